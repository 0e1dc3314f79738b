#pragma once
/// A hub-learned metric (shared METHOD.md, "A hub-learned metric"): a linear map
/// P (k x d) learned from the hub's own specs that whitens the within-model scatter of
/// their reduced points, so that what varies inside one model (content) stops deciding the
/// ranking, and, when k < d, keeps the k whitened directions that separate the models'
/// means best (a discriminant step). Specs stay in the encoder's raw space; a SpecIndex
/// built with a metric scores in the mapped space, with the metric's own gamma.
///
/// Format "gmimetric" v1 (little-endian), described by schemas/metric.md:
///   magic "GMIMETR\0" (8 bytes) | u32 format_version | u32 json_length |
///   json metadata (UTF-8) | zero padding to 8 bytes | float32 P, k x d row-major |
///   u32 CRC-32 (IEEE) of every byte before it.
/// Thread-safety: value types; MetricLearner is not thread-safe; free functions are reentrant.
#include <cstdint>
#include <functional>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "gmi/encoder.hpp"
#include "gmi/linalg.hpp"
#include "gmi/spec.hpp"

namespace gmi {

inline constexpr std::uint32_t kMetricFormatVersion = 1;

struct MetricOptions {
  /// Shrinkage: S_w + shrinkage * tr(S_w) / d * I before whitening.
  double shrinkage = 1.0;
  /// k, the mapped dimension; 0 keeps all d (plain whitening, no discriminant step).
  int dims = 0;
  /// gamma in the mapped space = gamma_scale / median pairwise squared distance there.
  double gamma_scale = 0.05;
  /// At least this many models (with >= 2 reduced points) to learn anything.
  int min_models = 4;
  /// Reduced points kept (reservoir) for the median heuristic.
  int gamma_sample = 4000;
};

/// Checks the options; throws InputError naming the bad one.
void validate(const MetricOptions& options);

struct Metric {
  std::uint64_t version = 0;   ///< store-assigned, increasing; 0: learnt on the fly, never stored
  EncoderIdentity image_encoder;  ///< raw space P applies to (dim = d)
  int models = 0;              ///< models it was learnt from
  std::uint64_t points = 0;    ///< reduced points it was learnt from
  double shrinkage = 0;
  double gamma = 1;            ///< kernel width in the mapped space
  double gamma_scale = 0;
  std::string discriminant = "none";  ///< "none" (k = d) or "lda" (k < d)
  std::string created_at;      ///< ISO-8601 UTC
  RowMatrix p;                 ///< k x d

  int dim_in() const { return static_cast<int>(p.cols()); }
  int dim_out() const { return static_cast<int>(p.rows()); }
  /// "crc32:xxxxxxxx" of P's bytes: two metrics with the same checksum map alike.
  std::string checksum() const;
  /// "v<version>" or "local" (learnt on the fly), plus the checksum: for results and logs.
  std::string label() const;
  /// What results and `gmi hub metric` show: everything but P.
  nlohmann::json describe() const;
  /// Rows of xs (B x d) mapped: B x k.
  RowMatrix map(const RowMatrix& xs) const;
};

/// What a ranking's result says of the metric it used: {"version", "checksum", "dim"}, or
/// null for the encoder's raw space.
nlohmann::json metric_stamp_json(const Metric* metric);

/// Throws EncoderMismatchError unless the metric was learnt for this image encoder.
void check_metric_encoder(const Metric& metric, const EncoderIdentity& image_encoder);

std::vector<std::uint8_t> serialize_metric(const Metric& metric);
/// Throws SpecFormatError ("invalid metric: ...") on bad magic, version, checksum or shapes.
Metric parse_metric(const std::uint8_t* data, std::size_t size);
inline Metric parse_metric(const std::vector<std::uint8_t>& bytes) {
  return parse_metric(bytes.data(), bytes.size());
}

/// What identifies a stored metric without reading P.
struct MetricStamp {
  std::uint64_t version = 0;  ///< 0: no metric
  int models = 0;             ///< models it was learnt from
};

/// The stamp in a gmimetric blob's header and metadata, reading nothing after them
/// (nullopt when the bytes are not a metric header). For cheap polling of a stored metric.
std::optional<MetricStamp> peek_metric_stamp(const std::uint8_t* data, std::size_t size);

/// True when the hub, now `models_now` models, should learn a (new) metric: it has none
/// and at least min_models models, or it has grown by `growth` (0.25 = 25%) or more since
/// the stored one was learnt.
bool metric_due(std::size_t models_now, const MetricStamp& stamp, int min_models, double growth);
/// Bytes of a gmimetric file needed before its metadata can be peeked (the fixed header).
inline constexpr std::size_t kMetricHeaderBytes = 16;

/// Learns a metric one spec at a time (a hub need not be in memory at once): the
/// beta-weighted within-model scatter of the reduced points, each model centred on its own
/// weighted mean and weighing the same, and the between-model scatter of the sample means.
/// Memory: two d x d matrices of doubles plus a bounded sample of points.
class MetricLearner {
 public:
  explicit MetricLearner(EncoderIdentity image_encoder, MetricOptions options = {});
  /// Adds one model's spec. Throws EncoderMismatchError for a spec of another encoder.
  /// Specs with fewer than 2 reduced points of positive weight add nothing.
  void add(const Spec& spec);
  int models() const { return models_; }
  /// Throws InputError when fewer than options.min_models models were added.
  Metric finish();

 private:
  void flush();
  EncoderIdentity encoder_;
  MetricOptions options_;
  Eigen::MatrixXd within_, between_;
  Eigen::VectorXd mean_sum_;
  RowMatrix pending_;         // centred, sqrt(weight)-scaled rows not yet in within_
  Eigen::Index pending_rows_ = 0;
  RowMatrix sample_;          // reservoir of raw reduced points, for gamma (first sample_rows_ used)
  Eigen::Index sample_rows_ = 0;
  std::uint64_t seen_points_ = 0;
  std::mt19937_64 rng_{20261201};
  int models_ = 0;
};

/// Convenience: every spec of `specs` into one learner.
Metric learn_metric(const std::vector<Spec>& specs, const MetricOptions& options = {});

}  // namespace gmi
