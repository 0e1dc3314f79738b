// score: the "image_embeddings" and "pseudo_prompts" slots -> the ranked models of this
// worker's shard (a scorer that ignores prompts needs no pseudo_prompts), and the metric
// version they were ranked with (the broker merges shards only when they agree). All queries of a batch that
// share scorer and top are ranked with one rank_batch (a GEMM over the packed specs).
#include <map>

#include "../runtime/stages.hpp"
#include "gmi/error.hpp"
#include "gmi/workers/hub_cache.hpp"
#include "gmi/workers/payload.hpp"

namespace gmi::workers {
namespace {

using nlohmann::json;

class ScoreStage final : public Stage {
 public:
  explicit ScoreStage(const Config& config) {
    policy_.max_batch = static_cast<int>(config.get_int("score.max_batch"));
    policy_.max_wait_ms = static_cast<int>(config.get_int("score.max_wait_ms"));
    default_scorer_ = parse_scorer(config.get_string("score.scorer"));
    hub_ = make_hub_cache(config, "score", /*sharded=*/true);
  }

  std::string name() const override { return "score"; }
  BatchPolicy batch_policy() const override { return policy_; }
  std::string not_ready_reason() const override { return hub_->not_ready_reason(); }
  int shard() const override { return hub_->options().shard; }
  int shards() const override { return hub_->options().shards; }
  std::vector<std::string> reads() const override {
    return {wire::slot::kImageEmbeddings, wire::slot::kPseudoPrompts};
  }

  std::vector<StageResult> process(std::vector<StageTask>& batch) override {
    std::vector<StageResult> out(batch.size());
    // Read-your-writes: every spec stored before this batch began is in the snapshot used.
    std::string stale;  // why there is no snapshot to use
    auto hub = hub_->current_fresh(std::chrono::seconds(10), stale);
    if (!hub) {
      for (auto& r : out) r = StageResult::failure("score: " + stale, true);
      return out;
    }
    const SegmentedIndex& index = hub->hub();
    // Group by (scorer, top): each group is one batched ranking.
    std::map<std::pair<int, int>, std::vector<std::size_t>> groups;
    std::vector<RowMatrix> xs(batch.size()), ts(batch.size());
    for (std::size_t i = 0; i < batch.size(); ++i) {
      try {
        const StageTask& task = batch[i];
        const Scorer scorer = task.params.contains("scorer")
                                  ? parse_scorer(task.params["scorer"].get<std::string>())
                                  : default_scorer_;
        const int top = task.params.value("top", 10);
        if (index.size() > 0) {
          const bool prompts = scorer == Scorer::kWeighted;
          const EncoderIdentity ie = encoder_of(task.slots, wire::slot::kImageEmbeddings);
          const EncoderIdentity te =
              prompts ? encoder_of(task.slots, wire::slot::kPseudoPrompts) : index.text_encoder();
          index.check_compatible(ie, te);
          xs[i] = rows_of(task.slots, wire::slot::kImageEmbeddings);
          ts[i] = prompts ? rows_of(task.slots, wire::slot::kPseudoPrompts)
                          : RowMatrix::Zero(1, index.text_encoder().dim);
          if (xs[i].rows() != 1 || xs[i].cols() != index.image_encoder().dim || ts[i].rows() != 1 ||
              ts[i].cols() != index.text_encoder().dim) {
            throw wire::SlotError("slots \"image_embeddings\" / \"pseudo_prompts\" must hold one row each of " +
                                  std::to_string(index.image_encoder().dim) + " / " +
                                  std::to_string(index.text_encoder().dim) + " values");
          }
        }
        groups[{static_cast<int>(scorer), top}].push_back(i);
      } catch (const InputError& e) {
        out[i] = StageResult::failure(std::string("score: ") + e.what(), false);
      }
    }
    for (const auto& [key, members] : groups) {
      ScoreOptions options = hub->options().score;
      options.scorer = static_cast<Scorer>(key.first);
      options.top_k = key.second;
      std::vector<Identification> ranked(members.size());
      if (index.size() > 0) {
        const Eigen::Index n = static_cast<Eigen::Index>(members.size());
        RowMatrix x(n, index.image_encoder().dim), t(n, index.text_encoder().dim);
        for (Eigen::Index k = 0; k < n; ++k) {
          x.row(k) = xs[members[static_cast<std::size_t>(k)]].row(0);
          t.row(k) = ts[members[static_cast<std::size_t>(k)]].row(0);
        }
        ranked = hub->rank(x, t, options);
      }
      for (std::size_t k = 0; k < members.size(); ++k) {
        json results = json::array();
        const auto& list = ranked[k].results;
        for (std::size_t j = 0; j < list.size(); ++j) {
          results.push_back({{"rank", j + 1}, {"model", list[j].model}, {"score", list[j].score}});
        }
        StageResult& r = out[members[k]];
        r.meta = {{"results", std::move(results)},
                  {"scorer", to_string(options.scorer)},
                  {"ascending", ascending(options.scorer)},
                  {"models", index.size()},
                  {"shard", shard()},
                  {"metric", metric_stamp_json(hub->metric().get())}};
      }
    }
    return out;
  }

 private:
  BatchPolicy policy_;
  Scorer default_scorer_ = Scorer::kWeighted;
  std::unique_ptr<HubCache> hub_;
};

}  // namespace

std::unique_ptr<Stage> make_score_stage(const Config& config) {
  return std::make_unique<ScoreStage>(config);
}

}  // namespace gmi::workers
