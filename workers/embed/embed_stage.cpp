// embed: the "pixels" slot -> "image_embeddings" (and, for uploads, "prompt_embeddings" of the
// prompts of the images that decoded; for queries that carry "captions", the captions
// embedded by the text encoder as "pseudo_prompts"). Batches count images across jobs: the
// broker's credit and the runtime's batches are in images (credit_slot "pixels"), and a
// batch's images go through the encoder in passes of at most embed.max_batch images, the
// images of different jobs sharing a pass, so only one pass's pixels are unpacked at a time.
#include "../runtime/stages.hpp"
#include "gmi/encoder_registry.hpp"
#include "gmi/error.hpp"
#include "gmi/ops.hpp"
#include "gmi/wire.hpp"
#include "gmi/workers/batching.hpp"
#include "gmi/workers/payload.hpp"

namespace gmi::workers {
namespace {

using nlohmann::json;

class EmbedStage final : public Stage {
 public:
  explicit EmbedStage(const Config& config)
      : image_encoder_(
            make_image_encoder(config.get_string("encoder.image"), encoder_runtime(config))),
        text_encoder_(
            make_text_encoder(config.get_string("encoder.text"), encoder_runtime(config))),
        pass_images_(
            prometheus::BuildHistogram()
                .Name("gmi_embed_pass_images")
                .Help("Images per encoder pass of an embed worker (at most embed.max_batch)")
                .Register(Metrics::instance().registry())
                .Add({}, Metrics::size_buckets())) {
    policy_.max_batch = static_cast<int>(config.get_int("embed.max_batch"));
    policy_.max_wait_ms = static_cast<int>(config.get_int("embed.max_wait_ms"));
    policy_.credit_slot = wire::slot::kPixels;
  }

  std::string name() const override { return "embed"; }
  BatchPolicy batch_policy() const override { return policy_; }
  std::vector<std::string> reads() const override {
    return {wire::slot::kPixels, wire::slot::kCaptions};
  }

  std::vector<StageResult> process(std::vector<StageTask>& batch) override {
    std::vector<StageResult> out(batch.size());
    // Check every task's slots first; a task whose payload is malformed fails alone.
    std::vector<const wire::Slot*> pixels(batch.size(), nullptr);
    std::vector<std::size_t> counts(batch.size(), 0);
    for (std::size_t i = 0; i < batch.size(); ++i) {
      try {
        pixels[i] = &batch[i].slots.get(wire::slot::kPixels, wire::SlotKind::kPixels);
        if (const wire::Slot* c = batch[i].slots.find(wire::slot::kCaptions)) {
          if (c->kind != wire::SlotKind::kText || c->frames.size() != image_count(*pixels[i])) {
            throw wire::SlotError("slot \"captions\" must be text with one caption per image (" +
                                  std::to_string(image_count(*pixels[i])) + ")");
          }
        }
        counts[i] = image_count(*pixels[i]);
      } catch (const InputError& e) {
        out[i] = StageResult::failure(std::string("embed: ") + e.what(), false);
        pixels[i] = nullptr;
      }
    }
    const int d = image_encoder_->identity().dim;
    std::vector<RowMatrix> x(batch.size());
    for (std::size_t i = 0; i < batch.size(); ++i) {
      x[i].resize(static_cast<Eigen::Index>(counts[i]), d);
    }
    for (const auto& pass : image_passes(counts, static_cast<std::size_t>(policy_.max_batch))) {
      std::vector<Image> images;
      for (const auto& r : pass) {
        for (std::size_t k = 0; k < r.count; ++k)
          images.push_back(image_at(*pixels[r.task], r.first + k));
      }
      pass_images_.Observe(static_cast<double>(images.size()));
      const RowMatrix e = image_encoder_->encode(images);
      Eigen::Index row = 0;
      for (const auto& r : pass) {
        x[r.task].middleRows(static_cast<Eigen::Index>(r.first),
                             static_cast<Eigen::Index>(r.count)) =
            e.middleRows(row, static_cast<Eigen::Index>(r.count));
        row += static_cast<Eigen::Index>(r.count);
      }
    }
    for (std::size_t i = 0; i < batch.size(); ++i) {
      if (pixels[i] == nullptr) continue;
      StageTask& task = batch[i];
      StageResult& r = out[i];
      r.slots.put(rows_slot(wire::slot::kImageEmbeddings, x[i], image_encoder_->identity()));
      if (task.kind == "upload") {
        // The prompts of the images that decoded, in order.
        const json prompts = task.params.value("prompts", json::array());
        std::vector<std::string> kept;
        for (std::size_t k = 0; k < counts[i]; ++k) {
          const std::size_t index = input_index(*pixels[i], k);
          kept.push_back(index < prompts.size() && prompts[index].is_string()
                             ? prompts[index].get<std::string>()
                             : std::string());
        }
        r.meta["prompts"] = kept;
        r.slots.put(rows_slot(wire::slot::kPromptEmbeddings, text_encoder_->encode(kept),
                              text_encoder_->identity()));
      } else if (task.slots.find(wire::slot::kCaptions) != nullptr) {
        // A captioning interrogator ran before: its captions (or the query's own prompt)
        // become the pseudo-prompts, in the text encoder's space.
        std::vector<std::string> texts = texts_of(task.slots, wire::slot::kCaptions);
        const std::string prompt = task.params.value("prompt", "");
        if (!prompt.empty()) {
          for (auto& t : texts) t = prompt;
          r.meta["interrogator"] = "prompt";
        }
        r.slots.put(rows_slot(wire::slot::kPseudoPrompts, text_encoder_->encode(texts),
                              text_encoder_->identity()));
      }
    }
    return out;
  }

 private:
  BatchPolicy policy_;
  std::unique_ptr<ImageEncoder> image_encoder_;
  std::unique_ptr<TextEncoder> text_encoder_;
  prometheus::Histogram& pass_images_;
};

}  // namespace

std::unique_ptr<Stage> make_embed_stage(const Config& config) {
  return std::make_unique<EmbedStage>(config);
}

}  // namespace gmi::workers
