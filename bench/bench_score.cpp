// Scoring benchmark: exact or two-stage scoring of M synthetic specs (packed SpecIndex), one
// query at a time and in batches, with float32 or binary16 storage, on a hub of random
// directions or one that overlaps like real hubs (hub_synth.hpp); the rankings are compared
// with float32 exact scoring of the same specs in the same run (recall@1/@4 on fresh queries).
// Compare with scripts/bench_score_numpy.py (same sizes). --json prints one object for machines.
#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "bench_util.hpp"
#include "hub_synth.hpp"
#include "gmi/parallel.hpp"
#include "gmi/rkme.hpp"
#include "gmi/scoring.hpp"

namespace {

using Clock = std::chrono::steady_clock;

using gmi::bench::FastRng;
using gmi::bench::peak_rss_gb;

// Rows scattered around `centre` (its own direction per model), each L2-normalised.
gmi::RowMatrix around(const Eigen::VectorXf& centre, int rows, float spread, FastRng& rng) {
  gmi::RowMatrix m(rows, centre.size());
  for (int i = 0; i < rows; ++i) {
    for (Eigen::Index k = 0; k < centre.size(); ++k) m(i, k) = centre(k) + spread * rng.uniform();
    m.row(i).normalize();
  }
  return m;
}

Eigen::VectorXf unit_vector(Eigen::Index dim, FastRng& rng) {
  Eigen::VectorXf v(dim);
  for (auto& e : v) e = rng.uniform();
  return v.normalized();
}

double mem_available_gb() {
  std::ifstream f("/proc/meminfo");
  std::string key;
  double kb = 0;
  std::string unit;
  while (f >> key >> kb >> unit)
    if (key == "MemAvailable:") return kb / (1024.0 * 1024.0);
  return -1;
}

struct Stats {
  double median, p90;
};

Stats stats(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const auto at = [&](double q) {
    return v[std::min(v.size() - 1, static_cast<std::size_t>(q * static_cast<double>(v.size())))];
  };
  return {at(0.5), at(0.9)};
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"SpecIndex scoring benchmark on synthetic specs"};
  long models = 1000;
  int r = 32, d = 512, dt = 256, queries = 20, repeats = 3;
  double tau = gmi::ScoreOptions{}.tau, gamma = 1.0;
  std::vector<int> batches{16, 64};
  std::vector<std::string> scorers{"weighted", "rkme"};
  std::uint64_t seed = 7;
  std::string storage_name = "f32", search = "exact";
  bool json = false;
  app.add_option("--models", models, "M: number of specs (1000, 10000, 100000)");
  app.add_option("--r", r, "reduced points per spec");
  app.add_option("--d", d, "image embedding dimension");
  app.add_option("--dt", dt, "prompt embedding dimension");
  app.add_option("--queries", queries, "single queries timed per scorer");
  app.add_option("--batches", batches, "batch sizes");
  app.add_option("--repeats", repeats, "batches timed per batch size and scorer");
  app.add_option("--scorers", scorers, "scorers to time");
  app.add_option("--tau", tau, "prompt-weight temperature (default: the scorer's, as the services use)")
      ->capture_default_str();
  app.add_option("--seed", seed, "data seed");
  app.add_option("--storage", storage_name, "f32 | f16: how the index stores its points")
      ->check(CLI::IsMember({"f32", "f16"}));
  long candidates = 256;
  gmi::SpecIndex::TwoStage two_stage;
  app.add_option("--search", search,
                 "exact | two-stage (every model's score estimated from a summary of its spec, then "
                 "exact on the --candidates best estimates)")
      ->check(CLI::IsMember({"exact", "two-stage"}));
  app.add_option("--candidates", candidates, "two-stage: models kept by the first stage")->check(CLI::PositiveNumber);
  app.add_option("--dims", two_stage.dims,
                 "two-stage: the summary compares group means in this many principal directions (0: all d)")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  app.add_option("--prompt-dims", two_stage.prompt_dims,
                 "two-stage: and group prompts in this many (0: all dt)")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  app.add_option("--clusters", two_stage.clusters,
                 "two-stage: groups of reduced points per model in the summary (kernel k-means)")
      ->check(CLI::Range(1, 255))
      ->capture_default_str();
  app.add_option("--lists", two_stage.lists,
                 "two-stage: inverted-file cells over the summary's group means (0: none, every summary read)")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  app.add_option("--probe", two_stage.probe, "two-stage: cells a query visits (with --lists)")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  app.add_option("--residual-dims", two_stage.residual_dims,
                 "two-stage: each point's offset from its group's mean kept in this many principal directions "
                 "(0: groups only)")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  app.add_option("--coarse", two_stage.coarse,
                 "two-stage: a coarse pass over every model's groups alone keeps this many for the residual "
                 "estimate (0: none; without --lists)")
      ->capture_default_str();
  app.add_option("--coarse-dims", two_stage.coarse_dims, "two-stage: the coarse pass's directions of group means")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  app.add_option("--coarse-prompt-dims", two_stage.coarse_prompt_dims,
                 "two-stage: the coarse pass's directions of group prompts")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  app.add_option("--coarse-clusters", two_stage.coarse_clusters, "two-stage: the coarse pass's groups per model")
      ->check(CLI::Range(1, 255))
      ->capture_default_str();
  app.add_flag("--json", json, "print one JSON object (p50_ms, batch64_ms_per_query, recall_at_1, "
                               "recall_at_4, bytes_per_spec, ...) instead of the table");
  std::string hub_kind = "random", base_dir;
  int recall_queries = 1000;
  gmi::bench::OverlapOptions ov;
  app.add_option("--hub", hub_kind,
                 "random: every model around its own random direction (easy: a wide margin); "
                 "overlap: families of near-duplicates of a few base styles (hub_synth.hpp)")
      ->check(CLI::IsMember({"random", "overlap"}));
  app.add_option("--base", base_dir,
                 "overlap hub: a directory spec store (e.g. out/eval/specs) whose specs are the base "
                 "styles, projected to --d / --dt; default: 48 seeded styles sharing 16 content directions");
  app.add_option("--zipf", ov.zipf, "overlap hub: popularity exponent of the base styles")->capture_default_str();
  app.add_option("--family-size", ov.family_size, "overlap hub: mean models per family (geometric)")
      ->capture_default_str();
  app.add_option("--family-offset", ov.family_offset,
                 "overlap hub: a family's shift from its style, x the median distance between base means")
      ->capture_default_str();
  app.add_option("--member-offset", ov.member_offset,
                 "overlap hub: a member's shift within its family (near-duplicates), x the same distance")
      ->capture_default_str();
  app.add_option("--mix", ov.mix, "overlap hub: a family's fraction of points from a second style ~ U[0, mix)")
      ->capture_default_str();
  app.add_option("--fit-jitter", ov.fit_jitter,
                 "overlap hub: jitter of a spec point, x the base's RMS within-model spread")
      ->capture_default_str();
  app.add_option("--content", ov.content,
                 "overlap hub: a query's content variation, x one real within-model deviation")
      ->capture_default_str();
  app.add_option("--recall-queries", recall_queries,
                 "fresh queries (never a spec point) on which recall against float32 exact is measured")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  CLI11_PARSE(app, argc, argv);

