// interrogate: a pseudo-prompt for each query image, by the interrogator that
// interrogate.interrogator names (core/include/gmi/interrogator.hpp):
//   neighbour, ridge  "image_embeddings" -> "pseudo_prompts", learnt from the hub's reduced
//                     points (kept fresh by a HubCache);
//   prompt-bank       "image_embeddings" -> "pseudo_prompts", a softmax mix of the prompts of
//                     interrogate.prompt_bank nearest in a shared (CLIP) space; the bank is
//                     embedded once, at start;
//   captioner         "pixels" -> "captions" (runs before embed, which embeds them).
// A prompt given with the query replaces the interrogator's guess.
#include <algorithm>

#include "../runtime/stages.hpp"
#include "gmi/encoder_registry.hpp"
#include "gmi/error.hpp"
#include "gmi/interrogator.hpp"
#include "gmi/log.hpp"
#include "gmi/wire.hpp"
#include "gmi/workers/batching.hpp"
#include "gmi/workers/hub_cache.hpp"
#include "gmi/workers/payload.hpp"

namespace gmi::workers {
namespace {

using nlohmann::json;

/// One way of interrogating a batch; each writes its result slot into `out` for the
/// tasks that have none yet (a failure already set is kept).
class Method {
 public:
  virtual ~Method() = default;
  virtual std::vector<std::string> reads() const = 0;
  virtual std::string not_ready_reason() const { return {}; }
  virtual void run(std::vector<StageTask>& batch, std::vector<StageResult>& out) = 0;
};

// The image embedding of each task (one row), checked against the expected encoder.
// Returns the rows of the usable tasks; the others get a failure.
RowMatrix gather_queries(std::vector<StageTask>& batch, std::vector<StageResult>& out,
                         const EncoderIdentity& image_encoder, std::vector<std::size_t>& usable) {
  std::vector<RowMatrix> xs(batch.size());
  for (std::size_t i = 0; i < batch.size(); ++i) {
    try {
      const EncoderIdentity ie = encoder_of(batch[i].slots, wire::slot::kImageEmbeddings);
      if (!(ie == image_encoder)) {
        throw EncoderMismatchError("the query was embedded by " + ie.str() +
                                   ", this interrogator works with " + image_encoder.str());
      }
      xs[i] = rows_of(batch[i].slots, wire::slot::kImageEmbeddings);
      if (xs[i].rows() != 1) {
        throw wire::SlotError("slot \"image_embeddings\" holds " + std::to_string(xs[i].rows()) +
                              " rows; a query has 1");
      }
      usable.push_back(i);
    } catch (const InputError& e) {
      out[i] = StageResult::failure(std::string("interrogate: ") + e.what(), false);
    }
  }
  RowMatrix x(static_cast<Eigen::Index>(usable.size()), image_encoder.dim);
  for (std::size_t k = 0; k < usable.size(); ++k)
    x.row(static_cast<Eigen::Index>(k)) = xs[usable[k]].row(0);
  return x;
}

class HubMethod final : public Method {
 public:
  explicit HubMethod(const Config& config)
      : hub_(make_hub_cache(config, "interrogate", /*sharded=*/false)) {}
  std::vector<std::string> reads() const override { return {wire::slot::kImageEmbeddings}; }
  std::string not_ready_reason() const override { return hub_->not_ready_reason(); }

  void run(std::vector<StageTask>& batch, std::vector<StageResult>& out) override {
    // Read-your-writes, as in score: the specs stored before this batch began are used.
    std::string stale;  // why there is no snapshot to use
    auto hub = hub_->current_fresh(std::chrono::seconds(10), stale);
    if (!hub) {
      for (auto& r : out) r = StageResult::failure("interrogate: " + stale, true);
      return;
    }
    const auto& index = hub->index();
    if (index.size() == 0) {
      for (auto& r : out)
        r = StageResult::failure("interrogate: the hub holds no specs yet", false);
      return;
    }
    std::vector<std::size_t> usable;
    const RowMatrix x = gather_queries(batch, out, index.image_encoder(), usable);
    if (usable.empty()) return;
    std::vector<std::string> prompts;
    for (std::size_t i : usable) prompts.push_back(batch[i].params.value("prompt", ""));
    const RowMatrix t = hub->pseudo_prompts(x, prompts);
    for (std::size_t k = 0; k < usable.size(); ++k) {
      StageResult& r = out[usable[k]];
      r.meta["interrogator"] = prompts[k].empty() ? hub->options().interrogator : "prompt";
      r.slots.put(rows_slot(wire::slot::kPseudoPrompts,
                            t.middleRows(static_cast<Eigen::Index>(k), 1), index.text_encoder()));
    }
  }

 private:
  std::unique_ptr<HubCache> hub_;
};

class PromptBankMethod final : public Method {
 public:
  explicit PromptBankMethod(const Config& config) {
    const EncoderRuntime rt = encoder_runtime(config);
    image_encoder_ = image_encoder_info(config.get_string("encoder.image"), rt).identity;
    text_ = make_text_encoder(config.get_string("encoder.text"), rt);
    if (text_->identity().dim != image_encoder_.dim) {
      throw InputError(
          "interrogate.interrogator = prompt-bank needs image and text encoders that share one "
          "(CLIP) space, but encoder.text " +
          text_->identity().str() + " has dim " + std::to_string(text_->identity().dim) +
          " and encoder.image " + image_encoder_.str() + " has dim " +
          std::to_string(image_encoder_.dim));
    }
    const std::string path = config.get_string("interrogate.prompt_bank");
    if (path.empty())
      throw InputError(
          "interrogate.interrogator = prompt-bank needs interrogate.prompt_bank (a file)");
    const std::vector<std::string> bank = read_prompt_bank(path);
    // Embedded once, here: the bank does not change while the stage runs.
    interrogator_ = make_prompt_bank_interrogator(
        text_->encode(bank), static_cast<int>(config.get_int("interrogate.top_k")),
        config.get_double("interrogate.bank_tau"));
    log::info(
        "prompt bank embedded",
        {{"file", path}, {"prompts", bank.size()}, {"text_encoder", text_->identity().str()}});
  }
  std::vector<std::string> reads() const override { return {wire::slot::kImageEmbeddings}; }

