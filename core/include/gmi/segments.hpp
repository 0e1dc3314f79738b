#pragma once
/// A shard's specs as immutable packed segments plus a small mutable tail, so that an upload
/// or a removal touches only the tail and a tombstone, never the whole shard (README, "Fresh
/// specs"). SegmentedIndex is one immutable snapshot: it ranks by
/// merging each segment's top-k, its tombstones left out, and gives the same models in the
/// same order as one SpecIndex of the live specs. SegmentBuilder owns the mutable state (one
/// thread) and hands out snapshots; compaction (merging segments, dropping the dead) is
/// planned by the builder, run on any thread, and installed back.
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

#include "gmi/scoring.hpp"

namespace gmi {

/// One packed segment and which of its models have since been replaced or removed.
struct Segment {
  std::shared_ptr<const SpecIndex> index;
  std::shared_ptr<const std::vector<bool>> dead;  ///< index->size() flags; null: none dead
  std::size_t dead_count = 0;
  std::uint64_t id = 0;  ///< unique within its builder
  bool tail = false;     ///< the mutable tail (always searched exactly)
  std::size_t live() const { return index->size() - dead_count; }
};

/// How a SegmentedIndex searches its sealed segments (the tail is always scored exactly).
struct SegmentSearch {
  bool two_stage = false;  ///< the two-stage search, where a segment's summary is built
  SpecIndex::TwoStage options;
};

class SegmentedIndex {
 public:
  SegmentedIndex() = default;
  /// One sealed segment holding every model of `index`.
  explicit SegmentedIndex(std::shared_ptr<const SpecIndex> index);
  /// The segments must share encoders, metric and storage, and hold each live model once
  /// (InputError otherwise; checked for encoders, metric and storage).
  SegmentedIndex(std::vector<Segment> segments, std::shared_ptr<const Metric> metric);

  const std::vector<Segment>& segments() const { return segments_; }
  /// Live models.
  std::size_t size() const { return live_; }
  std::size_t dead() const { return dead_; }
  std::size_t sealed_segments() const;
  std::size_t tail_size() const;
  /// Bytes of every segment's packed arrays (dead models included, until compacted).
  std::size_t memory_bytes() const;
  /// Of those, the bytes memory-mapped from snapshot files (SpecIndex::mapped_bytes).
  std::size_t mapped_bytes() const;
  /// The encoders of the first non-empty segment (empty identities for an empty index).
  const EncoderIdentity& image_encoder() const { return image_; }
  const EncoderIdentity& text_encoder() const { return text_; }
  const std::shared_ptr<const Metric>& metric() const { return metric_; }
  /// Throws EncoderMismatchError unless the query was embedded by these encoders.
  void check_compatible(const EncoderIdentity& image, const EncoderIdentity& text) const;
  /// The only segment's index (its models all live); InputError when there are several (a
  /// hub-learned interrogator learns from one packed index).
  const SpecIndex& single() const;

  /// Each query's top-k over every live model: each segment's top-k (exact, or two-stage
  /// where `search` asks for it and the segment's summary is built), merged in top_k's order.
  std::vector<std::vector<RankedModel>> rank_batch(const RowMatrix& xs, const RowMatrix& ts,
                                                   const ScoreOptions& options,
                                                   const SegmentSearch& search) const;
  /// Builds the two-stage summary of every sealed segment lacking one; the bytes of all of
  /// them. Safe to call from several threads.
  std::size_t prepare(const SegmentSearch& search) const;
  /// The two-stage search of one segment: `whole`'s candidate and coarse counts scaled to the
  /// segment's share of the live models (times 1.5, at least 64 candidates; unchanged for a
  /// segment that holds them all), so that searching many segments costs about what one
  /// index of them would.
  SpecIndex::TwoStage segment_search(const SpecIndex::TwoStage& whole, const Segment& s) const;

