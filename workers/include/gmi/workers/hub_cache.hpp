#pragma once
/// The specs of one shard of the hub, in memory, kept fresh: a background thread polls the
/// store's generation every refresh_ms and, when it moved, fetches only the specs named in
/// the store's change log (everything, when the log does not reach back), then swaps in a
/// new Identifier. Readers never wait for a refresh: they use the last snapshot.
/// A spec that is damaged or made by other encoders is skipped with a warning, so one bad
/// upload cannot take the hub down. Redis outages keep the last snapshot serving.
/// The hub's metric (gmi/metric.hpp) is polled the same way, by its stamp: a new version is
/// fetched and swapped in with the specs, atomically for readers (one snapshot holds both).
/// A metric of another image encoder is refused (logged; the snapshot ranks without one).
/// Thread-safety: current() and not_ready_reason() are safe from any thread.
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>

#include "gmi/pipeline.hpp"
#include "gmi/segments.hpp"
#include "gmi/spec_store.hpp"
#include "gmi/workers/shard_snapshot.hpp"

namespace gmi {
class Config;
}

namespace gmi::workers {

struct HubCacheOptions {
  std::string store_uri;
  int shard = 0;
  int shards = 1;
  int refresh_ms = 500;
  IdentifyOptions identify;
  std::string stage = "score";  ///< for logs and the gmi_specs_loaded gauge
  bool use_metric = true;       ///< metric.use: auto (the store's, when it has one) or none
  /// Hold the shard as segments (a score worker): an upload or removal touches the tail and
  /// a tombstone only, compaction runs on a background thread, and the cache holds one copy
  /// of the specs (packed). Otherwise (an interrogator that learns from the whole hub) every
  /// refresh repacks the hub from the specs it keeps.
  bool segmented = false;
  SegmentPolicy segments;
  std::size_t load_chunk = 16384;  ///< a full load packs this many specs per segment
  /// ... in parts of this many, each packed on its own thread while the next are fetched, and
  /// merged (copied as packed) into the segment; at most two parts are held unpacked. Small
  /// enough that a part's arrays come from the heap (below glibc's 32 MB mmap threshold, which
  /// the load fixes) and the next chunk's parts reuse them instead of faulting in fresh pages.
  std::size_t load_part = 512;
  /// Segmented: keep the shard's segments as snapshot files in this local directory (empty:
  /// none), so that a restart maps them back and fetches only the changes since (README,
  /// "Restarts from disk"). Written at most every snapshot_every_s seconds, and on shutdown.
  std::string snapshot_dir;
  int snapshot_every_s = 30;
  bool snapshot_verify = true;  ///< check every segment file's checksum on restore
};

/// True when model `id` belongs to `shard` of `shards` (FNV-1a of the id, modulo shards).
bool in_shard(const std::string& id, int shard, int shards);

class HubCache {
 public:
  /// `prompt_encoder` may be null when the stage never embeds prompts (score).
  HubCache(HubCacheOptions options, EncoderIdentity image_encoder, EncoderIdentity text_encoder,
           std::shared_ptr<const TextEncoder> prompt_encoder);
  ~HubCache();
  HubCache(const HubCache&) = delete;
  HubCache& operator=(const HubCache&) = delete;

  /// The latest snapshot; null until the first load finished.
  std::shared_ptr<const Identifier> current() const;
  /// Read-your-writes: the snapshot once it has caught up with the store's generation as
  /// read now (one GET), refreshing at once if it lags, waiting at most `wait`. So a query
  /// scored after an upload finished sees that upload's spec. Null, with `why`, when none
  /// is loaded yet or it does not catch up in time; with the store unreachable, the latest.
  std::shared_ptr<const Identifier> current_fresh(std::chrono::milliseconds wait, std::string& why);
  std::string not_ready_reason() const;
  const HubCacheOptions& options() const { return options_; }

 private:
  void loop();
  void compact_loop();
  void snapshot_loop();
  // Builds and publishes a snapshot of `hub` (the store at `generation`); returns it.
  std::shared_ptr<const Identifier> publish(SegmentedIndex hub, std::uint64_t generation);

  HubCacheOptions options_;
  EncoderIdentity image_encoder_;
  EncoderIdentity text_encoder_;
  std::shared_ptr<const TextEncoder> prompt_encoder_;
  mutable std::mutex mutex_;
  std::condition_variable cv_;
  std::shared_ptr<const Identifier> current_;
  std::uint64_t current_generation_ = 0;  // the store generation current_ was loaded at
  bool refresh_now_ = false;              // a reader wants a refresh before refresh_ms
  std::condition_variable refreshed_;
  std::unique_ptr<SpecStore> probe_;      // the readers' store connection (under probe_mutex_)
  std::mutex probe_mutex_;
  std::string not_ready_ = "loading specs";
  bool quit_ = false;
  // Compaction: the refresh thread hands one plan at a time to the compaction thread and
  // installs its result; `epoch` tells results for a builder since replaced (a full reload).
  struct Compacting {
    SegmentBuilder::Compaction plan;
    std::uint64_t epoch = 0;
    std::shared_ptr<const SpecIndex> result;
    std::string error;
    double seconds = 0;
    bool done = false;
  };
  std::optional<Compacting> compacting_;  // under mutex_
  std::condition_variable compact_cv_;
  // Snapshots (snapshot_dir): the refresh thread restores from them once, then hands the
  // latest published segments to the snapshot thread, which writes them.
  std::unique_ptr<ShardSnapshots> snapshots_;
  struct SnapshotJob {
    SegmentedIndex hub;
    ShardPosition position;
  };
  std::optional<SnapshotJob> snapshot_job_;  // under mutex_; a newer one replaces it
  std::condition_variable snapshot_cv_;
  std::thread thread_;
  std::thread compactor_;
  std::thread snapshotter_;
};

/// A cache for `stage` from the configuration: redis.uri, score.refresh_ms, encoder.*,
/// and (when `sharded`) score.shard / score.shards; the whole hub otherwise.
std::unique_ptr<HubCache> make_hub_cache(const gmi::Config& config, const std::string& stage,
                                         bool sharded);

}  // namespace gmi::workers
