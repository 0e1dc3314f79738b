#pragma once
/// How stage payloads map onto named slots (schemas/README.md, "What flows between stages"):
/// decoded images as a pixels slot, embeddings as rows slots carrying their encoder's
/// identity, captions as a text slot. One place, used by every stage.
/// Thread-safety: pure functions.
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "gmi/encoder.hpp"
#include "gmi/image.hpp"
#include "gmi/linalg.hpp"
#include "gmi/slots.hpp"

namespace gmi::workers {

nlohmann::json encoder_to_json(const EncoderIdentity& id);
/// InputError naming `what` when `j` is not an encoder identity.
EncoderIdentity encoder_from_json(const nlohmann::json& j, const std::string& what);

/// A pixels slot being filled: add() each decoded image with its index in the input.
struct PixelsWriter {
  wire::Slot slot{
      wire::slot::kPixels, wire::SlotKind::kPixels, {{"images", nlohmann::json::array()}}, {}};
  void add(const Image& image, std::size_t index);
};
/// The number of images of a pixels slot, image `i` of it, and its input index.
std::size_t image_count(const wire::Slot& pixels);
Image image_at(const wire::Slot& pixels, std::size_t i);
std::size_t input_index(const wire::Slot& pixels, std::size_t i);

/// A rows slot of `m`, made by `encoder`.
wire::Slot rows_slot(const std::string& name, const RowMatrix& m, const EncoderIdentity& encoder);
/// The matrix of rows slot `name` (rows x cols as it says; SlotError naming it otherwise).
RowMatrix rows_of(const wire::Slots& slots, const std::string& name);
/// The encoder identity a rows slot names; SlotError naming the slot when it has none.
EncoderIdentity encoder_of(const wire::Slots& slots, const std::string& name);

/// A text slot of `texts`, and its strings.
wire::Slot text_slot(const std::string& name, const std::vector<std::string>& texts);
std::vector<std::string> texts_of(const wire::Slots& slots, const std::string& name);

}  // namespace gmi::workers
