#include <gtest/gtest.h>

#include <cmath>
#include <random>

#include "gmi/encoder.hpp"
#include "gmi/encoder_registry.hpp"
#include "gmi/error.hpp"

namespace gmi {
namespace {

Image gradient_image(int w, int h, int seed, float noise = 0.f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.f, 1.f);
  Image img;
  img.width = w;
  img.height = h;
  img.rgb.resize(static_cast<size_t>(w) * h * 3);
  for (int y = 0; y < h; ++y)
    for (int x = 0; x < w; ++x)
      for (int c = 0; c < 3; ++c) {
        float v = 40.f + 150.f * x / w + 40.f * std::sin(y * 0.05f + c) + noise * nd(rng);
        img.rgb[(static_cast<size_t>(y) * w + x) * 3 + c] =
            static_cast<std::uint8_t>(std::clamp(v, 0.f, 255.f));
      }
  return img;
}

Image tinted(const Image& src, float r, float g, float b) {
  Image out = src;
  for (size_t i = 0; i < out.rgb.size(); i += 3) {
    out.rgb[i] = static_cast<std::uint8_t>(std::min(255.f, src.rgb[i] * r));
    out.rgb[i + 1] = static_cast<std::uint8_t>(std::min(255.f, src.rgb[i + 1] * g));
    out.rgb[i + 2] = static_cast<std::uint8_t>(std::min(255.f, src.rgb[i + 2] * b));
  }
  return out;
}

TEST(BuiltinImageEncoder, IdentityIsVersionedAndWithinBudget) {
  auto enc = make_builtin_image_encoder();
  EXPECT_EQ(enc->identity().name, "gmi-style");
  EXPECT_FALSE(enc->identity().version.empty());
  EXPECT_GT(enc->identity().dim, 64);
  EXPECT_LE(enc->identity().dim, 1024);
  EXPECT_GT(enc->identity().default_gamma, 0);
}

TEST(BuiltinImageEncoder, RowsAreUnitNormAndDeterministic) {
  auto enc = make_builtin_image_encoder();
  std::vector<Image> imgs = {gradient_image(300, 200, 1, 10.f), gradient_image(256, 256, 2)};
  RowMatrix a = enc->encode(imgs);
  RowMatrix b = make_builtin_image_encoder()->encode(imgs);
  ASSERT_EQ(a.rows(), 2);
  ASSERT_EQ(a.cols(), enc->identity().dim);
  for (int i = 0; i < 2; ++i) EXPECT_NEAR(a.row(i).norm(), 1.0, 1e-5);
  EXPECT_EQ((a - b).cwiseAbs().maxCoeff(), 0.f);
  EXPECT_TRUE(a.allFinite());
}

TEST(BuiltinImageEncoder, FlatImageStaysFinite) {
  Image flat;
  flat.width = flat.height = 64;
  flat.rgb.assign(64 * 64 * 3, 0);
  RowMatrix e = make_builtin_image_encoder()->encode({flat});
  EXPECT_TRUE(e.allFinite());
  EXPECT_NEAR(e.row(0).norm(), 1.0, 1e-5);
}

TEST(BuiltinImageEncoder, StyleChangeMovesFartherThanContentJitter) {
  // Same style, slightly different content (noise seed) vs same content, another style
  // (a strong warm tint + grain): the style change must dominate.
  auto enc = make_builtin_image_encoder();
  Image a = gradient_image(256, 256, 1, 3.f);
  Image a2 = gradient_image(256, 256, 2, 3.f);
  Image b = tinted(gradient_image(256, 256, 1, 25.f), 1.3f, 0.9f, 0.5f);
  RowMatrix e = enc->encode({a, a2, b});
  double same = (e.row(0) - e.row(1)).squaredNorm();
  double styled = (e.row(0) - e.row(2)).squaredNorm();
  EXPECT_LT(same * 5, styled);
}

TEST(BuiltinImageEncoder, RejectsMalformedImage) {
  Image bad;
  bad.width = 10;
  bad.height = 10;
  bad.rgb.resize(5);
  EXPECT_THROW(make_builtin_image_encoder()->encode({bad}), InputError);
}

TEST(HashedTextEncoder, SimilarPromptsAreCloserThanUnrelatedOnes) {
  auto enc = make_builtin_text_encoder();
  RowMatrix t = enc->encode({"a close-up of a tabby cat", "a tabby cat, left part",
                             "galaxies in deep space", ""});
  for (int i = 0; i < 3; ++i) EXPECT_NEAR(t.row(i).norm(), 1.0, 1e-5);
  EXPECT_EQ(t.row(3).norm(), 0.f);
  EXPECT_GT(t.row(0).dot(t.row(1)), t.row(0).dot(t.row(2)) + 0.2f);
}

TEST(HashedTextEncoder, IgnoresCaseAndPunctuation) {
  auto enc = make_builtin_text_encoder();
  RowMatrix t = enc->encode({"A Tabby Cat!", "a tabby cat"});
  EXPECT_NEAR(t.row(0).dot(t.row(1)), 1.0, 1e-5);
}

TEST(EncoderFactory, UnknownNameIsAnInputError) {
  EXPECT_THROW(make_image_encoder("clip-vit-b32-missing"), InputError);
  EXPECT_THROW(make_text_encoder("nope"), InputError);
  EXPECT_NO_THROW(make_image_encoder("builtin"));
}

}  // namespace
}  // namespace gmi
