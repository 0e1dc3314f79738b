// Tests for gmi/image.hpp: JPEG and PNG decoding, limits, EXIF orientation, resizing.
//
// Test images are made here with libjpeg and libpng directly (not with gmi's encoders)
// when a test needs something gmi does not write: greyscale, CMYK, EXIF blocks, palettes,
// alpha, 16 bits, interlacing.
#include "gmi/image.hpp"

#include <gtest/gtest.h>
#include <png.h>
#include <sys/resource.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <random>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

// clang-format off
#include <cstdio>  // jpeglib.h uses FILE and size_t without declaring them
#include <jpeglib.h>
// clang-format on

#include "gmi/error.hpp"
#include "test_support.hpp"

namespace gmi {
namespace {

using Bytes = std::vector<std::uint8_t>;
using Rgb = std::array<int, 3>;

// ---------------------------------------------------------------------------------------
// Image makers

Image make_image(int width, int height, const std::function<Rgb(int, int)>& colour) {
  Image image;
  image.width = width;
  image.height = height;
  image.rgb.resize(static_cast<std::size_t>(width) * height * 3);
  for (int y = 0; y < height; ++y) {
    for (int x = 0; x < width; ++x) {
      const Rgb c = colour(x, y);
      for (int k = 0; k < 3; ++k) {
        image.rgb[(static_cast<std::size_t>(y) * width + x) * 3 + k] =
            static_cast<std::uint8_t>(c[k]);
      }
    }
  }
  return image;
}

/// Smooth ramps: what JPEG reproduces well.
Image make_gradient(int width, int height) {
  return make_image(width, height, [&](int x, int y) {
    return Rgb{x * 255 / (width - 1), y * 255 / (height - 1), (x + y) * 255 / (width + height - 2)};
  });
}

Image make_constant(int width, int height, Rgb colour) {
  return make_image(width, height, [&](int, int) { return colour; });
}

constexpr Rgb kRed{255, 0, 0};
constexpr Rgb kGreen{0, 255, 0};
constexpr Rgb kBlue{0, 0, 255};
constexpr Rgb kWhite{255, 255, 255};

/// Four solid quadrants: top-left red, top-right green, bottom-left blue, bottom-right white.
Image make_quadrants(int width, int height) {
  return make_image(width, height, [&](int x, int y) {
    const bool right = x >= width / 2;
    const bool bottom = y >= height / 2;
    return bottom ? (right ? kWhite : kBlue) : (right ? kGreen : kRed);
  });
}

Rgb pixel(const Image& image, int x, int y) {
  return {image.at(x, y, 0), image.at(x, y, 1), image.at(x, y, 2)};
}

/// Colours compared with a tolerance (JPEG is lossy).
::testing::AssertionResult near_colour(Rgb actual, Rgb expected, int tolerance) {
  for (int k = 0; k < 3; ++k) {
    if (std::abs(actual[k] - expected[k]) > tolerance) {
      return ::testing::AssertionFailure()
             << "got (" << actual[0] << "," << actual[1] << "," << actual[2] << "), expected ("
             << expected[0] << "," << expected[1] << "," << expected[2] << ") +-" << tolerance;
    }
  }
  return ::testing::AssertionSuccess();
}

DecodeFailure failure_of(const Bytes& bytes, const DecodeOptions& options = {}) {
  try {
    decode_image(bytes, options);
  } catch (const DecodeError& e) {
    return e.failure();
  }
  ADD_FAILURE() << "decode_image accepted the input";
  return DecodeFailure::kEmpty;
}

std::string message_of(const Bytes& bytes, const DecodeOptions& options = {}) {
  try {
    decode_image(bytes, options);
  } catch (const DecodeError& e) {
    return e.what();
  }
  return "(no error)";
}

Bytes bytes_of(std::string_view text) { return Bytes(text.begin(), text.end()); }

// ---------------------------------------------------------------------------------------
// JPEG writing with libjpeg directly

struct JpegSpec {
  int width = 0;
  int height = 0;
  int components = 3;
  J_COLOR_SPACE input_space = JCS_RGB;
  J_COLOR_SPACE jpeg_space = JCS_YCbCr;
  int quality = 95;
  bool progressive = false;
  int restart_rows = 0;  ///< restart marker every this many MCU rows (0: none)
  Bytes app1;            ///< written as an APP1 marker when not empty
};

Bytes write_jpeg(const JpegSpec& spec, const Bytes& pixels) {
  jpeg_compress_struct cinfo{};
  jpeg_error_mgr err{};
  cinfo.err = jpeg_std_error(&err);
  jpeg_create_compress(&cinfo);
  unsigned char* buffer = nullptr;
  unsigned long size = 0;
  jpeg_mem_dest(&cinfo, &buffer, &size);
  cinfo.image_width = spec.width;
  cinfo.image_height = spec.height;
  cinfo.input_components = spec.components;
  cinfo.in_color_space = spec.input_space;
  jpeg_set_defaults(&cinfo);
  jpeg_set_colorspace(&cinfo, spec.jpeg_space);
  jpeg_set_quality(&cinfo, spec.quality, TRUE);
  if (spec.progressive) jpeg_simple_progression(&cinfo);
  cinfo.restart_in_rows = spec.restart_rows;
  jpeg_start_compress(&cinfo, TRUE);
  if (!spec.app1.empty()) {
    jpeg_write_marker(&cinfo, JPEG_APP0 + 1, spec.app1.data(),
                      static_cast<unsigned>(spec.app1.size()));
  }
  const std::size_t stride = static_cast<std::size_t>(spec.width) * spec.components;
  while (cinfo.next_scanline < cinfo.image_height) {
    JSAMPROW row = const_cast<std::uint8_t*>(pixels.data()) + cinfo.next_scanline * stride;
    jpeg_write_scanlines(&cinfo, &row, 1);
  }
  jpeg_finish_compress(&cinfo);
  Bytes out(buffer, buffer + size);
  jpeg_destroy_compress(&cinfo);
  std::free(buffer);
  return out;
}

Bytes write_rgb_jpeg(const Image& image, JpegSpec spec = {}) {
  spec.width = image.width;
  spec.height = image.height;
  return write_jpeg(spec, image.rgb);
}

/// An APP1 payload: "Exif\0\0" then a TIFF block whose IFD0 holds only the orientation.
Bytes exif_block(int orientation, bool big_endian) {
  Bytes b = {'E', 'x', 'i', 'f', 0, 0};
  auto u16 = [&](unsigned v) {
    if (big_endian) {
      b.push_back(static_cast<std::uint8_t>(v >> 8));
      b.push_back(static_cast<std::uint8_t>(v));
    } else {
      b.push_back(static_cast<std::uint8_t>(v));
      b.push_back(static_cast<std::uint8_t>(v >> 8));
    }
  };
  auto u32 = [&](std::uint32_t v) {
    if (big_endian) {
      u16(v >> 16);
      u16(v & 0xFFFF);
    } else {
      u16(v & 0xFFFF);
      u16(v >> 16);
    }
  };
  b.push_back(big_endian ? 'M' : 'I');
  b.push_back(big_endian ? 'M' : 'I');
  u16(42);
  u32(8);       // IFD0 right after the header
  u16(2);       // two entries: a harmless one first, then the orientation
  u16(0x011A);  // XResolution, RATIONAL, points past the IFD (not followed)
  u16(5);
  u32(1);
  u32(100);
  u16(0x0112);  // Orientation, SHORT, count 1, value in the first two bytes of the field
  u16(3);
  u32(1);
  u16(static_cast<unsigned>(orientation));
  u16(0);
  u32(0);  // no next IFD
  return b;
}

/// Where the first SOFn segment's height/width bytes are in a JPEG, found by walking the
/// segments.
std::size_t find_sof_dimensions(const Bytes& jpeg) {
  std::size_t i = 2;
  while (i + 4 <= jpeg.size() && jpeg[i] == 0xFF) {
    const std::uint8_t marker = jpeg[i + 1];
    const std::size_t length = jpeg[i + 2] << 8 | jpeg[i + 3];
    if (marker >= 0xC0 && marker <= 0xC2) return i + 5;  // length(2) precision(1)
    i += 2 + length;
  }
  ADD_FAILURE() << "no SOF marker found";
  return 0;
}

// ---------------------------------------------------------------------------------------
// PNG writing with libpng directly

std::uint32_t crc32_of(const std::uint8_t* data, std::size_t n) {
  std::uint32_t crc = 0xFFFFFFFFu;
  for (std::size_t i = 0; i < n; ++i) {
    crc ^= data[i];
    for (int k = 0; k < 8; ++k) crc = (crc >> 1) ^ (0xEDB88320u & (0u - (crc & 1u)));
  }
  return ~crc;
}

void put_be32(Bytes& b, std::size_t at, std::uint32_t v) {
  b[at] = static_cast<std::uint8_t>(v >> 24);
  b[at + 1] = static_cast<std::uint8_t>(v >> 16);
  b[at + 2] = static_cast<std::uint8_t>(v >> 8);
  b[at + 3] = static_cast<std::uint8_t>(v);
}

struct PngSpec {
  int width = 0;
  int height = 0;
  int color_type = PNG_COLOR_TYPE_RGB;
  int bit_depth = 8;
  bool interlaced = false;
  std::vector<png_color> palette;
  Bytes palette_alpha;  ///< tRNS for palettes
  std::string text;     ///< written as a compressed zTXt "Comment" chunk when not empty
};

/// `pixels`: rows of packed samples exactly as libpng expects them (16-bit big-endian).
Bytes write_png(const PngSpec& spec, const Bytes& pixels) {
  png_structp png = png_create_write_struct(PNG_LIBPNG_VER_STRING, nullptr, nullptr, nullptr);
  png_infop info = png_create_info_struct(png);
  Bytes out;
  png_set_write_fn(
      png, &out,
      [](png_structp p, png_bytep data, png_size_t n) {
        auto* o = static_cast<Bytes*>(png_get_io_ptr(p));
        o->insert(o->end(), data, data + n);
      },
      [](png_structp) {});
  png_set_IHDR(png, info, spec.width, spec.height, spec.bit_depth, spec.color_type,
               spec.interlaced ? PNG_INTERLACE_ADAM7 : PNG_INTERLACE_NONE,
               PNG_COMPRESSION_TYPE_DEFAULT, PNG_FILTER_TYPE_DEFAULT);
  if (!spec.palette.empty()) {
    png_set_PLTE(png, info, spec.palette.data(), static_cast<int>(spec.palette.size()));
  }
  if (!spec.palette_alpha.empty()) {
    png_set_tRNS(png, info, spec.palette_alpha.data(), static_cast<int>(spec.palette_alpha.size()),
                 nullptr);
  }
  png_text text{};
  if (!spec.text.empty()) {
    text.compression = PNG_TEXT_COMPRESSION_zTXt;
    text.key = const_cast<char*>("Comment");
    text.text = const_cast<char*>(spec.text.c_str());
    png_set_text(png, info, &text, 1);
  }
  png_write_info(png, info);
  const std::size_t stride = pixels.size() / spec.height;
  std::vector<png_bytep> rows(spec.height);
  for (int y = 0; y < spec.height; ++y) rows[y] = const_cast<png_bytep>(pixels.data() + y * stride);
  png_write_image(png, rows.data());
  png_write_end(png, nullptr);
  png_destroy_write_struct(&png, &info);
  return out;
}

/// Where the chunk of the given type starts (its length field), found by walking the chunks.
std::size_t find_png_chunk(const Bytes& png, std::string_view type) {
  std::size_t i = 8;
  while (i + 8 <= png.size()) {
    if (std::string_view(reinterpret_cast<const char*>(png.data() + i + 4), 4) == type) return i;
    i += 12 + (std::size_t{png[i]} << 24 | png[i + 1] << 16 | png[i + 2] << 8 | png[i + 3]);
  }
  ADD_FAILURE() << "no " << type << " chunk";
  return 0;
}

/// Peak resident memory of this process so far, in MiB.
long peak_rss_mib() {
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  return usage.ru_maxrss / 1024;
}

/// Rewrites the IHDR dimensions of a PNG, with a valid CRC.
void patch_png_dimensions(Bytes& png, std::uint32_t width, std::uint32_t height) {
  put_be32(png, 16, width);
  put_be32(png, 20, height);
  put_be32(png, 29, crc32_of(png.data() + 12, 17));  // type + 13 data bytes
}

// ---------------------------------------------------------------------------------------
// Formats and failures

TEST(DecodeFailure, ToStringNamesEveryFailure) {
  EXPECT_STREQ(to_string(DecodeFailure::kEmpty), "empty");
  EXPECT_STREQ(to_string(DecodeFailure::kUnsupported), "unsupported");
  EXPECT_STREQ(to_string(DecodeFailure::kTruncated), "truncated");
  EXPECT_STREQ(to_string(DecodeFailure::kCorrupt), "corrupt");
  EXPECT_STREQ(to_string(DecodeFailure::kTooLarge), "too_large");
  EXPECT_STREQ(to_string(ImageFormat::kJpeg), "jpeg");
  EXPECT_STREQ(to_string(ImageFormat::kPng), "png");
  EXPECT_STREQ(to_string(ImageFormat::kUnknown), "unknown");
}

TEST(SniffFormat, RecognisesJpegAndPngByMagicBytes) {
  const Image image = make_gradient(16, 8);
  EXPECT_EQ(sniff_format(encode_jpeg(image)), ImageFormat::kJpeg);
  EXPECT_EQ(sniff_format(encode_png(image)), ImageFormat::kPng);
  EXPECT_EQ(sniff_format(bytes_of("GIF89a......")), ImageFormat::kUnknown);
  EXPECT_EQ(sniff_format({}), ImageFormat::kUnknown);
  EXPECT_EQ(sniff_format(Bytes{0xFF, 0xD8}), ImageFormat::kUnknown);  // too short to tell
}

TEST(DecodeImage, RejectsEmptyInput) { EXPECT_EQ(failure_of({}), DecodeFailure::kEmpty); }

TEST(DecodeImage, RejectsOtherFormatsNamingWhatTheyLookLike) {
  const std::vector<std::pair<std::string, std::string>> cases = {
      {std::string("GIF89a\x01\x00\x01\x00\x80\x00\x00", 13), "GIF"},
      {std::string("RIFF\x24\x00\x00\x00WEBPVP8 ", 16), "WebP"},
      {std::string("BM\x3e\x00\x00\x00\x00\x00", 8), "BMP"},
      {std::string("II*\x00\x08\x00\x00\x00", 8), "TIFF"},
      {std::string("MM\x00*\x00\x00\x00\x08", 8), "TIFF"},
      {"%PDF-1.7\n%\xE2\xE3\xCF\xD3\n", "PDF"},
      {"hello, this is not an image\n", "text"},
      {"<svg xmlns=\"http://www.w3.org/2000/svg\"/>", "SVG"},
  };
  for (const auto& [data, name] : cases) {
    const Bytes bytes = bytes_of(data);
    EXPECT_EQ(failure_of(bytes), DecodeFailure::kUnsupported) << name;
    const std::string message = message_of(bytes);
    EXPECT_NE(message.find("unsupported image format: " + name), std::string::npos) << message;
    EXPECT_NE(message.find("JPEG and PNG"), std::string::npos) << message;
  }
  // Unidentified binary: the message shows the leading bytes.
  const std::string message = message_of(Bytes{0x00, 0x01, 0x02, 0xAB, 0xCD});
  EXPECT_NE(message.find("00 01 02 ab cd"), std::string::npos) << message;
}

TEST(DecodeImage, ChecksByteLimitBeforeAnythingElse) {
  const Bytes jpeg = encode_jpeg(make_gradient(32, 32));
  DecodeOptions options;
  options.max_bytes = jpeg.size() - 1;
  EXPECT_EQ(failure_of(jpeg, options), DecodeFailure::kTooLarge);
  EXPECT_NE(message_of(jpeg, options).find(std::to_string(jpeg.size()) + " bytes"),
            std::string::npos);
  const Bytes text(jpeg.size(), 'x');  // not an image at all, and too large
  EXPECT_EQ(failure_of(text, options), DecodeFailure::kTooLarge);
  options.max_bytes = jpeg.size();
  EXPECT_NO_THROW(decode_image(jpeg, options));
}

// ---------------------------------------------------------------------------------------
// Round trips

TEST(DecodeImage, RoundTripsPngExactly) {
  const Image image = make_image(37, 23, [](int x, int y) {
    return Rgb{(x * 7 + y * 3) % 256, (x * y) % 256, (255 - x * 5) & 255};
  });
  const Image decoded = decode_image(encode_png(image));
  EXPECT_EQ(decoded.width, 37);
  EXPECT_EQ(decoded.height, 23);
  EXPECT_EQ(decoded.rgb, image.rgb);
}

TEST(DecodeImage, RoundTripsSmoothJpegClosely) {
  const Image image = make_gradient(96, 64);
  const Image decoded = decode_image(encode_jpeg(image, 95));
  ASSERT_EQ(decoded.width, 96);
  ASSERT_EQ(decoded.height, 64);
  ASSERT_EQ(decoded.rgb.size(), image.rgb.size());
  int worst = 0;
  double total = 0;
  for (std::size_t i = 0; i < image.rgb.size(); ++i) {
    const int diff = std::abs(int{decoded.rgb[i]} - int{image.rgb[i]});
    worst = std::max(worst, diff);
    total += diff;
  }
  EXPECT_LE(worst, 12);
  EXPECT_LE(total / image.rgb.size(), 2.0);
}

TEST(DecodeImage, GrayscaleJpegComesOutAsRgbWithEqualChannels) {
  const int w = 40, h = 24;
  Bytes grey(static_cast<std::size_t>(w) * h);
  for (int y = 0; y < h; ++y) {
    for (int x = 0; x < w; ++x) grey[y * w + x] = static_cast<std::uint8_t>(x * 6);
  }
  JpegSpec spec;
  spec.width = w;
  spec.height = h;
  spec.components = 1;
  spec.input_space = JCS_GRAYSCALE;
  spec.jpeg_space = JCS_GRAYSCALE;
  const Image decoded = decode_image(write_jpeg(spec, grey));
  ASSERT_EQ(decoded.width, w);
  ASSERT_EQ(decoded.height, h);
  for (int y = 0; y < h; ++y) {
    for (int x = 0; x < w; ++x) {
      ASSERT_EQ(decoded.at(x, y, 0), decoded.at(x, y, 1));
      ASSERT_EQ(decoded.at(x, y, 0), decoded.at(x, y, 2));
      ASSERT_NEAR(decoded.at(x, y, 0), grey[y * w + x], 8);
    }
  }
}

/// Adobe CMYK is stored inverted (255 = no ink); libjpeg writes the Adobe marker for CMYK.
Bytes adobe_cmyk_jpeg(J_COLOR_SPACE jpeg_space) {
  const int w = 32, h = 16;
  Bytes cmyk(static_cast<std::size_t>(w) * h * 4);
  for (int y = 0; y < h; ++y) {
    for (int x = 0; x < w; ++x) {
      // Left half: magenta + yellow ink = red. Right half: no ink, 50% black = grey.
      const std::array<int, 4> ink =
          x < w / 2 ? std::array{0, 255, 255, 0} : std::array{0, 0, 0, 128};
      for (int k = 0; k < 4; ++k)
        cmyk[(y * w + x) * 4 + k] = static_cast<std::uint8_t>(255 - ink[k]);
    }
  }
  JpegSpec spec;
  spec.width = w;
  spec.height = h;
  spec.components = 4;
  spec.input_space = JCS_CMYK;
  spec.jpeg_space = jpeg_space;
  return write_jpeg(spec, cmyk);
}

TEST(DecodeImage, AdobeCmykAndYcckJpegsComeOutAsRgb) {
  for (J_COLOR_SPACE space : {JCS_CMYK, JCS_YCCK}) {
    const Image decoded = decode_image(adobe_cmyk_jpeg(space));
    ASSERT_EQ(decoded.width, 32);
    ASSERT_EQ(decoded.height, 16);
    EXPECT_TRUE(near_colour(pixel(decoded, 3, 8), kRed, 12)) << "colour space " << space;
    EXPECT_TRUE(near_colour(pixel(decoded, 28, 8), Rgb{127, 127, 127}, 12))
        << "colour space " << space;
  }
}

TEST(DecodeImage, DecodesProgressiveJpeg) {
  const Image image = make_gradient(64, 48);
  JpegSpec spec;
  spec.progressive = true;
  const Image decoded = decode_image(write_rgb_jpeg(image, spec));
  ASSERT_EQ(decoded.width, 64);
  ASSERT_EQ(decoded.height, 48);
  EXPECT_TRUE(near_colour(pixel(decoded, 32, 24), pixel(image, 32, 24), 10));
}

// ---------------------------------------------------------------------------------------
// DCT scaling

TEST(DecodeImage, DctScalingPicksTheSmallestScaleNotBelowTheTarget) {
  const Bytes landscape = encode_jpeg(make_gradient(640, 480));
  const Bytes portrait = encode_jpeg(make_gradient(480, 640));
  struct Case {
    int target;
    int width;
    int height;
  };
  // Scales are n/8: 480 * n/8 must stay >= target, with n as small as possible.
  const Case cases[] = {
      {0, 640, 480},   {1, 80, 60},     {60, 80, 60},    {61, 160, 120},   {100, 160, 120},
      {120, 160, 120}, {121, 240, 180}, {224, 320, 240}, {300, 400, 300},  {420, 560, 420},
      {421, 640, 480}, {480, 640, 480}, {481, 640, 480}, {5000, 640, 480},
  };
  for (const Case& c : cases) {
    DecodeOptions options;
    options.target_min_side = c.target;
    const Image wide = decode_image(landscape, options);
    EXPECT_EQ(wide.width, c.width) << "target " << c.target;
    EXPECT_EQ(wide.height, c.height) << "target " << c.target;
    const Image tall = decode_image(portrait, options);
    EXPECT_EQ(tall.width, c.height) << "target " << c.target;
    EXPECT_EQ(tall.height, c.width) << "target " << c.target;
    EXPECT_EQ(wide.rgb.size(), static_cast<std::size_t>(wide.width) * wide.height * 3);
  }
}

TEST(DecodeImage, DctScalingRoundsOddSizesUp) {
  // 100x75 at 3/8 is 37.5 x 28.125: libjpeg rounds up to 38x29.
  const Bytes jpeg = encode_jpeg(make_gradient(100, 75));
  DecodeOptions options;
  options.target_min_side = 19;  // 2/8 gives 25x19
  Image decoded = decode_image(jpeg, options);
  EXPECT_EQ(decoded.width, 25);
  EXPECT_EQ(decoded.height, 19);
  options.target_min_side = 20;  // 3/8
  decoded = decode_image(jpeg, options);
  EXPECT_EQ(decoded.width, 38);
  EXPECT_EQ(decoded.height, 29);
}

TEST(DecodeImage, DctScaledJpegKeepsItsColours) {
  const Image image = make_quadrants(256, 128);
  DecodeOptions options;
  options.target_min_side = 32;
  const Image decoded = decode_image(encode_jpeg(image, 95), options);
  ASSERT_EQ(decoded.width, 64);
  ASSERT_EQ(decoded.height, 32);
  EXPECT_TRUE(near_colour(pixel(decoded, 8, 8), kRed, 12));
  EXPECT_TRUE(near_colour(pixel(decoded, 56, 8), kGreen, 12));
  EXPECT_TRUE(near_colour(pixel(decoded, 8, 24), kBlue, 12));
  EXPECT_TRUE(near_colour(pixel(decoded, 56, 24), kWhite, 12));
}

// A PNG is shrunk while it is read, as a JPEG is DCT-scaled: k x k boxes (the largest k
// whose shorter side still reaches the target), each pixel the mean of its box, edge boxes
// smaller; memory goes with the output, not with the stored size.
TEST(DecodeImage, PngShrinksWhileItIsReadToTheTargetsBoxMeans) {
  const Image full = make_gradient(70, 33);
  DecodeOptions options;
  options.target_min_side = 8;  // 33 / 8 = 4: boxes of 4 x 4, 18 x 9 pixels
  const Image decoded = decode_image(encode_png(full), options);
  ASSERT_EQ(decoded.width, 18);
  ASSERT_EQ(decoded.height, 9);
  for (int by = 0; by < decoded.height; ++by) {
    for (int bx = 0; bx < decoded.width; ++bx) {
      for (int c = 0; c < 3; ++c) {
        double sum = 0;
        int n = 0;
        for (int y = by * 4; y < std::min(by * 4 + 4, full.height); ++y) {
          for (int x = bx * 4; x < std::min(bx * 4 + 4, full.width); ++x, ++n) {
            sum += full.rgb[(static_cast<std::size_t>(y) * full.width + x) * 3 + c];
          }
        }
        const int got = decoded.rgb[(static_cast<std::size_t>(by) * decoded.width + bx) * 3 + c];
        EXPECT_NEAR(got, sum / n, 0.5 + 1e-9) << "box " << bx << "," << by << " channel " << c;
      }
    }
  }
  // Below twice the target nothing is shrunk.
  options.target_min_side = 20;
  const Image whole = decode_image(encode_png(full), options);
  EXPECT_EQ(whole.width, 70);
  EXPECT_EQ(whole.height, 33);
  EXPECT_EQ(whole.rgb, full.rgb);
}

// ---------------------------------------------------------------------------------------
// Pixel limits

TEST(DecodeImage, RejectsJpegPixelBombFromItsHeader) {
  Bytes jpeg = encode_jpeg(make_gradient(16, 16));
  const std::size_t at = find_sof_dimensions(jpeg);
  ASSERT_GT(at, 0u);
  // 65000 x 65000 (the format's maximum is 65535) = 4.2 gigapixels, over the 64 M default.
  jpeg[at] = 65000 >> 8;
  jpeg[at + 1] = 65000 & 0xFF;
  jpeg[at + 2] = 65000 >> 8;
  jpeg[at + 3] = 65000 & 0xFF;
  // The scan holds data for 16x16 only: decoding it would fail as truncated, so kTooLarge
  // shows that the header was checked before any pixel was decoded.
  EXPECT_EQ(failure_of(jpeg), DecodeFailure::kTooLarge);
  const std::string message = message_of(jpeg);
  EXPECT_NE(message.find("65000x65000"), std::string::npos) << message;
  EXPECT_NE(message.find("64000000"), std::string::npos) << message;
}

TEST(DecodeImage, RejectsPngPixelBombFromItsHeader) {
  Bytes png = encode_png(make_gradient(16, 16));
  patch_png_dimensions(png, 100000, 100000);
  EXPECT_EQ(failure_of(png), DecodeFailure::kTooLarge);
  const std::string message = message_of(png);
  EXPECT_NE(message.find("100000x100000"), std::string::npos) << message;
  EXPECT_NE(message.find("64000000"), std::string::npos) << message;

  // Within the limit but larger than the data: decoding starts, and fails otherwise.
  patch_png_dimensions(png, 4000, 4000);
  EXPECT_NE(failure_of(png), DecodeFailure::kTooLarge);
}

TEST(DecodeImage, PixelLimitIsInclusive) {
  const Bytes jpeg = encode_jpeg(make_gradient(20, 10));
  const Bytes png = encode_png(make_gradient(20, 10));
  DecodeOptions options;
  options.max_pixels = 200;
  EXPECT_NO_THROW(decode_image(jpeg, options));
  EXPECT_NO_THROW(decode_image(png, options));
  options.max_pixels = 199;
  EXPECT_EQ(failure_of(jpeg, options), DecodeFailure::kTooLarge);
  EXPECT_EQ(failure_of(png, options), DecodeFailure::kTooLarge);
  // The limit applies to the stored size, not the DCT-scaled one.
  options.target_min_side = 1;
  EXPECT_EQ(failure_of(jpeg, options), DecodeFailure::kTooLarge);
}

// ---------------------------------------------------------------------------------------
// Truncated and corrupt data

TEST(DecodeImage, RejectsTruncatedJpeg) {
  const Bytes jpeg = encode_jpeg(make_gradient(128, 96));
  const Bytes half(jpeg.begin(), jpeg.begin() + jpeg.size() / 2);
  EXPECT_EQ(failure_of(half), DecodeFailure::kTruncated);
  EXPECT_NE(message_of(half).find("truncated JPEG"), std::string::npos) << message_of(half);
  // Cut inside the headers, too.
  EXPECT_EQ(failure_of(Bytes(jpeg.begin(), jpeg.begin() + 30)), DecodeFailure::kTruncated);
  EXPECT_EQ(failure_of(Bytes{0xFF, 0xD8, 0xFF}), DecodeFailure::kTruncated);
  EXPECT_EQ(failure_of(Bytes{0xFF, 0xD8}), DecodeFailure::kTruncated);
}

TEST(DecodeImage, RejectsTruncatedProgressiveJpeg) {
  JpegSpec spec;
  spec.progressive = true;
  const Bytes jpeg = write_rgb_jpeg(make_gradient(128, 96), spec);
  EXPECT_EQ(failure_of(Bytes(jpeg.begin(), jpeg.begin() + jpeg.size() / 2)),
            DecodeFailure::kTruncated);
  EXPECT_EQ(failure_of(Bytes(jpeg.begin(), jpeg.end() - 40)), DecodeFailure::kTruncated);
}

TEST(DecodeImage, RejectsJpegCutAnywhereBeforeItsEndMarker) {
  for (const int restart_rows : {0, 1}) {
    JpegSpec spec;
    spec.quality = 80;
    spec.restart_rows = restart_rows;
    const Bytes jpeg = write_rgb_jpeg(make_gradient(48, 40), spec);
    for (std::size_t size = 2; size + 2 < jpeg.size(); ++size) {
      ASSERT_EQ(failure_of(Bytes(jpeg.begin(), jpeg.begin() + size)), DecodeFailure::kTruncated)
          << "cut at " << size << " of " << jpeg.size() << ", restart rows " << restart_rows;
    }
  }
}

TEST(DecodeImage, RejectsPngCutAnywhereBeforeItsEndChunk) {
  const Bytes png = encode_png(make_gradient(48, 40));
  for (std::size_t size = 2; size + 12 < png.size(); ++size) {  // IEND is the last 12 bytes
    ASSERT_EQ(failure_of(Bytes(png.begin(), png.begin() + size)), DecodeFailure::kTruncated)
        << "cut at " << size << " of " << png.size();
  }
}

TEST(DecodeImage, RejectsProgressiveJpegWithEndlessScans) {
  // Each scan costs a pass over all coefficients; repeating the last one (a refinement
  // scan, which libjpeg only warns about) builds a CPU bomb from a small file.
  JpegSpec spec;
  spec.progressive = true;
  const Bytes jpeg = write_rgb_jpeg(make_gradient(32, 32), spec);
  std::size_t last_scan = 0;
  for (std::size_t i = 2; i + 1 < jpeg.size(); ++i) {
    if (jpeg[i] == 0xFF && jpeg[i + 1] == 0xDA) last_scan = i;
  }
  ASSERT_GT(last_scan, 0u);
  Bytes bomb(jpeg.begin(), jpeg.end() - 2);  // without EOI
  for (int i = 0; i < 300; ++i) bomb.insert(bomb.end(), jpeg.begin() + last_scan, jpeg.end() - 2);
  bomb.push_back(0xFF);
  bomb.push_back(0xD9);
  EXPECT_EQ(failure_of(bomb), DecodeFailure::kCorrupt);
  EXPECT_NE(message_of(bomb).find("scans"), std::string::npos) << message_of(bomb);
}

TEST(DecodeImage, AcceptsJpegLackingOnlyItsEndMarker) {
  const Image image = make_gradient(64, 48);
  Bytes jpeg = encode_jpeg(image, 95);
  ASSERT_EQ(jpeg[jpeg.size() - 2], 0xFF);
  ASSERT_EQ(jpeg[jpeg.size() - 1], 0xD9);
  jpeg.resize(jpeg.size() - 2);
  const Image decoded = decode_image(jpeg);
  EXPECT_TRUE(near_colour(pixel(decoded, 63, 47), pixel(image, 63, 47), 12));
}

TEST(DecodeImage, RejectsTruncatedPng) {
  const Bytes png = encode_png(make_gradient(128, 96));
  const Bytes half(png.begin(), png.begin() + png.size() / 2);
  EXPECT_EQ(failure_of(half), DecodeFailure::kTruncated);
  EXPECT_NE(message_of(half).find("truncated PNG"), std::string::npos) << message_of(half);
  EXPECT_EQ(failure_of(Bytes(png.begin(), png.begin() + 20)), DecodeFailure::kTruncated);
  EXPECT_EQ(failure_of(Bytes(png.begin(), png.begin() + 5)), DecodeFailure::kTruncated);
}

TEST(DecodeImage, RejectsJpegWithBrokenHeader) {
  const Bytes jpeg = encode_jpeg(make_gradient(32, 32));
  Bytes broken = jpeg;
  broken[find_sof_dimensions(jpeg) + 4] = 0;  // zero components
  EXPECT_EQ(failure_of(broken), DecodeFailure::kCorrupt);
  // Garbage right after the SOI marker.
  broken = jpeg;
  for (std::size_t i = 3; i < 40; ++i) broken[i] = static_cast<std::uint8_t>(i * 37);
  EXPECT_THROW(decode_image(broken), DecodeError);
}

TEST(DecodeImage, RejectsPngWithBadCrcOrGarbage) {
  const Bytes png = encode_png(make_gradient(32, 32));
  Bytes bad_crc = png;
  bad_crc[png.size() / 2] ^= 0x55;  // inside IDAT
  EXPECT_EQ(failure_of(bad_crc), DecodeFailure::kCorrupt);
  EXPECT_NE(message_of(bad_crc).find("corrupt PNG"), std::string::npos) << message_of(bad_crc);

  Bytes garbage(png.begin(), png.begin() + 8);
  for (int i = 0; i < 200; ++i) garbage.push_back(static_cast<std::uint8_t>(i * 91 + 7));
  EXPECT_EQ(failure_of(garbage), DecodeFailure::kCorrupt);
}

TEST(DecodeImage, SurvivesRandomDamage) {
  const Bytes jpeg = encode_jpeg(make_gradient(48, 32));
  const Bytes png = encode_png(make_gradient(48, 32));
  std::mt19937 rng(1234);
  DecodeOptions options;
  options.max_pixels = 1 << 20;  // damaged headers may claim large sizes
  for (const Bytes* original : {&jpeg, &png}) {
    for (int round = 0; round < 300; ++round) {
      Bytes damaged = *original;
      const int flips = 1 + static_cast<int>(rng() % 8);
      for (int k = 0; k < flips; ++k)
        damaged[2 + rng() % (damaged.size() - 2)] = static_cast<std::uint8_t>(rng());
      try {
        const Image image = decode_image(damaged, options);
        EXPECT_EQ(image.rgb.size(), static_cast<std::size_t>(image.width) * image.height * 3);
      } catch (const DecodeError&) {
        // any failure is fine; crashing is not
      }
    }
  }
}

// ---------------------------------------------------------------------------------------
// EXIF orientation

/// For each orientation, the stored-image quadrant colour that must land at the displayed
/// top-left, top-right, bottom-left and bottom-right corners. Stored: TL red, TR green,
/// BL blue, BR white (see make_quadrants).
struct OrientationCase {
  int orientation;
  bool swaps;
  Rgb top_left, top_right, bottom_left, bottom_right;
};

const OrientationCase kOrientations[] = {
    {1, false, kRed, kGreen, kBlue, kWhite},  // as stored
    {2, false, kGreen, kRed, kWhite, kBlue},  // mirrored left-right
    {3, false, kWhite, kBlue, kGreen, kRed},  // rotated 180
    {4, false, kBlue, kWhite, kRed, kGreen},  // mirrored top-bottom
    {5, true, kRed, kBlue, kGreen, kWhite},   // transposed
    {6, true, kBlue, kRed, kWhite, kGreen},   // turn 90 clockwise to view
    {7, true, kWhite, kGreen, kBlue, kRed},   // transversed
    {8, true, kGreen, kWhite, kRed, kBlue},   // turn 90 counter-clockwise to view
};

TEST(DecodeImage, AppliesExifOrientation) {
  const int w = 64, h = 32;  // quadrants of 32x16: whole 16x16 MCUs, so colours stay clean
  const Image stored = make_quadrants(w, h);
  for (const bool big_endian : {false, true}) {
    for (const OrientationCase& c : kOrientations) {
      JpegSpec spec;
      spec.app1 = exif_block(c.orientation, big_endian);
      const Image shown = decode_image(write_rgb_jpeg(stored, spec));
      SCOPED_TRACE("orientation " + std::to_string(c.orientation) +
                   (big_endian ? " (MM)" : " (II)"));
      ASSERT_EQ(shown.width, c.swaps ? h : w);
      ASSERT_EQ(shown.height, c.swaps ? w : h);
      const int right = shown.width - 1, bottom = shown.height - 1;
      EXPECT_TRUE(near_colour(pixel(shown, 0, 0), c.top_left, 16));
      EXPECT_TRUE(near_colour(pixel(shown, right, 0), c.top_right, 16));
      EXPECT_TRUE(near_colour(pixel(shown, 0, bottom), c.bottom_left, 16));
      EXPECT_TRUE(near_colour(pixel(shown, right, bottom), c.bottom_right, 16));
    }
  }
}

TEST(DecodeImage, AppliesExifOrientationToDctScaledJpeg) {
  JpegSpec spec;
  spec.app1 = exif_block(6, false);
  DecodeOptions options;
  options.target_min_side = 16;
  const Image shown = decode_image(write_rgb_jpeg(make_quadrants(128, 64), spec), options);
  ASSERT_EQ(shown.width, 16);
  ASSERT_EQ(shown.height, 32);
  EXPECT_TRUE(near_colour(pixel(shown, 1, 1), kBlue, 16));
  EXPECT_TRUE(near_colour(pixel(shown, 14, 30), kGreen, 16));
}

TEST(DecodeImage, IgnoresBrokenExif) {
  const Image stored = make_quadrants(64, 32);
  const Bytes good = exif_block(6, false);
  std::vector<std::pair<std::string, Bytes>> broken;
  broken.emplace_back("cut after the header", Bytes(good.begin(), good.begin() + 10));
  broken.emplace_back("cut inside the IFD", Bytes(good.begin(), good.begin() + 30));
  broken.emplace_back("only Exif", Bytes(good.begin(), good.begin() + 6));
  Bytes b = good;
  b[6] = 'X';  // byte order neither II nor MM
  broken.emplace_back("bad byte order", b);
  b = good;
  b[8] = 43;  // TIFF magic 43
  broken.emplace_back("bad magic", b);
  b = good;
  b[10] = 0xF0, b[11] = 0xFF, b[12] = 0xFF, b[13] = 0x7F;  // IFD0 far past the end
  broken.emplace_back("IFD offset past the end", b);
  b = good;
  b[14] = 0xFF, b[15] = 0xFF;  // 65535 entries
  broken.emplace_back("entry count past the end", b);
  b = good;
  b[6 + 8 + 2 + 12 + 8] = 9;  // orientation 9 does not exist
  broken.emplace_back("orientation 9", b);
  b = good;
  b[6 + 8 + 2 + 12 + 2] = 2;  // type ASCII
  broken.emplace_back("orientation of type ASCII", b);
  b = good;
  b[0] = 'e';  // not "Exif": some other APP1 (XMP and friends)
  broken.emplace_back("not Exif", b);

  for (const auto& [name, app1] : broken) {
    JpegSpec spec;
    spec.app1 = app1;
    Image shown;
    ASSERT_NO_THROW(shown = decode_image(write_rgb_jpeg(stored, spec))) << name;
    EXPECT_EQ(shown.width, 64) << name;
    EXPECT_EQ(shown.height, 32) << name;
    EXPECT_TRUE(near_colour(pixel(shown, 0, 0), kRed, 16)) << name;
  }
  // Sanity: the unbroken block does rotate.
  JpegSpec spec;
  spec.app1 = good;
  EXPECT_EQ(decode_image(write_rgb_jpeg(stored, spec)).width, 32);
}

// ---------------------------------------------------------------------------------------
// PNG colour types

TEST(DecodeImage, PngGreyscaleComesOutAsRgb) {
  PngSpec spec;
  spec.width = 3;
  spec.height = 1;
  spec.color_type = PNG_COLOR_TYPE_GRAY;
  const Image decoded = decode_image(write_png(spec, {0, 100, 255}));
  ASSERT_EQ(decoded.width, 3);
  EXPECT_EQ(pixel(decoded, 0, 0), (Rgb{0, 0, 0}));
  EXPECT_EQ(pixel(decoded, 1, 0), (Rgb{100, 100, 100}));
  EXPECT_EQ(pixel(decoded, 2, 0), (Rgb{255, 255, 255}));
}

TEST(DecodeImage, PngOneBitGreyscaleExpandsToFullRange) {
  PngSpec spec;
  spec.width = 8;
  spec.height = 1;
  spec.color_type = PNG_COLOR_TYPE_GRAY;
  spec.bit_depth = 1;
  const Image decoded = decode_image(write_png(spec, {0b10100000}));
  ASSERT_EQ(decoded.width, 8);
  EXPECT_EQ(pixel(decoded, 0, 0), kWhite);
  EXPECT_EQ(pixel(decoded, 1, 0), (Rgb{0, 0, 0}));
  EXPECT_EQ(pixel(decoded, 2, 0), kWhite);
  EXPECT_EQ(pixel(decoded, 7, 0), (Rgb{0, 0, 0}));
}

TEST(DecodeImage, PngAlphaIsCompositedOverWhite) {
  PngSpec spec;
  spec.width = 3;
  spec.height = 1;
  spec.color_type = PNG_COLOR_TYPE_RGB_ALPHA;
  // opaque red, fully transparent red, half-transparent black
  const Image decoded = decode_image(write_png(spec, {255, 0, 0, 255, 255, 0, 0, 0, 0, 0, 0, 128}));
  EXPECT_EQ(pixel(decoded, 0, 0), kRed);
  EXPECT_EQ(pixel(decoded, 1, 0), kWhite);
  EXPECT_EQ(pixel(decoded, 2, 0), (Rgb{127, 127, 127}));  // 255 * (1 - 128/255)

  spec.color_type = PNG_COLOR_TYPE_GRAY_ALPHA;
  const Image grey = decode_image(write_png(spec, {0, 255, 0, 0, 200, 255}));
  EXPECT_EQ(pixel(grey, 0, 0), (Rgb{0, 0, 0}));
  EXPECT_EQ(pixel(grey, 1, 0), kWhite);
  EXPECT_EQ(pixel(grey, 2, 0), (Rgb{200, 200, 200}));
}

TEST(DecodeImage, PngPaletteWithTransparencyComesOutAsRgb) {
  PngSpec spec;
  spec.width = 4;
  spec.height = 1;
  spec.color_type = PNG_COLOR_TYPE_PALETTE;
  spec.palette = {{255, 0, 0}, {0, 0, 255}, {10, 20, 30}};
  spec.palette_alpha = {255, 255, 0};  // entry 2 transparent
  const Image decoded = decode_image(write_png(spec, {0, 1, 2, 0}));
  EXPECT_EQ(pixel(decoded, 0, 0), kRed);
  EXPECT_EQ(pixel(decoded, 1, 0), kBlue);
  EXPECT_EQ(pixel(decoded, 2, 0), kWhite);
  EXPECT_EQ(pixel(decoded, 3, 0), kRed);
}

TEST(DecodeImage, Png16BitScalesTo8Bit) {
  PngSpec spec;
  spec.width = 2;
  spec.height = 1;
  spec.bit_depth = 16;
  // big-endian 16-bit samples: 0xFFFF, 0x0000, 0x8080 | 0x0101, 0xFEFF, 0x1234
  const Image decoded = decode_image(
      write_png(spec, {0xFF, 0xFF, 0x00, 0x00, 0x80, 0x80, 0x01, 0x01, 0xFE, 0xFF, 0x12, 0x34}));
  EXPECT_EQ(pixel(decoded, 0, 0), (Rgb{255, 0, 128}));
  EXPECT_EQ(pixel(decoded, 1, 0), (Rgb{1, 254, 0x12}));
}

TEST(DecodeImage, PngTextChunksAreSkipped) {
  const Image image = make_gradient(12, 10);
  PngSpec spec;
  spec.width = image.width;
  spec.height = image.height;
  spec.text = std::string(5000, 'a');  // deflates to almost nothing: a (tiny) zTXt bomb
  const Bytes png = write_png(spec, image.rgb);
  ASSERT_GT(find_png_chunk(png, "zTXt"), 0u);
  EXPECT_EQ(decode_image(png).rgb, image.rgb);
}

TEST(DecodeImage, PngChunkClaimingHugeLengthCostsNoMemory) {
  // libpng 1.6 only warns about a chunk over its size limit and then allocates (and
  // clears) the declared length for text chunks: found by the fuzzer.
  PngSpec spec;
  spec.width = 8;
  spec.height = 8;
  spec.text = "hello";
  Bytes png = write_png(spec, make_gradient(8, 8).rgb);
  const std::size_t at = find_png_chunk(png, "zTXt");
  ASSERT_GT(at, 0u);
  put_be32(png, at, 0x7FFFFF00);  // 2 GiB, in a 200-byte file
  const long rss_before = peak_rss_mib();
  EXPECT_EQ(failure_of(png), DecodeFailure::kTruncated);
  EXPECT_LT(peak_rss_mib() - rss_before, 256);
}

TEST(DecodeImage, InterlacedPngMatchesTheImage) {
  const Image image = make_image(19, 13, [](int x, int y) {
    return Rgb{x * 13, y * 19, (x ^ y) * 8};
  });
  PngSpec spec;
  spec.width = image.width;
  spec.height = image.height;
  spec.interlaced = true;
  const Image decoded = decode_image(write_png(spec, image.rgb));
  EXPECT_EQ(decoded.rgb, image.rgb);
}

// ---------------------------------------------------------------------------------------
// Files

TEST(Resize, AWindowIsThatPartOfTheWholeResizeAndCostsOnlyTheWindow) {
  std::mt19937 rng(5);
  for (auto [sw, sh, W, H] : {std::array{97, 61, 40, 30}, std::array{30, 20, 90, 60}, std::array{60, 2, 7680, 256}}) {
    Image src;
    src.width = sw;
    src.height = sh;
    src.rgb.resize(static_cast<std::size_t>(sw) * sh * 3);
    for (auto& v : src.rgb) v = static_cast<std::uint8_t>(rng() & 255);
    const Image whole = resize(src, W, H);
    const int x0 = (W - 20) / 2, y0 = (H - 16) / 2;
    const Image part = resize_window(src, W, H, x0, y0, 20, 16);
    ASSERT_EQ(part.width, 20);
    for (int y = 0; y < 16; ++y)
      for (int x = 0; x < 20; ++x)
        for (int c = 0; c < 3; ++c) ASSERT_EQ(part.at(x, y, c), whole.at(x0 + x, y0 + y, c)) << sw << "x" << sh;
  }
  // The crop of a 20000 x 1 strip scaled to a shorter side of 256: the window's work only.
  Image strip;
  strip.width = 20000;
  strip.height = 1;
  strip.rgb.assign(20000 * 3, 90);
  const Image centre = resize_center_crop(strip, 256);
  EXPECT_EQ(centre.width, 256);
  EXPECT_EQ(centre.at(100, 100, 0), 90);
}

TEST(ReadImageFile, DecodesAFile) {
  testing::TempDir dir;
  const Image image = make_gradient(30, 20);
  const Bytes png = encode_png(image);
  const auto path = dir.path() / "picture.png";
  std::ofstream(path, std::ios::binary)
      .write(reinterpret_cast<const char*>(png.data()), png.size());
  const Image decoded = read_image_file(path);
  EXPECT_EQ(decoded.rgb, image.rgb);
}

TEST(ReadImageFile, ReportsMissingFileAsIoError) {
  testing::TempDir dir;
  const auto path = dir.path() / "no-such-picture.jpg";
  try {
    read_image_file(path);
    FAIL() << "no error";
  } catch (const IoError& e) {
    const std::string message = e.what();
    EXPECT_NE(message.find(path.string()), std::string::npos) << message;
    EXPECT_NE(message.find("No such file"), std::string::npos) << message;
  }
  EXPECT_THROW(read_image_file(dir.path()), IoError);  // a directory
}

TEST(ReadImageFile, ChecksFileSizeBeforeReading) {
  testing::TempDir dir;
  const auto path = dir.path() / "big.bin";
  std::ofstream(path, std::ios::binary) << std::string(5000, 'x');
  DecodeOptions options;
  options.max_bytes = 4999;
  try {
    read_image_file(path, options);
    FAIL() << "no error";
  } catch (const DecodeError& e) {
    EXPECT_EQ(e.failure(), DecodeFailure::kTooLarge);
    const std::string message = e.what();
    EXPECT_NE(message.find(path.string()), std::string::npos) << message;
    EXPECT_NE(message.find("5000 bytes"), std::string::npos) << message;
  }
}

TEST(ReadImageFile, PrefixesDecodeErrorsWithThePath) {
  testing::TempDir dir;
  const Bytes jpeg = encode_jpeg(make_gradient(64, 64));
  const auto path = dir.path() / "cut.jpg";
  std::ofstream(path, std::ios::binary)
      .write(reinterpret_cast<const char*>(jpeg.data()), jpeg.size() / 2);
  try {
    read_image_file(path);
    FAIL() << "no error";
  } catch (const DecodeError& e) {
    EXPECT_EQ(e.failure(), DecodeFailure::kTruncated);
    EXPECT_EQ(std::string(e.what()).rfind(path.string() + ": truncated JPEG", 0), 0u) << e.what();
  }
  const auto empty = dir.path() / "empty.png";
  std::ofstream(empty, std::ios::binary).flush();
  try {
    read_image_file(empty);
    FAIL() << "no error";
  } catch (const DecodeError& e) {
    EXPECT_EQ(e.failure(), DecodeFailure::kEmpty);
  }
}

// ---------------------------------------------------------------------------------------
// Resizing

TEST(Resize, ConstantImageStaysConstant) {
  const Rgb colour{17, 200, 99};
  const Image image = make_constant(37, 23, colour);
  for (const auto& [w, h] : {std::pair{10, 7}, std::pair{36, 22}, std::pair{1, 1},
                             std::pair{80, 50}, std::pair{37, 5}, std::pair{100, 3}}) {
    const Image out = resize(image, w, h);
    ASSERT_EQ(out.width, w);
    ASSERT_EQ(out.height, h);
    for (int y = 0; y < h; ++y) {
      for (int x = 0; x < w; ++x)
        ASSERT_EQ(pixel(out, x, y), colour) << w << "x" << h << " at " << x << "," << y;
    }
  }
}

TEST(Resize, AreaShrinkOfCheckerGivesTheMean) {
  const Image checker = make_image(2, 2, [](int x, int y) {
    return (x + y) % 2 ? Rgb{30, 0, 255} : Rgb{10, 255, 0};
  });
  const Image one = resize(checker, 1, 1);
  EXPECT_EQ(one.at(0, 0, 0), 20);
  EXPECT_NEAR(one.at(0, 0, 1), 127.5, 0.51);
  EXPECT_NEAR(one.at(0, 0, 2), 127.5, 0.51);

  // A 1-pixel checker shrunk by an integer factor is flat at the mean.
  const Image big = make_image(64, 48, [](int x, int y) {
    return (x + y) % 2 ? Rgb{40, 40, 40} : Rgb{0, 0, 0};
  });
  const Image small = resize(big, 16, 12);
  for (std::uint8_t v : small.rgb) ASSERT_EQ(v, 20);
}

TEST(Resize, FractionalShrinkWeighsPartlyCoveredPixels) {
  // 3 -> 2 pixels: output 0 covers source [0, 1.5), output 1 covers [1.5, 3).
  const Image row = make_image(3, 1, [](int x, int) { return Rgb{x * 90, 0, 0}; });
  const Image out = resize(row, 2, 1);
  EXPECT_EQ(out.at(0, 0, 0), 30);   // (0 * 1 + 90 * 0.5) / 1.5
  EXPECT_EQ(out.at(1, 0, 0), 150);  // (90 * 0.5 + 180 * 1) / 1.5
}

TEST(Resize, GrowingIsBilinear) {
  const Image row = make_image(2, 1, [](int x, int) { return Rgb{x * 100, 0, 0}; });
  const Image out = resize(row, 4, 1);
  // Output centres map to source -0.25 (clamped), 0.25, 0.75, 1.25 (clamped).
  EXPECT_EQ(out.at(0, 0, 0), 0);
  EXPECT_EQ(out.at(1, 0, 0), 25);
  EXPECT_EQ(out.at(2, 0, 0), 75);
  EXPECT_EQ(out.at(3, 0, 0), 100);
}

TEST(Resize, RejectsNonPositiveSizesAndBrokenImages) {
  const Image image = make_constant(4, 4, kRed);
  EXPECT_THROW(resize(image, 0, 4), InputError);
  EXPECT_THROW(resize(image, 4, -1), InputError);
  Image broken = image;
  broken.rgb.pop_back();
  EXPECT_THROW(resize(broken, 2, 2), InputError);
  EXPECT_THROW(resize_center_crop(image, 0), InputError);
}

TEST(ResizeCenterCrop, KeepsTheCentreOfTheLongerSide) {
  // 12x4: left third red, middle third green, right third blue.
  const Image wide = make_image(12, 4, [](int x, int) {
    return x < 4 ? kRed : x < 8 ? kGreen : kBlue;
  });
  const Image square = resize_center_crop(wide, 4);
  ASSERT_EQ(square.width, 4);
  ASSERT_EQ(square.height, 4);
  for (int y = 0; y < 4; ++y) {
    for (int x = 0; x < 4; ++x) ASSERT_EQ(pixel(square, x, y), kGreen);
  }
  // Portrait, and scaled: 8x24 -> 4x12, crop rows 4..7 (the middle third).
  const Image tall = make_image(8, 24, [](int, int y) {
    return y < 8 ? kRed : y < 16 ? kGreen : kBlue;
  });
  const Image crop = resize_center_crop(tall, 4);
  ASSERT_EQ(crop.width, 4);
  ASSERT_EQ(crop.height, 4);
  for (int y = 0; y < 4; ++y) {
    for (int x = 0; x < 4; ++x) ASSERT_EQ(pixel(crop, x, y), kGreen) << x << "," << y;
  }
}

TEST(Encode, RejectsInconsistentImagesAndQuality) {
  Image image = make_constant(4, 4, kRed);
  EXPECT_THROW(encode_jpeg(image, 0), InputError);
  EXPECT_THROW(encode_jpeg(image, 101), InputError);
  image.rgb.resize(5);
  EXPECT_THROW(encode_png(image), InputError);
  EXPECT_THROW(encode_jpeg(image), InputError);
  EXPECT_THROW(encode_png(Image{}), InputError);
}

// ---------------------------------------------------------------------------------------
// Real files shipped with scikit-image, when installed

const std::filesystem::path kSampleDir = "/usr/lib/python3/dist-packages/skimage/data";

std::filesystem::path sample(const std::string& name) { return kSampleDir / name; }

#define REQUIRE_SAMPLE(name) \
  if (!std::filesystem::exists(sample(name))) GTEST_SKIP() << sample(name) << " is not installed"

bool channels_equal(const Image& image) {
  for (std::size_t i = 0; i < image.rgb.size(); i += 3) {
    if (image.rgb[i] != image.rgb[i + 1] || image.rgb[i] != image.rgb[i + 2]) return false;
  }
  return true;
}

TEST(SampleImages, DecodesRocketJpegWithAndWithoutDctScaling) {
  REQUIRE_SAMPLE("rocket.jpg");
  const Image full = read_image_file(sample("rocket.jpg"));
  EXPECT_EQ(full.width, 640);
  EXPECT_EQ(full.height, 427);
  EXPECT_FALSE(channels_equal(full));
  DecodeOptions options;
  options.target_min_side = 100;  // 427 * 2/8 = 106.75 -> 107
  const Image scaled = read_image_file(sample("rocket.jpg"), options);
  EXPECT_EQ(scaled.width, 160);
  EXPECT_EQ(scaled.height, 107);
}

TEST(SampleImages, DecodesChelseaPng) {
  REQUIRE_SAMPLE("chelsea.png");
  const Image image = read_image_file(sample("chelsea.png"));
  EXPECT_EQ(image.width, 451);
  EXPECT_EQ(image.height, 300);
  EXPECT_FALSE(channels_equal(image));
}

TEST(SampleImages, TruncatedJpegIsReportedAsTruncated) {
  REQUIRE_SAMPLE("truncated.jpg");
  try {
    read_image_file(sample("truncated.jpg"));
    FAIL() << "no error";
  } catch (const DecodeError& e) {
    EXPECT_EQ(e.failure(), DecodeFailure::kTruncated) << e.what();
  }
}

TEST(SampleImages, DecodesRgbaHorsePng) {
  REQUIRE_SAMPLE("horse.png");
  const Image image = read_image_file(sample("horse.png"));
  EXPECT_EQ(image.width, 400);
  EXPECT_EQ(image.height, 328);
  EXPECT_EQ(image.rgb.size(), 400u * 328 * 3);
  EXPECT_EQ(pixel(image, 0, 0), kWhite);              // background
  EXPECT_EQ(pixel(image, 200, 164), (Rgb{0, 0, 0}));  // the horse
}

TEST(SampleImages, DecodesGreyCameraPngAsEqualChannels) {
  REQUIRE_SAMPLE("camera.png");
  const Image image = read_image_file(sample("camera.png"));
  EXPECT_EQ(image.width, 512);
  EXPECT_EQ(image.height, 512);
  EXPECT_TRUE(channels_equal(image));
}

TEST(SampleImages, DecodesPalettePngAndExifJpeg) {
  REQUIRE_SAMPLE("green_palette.png");
  const Image palette = read_image_file(sample("green_palette.png"));
  EXPECT_EQ(palette.width, 320);
  EXPECT_EQ(palette.height, 240);
  REQUIRE_SAMPLE("hubble_deep_field.jpg");  // EXIF orientation 1
  const Image hubble = read_image_file(sample("hubble_deep_field.jpg"));
  EXPECT_EQ(hubble.width, 1000);
  EXPECT_EQ(hubble.height, 872);
}

}  // namespace
}  // namespace gmi
