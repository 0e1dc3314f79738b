#pragma once
/// Encoders by name: "builtin", "auto", an installed encoder's name, or a card's path.
///
/// "auto" is the default everywhere (CLI, service, demo): the composite encoder
/// (built-in descriptor + the pre-trained MobileNetV2's style statistics) when this build
/// has LibTorch and that encoder's card and files verify in the encoder folder; the
/// built-in encoder otherwise. A bare NAME is NAME/card.json in the encoder folder.
/// Thread-safety: all functions are reentrant; the encoders they return are documented
/// in gmi/encoder.hpp.
#include <filesystem>
#include <memory>
#include <string>

#include "gmi/config.hpp"
#include "gmi/encoder.hpp"
#include "gmi/encoder_card.hpp"

namespace gmi {

/// Where and how encoders run.
struct EncoderRuntime {
  std::filesystem::path encoder_dir;  ///< empty: default_encoder_dir()
  std::string device = "cpu";         ///< cpu | cuda | cuda:N
  int max_batch = 64;                 ///< images per forward pass
  bool fp16 = true;                   ///< half precision on CUDA
  int threads = 0;                    ///< intra-op threads on CPU (0: LibTorch's default)
};

/// The runtime from the configuration: encoder.dir, embed.device, embed.max_batch, embed.fp16.
EncoderRuntime encoder_runtime(const Config& config);

/// The name of the encoder "auto" picks when its card verifies.
inline constexpr const char* kDefaultCompositeEncoder = "gmi-style-mnv2";

/// $GMI_ENCODER_DIR, else ${XDG_DATA_HOME:-$HOME/.local/share}/gmi/encoders.
std::filesystem::path default_encoder_dir();

/// Whether this build can run TorchScript encoders.
bool torch_available();
/// "LibTorch 1.13.1 (cpu)" or "not built with LibTorch".
std::string torch_description();

/// What a process that loads no weights knows of an image encoder.
struct ImageEncoderInfo {
  std::string source;        ///< "builtin" or the card's path
  EncoderIdentity identity;
  int min_side = 0;          ///< the decoder keeps at least this shorter side
};

/// Resolves NAME ("auto", "builtin", a name or a card path) to "builtin" or a card path.
/// Throws InputError when a named card is missing or does not verify.
std::string resolve_encoder(const std::string& name, const EncoderRuntime& runtime, const char* modality);

/// Identity and geometry from the card alone (no weights loaded).
ImageEncoderInfo image_encoder_info(const std::string& name, const EncoderRuntime& runtime = {});
EncoderIdentity text_encoder_identity(const std::string& name, const EncoderRuntime& runtime = {});

/// Loads the encoder (its weights, for TorchScript cards). Throws InputError with the
/// file's name on a missing file, a checksum mismatch or a module of the wrong shape.
std::unique_ptr<ImageEncoder> make_image_encoder(const std::string& name, const EncoderRuntime& runtime = {});
std::unique_ptr<TextEncoder> make_text_encoder(const std::string& name, const EncoderRuntime& runtime = {});

/// A captioner from its card (modality "captioner": a TorchScript module image -> token
/// ids, and the tokenizer's merges file). Throws InputError as make_image_encoder does.
std::unique_ptr<Captioner> make_captioner(const std::string& name, const EncoderRuntime& runtime = {});

}  // namespace gmi