  const double points = static_cast<double>(models) * r;
  const double spec_bytes =
      static_cast<double>(models) * (static_cast<double>(r) * (d + dt + r + 1) + d) * 4.0;
  const double available = mem_available_gb();
  if (!json)
    std::printf(
        "bench_score: M=%ld r=%d d=%d dt=%d (P=%.0f points, %.2f GB of spec arrays; "
        "%.1f GB available)\n",
        models, r, d, dt, points, spec_bytes / 1e9, available);
  // binary16 runs hold the float32 reference too.
  const double copies = storage_name == "f32" ? 1.25 : 2.0;
  if (available > 0 && spec_bytes * copies / (1024.0 * 1024.0 * 1024.0) > available) {
    std::fprintf(stderr, "not enough memory for one copy of the specs plus headroom\n");
    return 1;
  }

  // The hub: every spec and query a function of (seed, index), so any part can be made again.
  std::optional<gmi::bench::OverlapHub> overlap;
  if (hub_kind == "overlap") {
    ov.seed = seed;
    ov.r = r;
    ov.d = d;
    ov.dt = dt;
    overlap.emplace(base_dir.empty() ? gmi::bench::seeded_base(ov.base_models, r, d, dt, seed ^ 0x5eed)
                                     : gmi::bench::load_base(base_dir),
                    ov, models);
    if (!json)
      std::printf("overlap hub: base %s (%zu models), %ld families, spacing %.3f, spread %.3f\n",
                  overlap->base().source.c_str(), overlap->base().zx.size(), overlap->families(),
                  overlap->spacing(), overlap->spread());
  }
  const gmi::EncoderIdentity image{"bench-image", "1", d, gamma};
  const gmi::EncoderIdentity text{"bench-text", "1", dt, 1.0};
  const auto make_spec = [&](long m) {
    if (overlap) return overlap->spec(m);
    FastRng rng{seed * 0x100000001b3ull + static_cast<std::uint64_t>(m)};
    rng.next();
    gmi::Spec s;
    s.model_id = "model-" + std::to_string(m);
    s.image_encoder = image;
    s.text_encoder = text;
    s.n = 1000;
    s.gamma = gamma;
    s.zx = around(unit_vector(d, rng), r, 0.08f, rng);
    s.zt = around(unit_vector(dt, rng), r, 0.08f, rng);
    s.beta.resize(r);
    for (auto& b : s.beta) b = 0.5f + 0.5f * rng.uniform();
    s.beta /= s.beta.sum();
    s.gram_x = gmi::gaussian_gram(s.zx, gamma);
    s.mean_x = s.zx.colwise().mean().transpose();
    s.downloads = static_cast<double>(rng.next() % 100000);
    return s;
  };
  // Specs one at a time; SpecIndex consumes the vector, freeing each spec as it packs it.
  auto start = Clock::now();
  std::vector<gmi::Spec> specs;
  specs.reserve(static_cast<std::size_t>(models));
  for (long m = 0; m < models; ++m) specs.push_back(make_spec(m));
  const double build_s = std::chrono::duration<double>(Clock::now() - start).count();
  const double rss_specs = peak_rss_gb();

