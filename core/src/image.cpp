// The image module's front door: format sniffing, limits, file reading, resizing.
// The codecs live in image_jpeg.cpp and image_png.cpp, EXIF orientation in exif.cpp.
#include "unique_fd.hpp"
#include "gmi/image.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <string>
#include <string_view>
#include <system_error>
#include <vector>

#include "gmi/error.hpp"
#include "image_codecs.hpp"

namespace gmi {

const char* to_string(DecodeFailure f) {
  switch (f) {
    case DecodeFailure::kEmpty:
      return "empty";
    case DecodeFailure::kUnsupported:
      return "unsupported";
    case DecodeFailure::kTruncated:
      return "truncated";
    case DecodeFailure::kCorrupt:
      return "corrupt";
    case DecodeFailure::kTooLarge:
      return "too_large";
  }
  return "unknown";
}

const char* to_string(ImageFormat f) {
  switch (f) {
    case ImageFormat::kJpeg:
      return "jpeg";
    case ImageFormat::kPng:
      return "png";
    case ImageFormat::kUnknown:
      return "unknown";
  }
  return "unknown";
}

namespace {

using namespace std::string_view_literals;

constexpr std::uint8_t kJpegMagic[] = {0xFF, 0xD8, 0xFF};
constexpr std::uint8_t kPngMagic[] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1A, '\n'};

bool starts_with(std::span<const std::uint8_t> bytes, std::string_view prefix) {
  return bytes.size() >= prefix.size() &&
         std::memcmp(bytes.data(), prefix.data(), prefix.size()) == 0;
}

template <std::size_t N>
bool starts_with(std::span<const std::uint8_t> bytes, const std::uint8_t (&magic)[N]) {
  return bytes.size() >= N && std::memcmp(bytes.data(), magic, N) == 0;
}

/// True when all of `bytes` is a proper prefix of `magic`: the file was cut inside it.
template <std::size_t N>
bool is_cut_magic(std::span<const std::uint8_t> bytes, const std::uint8_t (&magic)[N]) {
  return bytes.size() >= 2 && bytes.size() < N &&
         std::memcmp(bytes.data(), magic, bytes.size()) == 0;
}

/// Printable ASCII and UTF-8 with ordinary whitespace, judged on the first bytes.
bool looks_like_text(std::span<const std::uint8_t> bytes) {
  const std::size_t n = std::min<std::size_t>(bytes.size(), 512);
  for (std::size_t i = 0; i < n; ++i) {
    const std::uint8_t b = bytes[i];
    const bool ok = b == '\t' || b == '\n' || b == '\r' || b == '\f' || (b >= 0x20 && b != 0x7F);
    if (!ok) return false;
  }
  return true;
}

/// What unrecognised bytes look like, for the error message.
std::string describe_unknown(std::span<const std::uint8_t> bytes) {
  if (starts_with(bytes, "GIF87a"sv) || starts_with(bytes, "GIF89a"sv)) return "GIF";
  if (bytes.size() >= 12 && starts_with(bytes, "RIFF"sv) &&
      std::memcmp(bytes.data() + 8, "WEBP", 4) == 0) {
    return "WebP";
  }
  if (bytes.size() >= 12 && std::memcmp(bytes.data() + 4, "ftyp", 4) == 0) {
    const std::string_view brand(reinterpret_cast<const char*>(bytes.data() + 8), 4);
    if (brand == "avif" || brand == "avis") return "AVIF";
    if (brand == "heic" || brand == "heix" || brand == "mif1" || brand == "msf1") return "HEIF";
    return "an ISO media file (MP4/MOV)";
  }
  if (starts_with(bytes, "II*\0"sv) || starts_with(bytes, "MM\0*"sv)) return "TIFF";
  if (starts_with(bytes, "BM"sv)) return "BMP";
  if (starts_with(bytes, "%PDF"sv)) return "PDF";
  if (starts_with(bytes, "\0\0\1\0"sv)) return "ICO";
  if (starts_with(bytes, "\xFF\x0A"sv) || starts_with(bytes, "\0\0\0\x0CJXL "sv)) return "JPEG XL";
  if (starts_with(bytes, "\0\0\0\x0CjP  "sv)) return "JPEG 2000";
  if (starts_with(bytes, "PK\3\4"sv)) return "a ZIP archive";
  if (starts_with(bytes, "\x1F\x8B"sv)) return "gzip data";
  if (looks_like_text(bytes)) {
    std::string_view head(reinterpret_cast<const char*>(bytes.data()),
                          std::min<std::size_t>(bytes.size(), 256));
    head.remove_prefix(std::min(head.find_first_not_of(" \t\r\n"), head.size()));
    if (head.starts_with("<svg") || head.find("<svg") != std::string_view::npos) return "SVG";
    if (head.starts_with("<")) return "HTML/XML text";
    if (head.starts_with("{") || head.starts_with("[")) return "JSON text";
    return "text";
  }
  std::string hex = "unrecognised bytes";
  static constexpr char kDigits[] = "0123456789abcdef";
  for (std::size_t i = 0; i < std::min<std::size_t>(bytes.size(), 8); ++i) {
    hex += ' ';
    hex += kDigits[bytes[i] >> 4];
    hex += kDigits[bytes[i] & 0xF];
  }
  return hex;
}

std::string errno_text(int error) {
  return std::error_code(error, std::generic_category()).message();
}

[[noreturn]] void throw_io(const std::filesystem::path& path, const char* what, int error) {
  throw IoError("cannot " + std::string(what) + " image file '" + path.string() +
                "': " + errno_text(error));
}

using FileDescriptor = detail::UniqueFd;

/// For one output axis: which source samples each output sample averages, with weights.
struct AxisTaps {
  std::vector<int> first;           ///< per output index: first source index
  std::vector<int> count;           ///< per output index: number of source samples
  std::vector<float> weights;       ///< per output index: `count` weights, packed
  std::vector<std::size_t> offset;  ///< per output index: where its weights start
};

/// Shrinking: each output sample is the exact mean of the source interval it covers,
/// partial source samples weighted by the fraction covered (a box filter).
/// Growing (or same size): bilinear between the two nearest source centres.
/// Taps of the output indices [begin, begin + n) of a src -> dst axis (index k of the
/// result is output begin + k): a window costs what the window holds, not the whole axis.
AxisTaps make_taps(int src, int dst, int begin, int n) {
  AxisTaps taps;
  taps.first.resize(n);
  taps.count.resize(n);
  taps.offset.resize(n);
  const double scale = static_cast<double>(src) / dst;
  for (int k = 0; k < n; ++k) {
    const int i = begin + k;
    taps.offset[k] = taps.weights.size();
    if (dst < src) {
      const double begin = i * scale;
      const double end = (i + 1) * scale;
      const int first = static_cast<int>(std::floor(begin));
      const int last = std::min(src - 1, static_cast<int>(std::ceil(end)) - 1);
      taps.first[k] = first;
      taps.count[k] = last - first + 1;
      for (int j = first; j <= last; ++j) {
        const double covered = std::min<double>(end, j + 1) - std::max<double>(begin, j);
        taps.weights.push_back(static_cast<float>(covered / scale));
      }
    } else {
      const double centre = std::clamp((i + 0.5) * scale - 0.5, 0.0, static_cast<double>(src - 1));
      const int left = std::min(static_cast<int>(centre), src - 1);
      const int right = std::min(left + 1, src - 1);
      const double t = centre - left;
      taps.first[k] = left;
      if (right == left || t == 0.0) {
        taps.count[k] = 1;
        taps.weights.push_back(1.0f);
      } else {
        taps.count[k] = 2;
        taps.weights.push_back(static_cast<float>(1.0 - t));
        taps.weights.push_back(static_cast<float>(t));
      }
    }
  }
  return taps;
}

std::uint8_t to_byte(float v) {
  return static_cast<std::uint8_t>(std::clamp(std::lround(v), 0L, 255L));
}

}  // namespace

