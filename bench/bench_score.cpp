// Scoring benchmark: exact scoring of M synthetic specs (packed SpecIndex), one query at a
// time and in batches, with float32 or binary16 storage; with binary16, the float32 index is
// built in the same run and the rankings compared (recall@1/@4 of its top-k). Compare with
// scripts/bench_score_numpy.py (same sizes). --json prints one object for machines.
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
  double tau = 0.1, gamma = 1.0;
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
  app.add_option("--tau", tau, "prompt-weight temperature");
  app.add_option("--seed", seed, "data seed");
  app.add_option("--storage", storage_name, "f32 | f16: how the index stores its points")
      ->check(CLI::IsMember({"f32", "f16"}));
  long candidates = 256;
  app.add_option("--search", search,
                 "exact | two-stage (the --candidates models nearest by mean cosine, then exact on those)")
      ->check(CLI::IsMember({"exact", "two-stage"}));
  app.add_option("--candidates", candidates, "two-stage: models kept by the first stage")->check(CLI::PositiveNumber);
  app.add_flag("--json", json, "print one JSON object (p50_ms, batch64_ms_per_query, recall_at_1, "
                               "recall_at_4, bytes_per_spec, ...) instead of the table");
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

  // Specs one at a time; SpecIndex consumes the vector, freeing each spec as it packs it.
  const gmi::EncoderIdentity image{"bench-image", "1", d, gamma};
  const gmi::EncoderIdentity text{"bench-text", "1", dt, 1.0};
  FastRng rng{seed};
  auto start = Clock::now();
  std::vector<gmi::Spec> specs;
  specs.reserve(static_cast<std::size_t>(models));
  for (long m = 0; m < models; ++m) {
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
    specs.push_back(std::move(s));
  }
  const double build_s = std::chrono::duration<double>(Clock::now() - start).count();
  const double rss_specs = peak_rss_gb();

  // Queries: near a random model's points (a realistic hit), with a pseudo-prompt near its zt.
  const int max_batch = batches.empty() ? 1 : *std::max_element(batches.begin(), batches.end());
  const int pool = std::max({queries, max_batch, 64});
  gmi::RowMatrix xs(pool, d), ts(pool, dt);
  for (int q = 0; q < pool; ++q) {
    const gmi::Spec& near = specs[static_cast<std::size_t>(rng.next() % static_cast<std::uint64_t>(models))];
    const auto p = static_cast<Eigen::Index>(rng.next() % static_cast<std::uint64_t>(r));
    for (int k = 0; k < d; ++k) xs(q, k) = near.zx(p, k) + 0.05f * rng.uniform();
    for (int k = 0; k < dt; ++k) ts(q, k) = near.zt(p, k) + 0.05f * rng.uniform();
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
                     {"search", search}, {"threads", gmi::default_threads()},
                     {"candidates", search == "two-stage" ? nlohmann::json(candidates) : nlohmann::json(nullptr)},
                     {"bytes_per_spec", static_cast<double>(index.memory_bytes()) / static_cast<double>(models)},
                     {"pack_s", pack_s}};

  for (const std::string& name : scorers) {
    gmi::ScoreOptions options;
    options.scorer = gmi::parse_scorer(name);
    options.tau = tau;
    const bool uses_t = options.scorer == gmi::Scorer::kWeighted;
    // The search under test: exact, or two-stage on the same index.
    const auto ranks = [&](const gmi::RowMatrix& bx, const gmi::RowMatrix& bt, const gmi::ScoreOptions& o) {
      return search == "two-stage" ? index.rank_batch_two_stage(bx, bt, o, static_cast<std::size_t>(candidates))
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
    double at1 = 0, at4 = 0, same4 = 0, margin = 0;
    for (std::size_t q = 0; q < mine.size(); ++q) {
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
    if (!json)
      std::printf("%-8s vs float32 exact on %zu queries: recall@1 %.4f  recall@4 %.4f  identical top-4 %.4f  "
                  "(mean score margin rank 1 to 2: %.4g)\n",
                  name.c_str(), mine.size(), at1 / n, at4 / n, same4 / n, margin / n);
  }
  // The first scorer's figures at the top level too, for checks that drive one scorer.
  if (!scorers.empty()) {
    for (const auto& [k, v] : out["scorers"][scorers.front()].items()) out[k] = v;
  }
  out["peak_rss_gb"] = peak_rss_gb();
  if (json) {
    std::printf("%s\n", out.dump().c_str());
  } else {
    std::printf("peak RSS %.2f GB\n", peak_rss_gb());
  }
  return 0;
}