  void run(std::vector<StageTask>& batch, std::vector<StageResult>& out) override {
    std::vector<std::size_t> usable;
    const RowMatrix x = gather_queries(batch, out, image_encoder_, usable);
    if (usable.empty()) return;
    RowMatrix t = interrogator_->pseudo_prompts(x);
    for (std::size_t k = 0; k < usable.size(); ++k) {
      StageResult& r = out[usable[k]];
      const std::string prompt = batch[usable[k]].params.value("prompt", "");
      if (!prompt.empty()) t.row(static_cast<Eigen::Index>(k)) = text_->encode({prompt}).row(0);
      r.meta["interrogator"] = prompt.empty() ? "prompt-bank" : "prompt";
      r.slots.put(rows_slot(wire::slot::kPseudoPrompts,
                            t.middleRows(static_cast<Eigen::Index>(k), 1), text_->identity()));
    }
  }

 private:
  EncoderIdentity image_encoder_;
  std::unique_ptr<TextEncoder> text_;
  std::unique_ptr<Interrogator> interrogator_;
};

class CaptionerMethod final : public Method {
 public:
  explicit CaptionerMethod(const Config& config)
      : max_images_(config.get_int("interrogate.max_batch")) {
    const std::string card = config.get_string("interrogate.captioner");
    if (card.empty())
      throw InputError("interrogate.interrogator = captioner needs interrogate.captioner (a card)");
    captioner_ = make_captioner(card, encoder_runtime(config));
    log::info("captioner loaded", {{"captioner", captioner_->identity().str()}});
  }
  std::vector<std::string> reads() const override { return {wire::slot::kPixels}; }

  void run(std::vector<StageTask>& batch, std::vector<StageResult>& out) override {
    std::vector<const wire::Slot*> pixels(batch.size(), nullptr);
    std::vector<std::size_t> counts(batch.size(), 0);
    std::vector<std::vector<std::string>> captions(batch.size());
    for (std::size_t i = 0; i < batch.size(); ++i) {
      try {
        pixels[i] = &batch[i].slots.get(wire::slot::kPixels, wire::SlotKind::kPixels);
        counts[i] = image_count(*pixels[i]);
      } catch (const InputError& e) {
        out[i] = StageResult::failure(std::string("interrogate: ") + e.what(), false);
      }
    }
    for (const auto& pass : image_passes(counts, max_images_)) {
      std::vector<Image> images;
      for (const auto& r : pass) {
        for (std::size_t k = 0; k < r.count; ++k)
          images.push_back(image_at(*pixels[r.task], r.first + k));
      }
      std::vector<std::string> text = captioner_->caption(images);
      std::size_t at = 0;
      for (const auto& r : pass) {
        for (std::size_t k = 0; k < r.count; ++k)
          captions[r.task].push_back(std::move(text.at(at++)));
      }
    }
    for (std::size_t i = 0; i < batch.size(); ++i) {
      if (pixels[i] == nullptr) continue;
      out[i].meta["interrogator"] = "captioner";
      out[i].meta["captions"] = captions[i];
      out[i].slots.put(text_slot(wire::slot::kCaptions, captions[i]));
    }
  }

 private:
  std::size_t max_images_;
  std::unique_ptr<Captioner> captioner_;
};

class InterrogateStage final : public Stage {
 public:
  explicit InterrogateStage(const Config& config) {
    policy_.max_batch = static_cast<int>(config.get_int("interrogate.max_batch"));
    policy_.max_wait_ms = static_cast<int>(config.get_int("interrogate.max_wait_ms"));
    const std::string name = config.get_string("interrogate.interrogator");
    try {
      interrogator_input(name);
    } catch (const InputError& e) {
      throw InputError(std::string("interrogate.interrogator: ") + e.what());
    }
    if (hub_learned_interrogator(name)) {
      method_ = std::make_unique<HubMethod>(config);
    } else if (name == "prompt-bank") {
      method_ = std::make_unique<PromptBankMethod>(config);
    } else {
      method_ = std::make_unique<CaptionerMethod>(config);
      policy_.credit_slot = wire::slot::kPixels;
    }
  }

  std::string name() const override { return "interrogate"; }
  BatchPolicy batch_policy() const override { return policy_; }
  std::vector<std::string> reads() const override { return method_->reads(); }
  std::string not_ready_reason() const override { return method_->not_ready_reason(); }

  std::vector<StageResult> process(std::vector<StageTask>& batch) override {
    std::vector<StageResult> out(batch.size());
    method_->run(batch, out);
    return out;
  }

 private:
  BatchPolicy policy_;
  std::unique_ptr<Method> method_;
};

}  // namespace

std::unique_ptr<Stage> make_interrogate_stage(const Config& config) {
  return std::make_unique<InterrogateStage>(config);
}

}  // namespace gmi::workers