namespace detail {

void check_image_layout(const Image& image, const char* caller) {
  if (image.width <= 0 || image.height <= 0 ||
      image.rgb.size() != static_cast<std::size_t>(image.width) * image.height * 3) {
    throw InputError(std::string(caller) + ": image is " + std::to_string(image.width) + "x" +
                     std::to_string(image.height) + " with " + std::to_string(image.rgb.size()) +
                     " bytes; expected positive sides and width * height * 3 bytes");
  }
}

}  // namespace detail

ImageFormat sniff_format(std::span<const std::uint8_t> bytes) {
  if (starts_with(bytes, kJpegMagic)) return ImageFormat::kJpeg;
  if (starts_with(bytes, kPngMagic)) return ImageFormat::kPng;
  return ImageFormat::kUnknown;
}

Image decode_image(std::span<const std::uint8_t> bytes, const DecodeOptions& options) {
  if (bytes.size() > options.max_bytes) {
    throw DecodeError(DecodeFailure::kTooLarge, "image is " + std::to_string(bytes.size()) +
                                                    " bytes, over the limit of " +
                                                    std::to_string(options.max_bytes) + " bytes");
  }
  if (bytes.empty()) throw DecodeError(DecodeFailure::kEmpty, "image is empty (0 bytes)");
  switch (sniff_format(bytes)) {
    case ImageFormat::kJpeg:
      return detail::decode_jpeg(bytes, options);
    case ImageFormat::kPng:
      return detail::decode_png(bytes, options);
    case ImageFormat::kUnknown:
      break;
  }
  if (is_cut_magic(bytes, kJpegMagic) || is_cut_magic(bytes, kPngMagic)) {
    throw DecodeError(DecodeFailure::kTruncated, "truncated image: the data ends " +
                                                     std::to_string(bytes.size()) +
                                                     " bytes in, inside the format's magic bytes");
  }
  throw DecodeError(
      DecodeFailure::kUnsupported,
      "unsupported image format: " + describe_unknown(bytes) + " (gmi decodes JPEG and PNG)");
}

