// The hub-learned metric: learning (within-model whitening, optional discriminant step)
// and the "gmimetric" v1 format. See gmi/metric.hpp and shared METHOD.md.
#include "gmi/metric.hpp"

#include <algorithm>
#include <cmath>
#include <cstdio>

#include <Eigen/Cholesky>
#include <Eigen/Eigenvalues>

#include "binary_io.hpp"
#include "clock.hpp"
#include "gmi/error.hpp"
#include "gmi/rkme.hpp"

namespace gmi {
namespace {

using Eigen::Index;

constexpr std::array<char, 8> kMagic = {'G', 'M', 'I', 'M', 'E', 'T', 'R', '\0'};
constexpr std::size_t kHeaderBytes = 16;
constexpr std::uint32_t kMaxJson = 1u << 20;
// Rows gathered before one float rank update into the double accumulators.
constexpr Index kFlushRows = 4096;

[[noreturn]] void fail(const std::string& what) { throw SpecFormatError("invalid metric: " + what); }

std::uint32_t crc_of_p(const RowMatrix& p) {
  std::vector<std::uint8_t> bytes;
  bytes.reserve(static_cast<std::size_t>(p.size()) * 4);
  binary::put_floats(bytes, p.data(), static_cast<std::size_t>(p.size()));
  return binary::crc32(bytes.data(), bytes.size());
}

// Adds rows' outer products (lower triangle) into acc, in float, then in double.
void rank_update(Eigen::MatrixXd& acc, const RowMatrix& rows, Index count) {
  if (count == 0) return;
  Eigen::MatrixXf part = Eigen::MatrixXf::Zero(acc.rows(), acc.cols());
  part.selfadjointView<Eigen::Lower>().rankUpdate(rows.topRows(count).transpose());
  acc.triangularView<Eigen::Lower>() += part.cast<double>();
}

}  // namespace

void validate(const MetricOptions& o) {
  if (!(o.shrinkage > 0) || !std::isfinite(o.shrinkage))
    throw InputError("metric: shrinkage must be a positive number (got " + std::to_string(o.shrinkage) + ")");
  if (o.dims < 0) throw InputError("metric: dims must be >= 0 (0 keeps every dimension)");
  if (!(o.gamma_scale > 0) || !std::isfinite(o.gamma_scale))
    throw InputError("metric: gamma_scale must be a positive number");
  if (o.min_models < 2) throw InputError("metric: min_models must be >= 2");
  if (o.gamma_sample < 16) throw InputError("metric: gamma_sample must be >= 16");
}

std::string Metric::checksum() const {
  char buf[16];
  std::snprintf(buf, sizeof buf, "%08x", crc_of_p(p));
  return std::string("crc32:") + buf;
}

std::string Metric::label() const {
  std::string out = version ? std::to_string(version) : std::string("local");
  if (version) out.insert(out.begin(), 'v');
  out += ' ';
  out += checksum();
  return out;
}

nlohmann::json Metric::describe() const {
  return {{"version", version},
          {"checksum", checksum()},
          {"image_encoder", image_encoder.str()},
          {"models", models},
          {"points", points},
          {"dim_in", dim_in()},
          {"dim_out", dim_out()},
          {"discriminant", discriminant},
          {"shrinkage", shrinkage},
          {"gamma", gamma},
          {"gamma_scale", gamma_scale},
          {"created_at", created_at}};
}

RowMatrix Metric::map(const RowMatrix& xs) const {
  if (xs.cols() != p.cols())
    throw InputError("metric: rows have dimension " + std::to_string(xs.cols()) + ", the metric maps " +
                     std::to_string(p.cols()));
  return xs * p.transpose();
}

nlohmann::json metric_stamp_json(const Metric* m) {
  if (!m) return nullptr;
  return {{"version", m->version}, {"checksum", m->checksum()}, {"dim", m->dim_out()}};
}

void check_metric_encoder(const Metric& metric, const EncoderIdentity& image_encoder) {
  if (!(metric.image_encoder == image_encoder))
    throw EncoderMismatchError("the hub's metric " + metric.label() + " was learnt for image encoder " +
                               metric.image_encoder.str() + ", the specs were made with " +
                               image_encoder.str() + " (learn a new one: gmi hub learn-metric)");
}

std::vector<std::uint8_t> serialize_metric(const Metric& m) {
  if (m.p.rows() < 1 || m.p.cols() != m.image_encoder.dim)
    throw InputError("serialize_metric: P is " + std::to_string(m.p.rows()) + "x" +
                     std::to_string(m.p.cols()) + ", the encoder's dim is " +
                     std::to_string(m.image_encoder.dim));
  nlohmann::ordered_json meta = {
      {"version", m.version},
      {"image_encoder",
       {{"name", m.image_encoder.name},
        {"version", m.image_encoder.version},
        {"dim", m.image_encoder.dim},
        {"default_gamma", m.image_encoder.default_gamma}}},
      {"models", m.models},
      {"points", m.points},
      {"dim_out", m.dim_out()},
      {"discriminant", m.discriminant},
      {"shrinkage", m.shrinkage},
      {"gamma", m.gamma},
      {"gamma_scale", m.gamma_scale},
      {"created_at", m.created_at},
      {"checksum", m.checksum()}};
  const std::string text = meta.dump();
  std::vector<std::uint8_t> out(kMagic.begin(), kMagic.end());
  binary::put_u32(out, kMetricFormatVersion);
  binary::put_u32(out, static_cast<std::uint32_t>(text.size()));
  out.insert(out.end(), text.begin(), text.end());
  out.resize(binary::pad_to_8(out.size()), 0);
  binary::put_floats(out, m.p.data(), static_cast<std::size_t>(m.p.size()));
  binary::put_u32(out, binary::crc32(out.data(), out.size()));
  return out;
}

Metric parse_metric(const std::uint8_t* data, std::size_t size) {
  if (size < kHeaderBytes + 4) fail("only " + std::to_string(size) + " bytes");
  if (!std::equal(kMagic.begin(), kMagic.end(), data)) fail("bad magic (not a gmimetric file)");
  const std::uint32_t format = binary::get_u32(data + 8);
  if (format != kMetricFormatVersion)
    fail("format version " + std::to_string(format) + " (this build reads " +
         std::to_string(kMetricFormatVersion) + ")");
  if (binary::crc32(data, size - 4) != binary::get_u32(data + size - 4)) fail("checksum mismatch");
  const std::uint32_t json_len = binary::get_u32(data + 12);
  if (json_len > kMaxJson || kHeaderBytes + json_len > size - 4) fail("metadata length out of range");
  nlohmann::json meta;
  try {
    meta = nlohmann::json::parse(data + kHeaderBytes, data + kHeaderBytes + json_len);
  } catch (const nlohmann::json::exception& e) {
    fail(std::string("metadata is not JSON: ") + e.what());
  }
  Metric m;
  try {
    const auto& enc = meta.at("image_encoder");
    m.version = meta.at("version").get<std::uint64_t>();
    m.image_encoder.name = enc.at("name").get<std::string>();
    m.image_encoder.version = enc.at("version").get<std::string>();
    m.image_encoder.dim = enc.at("dim").get<int>();
    m.image_encoder.default_gamma = enc.at("default_gamma").get<double>();
    m.models = meta.at("models").get<int>();
    m.points = meta.at("points").get<std::uint64_t>();
    m.discriminant = meta.at("discriminant").get<std::string>();
    m.shrinkage = meta.at("shrinkage").get<double>();
    m.gamma = meta.at("gamma").get<double>();
    m.gamma_scale = meta.at("gamma_scale").get<double>();
    m.created_at = meta.at("created_at").get<std::string>();
    const int k = meta.at("dim_out").get<int>();
    const int d = m.image_encoder.dim;
    if (d < 1 || k < 1 || k > d) fail("dim_out " + std::to_string(k) + " for dim " + std::to_string(d));
    const std::size_t start = binary::pad_to_8(kHeaderBytes + json_len);
    const std::size_t count = static_cast<std::size_t>(k) * static_cast<std::size_t>(d);
    if (start > size - 4 || (size - 4 - start) / 4 != count || (size - 4 - start) % 4 != 0)
      fail("P holds " + std::to_string((size - 4 - std::min(size - 4, start)) / 4) + " values, expected " +
           std::to_string(k) + "x" + std::to_string(d));
    m.p.resize(k, d);
    binary::get_floats(data + start, count, m.p.data());
    if (!m.p.allFinite()) fail("P has non-finite values");
    if (!(m.gamma > 0) || !std::isfinite(m.gamma)) fail("gamma must be positive");
    if (meta.contains("checksum") && meta["checksum"].get<std::string>() != m.checksum())
      fail("P does not match its checksum " + meta["checksum"].get<std::string>());
  } catch (const nlohmann::json::exception& e) {
    fail(std::string("metadata: ") + e.what());
  }
  return m;
}

bool metric_due(std::size_t models_now, const MetricStamp& stamp, int min_models, double growth) {
  if (models_now < static_cast<std::size_t>(std::max(min_models, 2))) return false;
  if (stamp.version == 0) return true;
  const auto learnt = static_cast<std::size_t>(std::max(stamp.models, 1));
  return models_now > learnt && static_cast<double>(models_now) >= static_cast<double>(learnt) * (1.0 + growth);
}

std::optional<MetricStamp> peek_metric_stamp(const std::uint8_t* data, std::size_t size) {
  if (size < kHeaderBytes || !std::equal(kMagic.begin(), kMagic.end(), data)) return std::nullopt;
  const std::uint32_t json_len = binary::get_u32(data + 12);
  if (json_len > kMaxJson || kHeaderBytes + json_len > size) return std::nullopt;
  try {
    const auto meta = nlohmann::json::parse(data + kHeaderBytes, data + kHeaderBytes + json_len);
    return MetricStamp{meta.at("version").get<std::uint64_t>(), meta.at("models").get<int>()};
  } catch (const nlohmann::json::exception&) {
    return std::nullopt;
  }
}

MetricLearner::MetricLearner(EncoderIdentity image_encoder, MetricOptions options)
    : encoder_(std::move(image_encoder)), options_(options) {
  validate(options_);
  const Index d = encoder_.dim;
  if (d < 1) throw InputError("metric: the encoder's dim must be >= 1");
  within_ = Eigen::MatrixXd::Zero(d, d);
  between_ = Eigen::MatrixXd::Zero(d, d);
  mean_sum_ = Eigen::VectorXd::Zero(d);
  pending_.resize(kFlushRows, d);
  sample_.resize(options_.gamma_sample, d);
}

void MetricLearner::flush() {
  rank_update(within_, pending_, pending_rows_);
  pending_rows_ = 0;
}

void MetricLearner::add(const Spec& spec) {
  if (!(spec.image_encoder == encoder_))
    throw EncoderMismatchError("metric: spec '" + spec.model_id + "' was made with image encoder " +
                               spec.image_encoder.str() + ", the metric is for " + encoder_.str());
  const Index d = encoder_.dim, r = spec.beta.size();
  if (spec.zx.rows() != r || spec.zx.cols() != d) throw SpecFormatError("spec '" + spec.model_id + "': zx shape");
  const Eigen::VectorXd beta = spec.beta.cast<double>().cwiseMax(0.0);
  const double total = beta.sum();
  if (r < 2 || !(total > 0) || (beta.array() > 0).count() < 2) return;
  const Eigen::VectorXd w = beta / total;
  const Eigen::RowVectorXd mu = (w.transpose() * spec.zx.cast<double>());
  for (Index j = 0; j < r; ++j) {
    if (w(j) <= 0) continue;
    if (pending_rows_ == kFlushRows) flush();
    pending_.row(pending_rows_++) =
        ((spec.zx.row(j).cast<double>() - mu) * std::sqrt(w(j))).cast<float>();
    // Reservoir sample of the raw points, for the median heuristic in the mapped space.
    ++seen_points_;
    if (sample_rows_ < sample_.rows()) {
      sample_.row(sample_rows_++) = spec.zx.row(j);
    } else {
      const std::uint64_t slot = rng_() % seen_points_;
      if (slot < static_cast<std::uint64_t>(sample_.rows())) sample_.row(static_cast<Index>(slot)) = spec.zx.row(j);
    }
  }
  const Eigen::VectorXd m = spec.mean_x.size() == d ? Eigen::VectorXd(spec.mean_x.cast<double>()) : Eigen::VectorXd(mu.transpose());
  between_.selfadjointView<Eigen::Lower>().rankUpdate(m);
  mean_sum_ += m;
  ++models_;
}

Metric MetricLearner::finish() {
  flush();
  if (models_ < options_.min_models)
    throw InputError("metric: " + std::to_string(models_) + " usable models (specs with >= 2 weighted reduced points); at least " +
                     std::to_string(options_.min_models) + " are needed to learn a metric");
  const Index d = encoder_.dim;
  const double m = models_;
  Eigen::MatrixXd sw = within_.selfadjointView<Eigen::Lower>();
  sw /= m;
  const double trace = sw.trace();
  sw.diagonal().array() += options_.shrinkage * std::max(trace, 1e-12) / static_cast<double>(d);
  Eigen::LLT<Eigen::MatrixXd> llt(sw);
  if (llt.info() != Eigen::Success) throw InputError("metric: the within-model scatter is not positive definite");
  // W = L^-1: ||W v||^2 = v' S_w^-1 v, a whitening of the within-model scatter.
  Eigen::MatrixXd w = Eigen::MatrixXd::Identity(d, d);
  llt.matrixL().solveInPlace(w);
  Metric out;
  out.image_encoder = encoder_;
  out.models = models_;
  out.points = seen_points_;
  out.shrinkage = options_.shrinkage;
  out.gamma_scale = options_.gamma_scale;
  out.created_at = detail::utc_now_iso8601();
  const int k = options_.dims == 0 ? static_cast<int>(d) : std::min<int>(options_.dims, static_cast<int>(d));
  if (k == d) {
    out.discriminant = "none";
    out.p = w.cast<float>();
  } else {
    // Between-model scatter of the means, whitened; keep its k leading directions.
    Eigen::MatrixXd sb = between_.selfadjointView<Eigen::Lower>();
    const Eigen::VectorXd mean = mean_sum_ / m;
    sb = sb / m - mean * mean.transpose();
    const Eigen::MatrixXd sbw = w * sb * w.transpose();
    Eigen::SelfAdjointEigenSolver<Eigen::MatrixXd> eig(sbw);
    if (eig.info() != Eigen::Success) throw InputError("metric: the discriminant step did not converge");
    // Eigen sorts ascending: the last k columns are the most separating directions.
    const Eigen::MatrixXd u = eig.eigenvectors().rightCols(k).rowwise().reverse();
    out.discriminant = "lda";
    out.p = (u.transpose() * w).cast<float>();
  }
  if (sample_rows_ < 2) throw InputError("metric: too few reduced points for a kernel width");
  out.gamma = options_.gamma_scale * median_heuristic_gamma(out.map(sample_.topRows(sample_rows_)));
  return out;
}

Metric learn_metric(const std::vector<Spec>& specs, const MetricOptions& options) {
  if (specs.empty()) throw InputError("metric: no specs to learn from");
  MetricLearner learner(specs.front().image_encoder, options);
  for (const auto& s : specs) learner.add(s);
  return learner.finish();
}

}  // namespace gmi
