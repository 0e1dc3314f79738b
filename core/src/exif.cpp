// EXIF orientation: reading tag 0x0112 from a JPEG's APP1 block, and applying it.
//
// The APP1 payload comes straight from the file, so every offset in it is hostile:
// each read is bounds-checked against the payload and a bad block reads as "as stored".
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>
#include <utility>

#include "image_codecs.hpp"

namespace gmi::detail {
namespace {

constexpr std::uint16_t kOrientationTag = 0x0112;
constexpr std::uint16_t kTypeShort = 3;
constexpr std::uint16_t kTypeLong = 4;
constexpr std::size_t kIfdEntrySize = 12;

/// A TIFF block with its byte order; reads outside it report failure instead of reading.
class TiffReader {
 public:
  TiffReader(std::span<const std::uint8_t> tiff, bool big_endian)
      : tiff_(tiff), big_endian_(big_endian) {}

  bool u16(std::uint64_t offset, std::uint16_t& out) const {
    if (offset > tiff_.size() || tiff_.size() - offset < 2) return false;
    const std::uint8_t* p = tiff_.data() + offset;
    out = big_endian_ ? static_cast<std::uint16_t>(p[0] << 8 | p[1])
                      : static_cast<std::uint16_t>(p[1] << 8 | p[0]);
    return true;
  }

  bool u32(std::uint64_t offset, std::uint32_t& out) const {
    if (offset > tiff_.size() || tiff_.size() - offset < 4) return false;
    const std::uint8_t* p = tiff_.data() + offset;
    out = big_endian_ ? (std::uint32_t{p[0]} << 24 | std::uint32_t{p[1]} << 16 |
                         std::uint32_t{p[2]} << 8 | p[3])
                      : (std::uint32_t{p[3]} << 24 | std::uint32_t{p[2]} << 16 |
                         std::uint32_t{p[1]} << 8 | p[0]);
    return true;
  }

 private:
  std::span<const std::uint8_t> tiff_;
  bool big_endian_;
};

}  // namespace

int exif_orientation(std::span<const std::uint8_t> app1_payload) {
  static constexpr std::uint8_t kExifHeader[6] = {'E', 'x', 'i', 'f', 0, 0};
  if (app1_payload.size() < sizeof kExifHeader ||
      std::memcmp(app1_payload.data(), kExifHeader, sizeof kExifHeader) != 0) {
    return 1;
  }
  const auto tiff = app1_payload.subspan(sizeof kExifHeader);
  if (tiff.size() < 8) return 1;
  bool big_endian;
  if (tiff[0] == 'I' && tiff[1] == 'I') {
    big_endian = false;
  } else if (tiff[0] == 'M' && tiff[1] == 'M') {
    big_endian = true;
  } else {
    return 1;
  }
  const TiffReader reader(tiff, big_endian);

  std::uint16_t magic = 0;
  std::uint32_t ifd0 = 0;
  std::uint16_t entry_count = 0;
  if (!reader.u16(2, magic) || magic != 42) return 1;
  if (!reader.u32(4, ifd0) || !reader.u16(ifd0, entry_count)) return 1;
  // An IFD that claims more entries than the block holds is malformed as a whole.
  if (std::uint64_t{ifd0} + 2 + kIfdEntrySize * entry_count > tiff.size()) return 1;

  for (std::uint32_t i = 0; i < entry_count; ++i) {
    const std::uint64_t entry = std::uint64_t{ifd0} + 2 + kIfdEntrySize * i;
    std::uint16_t tag = 0;
    std::uint16_t type = 0;
    std::uint32_t count = 0;
    if (!reader.u16(entry, tag) || !reader.u16(entry + 2, type) || !reader.u32(entry + 4, count)) {
      return 1;
    }
    if (tag != kOrientationTag) continue;
    if (count < 1) return 1;
    std::uint32_t value = 0;
    if (type == kTypeShort) {
      std::uint16_t v = 0;
      if (!reader.u16(entry + 8, v)) return 1;
      value = v;
    } else if (type == kTypeLong) {  // not what the standard says, but some writers do it
      if (!reader.u32(entry + 8, value)) return 1;
    } else {
      return 1;
    }
    return value >= 1 && value <= 8 ? static_cast<int>(value) : 1;
  }
  return 1;
}

Image apply_exif_orientation(Image image, int orientation) {
  if (orientation < 2 || orientation > 8) return image;
  const std::ptrdiff_t w = image.width;
  const std::ptrdiff_t h = image.height;

  // Where output pixel (0,0) comes from in the stored image, and how the source position
  // moves (in pixels) when the output x or y advances by one.
  std::ptrdiff_t start_x = 0, start_y = 0;
  std::ptrdiff_t step_x_dx = 0, step_x_dy = 0;  // output x + 1
  std::ptrdiff_t step_y_dx = 0, step_y_dy = 0;  // output y + 1
  switch (orientation) {
    case 2:  // mirrored left-right
      start_x = w - 1, step_x_dx = -1, step_y_dy = 1;
      break;
    case 3:  // rotated 180
      start_x = w - 1, start_y = h - 1, step_x_dx = -1, step_y_dy = -1;
      break;
    case 4:  // mirrored top-bottom
      start_y = h - 1, step_x_dx = 1, step_y_dy = -1;
      break;
    case 5:  // transposed: stored rows become columns
      step_x_dy = 1, step_y_dx = 1;
      break;
    case 6:  // needs a 90 degree clockwise turn
      start_y = h - 1, step_x_dy = -1, step_y_dx = 1;
      break;
    case 7:  // transversed (anti-diagonal mirror)
      start_x = w - 1, start_y = h - 1, step_x_dy = -1, step_y_dx = -1;
      break;
    case 8:  // needs a 90 degree counter-clockwise turn
      start_x = w - 1, step_x_dy = 1, step_y_dx = -1;
      break;
  }

  const bool swaps = orientation >= 5;
  Image out;
  out.width = swaps ? image.height : image.width;
  out.height = swaps ? image.width : image.height;
  out.rgb.resize(image.rgb.size());

  const std::ptrdiff_t step_x = (step_x_dx + step_x_dy * w) * 3;
  const std::ptrdiff_t step_y = (step_y_dx + step_y_dy * w) * 3;
  // Offsets, not pointers: stepping past the last row must not form an out-of-range pointer.
  const std::uint8_t* src = image.rgb.data();
  std::uint8_t* dst = out.rgb.data();
  std::ptrdiff_t row_offset = (start_x + start_y * w) * 3;
  for (int y = 0; y < out.height; ++y, row_offset += step_y) {
    std::ptrdiff_t offset = row_offset;
    for (int x = 0; x < out.width; ++x, offset += step_x, dst += 3) {
      dst[0] = src[offset];
      dst[1] = src[offset + 1];
      dst[2] = src[offset + 2];
    }
  }
  return out;
}

}  // namespace gmi::detail
