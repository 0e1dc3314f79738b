// Spec-fit benchmark: fit_rkme on synthetic clustered, L2-normalised data.
// Compare with scripts/bench_fit_numpy.py on the same data (--dump writes it).
// --trace: J against time over a long fit, where today's and candidate stopping rules would
// stop, and the peer procedure (learnware's RKMETableSpecification, re-implemented: k-means,
// then `--peer-steps` rounds of one fixed-size gradient step on z and a simplex re-solve of
// beta) on the same joint samples, for scripts/bench_fit_plateau.sh.
#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <cmath>
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

double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

struct TracePoint {
  int iteration;
  double seconds;  // since the fit began (k-means included)
  double j;        // MMD^2 of the iterate
};

// Where a rule "stop when J improved by less than tol * J over the last `window` iterations,
// or at `cap`" stops on a recorded trace. The fit is deterministic, so this is where a fit
// run with that rule would stop (the rule reads nothing but J).
std::size_t stop_index(const std::vector<TracePoint>& trace, double tol, int window, int cap) {
  for (std::size_t i = 0; i < trace.size(); ++i) {
    if (trace[i].iteration >= cap) return i;
    if (trace[i].iteration < window) continue;
    const double before = trace[i - static_cast<std::size_t>(window)].j;
    if (before - trace[i].j < tol * before || trace[i].j <= 0) return i;
  }
  return trace.size() - 1;
}

// The peer's procedure on the joint samples u (n x D, double): gmi's k-means and simplex beta
// as the start (fit_rkme with no iteration), then `steps` rounds of z <- z - step * g with the
// peer's gradient g_i = -2 gamma beta_i [sum_l beta_l k(z_i,z_l)(z_i - z_l)
// - (2/n) sum_x k(z_i,x)(z_i - x)] and beta re-solved on the simplex. Returns its MMD^2.
double peer_fit(const gmi::RowMatrix& u, double gamma, int r, int steps, double step,
                double* seconds) {
  const auto start = std::chrono::steady_clock::now();
  gmi::RkmeOptions o;
  o.reduced_size = r;
  o.gamma = gamma;
  o.lambda = 0;
  o.max_iterations = 0;
  const gmi::RowMatrix none(u.rows(), 0);
  const gmi::ReducedSet init = gmi::fit_rkme(u, none, o);
  using M = Eigen::MatrixXd;
  const M ud = u.cast<double>();
  M z = init.zx.cast<double>();
  Eigen::VectorXd beta = init.beta.cast<double>();
  const double n = static_cast<double>(u.rows());
  auto kernel = [gamma](const M& a, const M& b) {
    M d2 = (-2.0 * a * b.transpose()).eval();
    d2.colwise() += a.rowwise().squaredNorm();
    d2.rowwise() += b.rowwise().squaredNorm().transpose();
    return M((-gamma * d2.array().max(0.0)).exp());
  };
  for (int s = 0; s < steps; ++s) {
    const M kzz = kernel(z, z), kzu = kernel(z, ud);
    const Eigen::VectorXd kb = kzz * beta, ku = kzu.rowwise().sum();
    // sum_l beta_l k_il (z_i - z_l) = kb_i z_i - (K diag(beta) Z)_i; likewise for the samples.
    const M t1 = kb.asDiagonal() * z - kzz * beta.asDiagonal() * z;
    const M t2 = (ku.asDiagonal() * z - kzu * ud) * (-2.0 / n);
    z -= step * ((-2.0 * gamma) * beta.asDiagonal() * (t1 + t2));
    beta = gmi::solve_simplex_qp(kernel(z, z), kernel(z, ud).rowwise().sum() / n);
  }
  *seconds = seconds_since(start);
  const gmi::RowMatrix zf = z.cast<float>();
  return gmi::rkme_mmd2(u, none, zf, gmi::RowMatrix(r, 0), beta.cast<float>(), gamma, 0);
}

struct Rule {
  double tol;
  int window, cap;
};

