// Upload-to-visible benchmark: a score worker's hub cache (workers/runtime/hub_cache.cpp) over
// a real spec store holding M synthetic specs (the overlapping hub, hub_synth.hpp); then each
// upload is put into the store and timed until the cache's read-your-writes path
// (HubCache::current_fresh, what a score batch calls first) returns a snapshot that holds it.
// --no-segments measures the path before segments (every refresh repacks the shard). Fills
// the store first unless it already holds the models. --snapshot-dir also times restarts from
// disk: the shard's snapshot written, then a new cache restored from it (with and without
// checking every file's checksum) against the full load. --json prints one object for machines.
#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include <hiredis/hiredis.h>
#include <unistd.h>

#include "bench_util.hpp"
#include "gmi/error.hpp"
#include "gmi/log.hpp"
#include "gmi/redis.hpp"
#include "gmi/spec_store.hpp"
#include "gmi/workers/hub_cache.hpp"
#include "hub_synth.hpp"

namespace {

using Clock = std::chrono::steady_clock;

double ms_since(Clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
}

double quantile(std::vector<double> v, double q) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v[std::min(v.size() - 1, static_cast<std::size_t>(q * static_cast<double>(v.size())))];
}

}  // namespace

int main(int argc, char** argv) try {
  CLI::App app{"Upload-to-visible: from a finished spec write to a score worker's snapshot that holds it"};
  std::string uri;
  long models = 10000;
  int uploads = 100, refresh_ms = 500, r = 32, d = 512, dt = 256;
  std::size_t tail_max = gmi::SegmentPolicy{}.tail_max;
  std::string storage_name = "f32";
  std::uint64_t seed = 7;
  bool segments = true, json = false;
  std::string snapshot_dir;
  bool drop_caches = false;
  app.add_option("--store", uri, "spec store URI (redis://HOST:PORT: its change log is what makes refreshes incremental)")
      ->required();
  app.add_option("--models", models, "specs in the store before the uploads")->capture_default_str();
  app.add_option("--uploads", uploads, "uploads timed (every fourth a new version of a stored model)")
      ->capture_default_str();
  app.add_option("--refresh-ms", refresh_ms, "the cache's poll interval (score.refresh_ms)")->capture_default_str();
  app.add_option("--tail-max", tail_max, "score.tail_max")->capture_default_str();
  app.add_option("--storage", storage_name, "score.storage: f32 | f16")->capture_default_str();
  app.add_option("--r", r, "reduced points per spec")->capture_default_str();
  app.add_option("--d", d, "image embedding dimension")->capture_default_str();
  app.add_option("--dt", dt, "prompt embedding dimension")->capture_default_str();
  app.add_option("--seed", seed, "hub seed")->capture_default_str();
  app.add_flag("!--no-segments", segments, "the path before segments: every refresh repacks the whole shard");
  app.add_option("--snapshot-dir", snapshot_dir,
                 "score.snapshot_dir: also time the snapshot and restarts from it (emptied first)");
  app.add_flag("--drop-caches", drop_caches,
               "with --snapshot-dir: empty the page cache before each restart (root: sync, then "
               "/proc/sys/vm/drop_caches), so that a restart reads its files from disk");
  app.add_flag("--json", json, "print one JSON object");
  CLI11_PARSE(app, argc, argv);
  if (models < 1 || uploads < 1) throw gmi::InputError("--models and --uploads must be positive");
  gmi::log::configure("bench_upload", "warn", "text");

  gmi::bench::OverlapOptions ov;
  ov.seed = seed;
  ov.r = r;
  ov.d = d;
  ov.dt = dt;
  gmi::bench::OverlapHub hub(gmi::bench::seeded_base(ov.base_models, r, d, dt, seed), ov, models + uploads);
  auto store = gmi::open_spec_store(uri);
  nlohmann::json out = {{"models", models}, {"uploads", uploads}, {"segments", segments},
                        {"storage", storage_name}, {"tail_max", tail_max}, {"refresh_ms", refresh_ms}};

  // Fill: models 0 .. M-1 (only when the store holds fewer).
  auto t0 = Clock::now();
  if (store->count() < static_cast<std::size_t>(models)) {
    for (long m = 0; m < models; ++m) {
      store->put(hub.spec(m));
      if (!json && (m % 1000 == 999 || m + 1 == models))
        std::fprintf(stderr, "\rfill %ld/%ld", m + 1, models);
    }
    if (!json) std::fputc('\n', stderr);
    out["fill_seconds"] = ms_since(t0) / 1000.0;
  }
  const std::size_t stored = store->count();

  // What a full load is made of, each timed alone over every stored spec, 64 a round trip as
  // the cache fetches: the bytes from Redis (pipelined GETs, nothing parsed; one server only),
  // and SpecStore::get_many (fetched and parsed).
  {
    const std::vector<std::string> ids = store->list();
    constexpr std::size_t kBatch = 64;
    if (uri.rfind("redis://", 0) == 0) {
      gmi::RedisConnection raw(gmi::parse_redis_uri(uri));
      std::size_t bytes = 0;
      t0 = Clock::now();
      for (std::size_t i = 0; i < ids.size(); i += kBatch) {
        std::vector<std::string> keys;
        std::vector<gmi::RedisConnection::Args> gets;
        for (std::size_t j = i; j < std::min(ids.size(), i + kBatch); ++j) keys.push_back(raw.key("spec:" + ids[j]));
        for (const auto& k : keys) gets.push_back({"GET", k});
        for (const auto& reply : raw.pipeline(gets)) bytes += reply->len;
      }
      const double seconds = ms_since(t0) / 1000.0;
      out["spec_bytes"] = bytes;
      out["fetch_raw_seconds"] = seconds;
      out["fetch_raw_gb_per_s"] = static_cast<double>(bytes) / seconds / 1e9;
    }
    t0 = Clock::now();
    std::size_t got = 0;
    for (std::size_t i = 0; i < ids.size(); i += kBatch) {
      const std::vector<std::string> batch(ids.begin() + static_cast<std::ptrdiff_t>(i),
                                           ids.begin() + static_cast<std::ptrdiff_t>(std::min(ids.size(), i + kBatch)));
      for (const auto& f : store->get_many(batch)) got += f.spec ? 1 : 0;
    }
    out["fetch_parse_seconds"] = ms_since(t0) / 1000.0;
    if (got != ids.size()) throw gmi::IoError("get_many returned " + std::to_string(got) + " of " + std::to_string(ids.size()) + " specs");
  }

  gmi::workers::HubCacheOptions o;
  o.store_uri = uri;
  o.refresh_ms = refresh_ms;
  o.stage = "bench";
  o.identify.build_interrogator = false;
  o.identify.storage = gmi::parse_storage(storage_name);
  o.identify.search = gmi::SearchMode::kExact;
  o.segmented = segments;
  o.segments.tail_max = tail_max;
  if (!snapshot_dir.empty()) {
    if (!segments) throw gmi::InputError("--snapshot-dir needs segments");
    std::filesystem::remove_all(snapshot_dir);
    o.snapshot_dir = snapshot_dir;
    o.snapshot_every_s = 1;
  }
  const std::filesystem::path manifest = std::filesystem::path(snapshot_dir) / "shard-0-of-1.json";
  const gmi::Spec first = hub.spec(0);
  const auto wait_loaded = [&](gmi::workers::HubCache& c, std::size_t want) {
    const auto start = Clock::now();
    while (!c.current() || c.current()->size() < want) {
      if (ms_since(start) > 3600e3) throw gmi::IoError("the cache did not load the store's " + std::to_string(want) + " specs in an hour");
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
    return ms_since(start) / 1000.0;
  };
  auto cache_ptr = std::make_unique<gmi::workers::HubCache>(o, first.image_encoder, first.text_encoder, nullptr);
  gmi::workers::HubCache& cache = *cache_ptr;
  out["load_seconds"] = wait_loaded(cache, stored);
  if (out.contains("spec_bytes"))
    out["load_gb_per_s"] = out["spec_bytes"].get<double>() / out["load_seconds"].get<double>() / 1e9;
  out["index_bytes"] = cache.current()->hub().memory_bytes();
  if (!snapshot_dir.empty()) {  // the first snapshot, before the uploads (so as not to time them against it)
    t0 = Clock::now();
    while (!std::filesystem::exists(manifest)) std::this_thread::sleep_for(std::chrono::milliseconds(20));
    out["snapshot_first_write_seconds"] = ms_since(t0) / 1000.0;
    std::uintmax_t bytes = 0;
    for (const auto& e : std::filesystem::directory_iterator(snapshot_dir)) bytes += e.file_size();
    out["snapshot_bytes"] = bytes;
  }

  std::vector<double> visible;
  for (int u = 0; u < uploads; ++u) {
    gmi::Spec s = hub.spec(models + u);
    if (u % 4 == 3) s.model_id = "model-" + std::to_string((u * 7919L) % models);  // a new version
    s.extra["bench_upload"] = u;
    const std::string id = s.model_id;
    store->put(s);  // "finished": the spec is in the store
    t0 = Clock::now();
    std::string why;
    auto snap = cache.current_fresh(std::chrono::seconds(60), why);
    const double ms = ms_since(t0);
    if (!snap) throw gmi::IoError("the cache did not catch up: " + why);
    visible.push_back(ms);
    if (!json) std::fprintf(stderr, "\rupload %d/%d  %.1f ms", u + 1, uploads, ms);
  }
  if (!json) std::fputc('\n', stderr);
  const auto snap = cache.current();
  out["upload_to_visible_ms_p50"] = quantile(visible, 0.5);
  out["upload_to_visible_ms_p90"] = quantile(visible, 0.9);
  out["upload_to_visible_ms_max"] = quantile(visible, 1.0);
  out["models_after"] = snap->size();
  out["sealed_segments"] = snap->hub().sealed_segments();
  out["dead"] = snap->hub().dead();
  out["peak_rss_gb"] = gmi::bench::peak_rss_gb();
  if (!snapshot_dir.empty()) {
    const std::size_t want = snap->size();
    t0 = Clock::now();
    cache_ptr.reset();  // SIGTERM's path: the last state written before the cache goes
    out["shutdown_seconds"] = ms_since(t0) / 1000.0;
    out["restart_page_cache"] = drop_caches ? "dropped" : "warm";
    for (bool verify : {true, false}) {
      o.snapshot_verify = verify;
      if (drop_caches) {
        ::sync();
        std::ofstream("/proc/sys/vm/drop_caches") << "3\n";
      }
      auto restarted = std::make_unique<gmi::workers::HubCache>(o, first.image_encoder, first.text_encoder, nullptr);
      const double seconds = wait_loaded(*restarted, want);
      out[verify ? "restart_seconds" : "restart_seconds_no_verify"] = seconds;
      out["restart_mapped_bytes"] = restarted->current()->hub().mapped_bytes();
      out["restart_index_bytes"] = restarted->current()->hub().memory_bytes();
    }
    out["peak_rss_gb"] = gmi::bench::peak_rss_gb();
  }
  if (json) {
    std::printf("%s\n", out.dump().c_str());
  } else {
    for (const auto& [key, value] : out.items()) std::printf("%-28s %s\n", key.c_str(), value.dump().c_str());
  }
  return 0;
} catch (const std::exception& e) {
  std::fprintf(stderr, "bench_upload: %s\n", e.what());
  return 2;
}
