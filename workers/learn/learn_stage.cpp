// learn: a "metric" job -> the hub's metric learnt from every spec in the store and stored
// as the next version (gmi/metric.hpp). The score and interrogate caches poll the version
// and swap the new metric in. Jobs come from the broker when an upload leaves the hub due
// (metric.min_models reached, or grown by metric.relearn_growth since the last version).
#include "../runtime/stages.hpp"
#include "gmi/encoder_registry.hpp"
#include "gmi/error.hpp"
#include "gmi/log.hpp"
#include "gmi/spec_store.hpp"

namespace gmi::workers {
namespace {

using nlohmann::json;

class LearnStage final : public Stage {
 public:
  explicit LearnStage(const Config& config)
      : store_uri_(spec_store_uri(config)),
        // Only the identity: which specs the metric is for; no weights are loaded.
        encoder_(image_encoder_info(config.get_string("encoder.image"), encoder_runtime(config)).identity),
        options_(metric_options(config)) {
    policy_.max_batch = 1;
    policy_.max_wait_ms = 0;
  }

  std::string name() const override { return "learn"; }
  BatchPolicy batch_policy() const override { return policy_; }

  std::vector<StageResult> process(std::vector<StageTask>& batch) override {
    std::vector<StageResult> out;
    for (auto& task : batch) out.push_back(learn(task));
    return out;
  }

 private:
  StageResult learn(const StageTask& task) {
    try {
      if (!store_) store_ = open_spec_store(store_uri_);
      // A job queued while the hub was due may find a version already learnt since (by
      // another job or `gmi hub learn-metric`): then there is nothing to do.
      const MetricStamp before = store_->metric_stamp();
      const auto asked = task.params.value("stamp_version", std::uint64_t{0});
      if (before.version > asked) {
        StageResult r;
        r.meta = {{"metric", {{"version", before.version}, {"models", before.models}}},
                  {"learnt", false},
                  {"note", "version " + std::to_string(before.version) + " was stored since the job was made"}};
        return r;
      }
      MetricLearnReport report = learn_store_metric(*store_, encoder_, options_);
      log::info("metric learnt", {{"job_id", task.job_id}, {"metric", report.metric.label()},
                                  {"models", report.metric.models}, {"skipped", report.skipped},
                                  {"seconds", report.seconds}});
      StageResult r;
      r.meta = {{"metric", report.metric.describe()}, {"learnt", true}, {"skipped", report.skipped},
                {"seconds", report.seconds}};
      return r;
    } catch (const MetricConflictError& e) {
      StageResult r;  // another learner stored first: the hub has a fresh metric either way
      r.meta = {{"learnt", false}, {"note", e.what()}};
      return r;
    } catch (const InputError& e) {
      return StageResult::failure(std::string("learn: ") + e.what(), false);
    } catch (const IoError& e) {
      store_.reset();
      return StageResult::failure(std::string("learn: ") + e.what(), true);
    }
  }

  BatchPolicy policy_;
  std::string store_uri_;
  EncoderIdentity encoder_;
  MetricOptions options_;
  std::unique_ptr<SpecStore> store_;
};

}  // namespace

MetricOptions metric_options(const Config& config) {
  MetricOptions o;
  o.dims = static_cast<int>(config.get_int("metric.dims"));
  o.shrinkage = config.get_double("metric.shrinkage");
  o.gamma_scale = config.get_double("metric.gamma_scale");
  o.min_models = static_cast<int>(config.get_int("metric.min_models"));
  validate(o);
  return o;
}

std::unique_ptr<Stage> make_learn_stage(const Config& config) {
  return std::make_unique<LearnStage>(config);
}

}  // namespace gmi::workers
