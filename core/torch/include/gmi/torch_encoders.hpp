#pragma once
/// TorchScript encoders (LibTorch). This header is torch-free on purpose: only the
/// sources of gmi_torch include torch headers, so the rest of the tree compiles fast and
/// builds without LibTorch (-DGMI_TORCH=OFF).
/// Thread-safety: encode() may be called from several threads (calls are serialised
/// inside, as one module instance runs one batch at a time).
#include <memory>
#include <string>

#include "gmi/encoder.hpp"
#include "gmi/encoder_card.hpp"

namespace gmi {

struct TorchOptions {
  std::string device = "cpu";  ///< cpu | cuda | cuda:N
  int max_batch = 64;          ///< images per forward (halved on CUDA out-of-memory)
  bool fp16 = true;            ///< half precision on CUDA (never on CPU)
  int threads = 0;             ///< intra-op threads (0: keep LibTorch's default)
};

/// Loads the card's module (after verify_card_files) and checks it with a probe batch:
/// the outputs' count and channels must match the card's. Throws InputError naming the
/// file on any mismatch.
std::unique_ptr<ImageEncoder> load_torchscript_image_encoder(const EncoderCard& card, const TorchOptions& options);
std::unique_ptr<TextEncoder> load_torchscript_text_encoder(const EncoderCard& card, const TorchOptions& options);
std::unique_ptr<Captioner> load_torchscript_captioner(const EncoderCard& card, const TorchOptions& options);

/// The bare model's throughput, for benchmarks: forward() alone on a batch already on the
/// device (fp16 on CUDA when options.fp16), in inference mode, for about `seconds`.
double bare_forward_images_per_s(const EncoderCard& card, const TorchOptions& options, int batch, double seconds);

/// "LibTorch 1.13.1, CUDA available: no".
std::string torch_runtime_description();

}  // namespace gmi
