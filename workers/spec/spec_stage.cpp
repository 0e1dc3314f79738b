// spec: an upload's embeddings -> a fitted spec, stored (put replaces atomically and bumps
// the store's generation and change log, which the score workers watch). It also says when
// the hub is due for a new metric (meta "metric_due"); the broker then makes a metric job.
#include "../runtime/stages.hpp"
#include "gmi/error.hpp"
#include "gmi/pipeline.hpp"
#include "gmi/spec_store.hpp"
#include "gmi/workers/payload.hpp"

namespace gmi::workers {
namespace {

using nlohmann::json;

class SpecStage final : public Stage {
 public:
  explicit SpecStage(const Config& config) : store_uri_(spec_store_uri(config)) {
    policy_.max_batch = static_cast<int>(config.get_int("spec.max_batch"));
    policy_.max_wait_ms = 0;
    min_samples_ = static_cast<int>(config.get_int("spec.min_samples"));
    auto_learn_ = config.get_bool("metric.auto_learn");
    min_models_ = static_cast<int>(config.get_int("metric.min_models"));
    growth_ = config.get_double("metric.relearn_growth");
  }

  std::string name() const override { return "spec"; }
  BatchPolicy batch_policy() const override { return policy_; }
  std::vector<std::string> reads() const override {
    return {wire::slot::kImageEmbeddings, wire::slot::kPromptEmbeddings};
  }

  std::vector<StageResult> process(std::vector<StageTask>& batch) override {
    std::vector<StageResult> out;
    for (auto& task : batch) out.push_back(build(task));
    return out;
  }

 private:
  StageResult build(const StageTask& task) {
    Spec spec;
    try {
      const EncoderIdentity ie = encoder_of(task.slots, wire::slot::kImageEmbeddings);
      const EncoderIdentity te = encoder_of(task.slots, wire::slot::kPromptEmbeddings);
      const RowMatrix x = rows_of(task.slots, wire::slot::kImageEmbeddings);
      const RowMatrix t = rows_of(task.slots, wire::slot::kPromptEmbeddings);
      if (x.cols() != ie.dim || t.cols() != te.dim || t.rows() != x.rows()) {
        throw wire::SlotError("slots \"image_embeddings\" (" + std::to_string(x.rows()) + " x " +
                              std::to_string(x.cols()) + ") and \"prompt_embeddings\" (" +
                              std::to_string(t.rows()) + " x " + std::to_string(t.cols()) +
                              ") do not fit their encoders or each other");
      }
      const std::size_t n = static_cast<std::size_t>(x.rows());
      SpecBuildOptions options;
      options.min_samples = min_samples_;
      options.downloads = task.params.value("downloads", 0.0);
      options.card = task.params.value("card", "");
      const std::string model = task.params.value("model_id", "");
      if (static_cast<int>(n) < min_samples_) {
        throw InputError("model '" + model + "' has " + std::to_string(n) + " usable samples; at least " +
                         std::to_string(min_samples_) + " are needed to build a spec");
      }
      spec = build_spec_from_embeddings(model, x, t, ie, te, options);
    } catch (const InputError& e) {
      return StageResult::failure(std::string("spec: ") + e.what(), false);
    }
    // The broker numbers uploads as it accepts them; a spec write is fenced by that number so
    // that a stale retry of an older upload never replaces a newer spec.
    const std::uint64_t seq = task.params.value("upload_seq", 0ull);
    std::uint64_t generation = 0;
    try {
      if (!store_) store_ = open_spec_store(store_uri_);
      if (seq > 0) {
        spec.extra["upload_seq"] = seq;
        const FencedPut put = store_->put_fenced(spec, seq);
        if (!put.stored) {
          return StageResult::failure("spec: a newer upload of model '" + spec.model_id + "' (upload " +
                                          std::to_string(put.stored_seq) + ") is stored already; this one (upload " +
                                          std::to_string(seq) + ") is superseded and was not stored",
                                      false);
        }
        generation = put.generation;
      } else {
        store_->put(spec);
      }
    } catch (const IoError& e) {
      store_.reset();
      return StageResult::failure(std::string("spec: cannot store the spec: ") + e.what(), true);
    }
    StageResult r;
    r.meta = {{"model", spec.model_id}, {"spec", spec_metadata(spec)},
              {"skipped", task.meta.value("skipped", json::array())}};
    if (generation > 0) r.meta["generation"] = generation;
    if (auto_learn_) {
      // The broker makes a metric job when the hub is due for a (new) metric. A store that
      // cannot say now only delays that to the next upload.
      try {
        const MetricStamp stamp = store_->metric_stamp();
        const std::size_t models = store_->count();
        if (metric_due(models, stamp, min_models_, growth_))
          r.meta["metric_due"] = {{"models", models}, {"stamp_version", stamp.version}, {"stamp_models", stamp.models}};
      } catch (const Error&) {
        store_.reset();
      }
    }
    return r;
  }

  BatchPolicy policy_;
  std::string store_uri_;
  int min_samples_ = 4;
  bool auto_learn_ = true;
  int min_models_ = 4;
  double growth_ = 0.25;
  std::unique_ptr<SpecStore> store_;
};

}  // namespace

std::unique_ptr<Stage> make_spec_stage(const Config& config) {
  return std::make_unique<SpecStage>(config);
}

}  // namespace gmi::workers
