#include "gmi/workers/payload.hpp"

#include <cstring>

#include "gmi/error.hpp"
#include "gmi/wire.hpp"

namespace gmi::workers {

using nlohmann::json;
using wire::Slot;
using wire::SlotError;
using wire::SlotKind;

json encoder_to_json(const EncoderIdentity& id) {
  return json{{"name", id.name},
              {"version", id.version},
              {"dim", id.dim},
              {"default_gamma", id.default_gamma}};
}

EncoderIdentity encoder_from_json(const json& j, const std::string& what) {
  if (!j.is_object() || !j.contains("name") || !j.contains("version") || !j.contains("dim") ||
      !j["name"].is_string() || !j["version"].is_string() || !j["dim"].is_number_integer()) {
    throw InputError(what + " is not an encoder identity {name, version, dim}");
  }
  EncoderIdentity id;
  id.name = j["name"].get<std::string>();
  id.version = j["version"].get<std::string>();
  id.dim = j["dim"].get<int>();
  id.default_gamma = j.value("default_gamma", 1.0);
  return id;
}

void PixelsWriter::add(const Image& image, std::size_t index) {
  slot.info["images"].push_back(
      {{"index", index}, {"width", image.width}, {"height", image.height}});
  slot.frames.emplace_back(reinterpret_cast<const char*>(image.rgb.data()), image.rgb.size());
}

std::size_t image_count(const Slot& pixels) { return pixels.frames.size(); }

Image image_at(const Slot& pixels, std::size_t i) {
  // Slots::read checked the sizes against width x height x 3.
  const json& im = pixels.info["images"][i];
  Image out;
  out.width = im["width"].get<int>();
  out.height = im["height"].get<int>();
  out.rgb.assign(pixels.frames[i].begin(), pixels.frames[i].end());
  return out;
}

std::size_t input_index(const Slot& pixels, std::size_t i) {
  const json& im = pixels.info["images"][i];
  return im.contains("index") && im["index"].is_number_unsigned() ? im["index"].get<std::size_t>()
                                                                  : i;
}

Slot rows_slot(const std::string& name, const RowMatrix& m, const EncoderIdentity& encoder) {
  Slot s{name,
         SlotKind::kRows,
         {{"rows", m.rows()}, {"cols", m.cols()}, {"encoder", encoder_to_json(encoder)}},
         {wire::pack_rows(m)}};
  return s;
}

RowMatrix rows_of(const wire::Slots& slots, const std::string& name) {
  const Slot& s = slots.get(name, SlotKind::kRows);
  try {
    return wire::unpack_rows(s.frames.at(0), s.info["rows"].get<std::size_t>(),
                             s.info["cols"].get<std::size_t>());
  } catch (const std::exception& e) {
    throw SlotError("slot \"" + name + "\": " + e.what());
  }
}

EncoderIdentity encoder_of(const wire::Slots& slots, const std::string& name) {
  const Slot& s = slots.get(name, SlotKind::kRows);
  if (!s.info.contains("encoder")) throw SlotError("slot \"" + name + "\" names no encoder");
  try {
    return encoder_from_json(s.info["encoder"], "slot \"" + name + "\": the encoder");
  } catch (const InputError& e) {
    throw SlotError(e.what());
  }
}

Slot text_slot(const std::string& name, const std::vector<std::string>& texts) {
  return Slot{name, SlotKind::kText, json::object(), texts};
}

std::vector<std::string> texts_of(const wire::Slots& slots, const std::string& name) {
  return slots.get(name, SlotKind::kText).frames;
}

}  // namespace gmi::workers
