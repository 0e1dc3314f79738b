// PNG decoding and encoding with libpng.
//
// libpng reports errors by longjmp to the setjmp in png_jmpbuf. As in image_jpeg.cpp,
// everything that lives across that jump is a member of a reader/writer object owned by
// the caller's frame, and the function holding the setjmp has no locals with destructors.
#include <png.h>

#include <algorithm>
#include <csetjmp>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <new>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "gmi/error.hpp"
#include "image_codecs.hpp"

namespace gmi::detail {
namespace {

/// Largest chunk libpng may buffer whole, and the most ancillary chunks it keeps. Belt and
/// braces: the ancillary chunks that libpng would buffer are skipped unread anyway.
constexpr png_alloc_size_t kMaxChunkBytes = 1u << 20;
constexpr png_uint_32 kMaxCachedChunks = 32;

constexpr std::uint8_t kPngSignature[8] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1A, '\n'};

std::uint32_t read_be32(const std::uint8_t* p) {
  return std::uint32_t{p[0]} << 24 | std::uint32_t{p[1]} << 16 | std::uint32_t{p[2]} << 8 | p[3];
}

std::string too_large_message(std::uint64_t width, std::uint64_t height, std::uint64_t limit) {
  return "PNG too large: " + std::to_string(width) + "x" + std::to_string(height) +
         " pixels is over the limit of " + std::to_string(limit) + " pixels";
}

/// One PNG decode: the libpng state plus everything written while libpng may jump.
class PngReader {
 public:
  explicit PngReader(std::span<const std::uint8_t> bytes) : bytes_(bytes) {
    png_ = png_create_read_struct(PNG_LIBPNG_VER_STRING, this, on_error, on_warning);
    if (png_ == nullptr) throw std::bad_alloc();
    info_ = png_create_info_struct(png_);
    if (info_ == nullptr) {
      png_destroy_read_struct(&png_, nullptr, nullptr);
      throw std::bad_alloc();
    }
  }
  ~PngReader() { png_destroy_read_struct(&png_, &info_, nullptr); }
  PngReader(const PngReader&) = delete;
  PngReader& operator=(const PngReader&) = delete;

  /// False on failure; then failure() and message() say why.
  bool decode(const DecodeOptions& options) {
    if (setjmp(png_jmpbuf(png_))) {
      // Everything is decoded and only the tail (IEND) is missing: keep the image.
      if (rows_done_ && ran_out_) return finish();
      failure_ = ran_out_ ? DecodeFailure::kTruncated : DecodeFailure::kCorrupt;
      return false;
    }
    const auto side_limit =
        static_cast<png_uint_32>(std::clamp<std::uint64_t>(options.max_pixels, 1, PNG_UINT_31_MAX));
    png_set_user_limits(png_, side_limit, side_limit);
    png_set_chunk_cache_max(png_, kMaxCachedChunks);
    png_set_chunk_malloc_max(png_, kMaxChunkBytes);
    // Only IHDR, PLTE, tRNS and IDAT matter for the pixels; everything else is skipped
    // without being buffered. This matters: libpng 1.6 only warns about a chunk over
    // kMaxChunkBytes and then allocates its declared length (up to 2 GiB) for text and
    // ICC chunks, and inflates zTXt/iCCP bombs.
    png_set_keep_unknown_chunks(png_, PNG_HANDLE_CHUNK_NEVER, nullptr, -1);
    png_set_read_fn(png_, this, read_bytes);

    png_read_info(png_, info_);
    const png_uint_32 width = png_get_image_width(png_, info_);
    const png_uint_32 height = png_get_image_height(png_, info_);
    if (std::uint64_t{width} * height > options.max_pixels) {
      std::snprintf(message_, sizeof message_, "%s",
                    too_large_message(width, height, options.max_pixels).c_str());
      failure_ = DecodeFailure::kTooLarge;
      return false;
    }

    // Everything becomes 8-bit RGB, or RGBA when there is transparency to composite.
    png_set_expand(png_);  // palette -> RGB, grey 1/2/4 -> 8 bits, tRNS -> alpha
    png_set_scale_16(png_);
    png_set_gray_to_rgb(png_);
    png_set_interlace_handling(png_);
    png_read_update_info(png_, info_);

    channels_ = png_get_channels(png_, info_);
    const std::size_t row_bytes = png_get_rowbytes(png_, info_);
    if ((channels_ != 3 && channels_ != 4) || png_get_bit_depth(png_, info_) != 8 ||
        row_bytes != std::size_t{width} * channels_) {
      std::snprintf(message_, sizeof message_, "libpng produced %d channels of %d bits", channels_,
                    png_get_bit_depth(png_, info_));
      failure_ = DecodeFailure::kUnsupported;
      return false;
    }

    // Shrunk while it is read, as JPEGs are DCT-scaled: a box of k x k stored pixels per
    // decoded pixel, the largest k whose shorter side still reaches the target, so that
    // memory and time go with the encoder's geometry, not with the stored size. (Interlaced
    // images come in passes and are read whole.)
    const png_uint_32 shorter = std::min(width, height);
    if (options.target_min_side > 0 && png_get_interlace_type(png_, info_) == PNG_INTERLACE_NONE &&
        shorter / static_cast<png_uint_32>(options.target_min_side) >= 2) {
      return read_shrunk(width, height, shorter / static_cast<png_uint_32>(options.target_min_side), row_bytes);
    }

    image_.width = static_cast<int>(width);
    image_.height = static_cast<int>(height);
    image_.rgb.resize(std::size_t{width} * height * 3);
    std::uint8_t* target = image_.rgb.data();
    if (channels_ == 4) {
      rgba_.resize(std::size_t{width} * height * 4);
      target = rgba_.data();
    }
    rows_.resize(height);
    for (png_uint_32 y = 0; y < height; ++y) rows_[y] = target + y * row_bytes;
    png_read_image(png_, rows_.data());
    rows_done_ = true;
    png_read_end(png_, nullptr);  // checks the CRC of the last image data
    return finish();
  }