  // Queries of random models: on the overlap hub fresh samples of the model's outputs; on the
  // random hub a point near one of its reduced points, with a pseudo-prompt near its zt.
  // The first rows are timed; all of them (>= recall_queries) measure recall.
  const int max_batch = batches.empty() ? 1 : *std::max_element(batches.begin(), batches.end());
  const int pool = std::max({queries, max_batch, 64, recall_queries});
  gmi::RowMatrix xs(pool, d), ts(pool, dt);
  std::vector<long> truth(static_cast<std::size_t>(pool));
  FastRng qrng{seed ^ 0x9e3779b97f4a7c15ull};
  for (int q = 0; q < pool; ++q) {
    const long m = static_cast<long>(qrng.next() % static_cast<std::uint64_t>(models));
    truth[static_cast<std::size_t>(q)] = m;
    if (overlap) {
      std::vector<float> x(static_cast<std::size_t>(d)), t(static_cast<std::size_t>(dt));
      overlap->query(m, static_cast<std::uint64_t>(q), x.data(), t.data());
      xs.row(q) = Eigen::Map<const Eigen::RowVectorXf>(x.data(), d);
      ts.row(q) = Eigen::Map<const Eigen::RowVectorXf>(t.data(), dt);
      continue;
    }
    const gmi::Spec& near = specs[static_cast<std::size_t>(m)];
    const auto p = static_cast<Eigen::Index>(qrng.next() % static_cast<std::uint64_t>(r));
    for (int k = 0; k < d; ++k) xs(q, k) = near.zx(p, k) + 0.05f * qrng.uniform();
    for (int k = 0; k < dt; ++k) ts(q, k) = near.zt(p, k) + 0.05f * qrng.uniform();
    xs.row(q).normalize();
    ts.row(q).normalize();
  }

