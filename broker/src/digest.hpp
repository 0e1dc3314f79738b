#pragma once
// SHA-256 for the broker library (idempotency fingerprints, credential scopes): OpenSSL's
// EVP, behind a small incremental interface.
#include <cstddef>
#include <memory>
#include <string>
#include <string_view>

namespace gmi::detail {

class Sha256 {
 public:
  Sha256();
  ~Sha256();
  Sha256(const Sha256&) = delete;
  Sha256& operator=(const Sha256&) = delete;

  void update(const void* data, std::size_t size);
  /// Appends the length (8 bytes) and then the bytes: a sequence of such fields hashes
  /// unambiguously.
  void field(std::string_view bytes);
  /// The digest as 64 lower-case hex digits; the object is spent afterwards.
  std::string hex();

 private:
  struct Ctx;
  std::unique_ptr<Ctx> ctx_;
};

inline std::string sha256_hex(std::string_view bytes) {
  Sha256 h;
  h.update(bytes.data(), bytes.size());
  return h.hex();
}

}  // namespace gmi::detail
