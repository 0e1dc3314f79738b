#include "gmi/workers/hub_cache.hpp"

#if defined(__GLIBC__)
#include <malloc.h>
#endif

#include <chrono>
#include <future>
#include <map>
#include <set>

#include "gmi/config.hpp"
#include "gmi/encoder_registry.hpp"
#include "gmi/error.hpp"
#include "gmi/log.hpp"
#include "gmi/ops.hpp"
#include "gmi/spec_store.hpp"

namespace gmi::workers {

bool in_shard(const std::string& id, int shard, int shards) {
  return shards <= 1 || model_partition(id, shards) == shard;
}

HubCache::HubCache(HubCacheOptions options, EncoderIdentity image_encoder, EncoderIdentity text_encoder,
                   std::shared_ptr<const TextEncoder> prompt_encoder)
    : options_(std::move(options)),
      image_encoder_(std::move(image_encoder)),
      text_encoder_(std::move(text_encoder)),
      prompt_encoder_(std::move(prompt_encoder)) {
  if (options_.shards < 1 || options_.shard < 0 || options_.shard >= options_.shards) {
    throw InputError("score.shard must be in [0, score.shards); got " + std::to_string(options_.shard) +
                     " of " + std::to_string(options_.shards));
  }
  if (options_.refresh_ms < 10) throw InputError("score.refresh_ms must be >= 10");
  if (options_.segmented && !options_.snapshot_dir.empty()) {
    if (options_.snapshot_every_s < 1) throw InputError("score.snapshot_every_s must be >= 1");
    snapshots_ = std::make_unique<ShardSnapshots>(options_.snapshot_dir, options_.shard, options_.shards,
                                                  options_.identify.storage, image_encoder_, text_encoder_,
                                                  options_.snapshot_verify);
  }
  thread_ = std::thread([this] { loop(); });
  if (options_.segmented) compactor_ = std::thread([this] { compact_loop(); });
  if (snapshots_) snapshotter_ = std::thread([this] { snapshot_loop(); });
}

HubCache::~HubCache() {
  {
    std::lock_guard lock(mutex_);
    quit_ = true;
  }
  cv_.notify_all();
  compact_cv_.notify_all();
  snapshot_cv_.notify_all();
  if (thread_.joinable()) thread_.join();
  if (compactor_.joinable()) compactor_.join();
  // After the refresh thread: the last snapshot it handed over is written before exit.
  if (snapshotter_.joinable()) snapshotter_.join();
}

std::shared_ptr<const Identifier> HubCache::current() const {
  std::lock_guard lock(mutex_);
  return current_;
}

std::shared_ptr<const Identifier> HubCache::current_fresh(std::chrono::milliseconds wait,
                                                         std::string& why) {
  std::uint64_t generation = 0;
  {
    std::lock_guard probe_lock(probe_mutex_);
    try {
      if (!probe_) probe_ = open_spec_store(options_.store_uri);
      generation = probe_->generation();
    } catch (const std::exception&) {
      probe_.reset();
      // The store is away: nothing newer can be loaded anyway.
      std::lock_guard lock(mutex_);
      if (!current_) why = not_ready_;
      return current_;
    }
  }
  std::unique_lock lock(mutex_);
  if (current_ && current_generation_ >= generation) return current_;
  refresh_now_ = true;
  cv_.notify_all();
  refreshed_.wait_for(lock, wait, [&] { return quit_ || (current_ && current_generation_ >= generation); });
  if (current_ && current_generation_ >= generation) return current_;
  why = !current_ ? not_ready_
                  : "the specs loaded (store generation " + std::to_string(current_generation_) +
                        ") have not caught up with the store (generation " + std::to_string(generation) +
                        ") yet";
  return nullptr;
}

std::string HubCache::not_ready_reason() const {
  std::lock_guard lock(mutex_);
  return not_ready_;
}

namespace {

struct ShardState {
  // In the metric's space when there is one (mapped once, as fetched; a new metric
  // reloads everything), so a refresh maps only what changed.
  std::map<std::string, Spec> specs;
  std::string cursor;
  std::uint64_t generation = 0;
  bool loaded = false;
  std::uint64_t metric_version = 0;   // of the metric below (or of one refused)
  std::shared_ptr<const Metric> metric;
};

// A fetched spec mapped into `metric`'s space (when there is one); nullopt when the store has
// none, or it cannot be served (skipped with a warning: damaged, other encoders, unmappable).
std::optional<Spec> servable(SpecStore::Fetched fetched, const std::string& id, const Metric* metric,
                             const EncoderIdentity& image, const EncoderIdentity& text) {
  if (!fetched.damaged.empty()) {
    log::warn("skipping a damaged spec", {{"model", id}, {"error", fetched.damaged}});
    return std::nullopt;
  }
  std::optional<Spec>& spec = fetched.spec;
  if (!spec) return std::nullopt;
  if (!(spec->image_encoder == image) || !(spec->text_encoder == text)) {
    log::warn("skipping a spec made by other encoders",
              {{"model", id}, {"spec_image_encoder", spec->image_encoder.str()},
               {"serving_image_encoder", image.str()}});
    return std::nullopt;
  }
  if (!metric) return std::move(spec);
  try {
    return to_metric_space(std::move(*spec), *metric);
  } catch (const InputError& e) {
    log::warn("skipping a spec the metric cannot map", {{"model", id}, {"error", e.what()}});
    return std::nullopt;
  }
}

// Each id once, in first-seen order (a change log names a model once per write).
std::vector<std::string> distinct(const std::vector<std::string>& ids) {
  std::set<std::string> seen;
  std::vector<std::string> out;
  for (const auto& id : ids)
    if (seen.insert(id).second) out.push_back(id);
  return out;
}

// Every spec of `ids` in this shard, fetched a pipelined batch at a time, to `sink` (in order).
// The next batch is fetched (and parsed) on another thread while the sink takes this one.
template <class Sink>
std::size_t fetch_all(SpecStore& store, const std::vector<std::string>& ids, int shard, int shards,
                      const Metric* metric, const EncoderIdentity& image, const EncoderIdentity& text,
                      const Sink& sink) {
  constexpr std::size_t kBatch = 64;
  std::vector<std::vector<std::string>> batches(1);
  for (const auto& id : ids) {
    if (!in_shard(id, shard, shards)) continue;
    if (batches.back().size() == kBatch) batches.emplace_back();
    batches.back().push_back(id);
  }
  if (batches.back().empty()) return 0;
  std::size_t fetched = 0;
  auto fetch = [&store](const std::vector<std::string>* batch) { return store.get_many(*batch); };
  std::future<std::vector<SpecStore::Fetched>> next = std::async(std::launch::async, fetch, &batches[0]);
  for (std::size_t b = 0; b < batches.size(); ++b) {
    std::vector<SpecStore::Fetched> got = next.get();  // rethrows the fetch's error
    if (b + 1 < batches.size()) next = std::async(std::launch::async, fetch, &batches[b + 1]);
    // (A sink that throws leaves `next` to finish before the store goes: its destructor waits.)
    const std::vector<std::string>& batch = batches[b];
    for (std::size_t i = 0; i < batch.size(); ++i)
      sink(batch[i], servable(std::move(got[i]), batch[i], metric, image, text));
    fetched += batch.size();
  }
  return fetched;
}

// A full load's segments, packed as the specs arrive: every `part` specs are packed on a thread
// of their own while the next are fetched (one part at a time, so at most two parts are held
// unpacked), and every `chunk` specs the parts are merged (copied as packed) into one segment.
class ChunkPacker {
 public:
  ChunkPacker(SegmentBuilder& builder, std::size_t chunk, std::size_t part, std::shared_ptr<const Metric> metric,
              SpecStorage storage)
      : builder_(builder), chunk_(std::max<std::size_t>(1, chunk)), part_size_(std::max<std::size_t>(1, part)),
        metric_(std::move(metric)), storage_(storage) {}
  ~ChunkPacker() {
    if (packing_.valid()) packing_.wait();
  }
  void add(Spec spec) {
    part_.push_back(std::move(spec));
    if (++in_chunk_ >= chunk_) {
      seal();
    } else if (part_.size() >= part_size_) {
      pack_part();
    }
  }
  /// The last specs packed and merged; the builder has every segment.
  void seal() {
    pack_part();
    collect();
    in_chunk_ = 0;
    if (parts_.empty()) return;
    if (parts_.size() == 1) {
      builder_.add_segment(parts_.front());
    } else {
      std::vector<SpecIndex::Part> merge;
      for (const auto& p : parts_) merge.push_back({p.get(), nullptr});
      builder_.add_segment(std::make_shared<const SpecIndex>(SpecIndex::merge(merge)));
    }
    parts_.clear();
  }

