#pragma once
/// Image decoding: JPEG (libjpeg-turbo) and PNG (libpng) into 8-bit RGB.
///
/// Limits are checked from the header BEFORE any pixel is decoded, so a
/// decompression bomb costs nothing. JPEGs are decoded with DCT scaling straight
/// to the smallest size whose shorter side is still >= `target_min_side`.
/// EXIF orientation is applied. Every failure is a gmi::DecodeError.
/// Thread-safety: all functions are reentrant.
#include <cstdint>
#include <filesystem>
#include <span>
#include <string>
#include <vector>

namespace gmi {

/// An 8-bit RGB image, row-major, interleaved (R,G,B per pixel).
struct Image {
  int width = 0;
  int height = 0;
  std::vector<std::uint8_t> rgb;  ///< size == width * height * 3

  std::uint8_t at(int x, int y, int c) const { return rgb[(static_cast<size_t>(y) * width + x) * 3 + c]; }
};

enum class ImageFormat { kUnknown, kJpeg, kPng };

const char* to_string(ImageFormat f);

struct DecodeOptions {
  std::size_t max_bytes = 64u << 20;             ///< refuse inputs larger than this
  std::uint64_t max_pixels = 64ull * 1000 * 1000;  ///< width*height as stored in the header
  int target_min_side = 0;  ///< >0: JPEG DCT-scales down toward this shorter side (never below it)
};

/// Identifies the format from the magic bytes alone.
ImageFormat sniff_format(std::span<const std::uint8_t> bytes);

/// Decodes `bytes`. Throws DecodeError with a message a person can act on.
Image decode_image(std::span<const std::uint8_t> bytes, const DecodeOptions& options = {});

/// Reads a file (checking its size against `max_bytes` before reading) and decodes it.
/// Throws IoError when the file cannot be read, DecodeError when it is not a usable image.
Image read_image_file(const std::filesystem::path& path, const DecodeOptions& options = {});

/// Area-averaging (shrink) / bilinear (grow) resize to exactly width x height.
Image resize(const Image& image, int width, int height);
/// The w x h window at (x0, y0) of resize(image, width, height), the same pixels, computed
/// at the cost of the window (the source rows and columns it reads), not of the whole
/// scaled image. InputError when the window is not inside width x height.
Image resize_window(const Image& image, int width, int height, int x0, int y0, int w, int h);

/// Resizes so that the shorter side equals `side` then crops the centre square side x side.
Image resize_center_crop(const Image& image, int side);

/// Encoders used by tests and the evaluation-hub tools.
std::vector<std::uint8_t> encode_png(const Image& image);
std::vector<std::uint8_t> encode_jpeg(const Image& image, int quality = 90);

}  // namespace gmi
