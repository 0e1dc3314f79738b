// Links gmi_core alone (no ZeroMQ, Redis, prometheus-cpp or cpp-httplib): the maths and media
// a benchmark, the fuzzer or a binding needs. Decodes a PNG made here, embeds it with the
// built-in encoder and computes its Gram matrix; exits 0 when every step gives what it should.
#include <cmath>
#include <cstdio>

#include "gmi/encoder.hpp"
#include "gmi/image.hpp"
#include "gmi/rkme.hpp"

int main() {
  using namespace gmi;
  Image img;
  img.width = 64;
  img.height = 48;
  img.rgb.resize(64 * 48 * 3);
  for (std::size_t i = 0; i < img.rgb.size(); ++i) img.rgb[i] = static_cast<std::uint8_t>((i * 7) % 251);
  const std::vector<std::uint8_t> png = encode_png(img);
  const Image back = decode_image(png);
  if (back.rgb != img.rgb) {
    std::fprintf(stderr, "core_alone: the PNG did not decode to its pixels\n");
    return 1;
  }
  auto encoder = make_builtin_image_encoder();
  std::vector<Image> batch(6, back);
  for (int i = 0; i < 6; ++i) batch[static_cast<std::size_t>(i)].rgb[static_cast<std::size_t>(i)] ^= 0x55;
  const RowMatrix x = encoder->encode(batch);
  if (x.rows() != 6 || x.cols() != encoder->identity().dim || !x.allFinite()) {
    std::fprintf(stderr, "core_alone: the built-in encoder gave a %ldx%ld matrix\n", static_cast<long>(x.rows()),
                 static_cast<long>(x.cols()));
    return 1;
  }
  const RowMatrix k = gaussian_gram(x, 1.0);
  if (k.rows() != 6 || std::abs(k(0, 0) - 1.0f) > 1e-6f) {
    std::fprintf(stderr, "core_alone: the Gram matrix's diagonal is not 1\n");
    return 1;
  }
  std::printf("core_alone: decode and encode with gmi_core alone: ok (%ld dims)\n", static_cast<long>(x.cols()));
  return 0;
}
