#pragma once
// Little-endian helpers shared by the binary formats (gmispec, gmimetric): CRC-32, u32 and
// float32 arrays through their bit patterns, so files read the same on any host.
#include <zlib.h>

#include <algorithm>
#include <array>
#include <bit>
#include <cstdint>
#include <cstring>
#include <vector>

namespace gmi::binary {

// CRC-32 (IEEE 802.3, reflected polynomial 0xEDB88320): zlib's crc32(), which reads several
// bytes a step (a spec's check is on the path of every load).
inline std::uint32_t crc32(const std::uint8_t* data, std::size_t size) {
  uLong c = ::crc32(0L, Z_NULL, 0);
  while (size > 0) {  // zlib takes uInt lengths
    const auto step = static_cast<uInt>(std::min<std::size_t>(size, 1u << 30));
    c = ::crc32(c, data, step);
    data += step;
    size -= step;
  }
  return static_cast<std::uint32_t>(c);
}

inline void put_u32(std::vector<std::uint8_t>& out, std::uint32_t v) {
  for (int i = 0; i < 4; ++i) out.push_back(static_cast<std::uint8_t>(v >> (8 * i)));
}

inline std::uint32_t get_u32(const std::uint8_t* p) {
  return static_cast<std::uint32_t>(p[0]) | static_cast<std::uint32_t>(p[1]) << 8 |
         static_cast<std::uint32_t>(p[2]) << 16 | static_cast<std::uint32_t>(p[3]) << 24;
}

inline void put_floats(std::vector<std::uint8_t>& out, const float* values, std::size_t count) {
  if constexpr (std::endian::native == std::endian::little) {
    const std::size_t at = out.size();
    out.resize(at + 4 * count);
    if (count) std::memcpy(out.data() + at, values, 4 * count);
  } else {
    for (std::size_t i = 0; i < count; ++i) {
      std::uint32_t bits;
      std::memcpy(&bits, &values[i], sizeof bits);
      put_u32(out, bits);
    }
  }
}

inline void get_floats(const std::uint8_t* p, std::size_t count, float* values) {
  if constexpr (std::endian::native == std::endian::little) {
    if (count) std::memcpy(values, p, 4 * count);
  } else {
    for (std::size_t i = 0; i < count; ++i) {
      std::uint32_t bits = get_u32(p + 4 * i);
      std::memcpy(&values[i], &bits, sizeof bits);
    }
  }
}

inline std::size_t pad_to_8(std::size_t n) { return (n + 7) / 8 * 8; }

}  // namespace gmi::binary
