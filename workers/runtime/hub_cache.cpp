#include "gmi/workers/hub_cache.hpp"

#include <chrono>
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
  if (shards <= 1) return true;
  std::uint64_t h = 1469598103934665603ull;
  for (unsigned char c : id) {
    h ^= c;
    h *= 1099511628211ull;
  }
  return static_cast<int>(h % static_cast<std::uint64_t>(shards)) == shard;
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
  thread_ = std::thread([this] { loop(); });
}

HubCache::~HubCache() {
  {
    std::lock_guard lock(mutex_);
    quit_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
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

// Fetches one spec into `state` (or drops it), mapped into the state's metric space; skips
// what cannot be served, with a warning.
void fetch(SpecStore& store, const std::string& id, ShardState& state, const EncoderIdentity& image,
           const EncoderIdentity& text) {
  std::optional<Spec> spec;
  try {
    spec = store.get(id);
  } catch (const SpecFormatError& e) {
    log::warn("skipping a damaged spec", {{"model", id}, {"error", e.what()}});
    state.specs.erase(id);
    return;
  }
  if (!spec) {
    state.specs.erase(id);
    return;
  }
  if (!(spec->image_encoder == image) || !(spec->text_encoder == text)) {
    log::warn("skipping a spec made by other encoders",
              {{"model", id}, {"spec_image_encoder", spec->image_encoder.str()},
               {"serving_image_encoder", image.str()}});
    state.specs.erase(id);
    return;
  }
  if (state.metric) {
    try {
      state.specs[id] = to_metric_space(std::move(*spec), *state.metric);
    } catch (const InputError& e) {
      log::warn("skipping a spec the metric cannot map", {{"model", id}, {"error", e.what()}});
      state.specs.erase(id);
    }
    return;
  }
  state.specs[id] = std::move(*spec);
}

}  // namespace

void HubCache::loop() {
  ShardState state;
  std::unique_ptr<SpecStore> store;
  auto& gauge = Metrics::instance().specs_loaded.Add(
      {{"stage", options_.stage}, {"shard", std::to_string(options_.shard)}});
  for (;;) {
    {
      std::unique_lock lock(mutex_);
      if (quit_) return;
    }
    try {
      if (!store) store = open_spec_store(options_.store_uri);
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
        if (!state.loaded || !changes.complete || metric_moved) {
          // Into a fresh map, swapped in only once every spec is in: a reload that fails
          // half-way (Redis times out) must not leave a half-empty map for the next
          // incremental refresh to build a snapshot from.
          ShardState reload;
          reload.metric = state.metric;
          for (const auto& id : store->list()) {
            if (!in_shard(id, options_.shard, options_.shards)) continue;
            fetch(*store, id, reload, image_encoder_, text_encoder_);
            ++fetched;
          }
          state.specs.swap(reload.specs);
        } else {
          std::set<std::string> seen;
          for (const auto& id : changes.models) {
            if (!seen.insert(id).second || !in_shard(id, options_.shard, options_.shards)) continue;
            fetch(*store, id, state, image_encoder_, text_encoder_);
            ++fetched;
          }
        }
        state.cursor = changes.cursor;
        state.generation = generation;
        state.metric_version = metric_version;
        state.loaded = true;
        std::vector<Spec> specs;
        specs.reserve(state.specs.size());
        for (const auto& [id, s] : state.specs) specs.push_back(s);
        auto next = std::make_shared<const Identifier>(std::move(specs), image_encoder_, text_encoder_,
                                                       prompt_encoder_, options_.identify, state.metric,
                                                       state.metric ? SpecSpace::kMapped : SpecSpace::kRaw);
        const double seconds =
            std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
        gauge.Set(static_cast<double>(state.specs.size()));
        const auto& index = next->index();
        const bool two_stage = next->two_stage();
        const std::shared_ptr<const Identifier> serving = next;
        {
          std::lock_guard lock(mutex_);
          current_ = std::move(next);
          current_generation_ = generation;
          not_ready_.clear();
        }
        refreshed_.notify_all();
        log::info("specs refreshed", {{"stage", options_.stage}, {"shard", options_.shard},
                                      {"models", state.specs.size()}, {"fetched", fetched},
                                      {"generation", generation},
                                      {"metric", state.metric ? state.metric->label() : "none"},
                                      {"storage", to_string(index.storage())},
                                      {"search", two_stage ? "two-stage" : "exact"},
                                      {"index_bytes", index.memory_bytes()},
                                      {"seconds", seconds}});
        // The new snapshot already serves (exactly); the two-stage summary follows.
        if (two_stage) {
          const auto t0 = std::chrono::steady_clock::now();
          const std::size_t bytes = serving->prepare_search();
          log::info("two-stage summary built",
                    {{"stage", options_.stage}, {"shard", options_.shard}, {"generation", generation},
                     {"bytes", bytes},
                     {"seconds", std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count()}});
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
  o.store_uri = config.get_string("redis.uri");
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
