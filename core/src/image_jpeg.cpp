// JPEG decoding and encoding with libjpeg-turbo.
//
// libjpeg reports errors through a callback that must not return; the default one calls
// exit(). Ours formats the message and longjmps back into the decoder, which then turns it
// into a DecodeError. To keep that jump safe, everything that lives across it (the libjpeg
// structs, the output buffers) is a member of a decoder object owned by the caller's frame,
// and the function holding the setjmp has no locals with destructors.
#include <algorithm>
#include <csetjmp>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <span>
#include <string>
#include <utility>
#include <vector>

// clang-format off
#include <cstdio>  // jpeglib.h uses FILE and size_t without declaring them
#include <jpeglib.h>
#include <jerror.h>
// clang-format on

#include "gmi/error.hpp"
#include "image_codecs.hpp"

namespace gmi::detail {
namespace {

/// A progressive JPEG may carry any number of scans, each one a full pass over the
/// coefficients; real encoders write about ten. Beyond this the file is an attack.
constexpr int kMaxScans = 256;

/// libjpeg's error manager, extended so that errors jump back to us instead of exit().
struct JpegErrorManager {
  jpeg_error_mgr pub;  // first: libjpeg only sees this part
  std::jmp_buf jump;
  DecodeFailure failure = DecodeFailure::kCorrupt;
  char message[JMSG_LENGTH_MAX] = {};
  /// Reading the rows of a single-scan image: running out of data is only fatal if the
  /// decoder then still needs data (see on_jpeg_message).
  bool data_may_end = false;
  bool data_ended = false;
};

DecodeFailure failure_for(int msg_code) {
  switch (msg_code) {
    case JERR_BAD_PRECISION:  // 12- and 16-bit JPEGs
    case JERR_CONVERSION_NOTIMPL:
    case JERR_NOT_COMPILED:
    case JERR_ARITH_NOTIMPL:
      return DecodeFailure::kUnsupported;
    case JERR_IMAGE_TOO_BIG:
    case JERR_WIDTH_OVERFLOW:
    case JERR_OUT_OF_MEMORY:
      return DecodeFailure::kTooLarge;
    default:
      return DecodeFailure::kCorrupt;
  }
}

[[noreturn]] void jump_with(j_common_ptr cinfo, DecodeFailure failure) {
  auto* err = reinterpret_cast<JpegErrorManager*>(cinfo->err);
  (*cinfo->err->format_message)(cinfo, err->message);
  err->failure = failure;
  std::longjmp(err->jump, 1);
}

[[noreturn]] void on_jpeg_error(j_common_ptr cinfo) {
  const auto* err = reinterpret_cast<JpegErrorManager*>(cinfo->err);
  jump_with(cinfo, err->data_ended ? DecodeFailure::kTruncated : failure_for(err->pub.msg_code));
}

/// libjpeg treats running out of data as a warning and pads the image with grey; we
/// refuse the image instead. Other warnings (extraneous bytes and the like) are common in
/// files that display fine everywhere, so they pass.
///
/// The Huffman decoder reads ahead, so a baseline file that lacks only its EOI marker
/// also runs out of data, on its last rows. There the end of data merely puts a fake EOI
/// in place; only if the decoder then needs bits it does not have (which libjpeg reports
/// as a further warning) is the image really cut short.
void on_jpeg_message(j_common_ptr cinfo, int msg_level) {
  if (msg_level >= 0) return;  // trace output
  auto* err = reinterpret_cast<JpegErrorManager*>(cinfo->err);
  if (err->data_ended) jump_with(cinfo, DecodeFailure::kTruncated);
  if (cinfo->err->msg_code == JWRN_JPEG_EOF) {
    if (!err->data_may_end) jump_with(cinfo, DecodeFailure::kTruncated);
    err->data_ended = true;
  }
}

void on_jpeg_progress(j_common_ptr cinfo) {
  if (!cinfo->is_decompressor) return;
  auto* dinfo = reinterpret_cast<j_decompress_ptr>(cinfo);
  if (dinfo->input_scan_number > kMaxScans) {
    auto* err = reinterpret_cast<JpegErrorManager*>(cinfo->err);
    std::snprintf(err->message, sizeof err->message, "more than %d scans", kMaxScans);
    err->failure = DecodeFailure::kCorrupt;
    std::longjmp(err->jump, 1);
  }
}

std::uint8_t mul255(unsigned a, unsigned b) {
  return static_cast<std::uint8_t>((a * b + 127) / 255);
}

/// One JPEG decode: the libjpeg state plus everything written while libjpeg may jump.
class JpegDecoder {
 public:
  JpegDecoder() {
    cinfo_.err = jpeg_std_error(&err_.pub);
    err_.pub.error_exit = on_jpeg_error;
    err_.pub.emit_message = on_jpeg_message;
    progress_.progress_monitor = on_jpeg_progress;
  }
  ~JpegDecoder() { jpeg_destroy_decompress(&cinfo_); }
  JpegDecoder(const JpegDecoder&) = delete;
  JpegDecoder& operator=(const JpegDecoder&) = delete;

