#pragma once
/// How stage payloads are laid out (schemas/README.md, "What flows between stages"):
/// decoded images as RGB8 frames described by meta.images, embeddings as float32 frames
/// described by meta.rows and the encoder identities. One place, used by every stage.
/// Thread-safety: pure functions.
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "gmi/encoder.hpp"
#include "gmi/image.hpp"
#include "gmi/linalg.hpp"

namespace gmi::workers {

nlohmann::json encoder_to_json(const EncoderIdentity& id);
/// InputError naming the field when `j` is not an encoder identity.
EncoderIdentity encoder_from_json(const nlohmann::json& j, const std::string& what);

/// The frame of one decoded image, and its meta entry {"index", "width", "height"}.
std::string image_frame(const Image& image);
nlohmann::json image_meta(const Image& image, std::size_t index);
/// The images of a decode result. InputError when meta and frames disagree.
std::vector<Image> images_from(const nlohmann::json& meta, const std::vector<std::string>& frames);

/// Frame `index` as a rows x cols float32 matrix; InputError when it does not fit.
RowMatrix rows_from(const std::vector<std::string>& frames, std::size_t index, std::size_t rows,
                    std::size_t cols, const std::string& what);

}  // namespace gmi::workers