 private:
  void collect() {
    if (packing_.valid()) parts_.push_back(packing_.get());
  }
  void pack_part() {
    if (part_.empty()) return;
    collect();
    packing_ = std::async(std::launch::async, [specs = std::move(part_), metric = metric_, storage = storage_]() mutable {
      return std::make_shared<const SpecIndex>(std::move(specs), metric, metric ? SpecSpace::kMapped : SpecSpace::kRaw,
                                               storage);
    });
    part_ = {};
  }

  SegmentBuilder& builder_;
  std::size_t chunk_, part_size_;
  std::shared_ptr<const Metric> metric_;
  SpecStorage storage_;
  std::vector<Spec> part_;
  std::size_t in_chunk_ = 0;
  std::vector<std::shared_ptr<const SpecIndex>> parts_;
  std::future<std::shared_ptr<const SpecIndex>> packing_;
};

// A load's parts (below 32 MB each) come from the heap rather than from mmap, so that once
// freed (merged into their segment) the next chunk's parts reuse them instead of faulting in
// fresh pages; glibc's threshold otherwise starts at 128 KB and moves with what is freed.
void keep_part_memory() {
#if defined(__GLIBC__)
  mallopt(M_MMAP_THRESHOLD, 32 << 20);
#endif
}

// Hands the memory a full load freed (fetched and unpacked specs) back to the system once,
// rather than as each part is packed (the next part would fault it in again).
void release_load_memory() {
#if defined(__GLIBC__)
  malloc_trim(0);
#endif
}

}  // namespace

std::shared_ptr<const Identifier> HubCache::publish(SegmentedIndex hub, std::uint64_t generation) {
  auto next = std::make_shared<const Identifier>(std::move(hub), image_encoder_, text_encoder_, prompt_encoder_,
                                                 options_.identify);
  {
    std::lock_guard lock(mutex_);
    current_ = next;
    current_generation_ = std::max(current_generation_, generation);
    not_ready_.clear();
  }
  refreshed_.notify_all();
  auto& m = Metrics::instance();
  const std::map<std::string, std::string> labels{{"stage", options_.stage}, {"shard", std::to_string(options_.shard)}};
  const SegmentedIndex& h = next->hub();
  m.specs_loaded.Add(labels).Set(static_cast<double>(h.size()));
  m.index_bytes.Add(labels).Set(static_cast<double>(h.memory_bytes()));
  m.snapshot_mapped_bytes.Add(labels).Set(static_cast<double>(h.mapped_bytes()));
  m.segments.Add(labels).Set(static_cast<double>(h.sealed_segments()));
  auto state = [&](const char* name) {
    auto l = labels;
    l["state"] = name;
    return l;
  };
  m.segment_models.Add(state("live")).Set(static_cast<double>(h.size() - h.tail_size()));
  m.segment_models.Add(state("tail")).Set(static_cast<double>(h.tail_size()));
  m.segment_models.Add(state("dead")).Set(static_cast<double>(h.dead()));
  return next;
}

void HubCache::compact_loop() {
  for (;;) {
    SegmentBuilder::Compaction plan;
    std::size_t hub_size = 0;
    {
      std::unique_lock lock(mutex_);
      compact_cv_.wait(lock, [&] { return quit_ || (compacting_ && !compacting_->done); });
      if (quit_) return;
      plan = compacting_->plan;
      hub_size = current_ ? current_->size() : 0;
    }
    const auto t0 = std::chrono::steady_clock::now();
    std::shared_ptr<const SpecIndex> result;
    std::string error;
    try {
      result = std::make_shared<const SpecIndex>(SegmentBuilder::run(plan));
      // Its two-stage summary too, so that the segment searches in two stages once installed.
      const IdentifyOptions& io = options_.identify;
      const bool staged = io.search == SearchMode::kTwoStage ||
                          (io.search == SearchMode::kAuto && hub_size >= io.two_stage_from);
      if (staged && result->size() > io.two_stage.candidates)
        result->prepare_two_stage(io.two_stage);
    } catch (const std::exception& e) {
      error = e.what();
    }
    std::lock_guard lock(mutex_);
    compacting_->result = std::move(result);
    compacting_->error = std::move(error);
    compacting_->seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    compacting_->done = true;
    refresh_now_ = true;  // the refresh thread installs it
    cv_.notify_all();
  }
}

void HubCache::snapshot_loop() {
  const std::map<std::string, std::string> labels{{"stage", options_.stage}, {"shard", std::to_string(options_.shard)}};
  const auto with_outcome = [&](const char* outcome) {
    auto l = labels;
    l["outcome"] = outcome;
    return l;
  };
  auto& m = Metrics::instance();
  std::chrono::steady_clock::time_point next{};  // the first write goes at once
  for (;;) {
    SnapshotJob job;
    {
      std::unique_lock lock(mutex_);
      snapshot_cv_.wait(lock, [&] { return quit_ || snapshot_job_.has_value(); });
      if (!quit_) snapshot_cv_.wait_until(lock, next, [&] { return quit_; });
      if (!snapshot_job_) return;  // quitting, nothing left to write
      job = std::move(*snapshot_job_);
      snapshot_job_.reset();
    }
    const auto t0 = std::chrono::steady_clock::now();
    try {
      const ShardSnapshots::Written w = snapshots_->write(job.hub, job.position);
      m.snapshot_writes_total.Add(with_outcome("written")).Increment();
      log::info("shard snapshot written",
                {{"stage", options_.stage}, {"shard", options_.shard}, {"models", job.hub.size()},
                 {"generation", job.position.generation}, {"files_written", w.files}, {"bytes_written", w.bytes},
                 {"files_removed", w.removed}, {"manifest", snapshots_->manifest_path()},
                 {"seconds", std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count()}});
    } catch (const std::exception& e) {
      m.snapshot_writes_total.Add(with_outcome("failed")).Increment();
      log::error("shard snapshot failed (the previous one stands)",
                 {{"stage", options_.stage}, {"shard", options_.shard}, {"error", e.what()}});
    }
    next = std::chrono::steady_clock::now() + std::chrono::seconds(options_.snapshot_every_s);
  }
}

void HubCache::loop() {
  ShardState state;
  std::unique_ptr<SegmentBuilder> builder;  // segmented: the shard's segments (instead of state.specs)
  std::uint64_t epoch = 0;                  // of `builder`: a full reload starts a new one
  std::unique_ptr<SpecStore> store;
  const std::string shard = std::to_string(options_.shard);
  const SpecStorage storage = options_.identify.storage;
  auto new_builder = [&] {
    return std::make_unique<SegmentBuilder>(state.metric, state.metric ? SpecSpace::kMapped : SpecSpace::kRaw,
                                            storage, options_.segments);
  };
  auto announce = [&](const std::shared_ptr<const Identifier>& serving, std::uint64_t generation, std::size_t fetched,
                      double seconds) {
    const SegmentedIndex& hub = serving->hub();
    log::info("specs refreshed", {{"stage", options_.stage}, {"shard", options_.shard},
                                  {"models", hub.size()}, {"fetched", fetched},
                                  {"generation", generation},
                                  {"metric", state.metric ? state.metric->label() : "none"},
                                  {"storage", to_string(storage)},
                                  {"search", serving->two_stage() ? "two-stage" : "exact"},
                                  {"segments", hub.sealed_segments()}, {"tail", hub.tail_size()},
                                  {"dead", hub.dead()}, {"index_bytes", hub.memory_bytes()},
                                  {"seconds", seconds}});
    // The new snapshot already serves (exactly, where a segment has no summary yet); the
    // summaries of new segments follow.
    if (serving->two_stage()) {
      const auto t0 = std::chrono::steady_clock::now();
      const std::size_t bytes = serving->prepare_search();
      log::info("two-stage summary built",
                {{"stage", options_.stage}, {"shard", options_.shard}, {"generation", generation},
                 {"bytes", bytes},
                 {"seconds", std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count()}});
    }
  };
  // Hands the published segments to the snapshot thread (the newest replaces one waiting).
  auto queue_snapshot = [&](const SegmentedIndex& hub) {
    if (!snapshots_) return;
    ShardPosition position{state.cursor, state.generation, state.metric_version,
                           state.metric ? state.metric->checksum() : std::string()};
    std::lock_guard lock(mutex_);
    snapshot_job_ = SnapshotJob{hub, std::move(position)};
    snapshot_cv_.notify_all();
  };
  // Restores the shard from its snapshot (once, when there is one): its segments mapped back,
  // its position taken as the cache's, so that the first refresh fetches only the changes since
  // (or everything, when the change log no longer reaches back).
  auto restore = [&] {
    const auto t0 = std::chrono::steady_clock::now();
    const std::optional<ShardPosition> position = snapshots_->position();
    if (!position) return;
    const std::uint64_t metric_version = options_.use_metric ? store->metric_version() : 0;
    std::shared_ptr<const Metric> metric;
    if (metric_version != position->metric_version) {
      log::warn("shard snapshot not used: it holds the points of another metric; loading every spec",
                {{"stage", options_.stage}, {"shard", options_.shard}, {"snapshot_metric", position->metric_version},
                 {"store_metric", metric_version}});
      return;
    }
    if (metric_version != 0) {
      auto got = store->get_metric();
      if (!got || got->version != metric_version || got->checksum() != position->metric_checksum ||
          !(got->image_encoder == image_encoder_)) {
        log::warn("shard snapshot not used: the store's metric is not the one it was made with; loading every spec",
                  {{"stage", options_.stage}, {"shard", options_.shard}});
        return;
      }
      metric = std::make_shared<const Metric>(std::move(*got));
    }
    ShardSnapshots::Restored restored = snapshots_->restore(metric);
    state.metric = metric;
    auto next = new_builder();
    for (auto& [index, dead] : restored.segments) next->add_segment(index, &dead);
    builder = std::move(next);
    ++epoch;
    state.cursor = position->cursor;
    state.generation = position->generation;
    state.metric_version = metric_version;
    state.loaded = true;
    const auto serving = publish(builder->snapshot(), position->generation);
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    log::info("specs restored from the shard snapshot",
              {{"stage", options_.stage}, {"shard", options_.shard}, {"models", serving->hub().size()},
               {"segments", restored.segments.size()}, {"mapped_bytes", serving->hub().mapped_bytes()},
               {"generation", position->generation}, {"manifest", snapshots_->manifest_path()}, {"seconds", seconds}});
    announce(serving, position->generation, 0, seconds);
  };
  bool restore_tried = false;
  for (;;) {
    {
      std::unique_lock lock(mutex_);
      if (quit_) return;
    }
    try {
      if (!store) store = open_spec_store(options_.store_uri);
      if (snapshots_ && !restore_tried) {
        restore_tried = true;
        try {
          restore();
        } catch (const std::exception& e) {
          log::warn("shard snapshot not used; loading every spec",
                    {{"stage", options_.stage}, {"shard", options_.shard}, {"error", e.what()}});
          state = ShardState{};
          builder.reset();
        }
      }
      const std::uint64_t generation = store->generation();
      std::uint64_t metric_version = options_.use_metric ? store->metric_version() : 0;
      const bool metric_moved = metric_version != state.metric_version;
      if (metric_moved) {
        // Fetched before the snapshot is rebuilt, so a reader sees the new metric and the
        // specs together. A metric of another encoder is refused and not asked for again.
        std::shared_ptr<const Metric> next;
        if (metric_version != 0) {
          auto m = store->get_metric();
          if (m) metric_version = m->version;  // a newer one may have landed since the stamp
          if (m && !(m->image_encoder == image_encoder_)) {
            log::error("refusing the hub's metric: it was learnt for another image encoder",
                       {{"stage", options_.stage}, {"metric", m->label()},
                        {"metric_image_encoder", m->image_encoder.str()},
                        {"serving_image_encoder", image_encoder_.str()}});
          } else if (m) {
            next = std::make_shared<const Metric>(std::move(*m));
          }
        }
        state.metric = std::move(next);  // its version is recorded once the reload below is done
      }
      if (!state.loaded || generation != state.generation || metric_moved) {
        const auto start = std::chrono::steady_clock::now();
        SpecChanges changes = store->changes_since(state.cursor);
        std::size_t fetched = 0;
        const bool full = !state.loaded || !changes.complete || metric_moved;
        if (full && options_.segmented) {
          // Into a new builder, swapped in only once every spec is in; packed as the specs
          // arrive (ChunkPacker), so that no more than two parts of specs are held unpacked.
          auto reload = new_builder();
          {
            keep_part_memory();
            ChunkPacker packer(*reload, options_.load_chunk, options_.load_part, state.metric, storage);
            fetched = fetch_all(*store, store->list(), options_.shard, options_.shards, state.metric.get(),
                                image_encoder_, text_encoder_, [&](const std::string& id, std::optional<Spec> spec) {
                                  if (!spec) return;
                                  try {
                                    check_packable(*spec, state.metric.get(),
                                                   state.metric ? SpecSpace::kMapped : SpecSpace::kRaw);
                                  } catch (const InputError& e) {
                                    log::warn("skipping a spec the shard cannot hold", {{"model", id}, {"error", e.what()}});
                                    return;
                                  }
                                  packer.add(std::move(*spec));
                                });
            packer.seal();
          }
          release_load_memory();
          builder = std::move(reload);
          ++epoch;
        } else if (options_.segmented) {
          fetched = fetch_all(*store, distinct(changes.models), options_.shard, options_.shards, state.metric.get(),
                              image_encoder_, text_encoder_, [&](const std::string& id, std::optional<Spec> spec) {
                                if (!spec) return builder->remove(id);
                                try {
                                  builder->upsert(std::move(*spec));
                                } catch (const InputError& e) {  // SpecFormatError, EncoderMismatchError
                                  log::warn("skipping a spec the shard cannot hold", {{"model", id}, {"error", e.what()}});
                                  builder->remove(id);
                                }
                              });
        } else if (full) {
          // Into a fresh map, swapped in only once every spec is in: a reload that fails
          // half-way (Redis times out) must not leave a half-empty map for the next
          // incremental refresh to build a snapshot from.
          ShardState reload;
          reload.metric = state.metric;
          fetched = fetch_all(*store, store->list(), options_.shard, options_.shards, state.metric.get(),
                              image_encoder_, text_encoder_, [&](const std::string& id, std::optional<Spec> spec) {
                                if (spec) reload.specs[id] = std::move(*spec);
                              });
          state.specs.swap(reload.specs);
        } else {
          fetched = fetch_all(*store, distinct(changes.models), options_.shard, options_.shards, state.metric.get(),
                              image_encoder_, text_encoder_, [&](const std::string& id, std::optional<Spec> spec) {
                                if (spec)
                                  state.specs[id] = std::move(*spec);
                                else
                                  state.specs.erase(id);
                              });
        }
        state.cursor = changes.cursor;
        state.generation = generation;
        state.metric_version = metric_version;
        state.loaded = true;
        SegmentedIndex hub;
        if (options_.segmented) {
          hub = builder->snapshot();
        } else {
          std::vector<Spec> specs;
          specs.reserve(state.specs.size());
          for (const auto& [id, s] : state.specs) specs.push_back(s);
          hub = SegmentedIndex(std::make_shared<const SpecIndex>(
              std::move(specs), state.metric, state.metric ? SpecSpace::kMapped : SpecSpace::kRaw, storage));
        }
        const auto serving = publish(std::move(hub), generation);
        if (options_.segmented) queue_snapshot(serving->hub());
        announce(serving, generation, fetched,
                 std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
      }
      if (options_.segmented && builder) {
        // A finished compaction is installed (or dropped, when its builder was replaced);
        // then the next one due, if any, is handed to the compaction thread.
        std::optional<Compacting> finished;
        {
          std::lock_guard lock(mutex_);
          if (compacting_ && compacting_->done) {
            finished = std::move(compacting_);
            compacting_.reset();
          }
        }
        auto& m = Metrics::instance();
        if (finished) {
          const char* outcome = "failed";
          if (!finished->result) {
            log::error("segment compaction failed", {{"stage", options_.stage}, {"shard", options_.shard},
                                                     {"error", finished->error}});
          } else if (finished->epoch == epoch && builder->install(finished->plan, finished->result)) {
            outcome = "installed";
            m.compaction_seconds.Add({{"stage", options_.stage}, {"shard", shard}}, Metrics::latency_buckets())
                .Observe(finished->seconds);
            const auto serving = publish(builder->snapshot(), state.generation);
            queue_snapshot(serving->hub());
            log::info("segments compacted", {{"stage", options_.stage}, {"shard", options_.shard},
                                             {"inputs", finished->plan.inputs.size()},
                                             {"models", finished->result->size()},
                                             {"segments", serving->hub().sealed_segments()},
                                             {"seconds", finished->seconds}});
          } else {
            outcome = "superseded";
          }
          m.compactions_total.Add({{"stage", options_.stage}, {"shard", shard}, {"outcome", outcome}}).Increment();
        }
        std::lock_guard lock(mutex_);
        if (!compacting_) {
          if (auto plan = builder->plan()) {
            compacting_ = Compacting{std::move(*plan), epoch, nullptr, {}, 0, false};
            compact_cv_.notify_all();
          }
        }
      }
    } catch (const std::exception& e) {
      // Keep serving the last snapshot; the store reconnects on the next round.
      log::warn("spec refresh failed", {{"stage", options_.stage}, {"error", e.what()}});
      std::lock_guard lock(mutex_);
      if (!current_) not_ready_ = std::string("cannot load specs: ") + e.what();
    }
    std::unique_lock lock(mutex_);
    cv_.wait_for(lock, std::chrono::milliseconds(options_.refresh_ms), [&] { return quit_ || refresh_now_; });
    refresh_now_ = false;
  }
}

std::unique_ptr<HubCache> make_hub_cache(const Config& config, const std::string& stage,
                                         bool sharded) {
  HubCacheOptions o;
  o.store_uri = spec_store_uri(config);
  o.refresh_ms = static_cast<int>(config.get_int("score.refresh_ms"));
  o.stage = stage;
  if (sharded) {
    o.shards = static_cast<int>(config.get_int("score.shards"));
    o.shard = static_cast<int>(config.get_int("score.shard", 0, o.shards - 1));
  }
  // Interrogation needs the weighted scorer's pseudo-prompts whatever the job's scorer.
  o.identify.score.scorer = Scorer::kWeighted;
  o.identify.interrogator = config.get_string("interrogate.interrogator");
  if (stage == "score") {
    // A score worker ranks with the pseudo-prompts its tasks bring: it builds no interrogator,
    // and may hold its points as binary16.
    o.identify.build_interrogator = false;
    o.segmented = true;
    o.segments.tail_max = static_cast<std::size_t>(config.get_int("score.tail_max"));
    o.segments.merge_factor = static_cast<int>(config.get_int("score.merge_factor"));
    o.segments.dead_fraction = config.get_double("score.dead_fraction");
    o.snapshot_dir = config.get_string("score.snapshot_dir");
    o.snapshot_every_s = static_cast<int>(config.get_int("score.snapshot_every_s"));
    o.snapshot_verify = config.get_bool("score.snapshot_verify");
    o.identify.storage = parse_storage(config.get_string("score.storage"));
    o.identify.search = parse_search(config.get_string("score.search"));
    o.identify.two_stage_from = static_cast<std::size_t>(config.get_int("score.two_stage_from"));
    SpecIndex::TwoStage& t = o.identify.two_stage;
    t.candidates = static_cast<std::size_t>(config.get_int("score.candidates"));
    t.clusters = static_cast<int>(config.get_int("score.clusters"));
    t.dims = static_cast<int>(config.get_int("score.dims"));
    t.prompt_dims = static_cast<int>(config.get_int("score.prompt_dims"));
    t.residual_dims = static_cast<int>(config.get_int("score.residual_dims"));
    t.lists = static_cast<int>(config.get_int("score.lists"));
    t.probe = static_cast<int>(config.get_int("score.probe"));
    t.coarse = static_cast<std::size_t>(config.get_int("score.coarse"));
    t.coarse_dims = static_cast<int>(config.get_int("score.coarse_dims"));
    t.coarse_prompt_dims = static_cast<int>(config.get_int("score.coarse_prompt_dims"));
    t.coarse_clusters = static_cast<int>(config.get_int("score.coarse_clusters"));
    if (t.lists > 0 && t.probe > t.lists)
      throw InputError("score.probe (" + std::to_string(t.probe) + ") must not exceed score.lists (" +
                       std::to_string(t.lists) + ")");
  }
  const std::string use = config.get_string("metric.use");
  if (use != "auto" && use != "none")
    throw InputError("metric.use must be auto (the store's metric, when it has one) or none; got '" + use + "'");
  o.use_metric = use == "auto";
  // Only identities: this process loads no image-encoder weights. Interrogation embeds
  // prompts a query gives, so it also loads the text encoder.
  const EncoderRuntime rt = encoder_runtime(config);
  const std::string text = config.get_string("encoder.text");
  std::shared_ptr<const TextEncoder> prompts;
  if (stage == "interrogate") prompts = make_text_encoder(text, rt);
  return std::make_unique<HubCache>(o, image_encoder_info(config.get_string("encoder.image"), rt).identity,
                                    prompts ? prompts->identity() : text_encoder_identity(text, rt), prompts);
}

}  // namespace gmi::workers