  DecodeFailure failure() const { return failure_; }
  const char* message() const { return message_; }
  Image take_image() { return std::move(image_); }

 private:
  // Row by row into box sums: ceil(width / k) x ceil(height / k) pixels, each the mean of
  // its box (edge boxes are smaller), alpha composited over white first as in finish().
  bool read_shrunk(png_uint_32 width, png_uint_32 height, png_uint_32 k, std::size_t row_bytes) {
    shrunk_ = true;
    const png_uint_32 out_w = (width + k - 1) / k, out_h = (height + k - 1) / k;
    image_.width = static_cast<int>(out_w);
    image_.height = static_cast<int>(out_h);
    image_.rgb.assign(std::size_t{out_w} * out_h * 3, 0);
    row_.resize(row_bytes);
    sums_.assign(std::size_t{out_w} * 3, 0);
    for (png_uint_32 y = 0; y < height; ++y) {
      png_read_row(png_, row_.data(), nullptr);
      for (png_uint_32 x = 0; x < width; ++x) {
        const std::uint8_t* p = row_.data() + std::size_t{x} * static_cast<std::size_t>(channels_);
        std::uint64_t* s = sums_.data() + std::size_t{x / k} * 3;
        if (channels_ == 4) {
          const unsigned alpha = p[3];
          for (int c = 0; c < 3; ++c) s[c] += (p[c] * alpha + 255 * (255 - alpha) + 127) / 255;
        } else {
          for (int c = 0; c < 3; ++c) s[c] += p[c];
        }
      }
      if ((y + 1) % k == 0 || y + 1 == height) {
        const png_uint_32 box_h = y % k + 1;
        std::uint8_t* out = image_.rgb.data() + std::size_t{y / k} * out_w * 3;
        for (png_uint_32 bx = 0; bx < out_w; ++bx) {
          const png_uint_32 box_w = std::min(k, width - bx * k);
          const std::uint64_t n = std::uint64_t{box_w} * box_h;
          for (int c = 0; c < 3; ++c) {
            out[bx * 3 + c] = static_cast<std::uint8_t>((sums_[bx * 3 + c] + n / 2) / n);
          }
        }
        std::fill(sums_.begin(), sums_.end(), 0);
      }
    }
    rows_done_ = true;
    png_read_end(png_, nullptr);
    return true;
  }

  [[noreturn]] static void on_error(png_structp png, png_const_charp message) {
    auto* reader = static_cast<PngReader*>(png_get_error_ptr(png));
    std::snprintf(reader->message_, sizeof reader->message_, "%s", message);
    png_longjmp(png, 1);
  }

  static void on_warning(png_structp, png_const_charp) {}  // ancillary trouble: ignored

  static void read_bytes(png_structp png, png_bytep out, png_size_t length) {
    auto* reader = static_cast<PngReader*>(png_get_io_ptr(png));
    if (length > reader->bytes_.size() - reader->pos_) {
      reader->ran_out_ = true;
      png_error(png, "the data ends before the image does");
    }
    std::memcpy(out, reader->bytes_.data() + reader->pos_, length);
    reader->pos_ += length;
  }

  /// Composites RGBA over white into the RGB image.
  bool finish() {
    if (shrunk_) return true;  // composited row by row
    if (channels_ == 4) {
      const std::size_t pixels = image_.rgb.size() / 3;
      for (std::size_t i = 0; i < pixels; ++i) {
        const unsigned alpha = rgba_[i * 4 + 3];
        for (int c = 0; c < 3; ++c) {
          const unsigned value = rgba_[i * 4 + c];
          image_.rgb[i * 3 + c] =
              static_cast<std::uint8_t>((value * alpha + 255 * (255 - alpha) + 127) / 255);
        }
      }
    }
    return true;
  }