int run_trace(const gmi::RowMatrix& x, const gmi::RowMatrix& t, gmi::RkmeOptions options,
              int cap, int peer_steps, double peer_step, const std::string& json_path) {
  // Iteration 0: k-means and the first beta, timed on their own.
  gmi::RkmeOptions init = options;
  init.max_iterations = 0;
  auto start = std::chrono::steady_clock::now();
  const gmi::ReducedSet first = gmi::fit_rkme(x, t, init);
  std::vector<TracePoint> trace{{0, seconds_since(start), first.initial_mmd2}};

  // Today's fit, as it ran before this rule was chosen: three gradient steps per iteration,
  // tol 1e-5 per iteration, cap 100.
  gmi::RkmeOptions today_options = options;
  today_options.optimizer = gmi::RkmeOptimizer::kGradient;
  today_options.max_iterations = 100;
  today_options.relative_tolerance = 1e-5;
  start = std::chrono::steady_clock::now();
  const gmi::ReducedSet today = gmi::fit_rkme(x, t, today_options);
  const double today_seconds = seconds_since(start);

  options.max_iterations = cap;
  options.relative_tolerance = 0;
  start = std::chrono::steady_clock::now();
  const gmi::ReducedSet fit = gmi::fit_rkme(x, t, options, [&](int it, double j) {
    trace.push_back({it, seconds_since(start), j});
  });
  // The lower of the two optimisers' ends stands for "converged".
  const double converged = std::min(trace.back().j, today.residual_mmd2);

  const std::vector<Rule> rules = {{1e-3, 1, 1000}, {1e-4, 1, 1000}, {1e-5, 1, 1000},
                                   {1e-2, 5, 1000}, {3e-3, 5, 1000}, {1e-3, 5, 1000},
                                   {3e-4, 5, 1000}, {1e-4, 5, 1000}, {1e-3, 10, 1000},
                                   {1e-4, 10, 1000}};

  gmi::RowMatrix u(x.rows(), x.cols() + (options.lambda > 0 ? t.cols() : 0));
  u.leftCols(x.cols()) = x;
  if (options.lambda > 0) u.rightCols(t.cols()) = static_cast<float>(options.lambda) * t;
  double peer_seconds = 0;
  const double peer = peer_fit(u, options.gamma, options.reduced_size, peer_steps, peer_step,
                               &peer_seconds);

  std::printf("trace: n=%lld r=%d gamma=%.6g lambda=%g; traced fit: J %.6e after %d "
              "iterations, %.3f s (stored residual %.6e); today's fit: %.6e after %d iterations, "
              "%.3f s; converged J %.6e\n",
              static_cast<long long>(x.rows()), options.reduced_size, options.gamma,
              options.lambda, trace.back().j, trace.back().iteration, trace.back().seconds,
              fit.residual_mmd2, today.residual_mmd2, today.iterations, today_seconds, converged);
  std::printf("peer (%d steps of %g): MMD^2 %.6e in %.3f s (%.2fx converged)\n", peer_steps,
              peer_step, peer, peer_seconds, peer / converged);
  std::printf("| rule (tol, window, cap) | stops at | seconds | of today's time | J / converged |\n"
              "|---|---|---|---|---|\n");
  for (const Rule& rule : rules) {
    const std::size_t i = stop_index(trace, rule.tol, rule.window, rule.cap);
    std::printf("| %g, %d, %d | %d | %.4f | %.3f | %.4f |\n", rule.tol, rule.window, rule.cap,
                trace[i].iteration, trace[i].seconds, trace[i].seconds / today_seconds,
                trace[i].j / converged);
  }
  if (!json_path.empty()) {
    std::ofstream f(json_path);
    if (!f) {
      std::fprintf(stderr, "bench_fit: cannot write %s\n", json_path.c_str());
      return 1;
    }
    f.precision(9);
    f << "{\"n\":" << x.rows() << ",\"d\":" << x.cols() << ",\"dt\":" << t.cols()
      << ",\"r\":" << options.reduced_size << ",\"gamma\":" << options.gamma
      << ",\"lambda\":" << options.lambda << ",\"converged_j\":" << converged
      << ",\"today\":{\"mmd2\":" << today.residual_mmd2 << ",\"iterations\":" << today.iterations
      << ",\"seconds\":" << today_seconds << "}"
      << ",\"peer\":{\"steps\":" << peer_steps << ",\"step\":" << peer_step
      << ",\"mmd2\":" << peer << ",\"seconds\":" << peer_seconds << "},\"rules\":[";
    for (std::size_t k = 0; k < rules.size(); ++k) {
      const std::size_t i = stop_index(trace, rules[k].tol, rules[k].window, rules[k].cap);
      f << (k ? "," : "") << "{\"tol\":" << rules[k].tol << ",\"window\":" << rules[k].window
        << ",\"cap\":" << rules[k].cap << ",\"iteration\":" << trace[i].iteration
        << ",\"seconds\":" << trace[i].seconds << ",\"j\":" << trace[i].j << "}";
    }
    f << "],\"trace\":[";
    for (std::size_t i = 0; i < trace.size(); ++i)
      f << (i ? "," : "") << "[" << trace[i].iteration << "," << trace[i].seconds << ","
        << trace[i].j << "]";
    f << "]}\n";
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"fit_rkme benchmark on synthetic data"};
  const gmi::RkmeOptions defaults;
  int n = 1000, d = 512, dt = 256, r = 32, clusters = 16, runs = 5,
      max_iterations = defaults.max_iterations;
  double noise = 0.6, lambda = 1.0, tolerance = defaults.relative_tolerance;
  std::uint64_t seed = 42;
  std::string dump, json_path;
  bool trace = false;
  int trace_cap = 2000, peer_steps = 3;
  double peer_step = 0.1;
  app.add_option("--n", n, "samples");
  app.add_option("--d", d, "image embedding dimension");
  app.add_option("--dt", dt, "prompt embedding dimension");
  app.add_option("--r", r, "reduced set size");
  app.add_option("--clusters", clusters, "clusters in the synthetic data");
  app.add_option("--noise", noise, "within-cluster noise (norm relative to the unit centre)");
  app.add_option("--lambda", lambda, "prompt weight of the joint space");
  app.add_option("--max-iterations", max_iterations, "outer iterations cap")->capture_default_str();
  app.add_option("--tolerance", tolerance, "relative tolerance on J")->capture_default_str();
  bool vs_before = false;
  app.add_flag("--vs-before", vs_before,
               "also time the fit as it was before L-BFGS (three gradient steps per iteration, "
               "tol 1e-5, cap 100) in the same run: fits per second of both");
  app.add_option("--runs", runs, "timed runs (the median is reported)");
  app.add_option("--seed", seed, "data seed");
  app.add_option("--dump", dump, "write x (n x d) then t (n x dt) as raw float32 to this file");
  std::string optimizer = "lbfgs";
  app.add_option("--optimizer", optimizer, "lbfgs | gradient: how z moves between beta steps")
      ->check(CLI::IsMember({"lbfgs", "gradient"}))
      ->capture_default_str();
  app.add_flag("--trace", trace,
               "record J against time over a fit of --trace-cap iterations (no tolerance); "
               "report where stopping rules stop and the peer procedure's MMD^2");
  app.add_option("--trace-cap", trace_cap, "iterations of the traced fit (its J is 'converged')")
      ->capture_default_str();
  app.add_option("--peer-steps", peer_steps, "rounds of the peer procedure (its default: 3)")
      ->capture_default_str();
  app.add_option("--peer-step", peer_step, "the peer's fixed gradient step (its default: 0.1)")
      ->capture_default_str();
  app.add_option("--json", json_path, "with --trace: write the trace and the rules here");
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
  options.optimizer =
      optimizer == "gradient" ? gmi::RkmeOptimizer::kGradient : gmi::RkmeOptimizer::kLbfgs;

  if (trace) return run_trace(x, t, options, trace_cap, peer_steps, peer_step, json_path);

  const auto timed = [&](const gmi::RkmeOptions& o, gmi::ReducedSet& fit) {
    std::vector<double> seconds;
    for (int run = 0; run < runs; ++run) {
      const auto start = std::chrono::steady_clock::now();
      fit = gmi::fit_rkme(x, t, o);
      seconds.push_back(seconds_since(start));
    }
    std::sort(seconds.begin(), seconds.end());
    return seconds;
  };
  gmi::ReducedSet fit;
  const std::vector<double> seconds = timed(options, fit);
  std::printf("bench_fit: n=%d d=%d dt=%d r=%d gamma=%.17g lambda=%g\n", n, d, dt, r, options.gamma,
              lambda);
  std::printf("fit time: median %.4f s (min %.4f, max %.4f, %d runs): %.2f fits/s\n",
              seconds[seconds.size() / 2], seconds.front(), seconds.back(), runs,
              1.0 / seconds[seconds.size() / 2]);
  std::printf("iterations: %d\n", fit.iterations);
  std::printf("initial MMD^2 (k-means + beta): %.8e\n", fit.initial_mmd2);
  std::printf("residual MMD^2: %.8e\n", fit.residual_mmd2);
  if (vs_before) {
    gmi::RkmeOptions before = options;
    before.optimizer = gmi::RkmeOptimizer::kGradient;
    before.max_iterations = 100;
    before.relative_tolerance = 1e-5;
    gmi::ReducedSet old;
    const std::vector<double> old_seconds = timed(before, old);
    const double a = seconds[seconds.size() / 2], b = old_seconds[old_seconds.size() / 2];
    std::printf("before (gradient, tol 1e-5, cap 100): median %.4f s, %.2f fits/s, %d iterations, "
                "residual MMD^2 %.8e\n",
                b, 1.0 / b, old.iterations, old.residual_mmd2);
    std::printf("now / before: time %.3f, residual MMD^2 %.3f\n", a / b,
                fit.residual_mmd2 / old.residual_mmd2);
  }
  return 0;
}
