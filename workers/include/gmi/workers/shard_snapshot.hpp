#pragma once
// A score worker's shard on local disk: every segment as a snapshot file (SpecIndex::save),
// and a manifest naming them with their tombstones and the store position they hold (the
// change-log cursor and generation, the metric), so that a restarted worker maps its
// segments back and fetches only what changed since; when the change log no longer reaches
// back to that cursor, the cache reloads everything, as on a first start.
//
// Files, in `dir` (local to one worker; shards may share a directory):
//   shard-<i>-of-<n>.json                 the manifest, replaced atomically (write, fsync, rename)
//   shard-<i>-of-<n>-<run>-<serial>.gmisnap  one per segment, written once, never changed
// A file no manifest names (a crash between the two, or a compacted-away segment) is removed
// by the next write.
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "gmi/segments.hpp"

namespace gmi::workers {

/// Where the shard's segments stand in the store.
struct ShardPosition {
  std::string cursor;               ///< SpecStore::changes_since's cursor after these segments
  std::uint64_t generation = 0;
  std::uint64_t metric_version = 0;  ///< 0: none
  std::string metric_checksum;       ///< Metric::checksum(), empty for none
};

class ShardSnapshots {
 public:
  /// Creates `dir` if needed. `verify`: check every segment's checksum on restore (reads
  /// each file once); otherwise only the header and the arrays read into memory.
  ShardSnapshots(std::string dir, int shard, int shards, SpecStorage storage, EncoderIdentity image,
                 EncoderIdentity text, bool verify);

  /// The manifest's position, or nullopt when there is none. Throws SpecFormatError when it
  /// is not a manifest of this shard, storage and these encoders.
  std::optional<ShardPosition> position() const;

  struct Restored {
    std::vector<std::pair<std::shared_ptr<const SpecIndex>, std::vector<bool>>> segments;  ///< with tombstones
  };
  /// Opens the manifest's segments (memory-mapped binary16 points), in `metric`'s space (the
  /// manifest's metric: the caller checks position() first). Throws SpecFormatError, IoError
  /// or EncoderMismatchError when a file is missing, damaged or of another metric.
  Restored restore(const std::shared_ptr<const Metric>& metric);

  struct Written {
    std::size_t files = 0, bytes = 0, removed = 0;  ///< segment files written now, their bytes; files removed
  };
  /// Writes each segment of `hub` not on disk yet, then the manifest, then removes the files
  /// it no longer names. Throws IoError (the previous manifest then still stands).
  Written write(const SegmentedIndex& hub, const ShardPosition& position);

  const std::string& manifest_path() const { return manifest_; }

 private:
  std::string dir_, prefix_, manifest_;
  int shard_, shards_;
  SpecStorage storage_;
  EncoderIdentity image_, text_;
  bool verify_;
  std::string run_;  // distinguishes this process's files from an earlier one's
  std::uint64_t serial_ = 0;
  // Segments on disk: the index (by ownership, so a freed one never matches) and its file.
  std::vector<std::pair<std::weak_ptr<const SpecIndex>, std::string>> on_disk_;
};

}  // namespace gmi::workers