 private:
  std::vector<Segment> segments_;
  std::shared_ptr<const Metric> metric_;
  EncoderIdentity image_, text_;
  std::size_t live_ = 0, dead_ = 0;
};

/// When the tail is sealed and which segments a compaction merges (size-tiered: segments
/// whose sizes lie in the same power-of-merge_factor band merge once there are merge_factor
/// of them; a segment with too many tombstones is rewritten alone).
struct SegmentPolicy {
  std::size_t tail_max = 256;           ///< the tail is sealed into a segment at this many models
  int merge_factor = 8;                 ///< segments of one size band merged at once (>= 2)
  double dead_fraction = 0.2;           ///< a segment with more of its models dead is rewritten
  std::size_t segment_max = 1u << 21;   ///< no merge makes a segment of more models
};

/// The mutable side: upserts and removals into the tail and tombstones, snapshots, and the
/// compaction plan. Not thread-safe: one owner (a score worker's refresh thread).
class SegmentBuilder {
 public:
  /// `space`: whether upserted specs are already in the metric's space (see SpecIndex).
  SegmentBuilder(std::shared_ptr<const Metric> metric, SpecSpace space, SpecStorage storage,
                 SegmentPolicy policy = {});

  /// Adds or replaces a model: the spec goes into the tail; an older copy in a sealed
  /// segment becomes a tombstone. Throws what SpecIndex throws for a bad spec when the tail
  /// is next packed (snapshot()), so callers validate first (validate(), encoders).
  void upsert(Spec spec);
  /// Removes a model wherever it is (nothing for an unknown id).
  void remove(const std::string& id);
  /// Adds the models of a packed index as one sealed segment (a bulk load, or a segment
  /// restored from a snapshot); older copies of its models elsewhere become tombstones. Rows
  /// flagged in `dead` (index->size() flags, or null) are tombstones from the start.
  void add_segment(std::shared_ptr<const SpecIndex> index, const std::vector<bool>* dead = nullptr);
  /// Live models.
  std::size_t size() const { return locations_.size(); }
  bool contains(const std::string& id) const { return locations_.count(id) > 0; }

  /// The current state as a snapshot; re-makes the tail if it changed since the last one
  /// (its surviving packed rows copied, the new specs packed), and seals it when it reached
  /// policy.tail_max.
  SegmentedIndex snapshot();

  /// A compaction to run: its input segments (as planned) and their tombstones then.
  struct Compaction {
    std::vector<Segment> inputs;
    std::size_t live = 0;  ///< models the merged segment will hold
  };
  /// The compaction due now, if any (a rewrite of the segment with the most tombstones
  /// first, then the smallest full size band).
  std::optional<Compaction> plan() const;
  /// Runs a compaction (any thread; the builder is not touched).
  static SpecIndex run(const Compaction& compaction);
  /// Replaces the compaction's inputs by its result; a model removed or replaced since the
  /// plan is a tombstone in the result. False (nothing changed) when an input is gone.
  bool install(const Compaction& compaction, std::shared_ptr<const SpecIndex> merged);

  const SegmentPolicy& policy() const { return policy_; }

 private:
  struct Sealed {
    std::shared_ptr<const SpecIndex> index;
    std::shared_ptr<std::vector<bool>> dead;  // copied before a write while a snapshot shares it
    std::size_t dead_count = 0;
    std::uint64_t id = 0;
  };
  static constexpr std::uint64_t kTail = 0;  // the location of a model in the tail
  struct Location {
    std::uint64_t segment = kTail;
    std::uint32_t row = 0;
  };
  void kill(const Location& where);
  Sealed* find(std::uint64_t id);
  // The shard's encoders, from its first spec; EncoderMismatchError for others.
  void check_encoders(const EncoderIdentity& image, const EncoderIdentity& text);
  static Segment as_segment(const Sealed& s);  // what a snapshot or a plan holds of it
  void seal_tail();
  void drop_from_tail(const std::string& id);
  std::uint64_t add_sealed(std::shared_ptr<const SpecIndex> index, const std::vector<bool>* dead = nullptr);

  std::shared_ptr<const Metric> metric_;
  SpecSpace space_;
  SpecStorage storage_;
  SegmentPolicy policy_;
  std::vector<Sealed> sealed_;
  // The tail: packed, and on each snapshot with changes re-made as its surviving rows plus the
  // specs upserted since (packed alone), so an upload copies the tail's packed arrays (at most
  // tail_max models) and packs only itself; no tail spec is kept unpacked.
  std::shared_ptr<const SpecIndex> tail_index_;
  std::map<std::string, Spec> pending_;             // upserted since the last snapshot
  std::unordered_map<std::string, bool> tail_drop_;  // rows of tail_index_ replaced or removed since
  std::unordered_map<std::string, Location> locations_;
  std::uint64_t next_id_ = 1;
  bool encoders_known_ = false;
  EncoderIdentity image_, text_;
};

}  // namespace gmi
