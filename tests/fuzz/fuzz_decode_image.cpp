// libFuzzer entry point for the image decoders: whatever the bytes, decode_image must
// either return a well-formed image or throw gmi::Error, never crash, hang or leak.
//
// Build: CC=clang CXX=clang++ cmake -S . -B build-fuzz -DGMI_FUZZ=ON && cmake --build
// build-fuzz --target fuzz_decode_image; run: build-fuzz/tests/fuzz_decode_image CORPUS/
// -max_len=65536 -rss_limit_mb=2048. Seeds: any small JPEGs and PNGs (progressive,
// greyscale, CMYK, EXIF, palette, alpha, 16-bit, interlaced).
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <span>

#include "gmi/error.hpp"
#include "gmi/image.hpp"

namespace {

/// Small limits keep every run fast; the limits themselves are part of what is tested.
gmi::DecodeOptions fuzz_options() {
  gmi::DecodeOptions options;
  options.max_bytes = 1 << 16;
  options.max_pixels = 1 << 18;  // 512 x 512
  return options;
}

void require(bool condition) {
  if (!condition) std::abort();
}

bool well_formed(const gmi::Image& image) {
  return image.width > 0 && image.height > 0 &&
         image.rgb.size() == static_cast<std::size_t>(image.width) * image.height * 3;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::span<const std::uint8_t> bytes(data, size);
  gmi::DecodeOptions options = fuzz_options();
  try {
    const gmi::Image image = gmi::decode_image(bytes, options);
    require(well_formed(image));
    require(static_cast<std::uint64_t>(image.width) * image.height <= options.max_pixels);

    // Again with DCT scaling (JPEG only; PNG ignores it): never below the target.
    options.target_min_side = std::max(1, std::min(image.width, image.height) / 3);
    const gmi::Image scaled = gmi::decode_image(bytes, options);
    require(well_formed(scaled));
    require(std::min(scaled.width, scaled.height) >= options.target_min_side);

    require(well_formed(gmi::resize_center_crop(scaled, 7)));
    require(well_formed(gmi::resize(scaled, 5, 3)));
  } catch (const gmi::Error&) {
    // Refusing bad input is the expected outcome.
  }
  return 0;
}
