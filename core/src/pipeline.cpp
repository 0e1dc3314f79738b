#include "gmi/pipeline.hpp"

#include <chrono>
#include <cmath>
#include <ctime>

#include "clock.hpp"
#include "gmi/error.hpp"

namespace gmi {

double default_lambda(double gamma) { return std::sqrt(0.25 / gamma); }

using detail::utc_now_iso8601;

Spec build_spec_from_embeddings(const std::string& model_id, const RowMatrix& x, const RowMatrix& t,
                                const EncoderIdentity& image_id, const EncoderIdentity& text_id,
                                const SpecBuildOptions& options, const RkmeProgress& progress) {
  validate_model_id(model_id);
  if (x.rows() < options.min_samples) {
    throw InputError("model '" + model_id + "' has " + std::to_string(x.rows()) +
                     " usable samples; at least " + std::to_string(options.min_samples) +
                     " are needed to build a spec");
  }
  RkmeOptions rk = options.rkme;
  if (rk.gamma <= 0) rk.gamma = image_id.default_gamma;
  if (rk.lambda < 0) rk.lambda = default_lambda(rk.gamma);
  ReducedSet rs = fit_rkme(x, t, rk, progress);
  Spec s;
  s.model_id = model_id;
  s.image_encoder = image_id;
  s.text_encoder = text_id;
  s.n = static_cast<int>(x.rows());
  s.gamma = rk.gamma;
  s.lambda = rk.lambda;
  s.residual_mmd2 = rs.residual_mmd2;
  s.zx = std::move(rs.zx);
  s.zt = std::move(rs.zt);
  s.beta = std::move(rs.beta);
  s.gram_x = gaussian_gram(s.zx, s.gamma);
  s.mean_x = x.colwise().mean().transpose();
  s.downloads = options.downloads;
  s.card = options.card;
  s.created_at = utc_now_iso8601();
  s.extra["fit"] = {{"iterations", rs.iterations}, {"initial_mmd2", rs.initial_mmd2},
                    {"reduced_size_requested", options.rkme.reduced_size}};
  validate(s);
  return s;
}

Spec build_spec(const std::string& model_id, const std::vector<Image>& images,
                const std::vector<std::string>& prompts, const ImageEncoder& image_encoder,
                const TextEncoder& text_encoder, const SpecBuildOptions& options,
                const RkmeProgress& progress) {
  if (images.size() != prompts.size())
    throw InputError("build_spec: " + std::to_string(images.size()) + " images but " +
                     std::to_string(prompts.size()) + " prompts");
  validate_model_id(model_id);
  if (static_cast<int>(images.size()) < options.min_samples) {
    throw InputError("model '" + model_id + "' has " + std::to_string(images.size()) +
                     " usable samples; at least " + std::to_string(options.min_samples) +
                     " are needed to build a spec");
  }
  return build_spec_from_embeddings(model_id, image_encoder.encode(images), text_encoder.encode(prompts),
                                    image_encoder.identity(), text_encoder.identity(), options,
                                    progress);
}

MetricMode parse_metric_mode(std::string_view name) {
  for (MetricMode m : {MetricMode::kAuto, MetricMode::kNone, MetricMode::kStored, MetricMode::kLearn})
    if (name == to_string(m)) return m;
  throw InputError("unknown metric mode '" + std::string(name) + "' (expected auto, none, stored or learn)");
}

const char* to_string(MetricMode mode) {
  switch (mode) {
    case MetricMode::kAuto:
      return "auto";
    case MetricMode::kNone:
      return "none";
    case MetricMode::kStored:
      return "stored";
    case MetricMode::kLearn:
      return "learn";
  }
  return "unknown";
}

std::shared_ptr<const Metric> choose_metric(MetricMode mode, std::optional<Metric> stored,
                                            const std::vector<Spec>& specs, const MetricOptions& options) {
  if (mode == MetricMode::kNone || specs.empty()) return nullptr;
  if (mode != MetricMode::kLearn && stored) {
    check_metric_encoder(*stored, specs.front().image_encoder);
    return std::make_shared<const Metric>(std::move(*stored));
  }
  if (mode == MetricMode::kStored)
    throw InputError("the store has no metric (learn one: gmi hub learn-metric, or use --metric auto)");
  if (mode == MetricMode::kLearn) return std::make_shared<const Metric>(learn_metric(specs, options));
  try {
    return std::make_shared<const Metric>(learn_metric(specs, options));
  } catch (const EncoderMismatchError&) {
    throw;
  } catch (const InputError&) {
    return nullptr;  // auto: too few usable models to learn from; rank in the raw space
  }
}

Identifier::Identifier(std::vector<Spec> specs, EncoderIdentity image_encoder, EncoderIdentity text_encoder,
                       std::shared_ptr<const TextEncoder> prompt_encoder, IdentifyOptions options,
                       std::shared_ptr<const Metric> metric, SpecSpace space)
    : image_encoder_(std::move(image_encoder)),
      text_encoder_(std::move(text_encoder)),
      prompt_encoder_(std::move(prompt_encoder)),
      options_(std::move(options)),
      hub_(std::make_shared<const SpecIndex>(std::move(specs), std::move(metric), space, options_.storage)) {
  finish_construction();
}

Identifier::Identifier(SegmentedIndex hub, EncoderIdentity image_encoder, EncoderIdentity text_encoder,
                       std::shared_ptr<const TextEncoder> prompt_encoder, IdentifyOptions options)
    : image_encoder_(std::move(image_encoder)),
      text_encoder_(std::move(text_encoder)),
      prompt_encoder_(std::move(prompt_encoder)),
      options_(std::move(options)),
      hub_(std::move(hub)) {
  finish_construction();
}

void Identifier::finish_construction() {
  if (prompt_encoder_ && !(prompt_encoder_->identity() == text_encoder_)) {
    throw EncoderMismatchError("the prompt encoder is " + prompt_encoder_->identity().str() + ", not " +
                               text_encoder_.str());
  }
  if (hub_.size() > 0) hub_.check_compatible(image_encoder_, text_encoder_);
  two_stage_ = options_.search == SearchMode::kTwoStage ||
               (options_.search == SearchMode::kAuto && hub_.size() >= options_.two_stage_from);
  if (!options_.build_interrogator) {
    // Queries bring their pseudo-prompts (pseudo_prompts() then needs prompts given).
  } else if (options_.interrogator_instance) {
    interrogator_ = options_.interrogator_instance;
  } else if (hub_learned_interrogator(options_.interrogator)) {
    if (options_.storage != SpecStorage::kF32)
      throw InputError("the " + options_.interrogator + " interrogator learns from float32 points; this hub is held as " +
                       to_string(options_.storage));
    interrogator_ = make_interrogator(options_.interrogator, hub_.single());
  } else {
    interrogator_input(options_.interrogator);  // InputError for an unknown name
  }
}

std::size_t Identifier::prepare_search() const {
  return two_stage_ && hub_.size() > 0 ? hub_.prepare(SegmentSearch{true, options_.two_stage}) : 0;
}

RowMatrix Identifier::pseudo_prompts(const RowMatrix& xs,
                                     const std::vector<std::string>& prompts) const {
  if (options_.score.scorer != Scorer::kWeighted || hub_.size() == 0 || xs.rows() == 0) {
    return RowMatrix::Zero(xs.rows(), text_encoder_.dim);
  }
  std::vector<std::string> given;
  std::vector<Eigen::Index> rows;
  for (size_t i = 0; i < prompts.size() && i < static_cast<size_t>(xs.rows()); ++i)
    if (!prompts[i].empty()) {
      given.push_back(prompts[i]);
      rows.push_back(static_cast<Eigen::Index>(i));
    }
  if (!interrogator_ && given.size() != static_cast<size_t>(xs.rows())) {
    throw InputError("the " + options_.interrogator +
                     " interrogator does not work from image embeddings; give every query a prompt");
  }
  RowMatrix ts = interrogator_ ? interrogator_->pseudo_prompts(xs) : RowMatrix::Zero(xs.rows(), text_encoder_.dim);
  if (!given.empty()) {
    if (!prompt_encoder_) throw InputError("this process embeds no prompts (it has no text encoder)");
    RowMatrix pt = prompt_encoder_->encode(given);
    for (size_t k = 0; k < rows.size(); ++k) ts.row(rows[k]) = pt.row(static_cast<Eigen::Index>(k));
  }
  return ts;
}

std::vector<Identification> Identifier::rank(const RowMatrix& xs, const RowMatrix& ts,
                                             const ScoreOptions& options) const {
  std::vector<Identification> out(static_cast<size_t>(xs.rows()));
  if (xs.rows() == 0 || hub_.size() == 0) return out;
  // Two-stage only on segments whose summary is built: a query never waits for the build.
  auto ranked = hub_.rank_batch(xs, ts, options, SegmentSearch{two_stage_, options_.two_stage});
  for (size_t i = 0; i < out.size(); ++i) out[i].results = std::move(ranked[i]);
  return out;
}

}  // namespace gmi
