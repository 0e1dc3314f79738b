// Learning the hub-learned metric at hub scale: time and memory of MetricLearner over M
// synthetic specs (streamed: one spec in memory at a time, as `gmi hub learn-metric` and the
// learn stage read a store), and the cost of using it: mapping a spec's points at load and a
// query, and the bytes a spec's zx takes at k dims instead of d.
//
//   bench_metric --models 1000,10000,100000 --d 1664 --r 32 [--dims 0,128]
#include <CLI/CLI.hpp>
#include <chrono>
#include <cstdio>
#include <string>
#include <vector>

#include "bench_util.hpp"
#include "gmi/metric.hpp"

namespace {

using Clock = std::chrono::steady_clock;

using gmi::bench::FastRng;
using gmi::bench::peak_rss_gb;

double seconds_since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Time and memory of learning and using the hub-learned metric on synthetic specs"};
  std::vector<long> model_counts{1000, 10000};
  std::vector<int> dims{0, 128};
  int d = 1664, r = 32, content = 64;
  std::uint64_t seed = 11;
  app.add_option("--models", model_counts, "hub sizes M to learn from")->delimiter(',');
  app.add_option("--dims", dims, "metric dims k to learn (0: all d)")->delimiter(',');
  app.add_option("--d", d, "embedding dimension (1664: the default composite encoder)");
  app.add_option("--r", r, "reduced points per spec");
  app.add_option("--content", content, "shared content directions (the nuisance every model shares)");
  app.add_option("--seed", seed, "data seed");
  CLI11_PARSE(app, argc, argv);

  const gmi::EncoderIdentity image{"bench-image", "1", d, 1.0};
  // Content: a few directions every model varies along; style: a per-model centre.
  FastRng rng{seed};
  gmi::RowMatrix basis(content, d);
  for (Eigen::Index i = 0; i < basis.size(); ++i) basis.data()[i] = rng.uniform();
  std::printf("bench_metric: d=%d r=%d content=%d (P is k x d floats; learner state 2 d^2 doubles = %.1f MB)\n", d,
              r, content, 2.0 * d * d * 8 / 1e6);
  std::printf("%9s %6s %10s %10s %10s %11s %12s %14s\n", "models", "k", "add_s", "finish_s", "total_s",
              "peak_rss_gb", "map_spec_ms", "map_query_us");
  for (long models : model_counts) {
    for (int k : dims) {
      gmi::MetricOptions o;
      o.dims = k;
      gmi::MetricLearner learner(image, o);
      gmi::Spec s;
      s.model_id = "m";
      s.image_encoder = image;
      s.text_encoder = {"bench-text", "1", 1, 1.0};
      s.zx.resize(r, d);
      s.beta = Eigen::VectorXf::Constant(r, 1.0f / static_cast<float>(r));
      Eigen::RowVectorXf centre(d), coef(content);
      const auto t0 = Clock::now();
      for (long m = 0; m < models; ++m) {
        for (auto& c : centre) c = 0.2f * rng.uniform();
        for (int j = 0; j < r; ++j) {
          for (auto& c : coef) c = rng.uniform();
          s.zx.row(j) = centre + coef * basis;
          for (int x = 0; x < d; x += 7) s.zx(j, x) += 0.05f * rng.uniform();
        }
        s.mean_x = s.zx.colwise().mean().transpose();
        learner.add(s);
      }
      const double add_s = seconds_since(t0);
      const auto t1 = Clock::now();
      const gmi::Metric metric = learner.finish();
      const double finish_s = seconds_since(t1);
      // Using it: one spec's points mapped at load, one query mapped per request.
      double sink = 0;  // keeps the products from being optimised away
      auto t2 = Clock::now();
      const int reps = 50;
      for (int i = 0; i < reps; ++i) sink += metric.map(s.zx).sum();
      const double map_spec_ms = seconds_since(t2) / reps * 1e3;
      const gmi::RowMatrix q = s.zx.topRows(1);
      t2 = Clock::now();
      for (int i = 0; i < 1000; ++i) sink += metric.map(q).sum();
      const double map_query_us = seconds_since(t2) / 1000 * 1e6;
      if (!(sink == sink)) std::printf("(non-finite map)\n");
      std::printf("%9ld %6d %10.2f %10.2f %10.2f %11.2f %12.3f %14.1f\n", models, metric.dim_out(), add_s, finish_s,
                  add_s + finish_s, peak_rss_gb(), map_spec_ms, map_query_us);
      std::fflush(stdout);
    }
  }
  std::printf("bytes per spec's zx: %d x %d floats = %.1f KB raw", r, d, r * d * 4.0 / 1024);
  for (int k : dims)
    if (k > 0) std::printf("; %.1f KB at k = %d", r * k * 4.0 / 1024, k);
  std::printf("\n");
  return 0;
}
