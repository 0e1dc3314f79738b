#pragma once
/// Matrix types shared across the core. Embeddings are stored one per row, row-major,
/// so that one sample (or one reduced point) is contiguous in memory and on disk.
#include <Eigen/Dense>

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace gmi {

using RowMatrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using RowMatrixD = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using Vector = Eigen::VectorXf;
using VectorD = Eigen::VectorXd;

/// The index of the first value that is not finite (NaN or infinite), or `count` when all are.
/// A block at a time by the exponent bits, which compilers vectorise (std::isfinite per value
/// with an early exit they do not): a spec's load checks every value it reads.
inline std::size_t first_non_finite(const float* values, std::size_t count) {
  constexpr std::size_t kBlock = 512;
  for (std::size_t b = 0; b < count; b += kBlock) {
    const std::size_t e = std::min(count, b + kBlock);
    std::uint32_t bad = 0;
    for (std::size_t i = b; i < e; ++i) {
      std::uint32_t bits;
      std::memcpy(&bits, values + i, sizeof bits);
      bad |= static_cast<std::uint32_t>((bits & 0x7f800000u) == 0x7f800000u);
    }
    if (bad)
      for (std::size_t i = b; i < e; ++i) {
        std::uint32_t bits;
        std::memcpy(&bits, values + i, sizeof bits);
        if ((bits & 0x7f800000u) == 0x7f800000u) return i;
      }
  }
  return count;
}
inline bool all_finite(const float* values, std::size_t count) { return first_non_finite(values, count) == count; }
template <class M>
bool all_finite(const M& m) {  // a dense Eigen float array or matrix, contiguous
  return all_finite(m.data(), static_cast<std::size_t>(m.size()));
}

}  // namespace gmi
