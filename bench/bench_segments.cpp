// Segments benchmark: what an upload costs a score worker's shard held as segments (the tail
// repacked, a tombstone set) against what it cost when every refresh repacked the shard (the
// whole-shard SpecIndex build, measured on --baseline-models specs in the same run); a full
// compaction's time; exact single-query latency over the segments against one packed index
// of the same specs (the same rankings checked). Specs come from the overlapping synthetic
// hub (hub_synth.hpp, seeded stand-in styles). --json prints one object for machines.
#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "bench_util.hpp"
#include "gmi/error.hpp"
#include "gmi/segments.hpp"
#include "hub_synth.hpp"

namespace {

using Clock = std::chrono::steady_clock;

double ms_since(Clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
}

struct Stats {
  double p50 = 0, p90 = 0, max = 0;
};

Stats stats(std::vector<double> v) {
  if (v.empty()) return {};
  std::sort(v.begin(), v.end());
  const auto at = [&](double q) {
    return v[std::min(v.size() - 1, static_cast<std::size_t>(q * static_cast<double>(v.size())))];
  };
  return {at(0.5), at(0.9), v.back()};
}

void progress(const char* what, long done, long total) {
  if (total <= 0) return;
  const int width = 30, filled = static_cast<int>(width * done / total);
  std::fprintf(stderr, "\r%-10s [%.*s%*s] %ld/%ld", what, filled, "##############################", width - filled, "",
               done, total);
  if (done == total) std::fputc('\n', stderr);
}

}  // namespace

