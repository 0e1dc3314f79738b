#pragma once
/// Private to the image module: the per-format decoders behind decode_image() and the
/// EXIF orientation they share. Not installed, not for other modules.
#include <cstdint>
#include <span>

#include "gmi/image.hpp"

namespace gmi::detail {

/// Decodes a JPEG whose magic bytes have already been recognised; the byte limit is
/// already checked. Applies the EXIF orientation.
Image decode_jpeg(std::span<const std::uint8_t> bytes, const DecodeOptions& options);

/// Decodes a PNG whose signature has already been recognised; the byte limit is already
/// checked.
Image decode_png(std::span<const std::uint8_t> bytes, const DecodeOptions& options);

/// The EXIF orientation (1..8) stored in a JPEG APP1 payload ("Exif\0\0" + TIFF block).
/// Anything missing, malformed or out of range reads as 1 (as stored): bad EXIF is never
/// an error.
int exif_orientation(std::span<const std::uint8_t> app1_payload);

/// Turns an image as stored into the image as meant to be seen, for EXIF orientation 1..8
/// (other values leave it unchanged). Orientations 5..8 swap width and height.
Image apply_exif_orientation(Image image, int orientation);

/// Throws InputError, naming `caller`, unless `image` has positive dimensions and exactly
/// width * height * 3 bytes.
void check_image_layout(const Image& image, const char* caller);

}  // namespace gmi::detail
