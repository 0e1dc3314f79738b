// Spec-fit benchmark: fit_rkme on synthetic clustered, L2-normalised data.
// Compare with scripts/bench_fit_numpy.py on the same data (--dump writes it).
#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "gmi/rkme.hpp"

namespace {

gmi::RowMatrix clustered(int n, int dim, int clusters, double noise, std::mt19937_64& rng) {
  std::normal_distribution<float> g(0.0f, 1.0f);
  gmi::RowMatrix centres(clusters, dim), out(n, dim);
  for (auto& v : centres.reshaped()) v = g(rng);
  for (int c = 0; c < clusters; ++c) centres.row(c).normalize();
  const float sigma = static_cast<float>(noise / std::sqrt(static_cast<double>(dim)));
  for (int i = 0; i < n; ++i) {
    const int c = static_cast<int>(rng() % static_cast<std::uint64_t>(clusters));
    for (int k = 0; k < dim; ++k) out(i, k) = centres(c, k) + sigma * g(rng);
    out.row(i).normalize();
  }
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"fit_rkme benchmark on synthetic data"};
  int n = 1000, d = 512, dt = 256, r = 32, clusters = 16, runs = 5, max_iterations = 100;
  double noise = 0.6, lambda = 1.0, tolerance = 1e-5;
  std::uint64_t seed = 42;
  std::string dump;
  app.add_option("--n", n, "samples");
  app.add_option("--d", d, "image embedding dimension");
  app.add_option("--dt", dt, "prompt embedding dimension");
  app.add_option("--r", r, "reduced set size");
  app.add_option("--clusters", clusters, "clusters in the synthetic data");
  app.add_option("--noise", noise, "within-cluster noise (norm relative to the unit centre)");
  app.add_option("--lambda", lambda, "prompt weight of the joint space");
  app.add_option("--max-iterations", max_iterations, "outer iterations cap");
  app.add_option("--tolerance", tolerance, "relative tolerance on J");
  app.add_option("--runs", runs, "timed runs (the median is reported)");
  app.add_option("--seed", seed, "data seed");
  app.add_option("--dump", dump, "write x (n x d) then t (n x dt) as raw float32 to this file");
  CLI11_PARSE(app, argc, argv);

  std::mt19937_64 rng(seed);
  const gmi::RowMatrix x = clustered(n, d, clusters, noise, rng);
  // Prompts follow the images' clusters loosely: a second clustering of the same samples.
  const gmi::RowMatrix t = clustered(n, dt, clusters, noise, rng);
  if (!dump.empty()) {
    std::ofstream f(dump, std::ios::binary);
    f.write(reinterpret_cast<const char*>(x.data()), static_cast<std::streamsize>(x.size() * 4));
    f.write(reinterpret_cast<const char*>(t.data()), static_cast<std::streamsize>(t.size() * 4));
  }

  gmi::RkmeOptions options;
  options.reduced_size = r;
  options.gamma = gmi::median_heuristic_gamma(x);
  options.lambda = lambda;
  options.max_iterations = max_iterations;
  options.relative_tolerance = tolerance;

  std::vector<double> seconds;
  gmi::ReducedSet fit;
  for (int run = 0; run < runs; ++run) {
    const auto start = std::chrono::steady_clock::now();
    fit = gmi::fit_rkme(x, t, options);
    seconds.push_back(
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  }
  std::sort(seconds.begin(), seconds.end());
  std::printf("bench_fit: n=%d d=%d dt=%d r=%d gamma=%.17g lambda=%g\n", n, d, dt, r, options.gamma,
              lambda);
  std::printf("fit time: median %.4f s (min %.4f, max %.4f, %d runs)\n",
              seconds[seconds.size() / 2], seconds.front(), seconds.back(), runs);
  std::printf("iterations: %d\n", fit.iterations);
  std::printf("initial MMD^2 (k-means + beta): %.8e\n", fit.initial_mmd2);
  std::printf("residual MMD^2: %.8e\n", fit.residual_mmd2);
  return 0;
}
