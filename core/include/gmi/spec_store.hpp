#pragma once
/// Where specs live. Two backends: a directory (the embedded default) and Redis.
///
/// URIs: "dir:PATH" (or a plain path), "redis://[USER@]HOST[:PORT][/DB][?prefix=P]".
/// The Redis password is never taken from the URI (it would show in argv): it comes from
/// GMI_REDIS_PASSWORD or the file named by GMI_REDIS_PASSWORD_FILE.
/// Thread-safety: a store instance is NOT thread-safe; use one per thread.
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "gmi/spec.hpp"

namespace gmi {

/// What changed in a store since a cursor (see SpecStore::changes_since).
struct SpecChanges {
  std::string cursor;               ///< pass back next time
  std::vector<std::string> models;  ///< put or removed since the old cursor (may repeat)
  bool complete = false;            ///< false: the log does not reach back; reload everything
};

class SpecStore {
 public:
  virtual ~SpecStore() = default;
  /// Stores (or atomically replaces) the spec under spec.model_id.
  virtual void put(const Spec& spec) = 0;
  /// std::nullopt when absent. Throws SpecFormatError if the stored bytes are damaged.
  virtual std::optional<Spec> get(const std::string& model_id) = 0;
  virtual bool remove(const std::string& model_id) = 0;
  /// Sorted model ids.
  virtual std::vector<std::string> list() = 0;
  /// A counter that changes whenever any spec is put or removed (for cache refresh).
  virtual std::uint64_t generation() = 0;
  /// Models put or removed after `cursor`; "" starts a new cursor (complete = false).
  /// Stores without a change log always answer complete = false.
  virtual SpecChanges changes_since(const std::string& cursor) {
    SpecChanges c;
    c.cursor = cursor.empty() ? "0" : cursor;
    return c;
  }
  /// Human-readable location, for messages.
  virtual std::string describe() const = 0;
};

std::unique_ptr<SpecStore> open_spec_store(const std::string& uri);

}  // namespace gmi
