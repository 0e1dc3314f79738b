// embed: decoded images -> image embeddings (and, for uploads, prompt embeddings). Batches
// across jobs: every image of every task in the batch goes through one encode() call, the
// shape the GPU path needs.
#include "../runtime/stages.hpp"
#include "gmi/encoder_registry.hpp"
#include "gmi/error.hpp"
#include "gmi/wire.hpp"
#include "gmi/workers/payload.hpp"

namespace gmi::workers {
namespace {

using nlohmann::json;

class EmbedStage final : public Stage {
 public:
  explicit EmbedStage(const Config& config)
      : image_encoder_(make_image_encoder(config.get_string("encoder.image"), encoder_runtime(config))),
        text_encoder_(make_text_encoder(config.get_string("encoder.text"), encoder_runtime(config))) {
    policy_.max_batch = static_cast<int>(config.get_int("embed.max_batch", 1, 65536));
    policy_.max_wait_ms = static_cast<int>(config.get_int("embed.max_wait_ms", 0, 60000));
  }

  std::string name() const override { return "embed"; }
  BatchPolicy batch_policy() const override { return policy_; }

  std::vector<StageResult> process(std::vector<StageTask>& batch) override {
    std::vector<StageResult> out(batch.size());
    // Unpack every task; a task whose payload is malformed fails alone.
    std::vector<Image> all;
    std::vector<std::size_t> first(batch.size(), 0), count(batch.size(), 0);
    std::vector<bool> usable(batch.size(), false);
    for (std::size_t i = 0; i < batch.size(); ++i) {
      try {
        auto images = images_from(batch[i].meta, batch[i].frames);
        first[i] = all.size();
        count[i] = images.size();
        for (auto& im : images) all.push_back(std::move(im));
        usable[i] = true;
      } catch (const InputError& e) {
        out[i] = StageResult::failure(std::string("embed: ") + e.what(), false);
      }
    }
    const RowMatrix x = image_encoder_->encode(all);
    for (std::size_t i = 0; i < batch.size(); ++i) {
      if (!usable[i]) continue;
      StageTask& task = batch[i];
      StageResult& r = out[i];
      RowMatrix xi = x.middleRows(static_cast<Eigen::Index>(first[i]), static_cast<Eigen::Index>(count[i]));
      r.meta = {{"rows", count[i]},
                {"image_encoder", encoder_to_json(image_encoder_->identity())},
                {"text_encoder", encoder_to_json(text_encoder_->identity())},
                {"skipped", task.meta.value("skipped", json::array())}};
      r.frames.push_back(wire::pack_rows(xi));
      if (task.kind == "upload") {
        // The prompts of the images that decoded, in order.
        const json prompts = task.params.value("prompts", json::array());
        std::vector<std::string> kept;
        for (const auto& im : task.meta["images"]) {
          const std::size_t index = im.value("index", std::size_t{0});
          kept.push_back(index < prompts.size() && prompts[index].is_string()
                             ? prompts[index].get<std::string>()
                             : std::string());
        }
        r.meta["prompts"] = kept;
        r.frames.push_back(wire::pack_rows(text_encoder_->encode(kept)));
      }
    }
    return out;
  }

 private:
  BatchPolicy policy_;
  std::unique_ptr<ImageEncoder> image_encoder_;
  std::unique_ptr<TextEncoder> text_encoder_;
};

}  // namespace

std::unique_ptr<Stage> make_embed_stage(const Config& config) {
  return std::make_unique<EmbedStage>(config);
}

}  // namespace gmi::workers
