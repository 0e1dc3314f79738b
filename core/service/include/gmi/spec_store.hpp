#pragma once
/// Where specs live. Two backends: a directory (the embedded default) and Redis.
///
/// URIs: "dir:PATH" (or a plain path), "redis://[USER@]HOST[:PORT][/DB][?prefix=P]",
/// "redis-cluster://[USER@]HOST:PORT[,HOST:PORT...][?prefix=P&partitions=K]".
/// The Redis password is never taken from the URI (it would show in argv): it comes from
/// GMI_REDIS_PASSWORD or the file named by GMI_REDIS_PASSWORD_FILE.
/// Thread-safety: a store instance is NOT thread-safe; use one per thread.
#include <cstddef>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "gmi/error.hpp"

#include "gmi/metric.hpp"
#include "gmi/spec.hpp"

namespace gmi {

/// What changed in a store since a cursor (see SpecStore::changes_since).
struct SpecChanges {
  std::string cursor;               ///< pass back next time
  std::vector<std::string> models;  ///< put or removed since the old cursor (may repeat)
  bool complete = false;            ///< false: the log does not reach back; reload everything
};

/// put_metric lost a race: the stored version moved on since the caller read it.
class MetricConflictError : public Error {
 public:
  using Error::Error;
};

/// What a fenced put did.
struct FencedPut {
  bool stored = false;            ///< false: a newer upload of the model is stored already
  std::uint64_t stored_seq = 0;   ///< the model's upload sequence in the store afterwards
  std::uint64_t generation = 0;   ///< the store's generation after the write (when stored)
};

class SpecStore {
 public:
  virtual ~SpecStore() = default;
  /// Stores (or atomically replaces) the spec under spec.model_id.
  virtual void put(const Spec& spec) = 0;
  /// Stores the spec unless the upload sequence stored for the model is newer than
  /// `upload_seq` (checked and written atomically with the spec), so that a stale retry of
  /// an old upload never overwrites a newer spec; the same sequence (a retry of the same
  /// upload, e.g. after a crash between the write and its report) writes again. upload_seq > 0; the spec's extra.upload_seq
  /// should carry it (staleness stays visible).
  virtual FencedPut put_fenced(const Spec& spec, std::uint64_t upload_seq) = 0;
  /// std::nullopt when absent. Throws SpecFormatError if the stored bytes are damaged.
  virtual std::optional<Spec> get(const std::string& model_id) = 0;
  /// One model of get_many: its spec (nullopt when absent), or why it cannot be read.
  struct Fetched {
    std::optional<Spec> spec;
    std::string damaged;  ///< non-empty: the SpecFormatError get() would have thrown
  };
  /// get() of several models, in order; a damaged spec is reported in its slot, not thrown
  /// (other errors throw). Redis: one pipelined round trip, the specs parsed on every core.
  virtual std::vector<Fetched> get_many(const std::vector<std::string>& model_ids);
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
  /// The hub's metric (one per store), or nullopt. Throws SpecFormatError when damaged.
  virtual std::optional<Metric> get_metric() = 0;
  /// The stored metric's version and model count ({0, 0} when there is none), read without
  /// P: cheap, for caches to poll and for deciding when to learn a new one.
  virtual MetricStamp metric_stamp() = 0;
  std::uint64_t metric_version() { return metric_stamp().version; }
  /// How many specs the store holds (list().size(), cheaper where the backend can).
  virtual std::size_t count() { return list().size(); }
  /// Stores `metric` as version expected_version + 1 (its own version field is ignored),
  /// atomically and only if the stored version is still expected_version; otherwise
  /// throws MetricConflictError (another learner won). Returns the new version.
  virtual std::uint64_t put_metric(const Metric& metric, std::uint64_t expected_version) = 0;
  /// Removes the metric; false when there was none.
  virtual bool remove_metric() = 0;
  /// Human-readable location, for messages.
  virtual std::string describe() const = 0;
};

/// "dir:PATH" (or a plain path), "redis://...", or "redis-cluster://..." (redis_cluster.hpp;
/// the models spread over the URI's `partitions`, one hash tag each).
std::unique_ptr<SpecStore> open_spec_store(const std::string& uri);

/// Which of `partitions` a model's keys live in, in a Redis Cluster store (FNV-1a of the id,
/// modulo partitions; 0 when partitions <= 1). The score workers' shards use the same
/// function, so with as many partitions as shards, shard I's models are partition I's.
int model_partition(std::string_view model_id, int partitions);

/// What learn_store_metric did.
struct MetricLearnReport {
  Metric metric;             ///< as stored (its version set)
  std::size_t skipped = 0;   ///< specs of other encoders, damaged or vanished while read
  double seconds = 0;
};

/// The metric job: learns the hub's metric from every spec in `store` made by
/// `image_encoder` (one spec in memory at a time; others are skipped and counted) and
/// stores it as the next version. Throws MetricConflictError when another learner stored
/// a version meanwhile, InputError when too few models can be learnt from.
MetricLearnReport learn_store_metric(SpecStore& store, const EncoderIdentity& image_encoder,
                                     const MetricOptions& options,
                                     const std::function<void(std::size_t done, std::size_t total)>& progress = {});

}  // namespace gmi
