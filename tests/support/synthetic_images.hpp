#pragma once
/// Synthetic test images: smooth "contents" and three very different "styles", so that
/// tests can build small hubs whose models the built-in encoder tells apart.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <random>
#include <vector>

#include "gmi/image.hpp"

namespace gmi::testing {

/// A synthetic "content": smooth shapes whose layout depends on `content`.
inline Image content_image(int content, int variant, int side = 160) {
  std::mt19937 rng(content * 1000 + variant);
  std::uniform_real_distribution<float> u(0.f, 1.f);
  float cx = 0.3f + 0.4f * ((content * 37) % 10) / 10.f, cy = 0.3f + 0.4f * ((content * 53) % 10) / 10.f;
  float jitter = 0.03f * u(rng);
  Image img;
  img.width = img.height = side;
  img.rgb.resize(static_cast<size_t>(side) * side * 3);
  for (int y = 0; y < side; ++y)
    for (int x = 0; x < side; ++x) {
      float fx = static_cast<float>(x) / side, fy = static_cast<float>(y) / side;
      float d = std::hypot(fx - cx - jitter, fy - cy);
      float base = 0.5f + 0.4f * std::cos(d * (8 + content)) * std::exp(-d);
      for (int c = 0; c < 3; ++c)
        img.rgb[(static_cast<size_t>(y) * side + x) * 3 + c] =
            static_cast<std::uint8_t>(std::clamp(base * 255.f * (0.6f + 0.2f * c * fx), 0.f, 255.f));
    }
  return img;
}

/// Three very different "models": plain, posterised + grainy, inverted + warm.
inline Image styled(const Image& src, int style, int seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.f, 1.f);
  Image out = src;
  for (size_t i = 0; i < out.rgb.size(); ++i) {
    float v = src.rgb[i];
    int c = static_cast<int>(i % 3);
    if (style == 1) v = std::round(v / 64.f) * 64.f + 25.f * nd(rng);
    if (style == 2) v = (255.f - v) * (c == 0 ? 1.0f : c == 1 ? 0.7f : 0.3f);
    out.rgb[i] = static_cast<std::uint8_t>(std::clamp(v, 0.f, 255.f));
  }
  return out;
}

inline void write_file(const std::filesystem::path& p, const std::vector<std::uint8_t>& bytes) {
  std::filesystem::create_directories(p.parent_path());
  std::ofstream(p, std::ios::binary).write(reinterpret_cast<const char*>(bytes.data()),
                                           static_cast<std::streamsize>(bytes.size()));
}

}  // namespace gmi::testing