Image read_image_file(const std::filesystem::path& path, const DecodeOptions& options) {
  const FileDescriptor file(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (file.get() < 0) throw_io(path, "open", errno);
  struct stat info {};
  if (::fstat(file.get(), &info) != 0) throw_io(path, "stat", errno);
  if (S_ISDIR(info.st_mode)) throw_io(path, "read", EISDIR);
  if (S_ISREG(info.st_mode) && static_cast<std::uint64_t>(info.st_size) > options.max_bytes) {
    throw DecodeError(DecodeFailure::kTooLarge, path.string() + ": image file is " +
                                                    std::to_string(info.st_size) +
                                                    " bytes, over the limit of " +
                                                    std::to_string(options.max_bytes) + " bytes");
  }

  // Read to the end rather than trusting st_size (pipes report 0, files can grow), but
  // never more than one byte past the limit, which decode_image then refuses.
  std::vector<std::uint8_t> bytes;
  const std::size_t cap = options.max_bytes + (options.max_bytes < SIZE_MAX ? 1 : 0);
  bytes.resize(std::min<std::size_t>(
      cap, S_ISREG(info.st_mode) ? static_cast<std::size_t>(info.st_size) + 1 : 1 << 16));
  std::size_t used = 0;
  for (;;) {
    if (used == bytes.size()) {
      if (bytes.size() >= cap) break;
      bytes.resize(std::min(cap, std::max<std::size_t>(bytes.size() * 2, 1 << 16)));
    }
    const ssize_t n = ::read(file.get(), bytes.data() + used, bytes.size() - used);
    if (n < 0) {
      if (errno == EINTR) continue;
      throw_io(path, "read", errno);
    }
    if (n == 0) break;
    used += static_cast<std::size_t>(n);
  }
  bytes.resize(used);

  try {
    return decode_image(bytes, options);
  } catch (const DecodeError& e) {
    throw DecodeError(e.failure(), path.string() + ": " + e.what());
  }
}

Image resize(const Image& image, int width, int height) {
  if (width == image.width && height == image.height) {
    detail::check_image_layout(image, "resize");
    return image;
  }
  return resize_window(image, width, height, 0, 0, width, height);
}

Image resize_window(const Image& image, int width, int height, int x0, int y0, int w, int h) {
  detail::check_image_layout(image, "resize");
  if (width <= 0 || height <= 0) {
    throw InputError("resize: target size " + std::to_string(width) + "x" + std::to_string(height) +
                     " must be positive");
  }
  if (w <= 0 || h <= 0 || x0 < 0 || y0 < 0 || x0 + static_cast<long long>(w) > width ||
      y0 + static_cast<long long>(h) > height) {
    throw InputError("resize: window " + std::to_string(w) + "x" + std::to_string(h) + " at (" +
                     std::to_string(x0) + ", " + std::to_string(y0) + ") is not inside " +
                     std::to_string(width) + "x" + std::to_string(height));
  }
  const AxisTaps across = make_taps(image.width, width, x0, w);
  const AxisTaps down = make_taps(image.height, height, y0, h);
  // Only the source rows the window's output rows read (taps are monotone).
  const int row_first = down.first.front();
  const int row_last = down.first.back() + down.count.back() - 1;
  const int rows_needed = row_last - row_first + 1;
  const int width_out = w;

  // Horizontal pass into floats (needed source rows x window width), then vertical.
  std::vector<float> rows(static_cast<std::size_t>(rows_needed) * width_out * 3);
  for (int yy = 0; yy < rows_needed; ++yy) {
    const int y = row_first + yy;
    const std::uint8_t* src = image.rgb.data() + static_cast<std::size_t>(y) * image.width * 3;
    float* dst = rows.data() + static_cast<std::size_t>(yy) * width_out * 3;
    for (int x = 0; x < width_out; ++x) {
      const float* w = across.weights.data() + across.offset[x];
      const std::uint8_t* s = src + static_cast<std::size_t>(across.first[x]) * 3;
      float r = 0, g = 0, b = 0;
      for (int k = 0; k < across.count[x]; ++k, s += 3) {
        r += w[k] * s[0];
        g += w[k] * s[1];
        b += w[k] * s[2];
      }
      dst[x * 3 + 0] = r;
      dst[x * 3 + 1] = g;
      dst[x * 3 + 2] = b;
    }
  }

  Image out;
  out.width = width_out;
  out.height = h;
  out.rgb.resize(static_cast<std::size_t>(width_out) * h * 3);
  const std::size_t row_floats = static_cast<std::size_t>(width_out) * 3;
  std::vector<float> sum(row_floats);
  for (int y = 0; y < h; ++y) {
    std::fill(sum.begin(), sum.end(), 0.0f);
    const float* wt = down.weights.data() + down.offset[y];
    for (int k = 0; k < down.count[y]; ++k) {
      const float* src =
          rows.data() + static_cast<std::size_t>(down.first[y] - row_first + k) * row_floats;
      for (std::size_t i = 0; i < row_floats; ++i) sum[i] += wt[k] * src[i];
    }
    std::uint8_t* dst = out.rgb.data() + static_cast<std::size_t>(y) * row_floats;
    for (std::size_t i = 0; i < row_floats; ++i) dst[i] = to_byte(sum[i]);
  }
  return out;
}

Image resize_center_crop(const Image& image, int side) {
  detail::check_image_layout(image, "resize_center_crop");
  if (side <= 0) {
    throw InputError("resize_center_crop: side " + std::to_string(side) + " must be positive");
  }
  // Scale so the shorter side becomes `side`; the longer one keeps the aspect ratio.
  int width = side;
  int height = side;
  if (image.width < image.height) {
    height = std::max(side, static_cast<int>(std::lround(static_cast<double>(image.height) * side /
                                                         image.width)));
  } else if (image.height < image.width) {
    width = std::max(side, static_cast<int>(std::lround(static_cast<double>(image.width) * side /
                                                        image.height)));
  }
  // Only the centre crop is computed: a 20000 x 1 image costs its crop, not 5 M x 256.
  return resize_window(image, width, height, (width - side) / 2, (height - side) / 2, side, side);
}

}  // namespace gmi