int main(int argc, char** argv) try {
  CLI::App app{"Segmented shard benchmark: upload, removal and compaction costs, query latency"};
  long models = 100000, baseline_models = 10000, chunk = 16384;
  int uploads = 200, queries = 30, r = 32, d = 512, dt = 256;
  std::size_t tail_max = gmi::SegmentPolicy{}.tail_max;
  std::string storage_name = "f32";
  std::uint64_t seed = 7;
  bool json = false, merge_all = true, two_stage = false;
  gmi::SpecIndex::TwoStage search;  // as the services search (config/gmi.yaml score.*)
  search.lists = 1024;
  search.probe = 128;
  app.add_option("--models", models, "specs in the shard")->capture_default_str();
  app.add_option("--chunk", chunk, "specs per segment at load (score workers: 16384)")->capture_default_str();
  app.add_option("--tail-max", tail_max, "the tail is sealed at this many models (score.tail_max)")
      ->capture_default_str();
  app.add_option("--uploads", uploads, "uploads timed (every third a new version of a loaded model), then as many removals / 4")
      ->capture_default_str();
  app.add_option("--queries", queries, "single exact queries timed, segmented and merged")->capture_default_str();
  app.add_option("--baseline-models", baseline_models,
                 "specs the whole-shard repack (the path before segments) is timed on; 0: skip")
      ->capture_default_str();
  app.add_option("--r", r, "reduced points per spec")->capture_default_str();
  app.add_option("--d", d, "image embedding dimension")->capture_default_str();
  app.add_option("--dt", dt, "prompt embedding dimension")->capture_default_str();
  app.add_option("--storage", storage_name, "f32 | f16")->capture_default_str();
  app.add_option("--seed", seed, "hub seed")->capture_default_str();
  app.add_flag("!--no-merge", merge_all, "skip the full compaction (it holds a second copy while it runs)");
  app.add_flag("--two-stage", two_stage,
               "also the two-stage search (score.* defaults: 256 candidates, lists 1024, probe 128), segmented "
               "and on the merged index, its top-4 against exact");
  app.add_option("--lists", search.lists, "two-stage: inverted-file cells per segment")->capture_default_str();
  app.add_option("--probe", search.probe, "two-stage: cells a query visits")->capture_default_str();
  app.add_option("--coarse", search.coarse,
                 "two-stage: models the coarse pass keeps (for the whole hub; each segment its share)")
      ->capture_default_str();
  app.add_flag("--json", json, "print one JSON object");
  CLI11_PARSE(app, argc, argv);
  if (models < 2 || chunk < 1 || uploads < 1 || queries < 1) throw gmi::InputError("sizes must be positive");
  const gmi::SpecStorage storage = gmi::parse_storage(storage_name);

  gmi::bench::OverlapOptions ov;
  ov.seed = seed;
  ov.r = r;
  ov.d = d;
  ov.dt = dt;
  const long extra = uploads;  // models the uploads add
  gmi::bench::OverlapHub hub(gmi::bench::seeded_base(ov.base_models, r, d, dt, seed), ov, models + extra);
  nlohmann::json out = {{"models", models}, {"chunk", chunk}, {"tail_max", tail_max}, {"storage", storage_name},
                        {"r", r}, {"d", d}, {"dt", dt}};

  // The path before segments: every refresh rebuilt the whole shard's index from its specs.
  if (baseline_models > 0) {
    std::vector<gmi::Spec> held;
    held.reserve(static_cast<std::size_t>(baseline_models));
    for (long m = 0; m < baseline_models; ++m) held.push_back(hub.spec(m));
    const auto t0 = Clock::now();
    std::vector<gmi::Spec> copy = held;  // the map of specs copied into the index's input
    const gmi::SpecIndex whole(std::move(copy), nullptr, gmi::SpecSpace::kRaw, storage);
    const double ms = ms_since(t0);
    out["baseline_models"] = baseline_models;
    out["baseline_repack_ms"] = ms;
    out["baseline_repack_ms_per_1000_models"] = ms * 1000.0 / static_cast<double>(baseline_models);
  }

  // Load: packed a chunk at a time, as a score worker's full load does.
  gmi::SegmentPolicy policy;
  policy.tail_max = tail_max;
  gmi::SegmentBuilder builder(nullptr, gmi::SpecSpace::kRaw, storage, policy);
  auto t0 = Clock::now();
  for (long m0 = 0; m0 < models; m0 += chunk) {
    const long m1 = std::min(models, m0 + chunk);
    std::vector<gmi::Spec> specs;
    specs.reserve(static_cast<std::size_t>(m1 - m0));
    for (long m = m0; m < m1; ++m) specs.push_back(hub.spec(m));
    builder.add_segment(std::make_shared<const gmi::SpecIndex>(std::move(specs), nullptr, gmi::SpecSpace::kRaw, storage));
    if (!json) progress("load", m1, models);
  }
  gmi::SegmentedIndex snap = builder.snapshot();
  out["load_seconds"] = ms_since(t0) / 1000.0;
  out["segments_loaded"] = snap.sealed_segments();
  out["index_bytes"] = snap.memory_bytes();
  out["bytes_per_spec"] = static_cast<double>(snap.memory_bytes()) / static_cast<double>(models);

  // Uploads: each one upsert + the snapshot a refresh publishes (spec generation not timed).
  std::vector<double> upload_ms, seal_ms;
  long fresh = models;
  for (int u = 0; u < uploads; ++u) {
    gmi::Spec s = hub.spec(fresh++);
    if (u % 3 == 2) s.model_id = "model-" + std::to_string((u * 7919L) % models);  // a new version
    const std::size_t sealed_before = snap.sealed_segments();
    t0 = Clock::now();
    builder.upsert(std::move(s));
    snap = builder.snapshot();
    const double ms = ms_since(t0);
    (snap.sealed_segments() > sealed_before ? seal_ms : upload_ms).push_back(ms);
    if (!json) progress("uploads", u + 1, uploads);
  }
  std::vector<double> remove_ms;
  for (int u = 0; u < std::max(1, uploads / 4); ++u) {
    t0 = Clock::now();
    builder.remove("model-" + std::to_string((u * 104729L + 13) % models));
    snap = builder.snapshot();
    remove_ms.push_back(ms_since(t0));
  }
  const Stats up = stats(upload_ms), rm = stats(remove_ms);
  out["upload_ms_p50"] = up.p50;
  out["upload_ms_p90"] = up.p90;
  out["upload_ms_max"] = up.max;
  out["upload_tail_at_end"] = snap.tail_size();
  out["seal_ms_max"] = stats(seal_ms).max;
  out["seals"] = seal_ms.size();
  out["remove_ms_p50"] = rm.p50;
  out["dead"] = snap.dead();
  out["segments"] = snap.sealed_segments();
  out["live_models"] = snap.size();

  // Exact single queries over the segments.
  std::vector<std::pair<gmi::RowMatrix, gmi::RowMatrix>> qs;
  for (int q = 0; q < queries; ++q) {
    gmi::RowMatrix x(1, d), t(1, dt);
    hub.query((q * 2654435761L) % models, 1000 + static_cast<std::uint64_t>(q), x.data(), t.data());
    qs.emplace_back(std::move(x), std::move(t));
  }
  gmi::ScoreOptions so;
  so.top_k = 10;
  std::vector<double> seg_ms;
  std::vector<std::vector<gmi::RankedModel>> seg_ranked;
  for (const auto& [x, t] : qs) {
    t0 = Clock::now();
    seg_ranked.push_back(snap.rank_batch(x, t, so, {}).front());
    seg_ms.push_back(ms_since(t0));
  }
  out["exact_p50_ms_segmented"] = stats(seg_ms).p50;

  // A full compaction: every segment and the tail merged into one, dropping the dead.
  std::optional<gmi::SpecIndex> merged;
  if (merge_all) {
    std::vector<gmi::SpecIndex::Part> parts;
    for (const gmi::Segment& s : snap.segments()) parts.push_back({s.index.get(), s.dead.get()});
    t0 = Clock::now();
    merged.emplace(gmi::SpecIndex::merge(parts));
    const double ms = ms_since(t0);
    out["merge_seconds"] = ms / 1000.0;
    out["merge_gb_per_s"] = static_cast<double>(merged->memory_bytes()) / (ms / 1000.0) / 1e9;
    std::vector<double> one_ms;
    int identical = 0;
    for (std::size_t q = 0; q < qs.size(); ++q) {
      t0 = Clock::now();
      const auto ranked = merged->rank_batch(qs[q].first, qs[q].second, so).front();
      one_ms.push_back(ms_since(t0));
      bool same = ranked.size() == seg_ranked[q].size();
      for (std::size_t j = 0; same && j < ranked.size(); ++j) same = ranked[j].model == seg_ranked[q][j].model;
      identical += same;
    }
    out["exact_p50_ms_one_index"] = stats(one_ms).p50;
    out["top10_identical"] = static_cast<double>(identical) / static_cast<double>(qs.size());
  }
  if (two_stage) {
    // Top-4 against the exact ranking above (segmented and merged agree on it).
    const auto same4 = [&](const std::vector<gmi::RankedModel>& got, std::size_t q) {
      if (got.size() < 4 || seg_ranked[q].size() < 4) return false;
      for (std::size_t j = 0; j < 4; ++j)
        if (got[j].model != seg_ranked[q][j].model) return false;
      return true;
    };
    const gmi::SegmentSearch plan{true, search};
    t0 = Clock::now();
    out["two_stage_summary_bytes"] = snap.prepare(plan);
    out["two_stage_build_seconds_segmented"] = ms_since(t0) / 1000.0;
    std::vector<double> ms_seg;
    int same = 0;
    for (std::size_t q = 0; q < qs.size(); ++q) {
      t0 = Clock::now();
      const auto ranked = snap.rank_batch(qs[q].first, qs[q].second, so, plan).front();
      ms_seg.push_back(ms_since(t0));
      same += same4(ranked, q);
    }
    out["two_stage_p50_ms_segmented"] = stats(ms_seg).p50;
    out["two_stage_top4_identical_segmented"] = static_cast<double>(same) / static_cast<double>(qs.size());
    if (merged) {
      t0 = Clock::now();
      merged->prepare_two_stage(search);
      out["two_stage_build_seconds_one_index"] = ms_since(t0) / 1000.0;
      std::vector<double> ms_one;
      same = 0;
      for (std::size_t q = 0; q < qs.size(); ++q) {
        t0 = Clock::now();
        const auto ranked = merged->rank_batch_two_stage(qs[q].first, qs[q].second, so, search).front();
        ms_one.push_back(ms_since(t0));
        same += same4(ranked, q);
      }
      out["two_stage_p50_ms_one_index"] = stats(ms_one).p50;
      out["two_stage_top4_identical_one_index"] = static_cast<double>(same) / static_cast<double>(qs.size());
    }
  }
  out["peak_rss_gb"] = gmi::bench::peak_rss_gb();

  if (json) {
    std::printf("%s\n", out.dump().c_str());
    return 0;
  }
  std::printf("%-34s %s\n", "figure", "value");
  for (const auto& [key, value] : out.items()) std::printf("%-34s %s\n", key.c_str(), value.dump().c_str());
  return 0;
} catch (const std::exception& e) {
  std::fprintf(stderr, "bench_segments: %s\n", e.what());
  return 2;
}
