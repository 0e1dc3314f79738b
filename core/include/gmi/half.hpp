#pragma once
/// IEEE 754 binary16 ("fp16") storage for packed embeddings: conversions, rounding to
/// nearest even, and a bulk widening that uses the CPU's F16C instructions when it has them.
#include <cstddef>
#include <cstdint>

namespace gmi {

/// The nearest binary16 to `value` (ties to even); overflow gives infinity, NaN stays NaN.
std::uint16_t float_to_half(float value);
/// The binary16 `h` as a float (exact: every binary16 is a float).
float half_to_float(std::uint16_t h);
/// out[i] = half_to_float(in[i]) for i < n.
void halves_to_floats(const std::uint16_t* in, float* out, std::size_t n);
/// out[i] = float_to_half(in[i]) for i < n.
void floats_to_halves(const float* in, std::uint16_t* out, std::size_t n);

}  // namespace gmi
