// interrogate: image embedding -> pseudo-prompt embedding t^. The hub-learned interrogators
// (neighbour, ridge) read the whole hub's reduced points, kept fresh by a HubCache. A prompt
// given with the query replaces the interrogator's guess.
#include "../runtime/stages.hpp"
#include "gmi/error.hpp"
#include "gmi/wire.hpp"
#include "gmi/workers/hub_cache.hpp"
#include "gmi/workers/payload.hpp"

namespace gmi::workers {
namespace {

using nlohmann::json;

class InterrogateStage final : public Stage {
 public:
  explicit InterrogateStage(const Config& config) {
    policy_.max_batch = static_cast<int>(config.get_int("interrogate.max_batch", 1, 65536));
    policy_.max_wait_ms = static_cast<int>(config.get_int("interrogate.max_wait_ms", 0, 60000));
    make_interrogator_name_check(config.get_string("interrogate.interrogator"));
    hub_ = make_hub_cache(config, "interrogate", /*sharded=*/false);
  }

  std::string name() const override { return "interrogate"; }
  BatchPolicy batch_policy() const override { return policy_; }
  std::string not_ready_reason() const override { return hub_->not_ready_reason(); }

  std::vector<StageResult> process(std::vector<StageTask>& batch) override {
    std::vector<StageResult> out(batch.size());
    auto hub = hub_->current();
    if (!hub) {
      for (auto& r : out) r = StageResult::failure("interrogate: " + hub_->not_ready_reason(), true);
      return out;
    }
    const auto& index = hub->index();
    const int d = index.size() > 0 ? index.image_encoder().dim : 0;
    // Gather the usable queries into one matrix.
    std::vector<RowMatrix> xs(batch.size());
    std::vector<std::size_t> rows;
    std::vector<std::string> prompts;
    Eigen::Index total = 0;
    for (std::size_t i = 0; i < batch.size(); ++i) {
      try {
        const EncoderIdentity ie = encoder_from_json(batch[i].meta.value("image_encoder", json()), "image_encoder");
        const EncoderIdentity te = encoder_from_json(batch[i].meta.value("text_encoder", json()), "text_encoder");
        if (index.size() == 0) throw NotFoundError("the hub holds no specs yet");
        index.check_compatible(ie, te);
        xs[i] = rows_from(batch[i].frames, 0, 1, static_cast<std::size_t>(d), "image embedding");
        rows.push_back(i);
        prompts.push_back(batch[i].params.value("prompt", ""));
        total += 1;
      } catch (const InputError& e) {
        out[i] = StageResult::failure(std::string("interrogate: ") + e.what(), false);
      }
    }
    if (rows.empty()) return out;
    RowMatrix x(total, d);
    for (std::size_t k = 0; k < rows.size(); ++k) x.row(static_cast<Eigen::Index>(k)) = xs[rows[k]].row(0);
    const RowMatrix t = hub->pseudo_prompts(x, prompts);
    for (std::size_t k = 0; k < rows.size(); ++k) {
      StageTask& task = batch[rows[k]];
      StageResult& r = out[rows[k]];
      r.meta = task.meta;
      r.meta["interrogator"] = prompts[k].empty() ? hub->options().interrogator : "prompt";
      r.frames.push_back(std::move(task.frames[0]));
      r.frames.push_back(wire::pack_rows(t.middleRows(static_cast<Eigen::Index>(k), 1)));
    }
    return out;
  }

 private:
  static void make_interrogator_name_check(const std::string& name) {
    if (name != "neighbour" && name != "ridge") {
      throw InputError("interrogate.interrogator = \"" + name + "\": expected neighbour or ridge");
    }
  }

  BatchPolicy policy_;
  std::unique_ptr<HubCache> hub_;
};

}  // namespace

std::unique_ptr<Stage> make_interrogate_stage(const Config& config) {
  return std::make_unique<InterrogateStage>(config);
}

}  // namespace gmi::workers