  /// False on failure; then failure() and message() say why.
  bool decode(std::span<const std::uint8_t> bytes, const DecodeOptions& options) {
    if (setjmp(err_.jump)) {
      failure_ = err_.failure;
      return false;
    }
    jpeg_create_decompress(&cinfo_);
    cinfo_.progress = &progress_;
    jpeg_mem_src(&cinfo_, bytes.data(), static_cast<unsigned long>(bytes.size()));
    jpeg_save_markers(&cinfo_, JPEG_APP0 + 1, 0xFFFF);
    jpeg_read_header(&cinfo_, TRUE);

    const std::uint64_t pixels = std::uint64_t{cinfo_.image_width} * cinfo_.image_height;
    if (pixels > options.max_pixels) {
      failure_ = DecodeFailure::kTooLarge;
      too_large_ = true;
      return false;
    }
    orientation_ = orientation_from_markers();

    // libjpeg converts grey and YCbCr to RGB itself, but not CMYK/YCCK: those come out as
    // CMYK and are converted below.
    cmyk_ = cinfo_.jpeg_color_space == JCS_CMYK || cinfo_.jpeg_color_space == JCS_YCCK;
    cinfo_.out_color_space = cmyk_ ? JCS_CMYK : JCS_RGB;
    choose_scale(options.target_min_side);

    jpeg_start_decompress(&cinfo_);
    const int expected_components = cmyk_ ? 4 : 3;
    if (cinfo_.output_components != expected_components) {
      std::snprintf(err_.message, sizeof err_.message, "libjpeg produced %d components",
                    cinfo_.output_components);
      failure_ = DecodeFailure::kUnsupported;
      return false;
    }
    image_.width = static_cast<int>(cinfo_.output_width);
    image_.height = static_cast<int>(cinfo_.output_height);
    image_.rgb.resize(std::size_t{cinfo_.output_width} * cinfo_.output_height * 3);
    // A multi-scan (progressive) image was read whole by jpeg_start_decompress.
    err_.data_may_end = !jpeg_has_multiple_scans(&cinfo_);
    if (cmyk_) {
      read_cmyk_rows();
    } else {
      read_rgb_rows();
    }
    // No jpeg_finish_decompress: every pixel is in, and a file that only lacks its EOI
    // marker is not worth refusing.
    return true;
  }

  DecodeFailure failure() const { return failure_; }
  const char* libjpeg_message() const { return err_.message; }
  bool too_large() const { return too_large_; }
  int stored_width() const { return static_cast<int>(cinfo_.image_width); }
  int stored_height() const { return static_cast<int>(cinfo_.image_height); }
  int orientation() const { return orientation_; }
  Image take_image() { return std::move(image_); }

 private:
  int orientation_from_markers() const {
    static constexpr std::uint8_t kExifHeader[6] = {'E', 'x', 'i', 'f', 0, 0};
    for (jpeg_saved_marker_ptr m = cinfo_.marker_list; m != nullptr; m = m->next) {
      if (m->marker == JPEG_APP0 + 1 && m->data_length >= sizeof kExifHeader &&
          std::memcmp(m->data, kExifHeader, sizeof kExifHeader) == 0) {
        return exif_orientation({m->data, m->data_length});
      }
    }
    return 1;
  }

  /// The smallest DCT scale n/8 whose shorter output side is still >= target.
  void choose_scale(int target_min_side) {
    if (target_min_side <= 0) return;
    cinfo_.scale_denom = 8;
    for (unsigned num = 1; num <= 8; ++num) {
      cinfo_.scale_num = num;
      jpeg_calc_output_dimensions(&cinfo_);
      if (std::min(cinfo_.output_width, cinfo_.output_height) >=
          static_cast<JDIMENSION>(target_min_side)) {
        return;
      }
    }
  }

  void read_rgb_rows() {
    constexpr int kBatch = 16;
    JSAMPROW rows[kBatch];
    const std::size_t stride = std::size_t{cinfo_.output_width} * 3;
    while (cinfo_.output_scanline < cinfo_.output_height) {
      const JDIMENSION first = cinfo_.output_scanline;
      const int n = static_cast<int>(std::min<JDIMENSION>(kBatch, cinfo_.output_height - first));
      for (int i = 0; i < n; ++i) rows[i] = image_.rgb.data() + (first + i) * stride;
      jpeg_read_scanlines(&cinfo_, rows, static_cast<JDIMENSION>(n));
    }
  }

