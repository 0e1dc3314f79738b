// binary16 conversions: exhaustive over every binary16, and rounding checked against the
// neighbours of each float tried.
#include "gmi/half.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

namespace gmi {
namespace {

bool is_nan_half(std::uint16_t h) { return (h & 0x7c00u) == 0x7c00u && (h & 0x3ffu) != 0; }

TEST(Half, EveryBinary16RoundTripsAndTheBulkWideningAgreesWithTheScalarOne) {
  std::vector<std::uint16_t> all(65536);
  for (std::uint32_t h = 0; h < 65536; ++h) all[h] = static_cast<std::uint16_t>(h);
  std::vector<float> wide(all.size());
  halves_to_floats(all.data(), wide.data(), all.size());  // F16C where the CPU has it
  for (std::uint32_t h = 0; h < 65536; ++h) {
    const auto x = static_cast<std::uint16_t>(h);
    const float f = half_to_float(x);
    if (is_nan_half(x)) {
      EXPECT_TRUE(std::isnan(f));
      EXPECT_TRUE(std::isnan(wide[h]));
      EXPECT_TRUE(is_nan_half(float_to_half(f)));
      continue;
    }
    ASSERT_EQ(std::memcmp(&f, &wide[h], sizeof f), 0) << "half " << h;
    ASSERT_EQ(float_to_half(f), x) << "half " << h << " = " << f;
  }
  // Known values.
  EXPECT_EQ(half_to_float(0x3c00), 1.0f);
  EXPECT_EQ(half_to_float(0xc000), -2.0f);
  EXPECT_EQ(half_to_float(0x7bff), 65504.0f);
  EXPECT_EQ(half_to_float(0x0001), std::ldexp(1.0f, -24));
  EXPECT_EQ(half_to_float(0x0400), std::ldexp(1.0f, -14));
  EXPECT_TRUE(std::isinf(half_to_float(0x7c00)));
}

TEST(Half, FloatsRoundToTheNearestBinary16TiesToEven) {
  std::mt19937 rng(3);
  std::uniform_int_distribution<std::uint32_t> bits;
  int tried = 0;
  for (int i = 0; i < 200000; ++i) {
    std::uint32_t b = bits(rng);
    // Mostly the range embeddings live in, some of everything.
    if (i % 4 != 0) b = (b & 0x807fffffu) | ((100u + b % 30u) << 23);
    float f;
    std::memcpy(&f, &b, sizeof f);
    if (std::isnan(f)) continue;
    const std::uint16_t h = float_to_half(f);
    const double got = half_to_float(h);
    if (std::fabs(f) >= 65520.0f) {
      EXPECT_TRUE(std::isinf(got)) << f;
      continue;
    }
    // No binary16 is nearer: check the neighbours on both sides.
    const double err = std::fabs(got - f);
    for (int step : {-1, 1}) {
      const auto n = static_cast<std::uint16_t>(h + step);
      if (is_nan_half(n) || (h & 0x7fffu) == 0 || (n & 0x7c00u) == 0x7c00u) continue;
      const double other = std::fabs(static_cast<double>(half_to_float(n)) - f);
      ASSERT_LE(err, other) << "f=" << f << " rounded to " << got;
      if (err == other) EXPECT_EQ(h & 1u, 0u) << "a tie went to the odd one: " << f;
    }
    ++tried;
  }
  EXPECT_GT(tried, 150000);
  // The bulk narrowing (F16C where the CPU has it) gives the scalar one's bits, NaN included
  // (a NaN among its 8 lanes sends the block the scalar way), also past a block's end.
  std::vector<float> many(200003);
  for (std::size_t i = 0; i < many.size(); ++i) {
    std::uint32_t b = bits(rng);
    if (i % 3 != 0) b = (b & 0x807fffffu) | ((100u + b % 30u) << 23);
    std::memcpy(&many[i], &b, sizeof b);
  }
  many[17] = std::numeric_limits<float>::quiet_NaN();
  std::vector<std::uint16_t> bulk(many.size());
  floats_to_halves(many.data(), bulk.data(), many.size());
  for (std::size_t i = 0; i < many.size(); ++i) ASSERT_EQ(bulk[i], float_to_half(many[i])) << "float " << many[i];
  EXPECT_EQ(float_to_half(std::ldexp(1.0f, -26)), 0u);         // below half the smallest subnormal
  EXPECT_EQ(float_to_half(std::ldexp(3.0f, -26)), 0x0001u);    // 0.75 of it rounds up
  EXPECT_EQ(float_to_half(1.0f + std::ldexp(1.0f, -11)), 0x3c00u);  // a tie, to even
  EXPECT_EQ(float_to_half(-std::numeric_limits<float>::infinity()), 0xfc00u);
}

}  // namespace
}  // namespace gmi
