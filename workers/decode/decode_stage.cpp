// decode: the "images" slot (image bytes) -> the "pixels" slot (RGB8 at the encoder's input
// size, JPEG DCT-scaled).
// A query's bad image fails its job with the decoder's reason; an upload keeps the images
// that decode and lists the others in meta.skipped.
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <span>
#include <thread>
#include <chrono>

#include "../runtime/stages.hpp"
#include "gmi/encoder_registry.hpp"
#include "gmi/error.hpp"
#include "gmi/image.hpp"
#include "gmi/log.hpp"
#include "gmi/workers/payload.hpp"

namespace gmi::workers {
namespace {

using nlohmann::json;

class DecodeStage final : public Stage {
 public:
  explicit DecodeStage(const Config& config) {
    policy_.max_batch = static_cast<int>(config.get_int("decode.max_batch"));
    policy_.max_wait_ms = static_cast<int>(config.get_int("decode.max_wait_ms"));
    options_.max_pixels = static_cast<std::uint64_t>(config.get_int("decode.max_pixels"));
    options_.max_bytes = static_cast<std::size_t>(config.get_int("decode.max_bytes"));
    // The encoder's card alone says how small an image may be decoded; no weights load here.
    options_.target_min_side =
        image_encoder_info(config.get_string("encoder.image"), encoder_runtime(config)).min_side;
    // A captioner sees the decoded pixels too: keep what its card asks for as well.
    if (config.get_string("interrogate.interrogator") == "captioner") {
      const EncoderRuntime rt = encoder_runtime(config);
      const EncoderCard card =
          load_encoder_card(resolve_encoder(config.get_string("interrogate.captioner"), rt, "captioner"));
      options_.target_min_side = std::max(options_.target_min_side, card.input.min_side);
    }
    // Fault injection for the crash tests: a worker that meets this byte string dies
    // (abort), as a decoder bug would make it. Unset in production.
    if (const char* m = std::getenv("GMI_FAULT_ABORT_ON"); m != nullptr && *m != '\0') abort_on_ = m;
    // ... and one that meets this one hangs (600 s), as a decoder stuck in a loop would.
    if (const char* m = std::getenv("GMI_FAULT_HANG_ON"); m != nullptr && *m != '\0') hang_on_ = m;
  }

  std::string name() const override { return "decode"; }
  BatchPolicy batch_policy() const override { return policy_; }
  std::vector<std::string> reads() const override { return {wire::slot::kImages}; }

  std::vector<StageResult> process(std::vector<StageTask>& batch) override {
    std::vector<StageResult> out;
    out.reserve(batch.size());
    for (auto& task : batch) out.push_back(decode_task(task));
    return out;
  }

 private:
  StageResult decode_task(const StageTask& task) {
    const wire::Slot* input = nullptr;
    try {
      input = &task.slots.get(wire::slot::kImages, wire::SlotKind::kImageBytes);
    } catch (const InputError& e) {
      return StageResult::failure(std::string("decode: ") + e.what(), false);
    }
    StageResult r;
    PixelsWriter pixels;
    json skipped = json::array();
    std::string first_error;
    for (std::size_t i = 0; i < input->frames.size(); ++i) {
      const std::string& bytes = input->frames[i];
      maybe_abort(bytes);
      maybe_hang(bytes);
      try {
        Image im = decode_image(std::span(reinterpret_cast<const std::uint8_t*>(bytes.data()), bytes.size()),
                                options_);
        pixels.add(im, i);
      } catch (const DecodeError& e) {
        const std::string why = std::string(to_string(e.failure())) + ": " + e.what();
        if (first_error.empty()) first_error = why;
        skipped.push_back({{"index", i}, {"error", why}});
      }
    }
    if (task.kind == "query" && pixels.slot.frames.empty()) {
      return StageResult::failure("the query image cannot be decoded (" + first_error + ")", false);
    }
    if (pixels.slot.frames.empty()) {
      return StageResult::failure("none of the " + std::to_string(input->frames.size()) +
                                      " images could be decoded; the first: " + first_error,
                                  false);
    }
    r.meta = {{"skipped", std::move(skipped)}};
    r.slots.put(std::move(pixels.slot));
    return r;
  }

  void maybe_hang(const std::string& bytes) const {
    if (!hang_on_.empty() && bytes.find(hang_on_) != std::string::npos) {
      log::error("fault injection: hanging on a marked image (GMI_FAULT_HANG_ON)");
      std::this_thread::sleep_for(std::chrono::seconds(600));
    }
  }

  void maybe_abort(const std::string& bytes) const {
    if (!abort_on_.empty() && bytes.find(abort_on_) != std::string::npos) {
      log::error("fault injection: aborting on a marked image (GMI_FAULT_ABORT_ON)");
      std::abort();
    }
  }

  BatchPolicy policy_;
  DecodeOptions options_;
  std::string abort_on_, hang_on_;
};

}  // namespace

std::unique_ptr<Stage> make_decode_stage(const Config& config) {
  return std::make_unique<DecodeStage>(config);
}

}  // namespace gmi::workers