  /// Adobe writes CMYK inverted (255 = no ink) and marks it with an APP14 marker; plain
  /// CMYK is taken as it stands. Either way RGB = (1 - C)(1 - K) per channel.
  void read_cmyk_rows() {
    const std::size_t width = cinfo_.output_width;
    cmyk_row_.resize(width * 4);
    const bool inverted = cinfo_.saw_Adobe_marker;
    while (cinfo_.output_scanline < cinfo_.output_height) {
      const std::size_t y = cinfo_.output_scanline;
      JSAMPROW row = cmyk_row_.data();
      jpeg_read_scanlines(&cinfo_, &row, 1);
      std::uint8_t* out = image_.rgb.data() + y * width * 3;
      for (std::size_t x = 0; x < width; ++x) {
        const std::uint8_t* p = &cmyk_row_[x * 4];
        unsigned c = p[0], m = p[1], ye = p[2], k = p[3];
        if (!inverted) c = 255 - c, m = 255 - m, ye = 255 - ye, k = 255 - k;
        out[x * 3 + 0] = mul255(c, k);
        out[x * 3 + 1] = mul255(m, k);
        out[x * 3 + 2] = mul255(ye, k);
      }
    }
  }

  jpeg_decompress_struct cinfo_{};
  JpegErrorManager err_;
  jpeg_progress_mgr progress_{};
  DecodeFailure failure_ = DecodeFailure::kCorrupt;
  bool too_large_ = false;
  bool cmyk_ = false;
  int orientation_ = 1;
  std::vector<std::uint8_t> cmyk_row_;
  Image image_;
};

/// One JPEG encode into a buffer that libjpeg grows with malloc (jpeg_mem_dest).
class JpegEncoder {
 public:
  JpegEncoder() {
    cinfo_.err = jpeg_std_error(&err_.pub);
    err_.pub.error_exit = on_jpeg_error;
    err_.pub.emit_message = [](j_common_ptr, int) {};
  }
  ~JpegEncoder() {
    jpeg_destroy_compress(&cinfo_);
    std::free(buffer_);
  }
  JpegEncoder(const JpegEncoder&) = delete;
  JpegEncoder& operator=(const JpegEncoder&) = delete;

  bool encode(const Image& image, int quality) {
    if (setjmp(err_.jump)) return false;
    jpeg_create_compress(&cinfo_);
    jpeg_mem_dest(&cinfo_, &buffer_, &size_);
    cinfo_.image_width = static_cast<JDIMENSION>(image.width);
    cinfo_.image_height = static_cast<JDIMENSION>(image.height);
    cinfo_.input_components = 3;
    cinfo_.in_color_space = JCS_RGB;
    jpeg_set_defaults(&cinfo_);
    jpeg_set_quality(&cinfo_, quality, TRUE);
    jpeg_start_compress(&cinfo_, TRUE);
    const std::size_t stride = std::size_t{cinfo_.image_width} * 3;
    while (cinfo_.next_scanline < cinfo_.image_height) {
      // libjpeg's API is not const-correct; it only reads the rows.
      JSAMPROW row = const_cast<std::uint8_t*>(image.rgb.data()) + cinfo_.next_scanline * stride;
      jpeg_write_scanlines(&cinfo_, &row, 1);
    }
    jpeg_finish_compress(&cinfo_);
    return true;
  }

  std::vector<std::uint8_t> bytes() const { return {buffer_, buffer_ + size_}; }
  const char* libjpeg_message() const { return err_.message; }

 private:
  jpeg_compress_struct cinfo_{};
  JpegErrorManager err_;
  unsigned char* buffer_ = nullptr;
  unsigned long size_ = 0;
};

std::string describe_failure(DecodeFailure failure, const char* libjpeg_message) {
  switch (failure) {
    case DecodeFailure::kTruncated:
      return "truncated JPEG: the data ends before the image does";
    case DecodeFailure::kUnsupported:
      return std::string("unsupported JPEG: ") + libjpeg_message;
    case DecodeFailure::kTooLarge:
      return std::string("JPEG too large: ") + libjpeg_message;
    default:
      return std::string("corrupt JPEG: ") + libjpeg_message;
  }
}

}  // namespace

Image decode_jpeg(std::span<const std::uint8_t> bytes, const DecodeOptions& options) {
  JpegDecoder decoder;
  if (!decoder.decode(bytes, options)) {
    if (decoder.too_large()) {
      throw DecodeError(DecodeFailure::kTooLarge,
                        "JPEG too large: " + std::to_string(decoder.stored_width()) + "x" +
                            std::to_string(decoder.stored_height()) +
                            " pixels is over the limit of " + std::to_string(options.max_pixels) +
                            " pixels");
    }
    throw DecodeError(decoder.failure(),
                      describe_failure(decoder.failure(), decoder.libjpeg_message()));
  }
  const int orientation = decoder.orientation();
  return apply_exif_orientation(decoder.take_image(), orientation);
}

}  // namespace gmi::detail

namespace gmi {

std::vector<std::uint8_t> encode_jpeg(const Image& image, int quality) {
  detail::check_image_layout(image, "encode_jpeg");
  if (quality < 1 || quality > 100) {
    throw InputError("encode_jpeg: quality " + std::to_string(quality) + " is outside 1..100");
  }
  detail::JpegEncoder encoder;
  if (!encoder.encode(image, quality)) {
    throw InputError("encode_jpeg: libjpeg refused the " + std::to_string(image.width) + "x" +
                     std::to_string(image.height) + " image: " + encoder.libjpeg_message());
  }
  return encoder.bytes();
}

}  // namespace gmi
