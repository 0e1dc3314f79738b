#include "gmi/workers/payload.hpp"

#include <cstring>

#include "gmi/error.hpp"
#include "gmi/wire.hpp"

namespace gmi::workers {

using nlohmann::json;

json encoder_to_json(const EncoderIdentity& id) {
  return json{{"name", id.name}, {"version", id.version}, {"dim", id.dim},
              {"default_gamma", id.default_gamma}};
}

EncoderIdentity encoder_from_json(const json& j, const std::string& what) {
  if (!j.is_object() || !j.contains("name") || !j.contains("version") || !j.contains("dim") ||
      !j["name"].is_string() || !j["version"].is_string() || !j["dim"].is_number_integer()) {
    throw InputError("meta." + what + " is not an encoder identity {name, version, dim}");
  }
  EncoderIdentity id;
  id.name = j["name"].get<std::string>();
  id.version = j["version"].get<std::string>();
  id.dim = j["dim"].get<int>();
  id.default_gamma = j.value("default_gamma", 1.0);
  return id;
}

std::string image_frame(const Image& image) {
  return std::string(reinterpret_cast<const char*>(image.rgb.data()), image.rgb.size());
}

json image_meta(const Image& image, std::size_t index) {
  return json{{"index", index}, {"width", image.width}, {"height", image.height}};
}

std::vector<Image> images_from(const json& meta, const std::vector<std::string>& frames) {
  const json images = meta.value("images", json::array());
  if (!images.is_array() || images.size() != frames.size()) {
    throw InputError("meta.images lists " + std::to_string(images.is_array() ? images.size() : 0) +
                     " images but " + std::to_string(frames.size()) + " frames came");
  }
  std::vector<Image> out;
  out.reserve(frames.size());
  for (std::size_t i = 0; i < frames.size(); ++i) {
    Image im;
    im.width = images[i].value("width", 0);
    im.height = images[i].value("height", 0);
    if (im.width <= 0 || im.height <= 0 ||
        static_cast<std::size_t>(im.width) * im.height * 3 != frames[i].size()) {
      throw InputError("image frame " + std::to_string(i) + " does not hold " +
                       std::to_string(im.width) + "x" + std::to_string(im.height) + " RGB pixels");
    }
    im.rgb.assign(frames[i].begin(), frames[i].end());
    out.push_back(std::move(im));
  }
  return out;
}

RowMatrix rows_from(const std::vector<std::string>& frames, std::size_t index, std::size_t rows,
                    std::size_t cols, const std::string& what) {
  if (index >= frames.size()) throw InputError("the " + what + " frame is missing");
  try {
    return wire::unpack_rows(frames[index], rows, cols);
  } catch (const InputError& e) {
    throw InputError("the " + what + " frame: " + e.what());
  }
}

}  // namespace gmi::workers
