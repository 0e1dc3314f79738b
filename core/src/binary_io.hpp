#pragma once
// Little-endian helpers shared by the binary formats (gmispec, gmimetric): CRC-32, u32 and
// float32 arrays through their bit patterns, so files read the same on any host.
#include <array>
#include <cstdint>
#include <cstring>
#include <vector>

namespace gmi::binary {

// CRC-32 (IEEE 802.3, reflected polynomial 0xEDB88320), as zlib's crc32() computes it.
constexpr std::array<std::uint32_t, 256> make_crc_table() {
  std::array<std::uint32_t, 256> table{};
  for (std::uint32_t i = 0; i < 256; ++i) {
    std::uint32_t c = i;
    for (int k = 0; k < 8; ++k) c = (c & 1U) ? 0xEDB88320U ^ (c >> 1) : c >> 1;
    table[i] = c;
  }
  return table;
}
inline constexpr auto kCrcTable = make_crc_table();

inline std::uint32_t crc32(const std::uint8_t* data, std::size_t size) {
  std::uint32_t c = 0xFFFFFFFFU;
  for (std::size_t i = 0; i < size; ++i) c = kCrcTable[(c ^ data[i]) & 0xFFU] ^ (c >> 8);
  return c ^ 0xFFFFFFFFU;
}

inline void put_u32(std::vector<std::uint8_t>& out, std::uint32_t v) {
  for (int i = 0; i < 4; ++i) out.push_back(static_cast<std::uint8_t>(v >> (8 * i)));
}

inline std::uint32_t get_u32(const std::uint8_t* p) {
  return static_cast<std::uint32_t>(p[0]) | static_cast<std::uint32_t>(p[1]) << 8 |
         static_cast<std::uint32_t>(p[2]) << 16 | static_cast<std::uint32_t>(p[3]) << 24;
}

inline void put_floats(std::vector<std::uint8_t>& out, const float* values, std::size_t count) {
  for (std::size_t i = 0; i < count; ++i) {
    std::uint32_t bits;
    std::memcpy(&bits, &values[i], sizeof bits);
    put_u32(out, bits);
  }
}

inline void get_floats(const std::uint8_t* p, std::size_t count, float* values) {
  for (std::size_t i = 0; i < count; ++i) {
    std::uint32_t bits = get_u32(p + 4 * i);
    std::memcpy(&values[i], &bits, sizeof bits);
  }
}

inline std::size_t pad_to_8(std::size_t n) { return (n + 7) / 8 * 8; }

}  // namespace gmi::binary