  const gmi::SpecStorage storage = gmi::parse_storage(storage_name);
  // With another storage than float32, the float32 index is the reference of the same run.
  std::optional<gmi::SpecIndex> reference;
  if (storage != gmi::SpecStorage::kF32) reference.emplace(specs);
  start = Clock::now();
  const gmi::SpecIndex index(std::move(specs), nullptr, gmi::SpecSpace::kRaw, storage);
  const double pack_s = std::chrono::duration<double>(Clock::now() - start).count();
  if (!json)
    std::printf("built specs in %.1f s (peak RSS %.2f GB); packed (%s) in %.1f s (peak RSS %.2f GB), "
                "%.0f bytes per spec\n",
                build_s, rss_specs, storage_name.c_str(), pack_s, peak_rss_gb(),
                static_cast<double>(index.memory_bytes()) / static_cast<double>(models));
  nlohmann::json out{{"models", models}, {"r", r}, {"d", d}, {"dt", dt}, {"storage", storage_name},
                     {"hub", hub_kind},
                     {"search", search}, {"threads", gmi::default_threads()},
                     {"candidates", search == "two-stage" ? nlohmann::json(candidates) : nlohmann::json(nullptr)},
                     {"candidate_dims", search == "two-stage" ? nlohmann::json(two_stage.dims) : nlohmann::json(nullptr)},
                     {"candidate_prompt_dims", search == "two-stage" ? nlohmann::json(two_stage.prompt_dims) : nlohmann::json(nullptr)},
                     {"candidate_clusters", search == "two-stage" ? nlohmann::json(two_stage.clusters) : nlohmann::json(nullptr)},
                     {"candidate_residual_dims", search == "two-stage" ? nlohmann::json(two_stage.residual_dims) : nlohmann::json(nullptr)},
                     {"candidate_lists", search == "two-stage" ? nlohmann::json(two_stage.lists) : nlohmann::json(nullptr)},
                     {"candidate_probe", search == "two-stage" && two_stage.lists > 0 ? nlohmann::json(two_stage.probe) : nlohmann::json(nullptr)},
                     {"candidate_coarse", search == "two-stage" && two_stage.coarse > 0 ? nlohmann::json(two_stage.coarse) : nlohmann::json(nullptr)},
                     {"candidate_coarse_shape", search == "two-stage" && two_stage.coarse > 0
                                                    ? nlohmann::json({two_stage.coarse_clusters, two_stage.coarse_dims, two_stage.coarse_prompt_dims})
                                                    : nlohmann::json(nullptr)},
                     {"tau", tau},
                     {"bytes_per_spec", static_cast<double>(index.memory_bytes()) / static_cast<double>(models)},
                     {"pack_s", pack_s}};

