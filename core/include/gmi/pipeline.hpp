#pragma once
/// The two jobs of the engine, free of any transport: build a model's spec from its
/// samples, and identify the models behind query images. The CLI and the stage workers
/// are thin adapters over these.
/// Thread-safety: build_spec is reentrant; an Identifier is immutable after construction
/// and its const methods may be called from several threads.
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "gmi/encoder.hpp"
#include "gmi/interrogator.hpp"
#include "gmi/metric.hpp"
#include "gmi/rkme.hpp"
#include "gmi/scoring.hpp"
#include "gmi/segments.hpp"
#include "gmi/spec.hpp"

namespace gmi {

/// The fit options every path that builds a spec starts from (`gmi spec build`, the
/// upload pipeline's spec stage): r = 32, gamma = the image encoder's default (0), lambda
/// derived from gamma (-1). build_spec_from_embeddings resolves them, in one place, so
/// that specs built by different paths from the same samples are the same spec.
inline RkmeOptions default_spec_fit() {
  RkmeOptions o;
  o.gamma = 0;
  o.lambda = -1;
  return o;
}

struct SpecBuildOptions {
  RkmeOptions rkme = default_spec_fit();  ///< gamma <= 0: the encoder's; lambda < 0: derived
  int min_samples = 4;          ///< fewer usable samples -> InputError
  double downloads = 0;
  std::string card;
};

/// Embeds images and prompts and fits the spec. `images` and `prompts` are parallel.
/// Throws InputError (too few samples, bad options).
Spec build_spec(const std::string& model_id, const std::vector<Image>& images,
                const std::vector<std::string>& prompts, const ImageEncoder& image_encoder,
                const TextEncoder& text_encoder, const SpecBuildOptions& options,
                const RkmeProgress& progress = {});

/// Same, from embeddings already computed (rows of x and t are samples).
Spec build_spec_from_embeddings(const std::string& model_id, const RowMatrix& x, const RowMatrix& t,
                                const EncoderIdentity& image_id, const EncoderIdentity& text_id,
                                const SpecBuildOptions& options, const RkmeProgress& progress = {});

/// Joint-space weight of the prompt part when the caller gives none: chosen so that two
/// unrelated prompts (||t - t'||^2 = 2) scale the kernel by exp(-1/2) (see README).
double default_lambda(double gamma);

/// Which metric a ranking uses. auto: the store's metric when it has one, else one learnt
/// on the fly from the loaded specs (when there are enough of them), else none.
enum class MetricMode { kAuto, kNone, kStored, kLearn };
/// "auto" | "none" | "stored" | "learn"; InputError otherwise.
MetricMode parse_metric_mode(std::string_view name);
const char* to_string(MetricMode mode);

/// The metric for `specs` under `mode`. `stored` is the store's metric (nullopt: none).
/// Throws EncoderMismatchError when a stored metric is of another image encoder than the
/// specs, InputError when `stored` mode finds none or `learn` mode has too few specs.
/// Returns null for the raw space (none, or auto with too few specs to learn from).
std::shared_ptr<const Metric> choose_metric(MetricMode mode, std::optional<Metric> stored,
                                            const std::vector<Spec>& specs,
                                            const MetricOptions& options = {});

struct IdentifyOptions {
  ScoreOptions score;
  /// A hub-learned interrogator (neighbour, ridge), built from the specs. Other names
  /// (prompt-bank, captioner) need `interrogator_instance`, or prompts for every query.
  std::string interrogator = "neighbour";
  /// Used instead of `interrogator` when set (e.g. a prompt-bank interrogator).
  std::shared_ptr<const Interrogator> interrogator_instance;
  /// False: no interrogator at all (a score worker, whose queries bring their pseudo-prompts).
  bool build_interrogator = true;
  /// How the index holds its points; a hub-learned interrogator needs kF32.
  SpecStorage storage = SpecStorage::kF32;
  /// How the hub is searched: auto is exact below two_stage_from models, two-stage from
  /// there once its summary is built (prepare_search()); until then, and for scorers without
  /// an exact stage (mean, popularity), exact.
  SearchMode search = SearchMode::kAuto;
  std::size_t two_stage_from = 20000;
  SpecIndex::TwoStage two_stage;
};

/// One query's answer.
struct Identification {
  std::vector<RankedModel> results;
};

/// A hub loaded for identification: specs packed, interrogator built, encoders checked.
class Identifier {
 public:
  /// Throws EncoderMismatchError when the specs were made by other encoders than these,
  /// or the metric was learnt for another image encoder. Only the encoders' identities are
  /// needed (queries come embedded); the text encoder, when given, embeds prompts given in
  /// place of the interrogator's. With a metric, scoring and the hub-learned interrogators
  /// work in its mapped space.
  Identifier(std::vector<Spec> specs, EncoderIdentity image_encoder, EncoderIdentity text_encoder,
             std::shared_ptr<const TextEncoder> prompt_encoder, IdentifyOptions options,
             std::shared_ptr<const Metric> metric = nullptr, SpecSpace space = SpecSpace::kRaw);

  /// A hub held as segments (a score worker's shard, kept by a SegmentBuilder): no
  /// hub-learned interrogator unless it is one segment. The encoders are the serving ones
  /// (the hub may be empty); EncoderMismatchError when the hub's are others.
  Identifier(SegmentedIndex hub, EncoderIdentity image_encoder, EncoderIdentity text_encoder,
             std::shared_ptr<const TextEncoder> prompt_encoder, IdentifyOptions options);

  /// The hub as one packed index (InputError when it is held in several segments).
  const SpecIndex& index() const { return hub_.single(); }
  const SegmentedIndex& hub() const { return hub_; }
  /// Live models.
  std::size_t size() const { return hub_.size(); }
  /// The metric in use, null for the raw space.
  const std::shared_ptr<const Metric>& metric() const { return hub_.metric(); }
  const IdentifyOptions& options() const { return options_; }
  /// True when the two-stage search ranks this hub (for the scorers it serves) once
  /// prepare_search() has built its summary.
  bool two_stage() const { return two_stage_; }
  /// Builds the two-stage summary and returns its bytes (0, doing nothing, for an exact hub).
  /// Queries meanwhile rank exactly: a new snapshot can serve at once and switch when its
  /// summary is ready.
  std::size_t prepare_search() const;

  /// Ranks models for each row of `xs` (image embeddings). `prompts[i]`, when given and
  /// non-empty, is used as query i's pseudo-prompt instead of the interrogator's.
  std::vector<Identification> identify(const RowMatrix& xs,
                                       const std::vector<std::string>& prompts = {}) const {
    return rank(xs, pseudo_prompts(xs, prompts), options_.score);
  }

  /// The two halves of identify(), for the pipeline's interrogate and score stages.
  /// pseudo_prompts: one row per query (zeros when the scorer does not use prompts).
  RowMatrix pseudo_prompts(const RowMatrix& xs, const std::vector<std::string>& prompts = {}) const;
  std::vector<Identification> rank(const RowMatrix& xs, const RowMatrix& ts,
                                   const ScoreOptions& options) const;

 private:
  EncoderIdentity image_encoder_;
  EncoderIdentity text_encoder_;
  std::shared_ptr<const TextEncoder> prompt_encoder_;
  IdentifyOptions options_;
  SegmentedIndex hub_;
  bool two_stage_ = false;
  void finish_construction();
  std::shared_ptr<const Interrogator> interrogator_;  ///< null: queries must bring prompts
};

}  // namespace gmi
