// Encoders by name. The one place that knows every backend: the built-in encoders,
// composite cards, and (in builds with LibTorch) TorchScript cards.
#include "gmi/encoder_registry.hpp"

#include <cstdlib>
#include <set>

#include "gmi/error.hpp"
#ifdef GMI_HAVE_TORCH
#include "gmi/torch_encoders.hpp"
#endif

namespace gmi {
namespace fs = std::filesystem;

fs::path default_encoder_dir() {
  if (const char* d = std::getenv("GMI_ENCODER_DIR"); d != nullptr && *d != '\0') return d;
  if (const char* x = std::getenv("XDG_DATA_HOME"); x != nullptr && *x != '\0') return fs::path(x) / "gmi" / "encoders";
  const char* home = std::getenv("HOME");
  return fs::path(home != nullptr && *home != '\0' ? home : "/tmp") / ".local" / "share" / "gmi" / "encoders";
}

#ifndef GMI_ENCODERS_ONLY
EncoderRuntime encoder_runtime(const Config& config) {
  EncoderRuntime rt;
  rt.encoder_dir = config.get_string("encoder.dir");
  rt.device = config.get_string("embed.device");
  rt.max_batch = static_cast<int>(config.get_int("embed.max_batch"));
  rt.fp16 = config.get_bool("embed.fp16");
  if (rt.device != "cpu" && rt.device != "cuda" && rt.device.rfind("cuda:", 0) != 0) {
    throw InputError("embed.device = \"" + rt.device + "\": must be cpu, cuda or cuda:N");
  }
  return rt;
}
#endif

bool torch_available() {
#ifdef GMI_HAVE_TORCH
  return true;
#else
  return false;
#endif
}

std::string torch_description() {
#ifdef GMI_HAVE_TORCH
  return torch_runtime_description();
#else
  return "not built with LibTorch (-DGMI_TORCH=OFF)";
#endif
}

namespace {

fs::path dir_of(const EncoderRuntime& rt) { return rt.encoder_dir.empty() ? default_encoder_dir() : rt.encoder_dir; }

bool is_builtin(const std::string& name) {
  return name == "builtin" || name == "gmi-style" || name == "gmi-text-hash";
}

// Every card a card depends on verifies (files and parts), recursively.
void verify_tree(const EncoderCard& card, std::set<std::string>& seen) {
  if (!seen.insert(card.path.string()).second) {
    throw InputError("encoder card " + card.path.string() + ": its parts refer back to it");
  }
  if (card.backend == "torchscript" && !torch_available()) {
    throw InputError("encoder card " + card.path.string() + " needs LibTorch, and this gmi is built without it");
  }
  verify_card_files(card);
  for (const auto& p : card.parts) {
    if (!is_builtin(p.encoder)) verify_tree(load_encoder_card(p.encoder), seen);
  }
}

EncoderIdentity composite_identity(const EncoderCard& card, const std::vector<EncoderIdentity>& parts) {
  // The parts' identities are part of the composite's: changing a part changes it.
  EncoderIdentity id = card.identity();
  for (const auto& p : parts) id.version += "+" + p.name + "/" + p.version;
  return id;
}

#ifdef GMI_HAVE_TORCH
TorchOptions torch_options(const EncoderRuntime& rt) {
  TorchOptions o;
  o.device = rt.device;
  o.max_batch = rt.max_batch;
  o.fp16 = rt.fp16;
  o.threads = rt.threads;
  return o;
}
#endif

}  // namespace

std::string resolve_encoder(const std::string& name, const EncoderRuntime& runtime, const char* modality) {
  if (name.empty()) throw InputError("an encoder name is empty");
  if (is_builtin(name)) return "builtin";
  if (name == "auto") {
    if (std::string(modality) != "image" || !torch_available()) return "builtin";
    const fs::path card = dir_of(runtime) / kDefaultCompositeEncoder / "card.json";
    if (!fs::exists(card)) return "builtin";
    try {
      std::set<std::string> seen;
      verify_tree(load_encoder_card(card), seen);
      return card.string();
    } catch (const InputError&) {
      return "builtin";  // a damaged install: the built-in encoder, as if none were there
    }
  }
  fs::path card = name;
  if (name.find('/') == std::string::npos && name.find(".json") == std::string::npos) {
    card = dir_of(runtime) / name / "card.json";
    if (!fs::exists(card)) {
      throw InputError("unknown encoder '" + name + "' (not builtin, auto, nor installed as " + card.string() + ")");
    }
  }
  const EncoderCard c = load_encoder_card(card);
  if (c.modality != modality) {
    throw InputError("encoder card " + c.path.string() + " is a " + c.modality + " card, not " + modality);
  }
  std::set<std::string> seen;
  verify_tree(c, seen);
  return c.path.string();
}

ImageEncoderInfo image_encoder_info(const std::string& name, const EncoderRuntime& runtime) {
  const std::string source = resolve_encoder(name, runtime, "image");
  ImageEncoderInfo info;
  info.source = source;
  if (source == "builtin") {
    const auto e = make_builtin_image_encoder();
    info.identity = e->identity();
    info.min_side = e->input_min_side();
    return info;
  }
  const EncoderCard card = load_encoder_card(source);
  if (card.backend == "composite") {
    std::vector<EncoderIdentity> ids;
    for (const auto& p : card.parts) {
      const ImageEncoderInfo part = image_encoder_info(p.encoder, runtime);
      ids.push_back(part.identity);
      info.min_side = std::max(info.min_side, part.min_side);
    }
    info.identity = composite_identity(card, ids);
    return info;
  }
  info.identity = card.identity();
  info.min_side = card.input.min_side;
  return info;
}

EncoderIdentity text_encoder_identity(const std::string& name, const EncoderRuntime& runtime) {
  const std::string source = resolve_encoder(name, runtime, "text");
  if (source == "builtin") return make_builtin_text_encoder()->identity();
  return load_encoder_card(source).identity();
}

std::unique_ptr<ImageEncoder> make_image_encoder(const std::string& name, const EncoderRuntime& runtime) {
  const std::string source = resolve_encoder(name, runtime, "image");
  if (source == "builtin") return make_builtin_image_encoder();
  const EncoderCard card = load_encoder_card(source);
  if (card.backend == "composite") {
    std::vector<WeightedEncoder> parts;
    std::vector<EncoderIdentity> ids;
    for (const auto& p : card.parts) {
      parts.push_back({make_image_encoder(p.encoder, runtime), p.weight});
      ids.push_back(parts.back().encoder->identity());
    }
    return make_composite_image_encoder(composite_identity(card, ids), std::move(parts));
  }
  if (card.backend == "builtin") return make_builtin_image_encoder();
#ifdef GMI_HAVE_TORCH
  return load_torchscript_image_encoder(card, torch_options(runtime));
#else
  throw InputError("encoder card " + card.path.string() + " needs LibTorch, and this gmi is built without it");
#endif
}

std::unique_ptr<TextEncoder> make_text_encoder(const std::string& name, const EncoderRuntime& runtime) {
  const std::string source = resolve_encoder(name, runtime, "text");
  if (source == "builtin") return make_builtin_text_encoder();
  const EncoderCard card = load_encoder_card(source);
  if (card.backend == "builtin") return make_builtin_text_encoder();
#ifdef GMI_HAVE_TORCH
  return load_torchscript_text_encoder(card, torch_options(runtime));
#else
  throw InputError("encoder card " + card.path.string() + " needs LibTorch, and this gmi is built without it");
#endif
}

std::unique_ptr<Captioner> make_captioner(const std::string& name, const EncoderRuntime& runtime) {
  if (name == "auto" || is_builtin(name)) throw InputError("there is no built-in captioner; give a captioner card");
  const std::string source = resolve_encoder(name, runtime, "captioner");
#ifdef GMI_HAVE_TORCH
  return load_torchscript_captioner(load_encoder_card(source), torch_options(runtime));
#else
  throw InputError("captioner card " + source + " needs LibTorch, and this gmi is built without it");
#endif
}

}  // namespace gmi