  if (search == "two-stage") {
    start = Clock::now();
    two_stage.candidates = static_cast<std::size_t>(candidates);
    const std::size_t bytes = index.prepare_two_stage(two_stage);
    const double prepare_s = std::chrono::duration<double>(Clock::now() - start).count();
    out["candidate_index_s"] = prepare_s;
    out["candidate_bytes_per_spec"] = static_cast<double>(bytes) / static_cast<double>(models);
    if (!json)
      std::printf("candidate summary (%d groups, %d + %d dims): %.2f s, %.0f bytes per spec\n",
                  two_stage.clusters, two_stage.dims, two_stage.prompt_dims, prepare_s,
                  static_cast<double>(bytes) / static_cast<double>(models));
  }
  for (const std::string& name : scorers) {
    gmi::ScoreOptions options;
    options.scorer = gmi::parse_scorer(name);
    options.tau = tau;
    const bool uses_t = options.scorer == gmi::Scorer::kWeighted;
    // The search under test: exact, or two-stage on the same index.
    const auto ranks = [&](const gmi::RowMatrix& bx, const gmi::RowMatrix& bt, const gmi::ScoreOptions& o) {
      return search == "two-stage" ? index.rank_batch_two_stage(bx, bt, o, two_stage)
                                   : index.rank_batch(bx, bt, o);
    };
    const double bytes = points * (d + (uses_t ? dt : 0)) * (storage == gmi::SpecStorage::kF16 ? 2.0 : 4.0);  // zx (+ zt) per pass
    ranks(xs.topRows(1), ts.topRows(1), options);  // warm-up
    std::vector<double> single;
    for (int q = 0; q < queries; ++q) {
      const auto t0 = Clock::now();
      const auto top = ranks(xs.middleRows(q, 1), ts.middleRows(q, 1), options);
      single.push_back(std::chrono::duration<double>(Clock::now() - t0).count());
      if (top.empty() || top.front().empty()) return 1;
    }
    const Stats s1 = stats(single);
    if (!json)
      std::printf("%-8s single   : median %9.3f ms  p90 %9.3f ms per query  (%.1f GB/s of zx%s)\n",
                  name.c_str(), s1.median * 1e3, s1.p90 * 1e3, bytes / s1.median / 1e9,
                  uses_t ? "+zt" : "");
    nlohmann::json& js = out["scorers"][name];
    js["p50_ms"] = s1.median * 1e3;
    js["p90_ms"] = s1.p90 * 1e3;
    for (int b : batches) {
      std::vector<double> per_query;
      for (int rep = 0; rep < repeats; ++rep) {
        const gmi::RowMatrix bx = xs.topRows(b), bt = ts.topRows(b);
        const auto t0 = Clock::now();
        const auto ranked = ranks(bx, bt, options);
        per_query.push_back(std::chrono::duration<double>(Clock::now() - t0).count() / b);
        if (static_cast<int>(ranked.size()) != b) return 1;
      }
      const Stats sb = stats(per_query);
      js["batch" + std::to_string(b) + "_ms_per_query"] = sb.median * 1e3;
      if (!json) std::printf(
          "%-8s batch %3d: median %9.3f ms  p90 %9.3f ms per query  (%.1f GB/s "
          "effective, x%.1f vs single)\n",
          name.c_str(), b, sb.median * 1e3, sb.p90 * 1e3, bytes / sb.median / 1e9,
          s1.median / sb.median);
    }
    // Recall of the reference's top-k (float32 exact) in this index's top-4, over the pool.
    const gmi::SpecIndex& ref = reference ? *reference : index;
    gmi::ScoreOptions four = options;
    four.top_k = 4;
    const auto mine = ranks(xs, ts, four), theirs = ref.rank_batch(xs, ts, four);
    double at1 = 0, at4 = 0, same4 = 0, margin = 0, true1 = 0, family1 = 0;
    const auto model_index = [](const std::string& id) { return std::stol(id.substr(6)); };  // "model-<m>"
    for (std::size_t q = 0; q < mine.size(); ++q) {
      // How hard the hub is: does exact scoring find the model (or its family) that drew the query?
      const long top = model_index(theirs[q][0].model);
      true1 += top == truth[q] ? 1 : 0;
      family1 += overlap && overlap->family(top) == overlap->family(truth[q]) ? 1 : 0;
      at1 += mine[q][0].model == theirs[q][0].model ? 1 : 0;
      std::size_t found = 0;
      bool equal = true;
      for (std::size_t i = 0; i < theirs[q].size(); ++i) {
        for (const auto& m : mine[q]) found += m.model == theirs[q][i].model ? 1 : 0;
        equal = equal && mine[q][i].model == theirs[q][i].model;
      }
      at4 += static_cast<double>(found) / static_cast<double>(theirs[q].size());
      same4 += equal ? 1 : 0;
      if (theirs[q].size() > 1) margin += std::fabs(theirs[q][1].score - theirs[q][0].score);
    }
    const auto n = static_cast<double>(mine.size());
    js["recall_at_1"] = at1 / n;
    js["recall_at_4"] = at4 / n;
    js["top4_identical"] = same4 / n;
    js["mean_margin_rank1_rank2"] = margin / n;
    js["recall_queries"] = mine.size();
    js["exact_top1_is_source_model"] = true1 / n;
    if (overlap) js["exact_top1_in_source_family"] = family1 / n;
    if (!json)
      std::printf("%-8s vs float32 exact on %zu queries: recall@1 %.4f  recall@4 %.4f  identical top-4 %.4f  "
                  "(mean score margin rank 1 to 2: %.4g)\n",
                  name.c_str(), mine.size(), at1 / n, at4 / n, same4 / n, margin / n);
    if (!json)
      std::printf("%-8s exact top-1 is the query's source model for %.4f of queries%s\n", name.c_str(), true1 / n,
                  overlap ? (", its family for " + std::to_string(family1 / n)).c_str() : "");
  }
  // The first scorer's figures at the top level too, for checks that drive one scorer.
  if (!scorers.empty()) {
    for (const auto& [k, v] : out["scorers"][scorers.front()].items()) out[k] = v;
  }
  if (overlap)
    out["overlap"] = {{"base", overlap->base().source}, {"base_models", overlap->base().zx.size()},
                      {"families", overlap->families()}, {"zipf", ov.zipf}, {"family_size", ov.family_size},
                      {"family_offset", ov.family_offset}, {"member_offset", ov.member_offset},
                      {"mix", ov.mix}, {"fit_jitter", ov.fit_jitter}, {"content", ov.content},
                      {"spacing", overlap->spacing()}, {"spread", overlap->spread()}};
  out["peak_rss_gb"] = peak_rss_gb();
  if (json) {
    std::printf("%s\n", out.dump().c_str());
  } else {
    std::printf("peak RSS %.2f GB\n", peak_rss_gb());
  }
  return 0;
}