  std::span<const std::uint8_t> bytes_;
  std::size_t pos_ = 0;
  png_structp png_ = nullptr;
  png_infop info_ = nullptr;
  bool ran_out_ = false;
  bool rows_done_ = false;
  int channels_ = 0;
  DecodeFailure failure_ = DecodeFailure::kCorrupt;
  char message_[256] = {};
  std::vector<std::uint8_t> rgba_;
  std::vector<png_bytep> rows_;
  bool shrunk_ = false;
  std::vector<std::uint8_t> row_;
  std::vector<std::uint64_t> sums_;
  Image image_;
};

/// One PNG encode into a growing byte vector.
class PngWriter {
 public:
  PngWriter() {
    png_ = png_create_write_struct(PNG_LIBPNG_VER_STRING, this, on_error, on_warning);
    if (png_ == nullptr) throw std::bad_alloc();
    info_ = png_create_info_struct(png_);
    if (info_ == nullptr) {
      png_destroy_write_struct(&png_, nullptr);
      throw std::bad_alloc();
    }
  }
  ~PngWriter() { png_destroy_write_struct(&png_, &info_); }
  PngWriter(const PngWriter&) = delete;
  PngWriter& operator=(const PngWriter&) = delete;

  bool encode(const Image& image) {
    if (setjmp(png_jmpbuf(png_))) return false;
    png_set_write_fn(png_, this, write_bytes, [](png_structp) {});
    png_set_IHDR(png_, info_, static_cast<png_uint_32>(image.width),
                 static_cast<png_uint_32>(image.height), 8, PNG_COLOR_TYPE_RGB, PNG_INTERLACE_NONE,
                 PNG_COMPRESSION_TYPE_DEFAULT, PNG_FILTER_TYPE_DEFAULT);
    png_write_info(png_, info_);
    const std::size_t stride = static_cast<std::size_t>(image.width) * 3;
    for (int y = 0; y < image.height; ++y) {
      // libpng only reads the row.
      png_write_row(png_, const_cast<png_bytep>(image.rgb.data() + y * stride));
    }
    png_write_end(png_, nullptr);
    return true;
  }

  std::vector<std::uint8_t> take_bytes() { return std::move(out_); }
  const char* message() const { return message_; }

 private:
  [[noreturn]] static void on_error(png_structp png, png_const_charp message) {
    auto* writer = static_cast<PngWriter*>(png_get_error_ptr(png));
    std::snprintf(writer->message_, sizeof writer->message_, "%s", message);
    png_longjmp(png, 1);
  }

  static void on_warning(png_structp, png_const_charp) {}

  static void write_bytes(png_structp png, png_bytep data, png_size_t length) {
    auto* writer = static_cast<PngWriter*>(png_get_io_ptr(png));
    bool out_of_memory = false;
    try {
      writer->out_.insert(writer->out_.end(), data, data + length);
    } catch (const std::bad_alloc&) {
      out_of_memory = true;  // jump only once the exception is over
    }
    if (out_of_memory) png_error(png, "out of memory");
  }

  png_structp png_ = nullptr;
  png_infop info_ = nullptr;
  char message_[256] = {};
  std::vector<std::uint8_t> out_;
};

}  // namespace

Image decode_png(std::span<const std::uint8_t> bytes, const DecodeOptions& options) {
  // The pixel limit straight from IHDR (always the first chunk, at a fixed place), before
  // libpng is even set up; libpng's own user limits would report a bomb as corrupt.
  if (bytes.size() >= 24 && std::memcmp(bytes.data(), kPngSignature, 8) == 0 &&
      std::memcmp(bytes.data() + 12, "IHDR", 4) == 0) {
    const std::uint64_t width = read_be32(bytes.data() + 16);
    const std::uint64_t height = read_be32(bytes.data() + 20);
    if (width * height > options.max_pixels) {
      throw DecodeError(DecodeFailure::kTooLarge,
                        too_large_message(width, height, options.max_pixels));
    }
  }

  PngReader reader(bytes);
  if (!reader.decode(options)) {
    switch (reader.failure()) {
      case DecodeFailure::kTooLarge:
        throw DecodeError(DecodeFailure::kTooLarge, reader.message());
      case DecodeFailure::kTruncated:
        throw DecodeError(DecodeFailure::kTruncated,
                          std::string("truncated PNG: ") + reader.message());
      case DecodeFailure::kUnsupported:
        throw DecodeError(DecodeFailure::kUnsupported,
                          std::string("unsupported PNG: ") + reader.message());
      default:
        throw DecodeError(reader.failure(), std::string("corrupt PNG: ") + reader.message());
    }
  }
  return reader.take_image();
}

}  // namespace gmi::detail

namespace gmi {

std::vector<std::uint8_t> encode_png(const Image& image) {
  detail::check_image_layout(image, "encode_png");
  detail::PngWriter writer;
  if (!writer.encode(image)) {
    throw InputError("encode_png: libpng refused the " + std::to_string(image.width) + "x" +
                     std::to_string(image.height) + " image: " + writer.message());
  }
  return writer.take_bytes();
}

}  // namespace gmi
