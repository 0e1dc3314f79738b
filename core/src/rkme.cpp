// RKME fit in the joint (image, prompt) space. See shared METHOD.md, "The specification".
#include "gmi/rkme.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <random>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "gmi/error.hpp"
#include "gmi/parallel.hpp"
#include "rkme_internal.hpp"

namespace gmi {
namespace detail {
namespace {

using Eigen::Index;
using Eigen::VectorXd;

// Gradient steps on z per outer iteration (each one an Armijo line search).
constexpr int kGradientStepsPerIteration = 3;
// Armijo sufficient-decrease constant and the cap on halvings in one search.
constexpr double kArmijo = 1e-4;
constexpr int kMaxHalvings = 60;
// Added to K_zz's diagonal before the simplex QP; far below any J we can resolve.
constexpr double kQpJitter = 1e-10;
// The simplex QP inside the fit: warm-started, so it rarely needs many iterations.
constexpr int kQpIterations = 2000;
constexpr double kQpTolerance = 1e-12;
// Outer iterations between from-scratch recomputations of U Z^T and Z Z^T.
constexpr int kRefreshEvery = 10;
// Curvature pairs the L-BFGS descent keeps.
constexpr int kLbfgsMemory = 8;

VectorXd row_sqnorms(const MatrixD& a) { return a.rowwise().squaredNorm(); }

// Everything J and its gradient need at one z = W U. The dot products U Z^T and Z Z^T are
// kept so that a line-search trial W - eta V costs O(n r), not a product with U:
// U (Z - eta G)^T = U Z^T - eta U G^T, and likewise for Z Z^T.
struct Kernels {
  MatrixD w;     // r x n: z = w U
  MatrixD uz;    // n x r: u_i . z_j
  MatrixD zz;    // r x r: z_j . z_l (its diagonal gives ||z_j||^2)
  MatrixD k_uz;  // n x r
  MatrixD k_zz;  // r x r
  VectorXd c;    // r: c_j = (1/n) sum_i kappa(u_i, z_j)
};

// A descent direction G = V U and the products that move the dot products along it.
struct Direction {
  MatrixD v;   // r x n
  MatrixD ug;  // n x r: U G^T = U U^T V^T
  MatrixD zg;  // r x r: Z G^T = W (U G^T)
  MatrixD gg;  // r x r: G G^T = V (U G^T)
};

VectorXd column_means(const MatrixD& k_uz) {
  return k_uz.colwise().sum().transpose() / static_cast<double>(k_uz.rows());
}

void kernels_from_dots(const VectorXd& u_sqnorm, double gamma, Kernels& s) {
  const VectorXd z_sqnorm = s.zz.diagonal();
  s.k_uz.resize(s.uz.rows(), s.uz.cols());
  s.k_uz.array() = (-gamma * (((-2.0 * s.uz.array()).colwise() + u_sqnorm.array()).rowwise() +
                              z_sqnorm.transpose().array())
                                 .max(0.0))
                       .exp();
  s.k_zz.resize(s.zz.rows(), s.zz.cols());
  s.k_zz.array() = (-gamma * (((-2.0 * s.zz.array()).colwise() + z_sqnorm.array()).rowwise() +
                              z_sqnorm.transpose().array())
                                 .max(0.0))
                       .exp();
  s.c = column_means(s.k_uz);
}

// From scratch: one product with the samples' Gram matrix.
void evaluate(const SampleGram& gram, const VectorXd& u_sqnorm, double gamma, Kernels& s) {
  s.uz = gram.apply(s.w.transpose());
  s.zz.noalias() = s.w * s.uz;
  s.zz = 0.5 * (s.zz + s.zz.transpose()).eval();
  kernels_from_dots(u_sqnorm, gamma, s);
}

// `to` at from.w - eta * dir.v, without touching U (to.w itself is left for the caller).
void evaluate_step(const Kernels& from, const Direction& dir, double eta, const VectorXd& u_sqnorm,
                   double gamma, Kernels& to) {
  to.uz = from.uz - eta * dir.ug;
  to.zz = from.zz - eta * (dir.zg + dir.zg.transpose()) + (eta * eta) * dir.gg;
  kernels_from_dots(u_sqnorm, gamma, to);
}

double objective(double self_term, const MatrixD& k_zz, const VectorXd& c, const VectorXd& beta) {
  return self_term - 2.0 * beta.dot(c) + beta.dot(k_zz * beta);
}

double objective(double self_term, const Kernels& s, const VectorXd& beta) {
  return objective(self_term, s.k_zz, s.c, beta);
}

// V with dJ/dz = V U (see rkme_internal.hpp). No product with U: O(r^2 n).
MatrixD gradient_coefficients_at(const Kernels& s, const VectorXd& beta, double gamma) {
  const VectorXd k_beta = s.k_zz * beta;
  MatrixD v(s.w.rows(), s.w.cols());
  v.noalias() = (s.k_zz * beta.asDiagonal()) * s.w;
  v -= s.k_uz.transpose() / static_cast<double>(s.k_uz.rows());
  v += (s.c - k_beta).asDiagonal() * s.w;
  return (4.0 * gamma * beta).asDiagonal() * v;
}

Eigen::MatrixXd with_jitter(const MatrixD& k, double jitter) {
  Eigen::MatrixXd out = k;
  out.diagonal().array() += jitter;
  return out;
}

VectorXd beta_step(const Kernels& s, const VectorXd& previous, const RkmeOptions& options) {
  if (options.constrained) {
    return solve_simplex_qp_from(with_jitter(s.k_zz, kQpJitter), s.c, previous, kQpIterations,
                                 kQpTolerance);
  }
  return with_jitter(s.k_zz, options.ridge).ldlt().solve(s.c);
}

double largest_eigenvalue(const Eigen::MatrixXd& k) {
  if (k.rows() <= 512) {
    Eigen::SelfAdjointEigenSolver<Eigen::MatrixXd> eig(k, Eigen::EigenvaluesOnly);
    if (eig.info() == Eigen::Success) return eig.eigenvalues().maxCoeff();
  }
  return k.cwiseAbs().rowwise().sum().maxCoeff();  // Gershgorin: a safe upper bound
}

[[noreturn]] void fail(const std::string& where, const std::string& what) {
  throw InputError(where + ": " + what);
}

std::string num(double v) {
  std::ostringstream os;
  os << v;
  return os.str();
}

void require_finite(const RowMatrix& m, const std::string& where, const char* field) {
  if (!m.allFinite()) fail(where, std::string(field) + " contains non-finite values");
}

void require_gamma_lambda(double gamma, double lambda, const std::string& where,
                          const char* gamma_field, const char* lambda_field) {
  if (!(gamma > 0) || !std::isfinite(gamma))
    fail(where, std::string(gamma_field) + " must be positive and finite (got " + num(gamma) + ")");
  if (!(lambda >= 0) || !std::isfinite(lambda))
    fail(where,
         std::string(lambda_field) + " must be non-negative and finite (got " + num(lambda) + ")");
}

// The joint samples u_i = [x_i ; lambda t_i]; the prompt part is dropped when lambda == 0.
MatrixD joint(const RowMatrix& x, const RowMatrix& t, double lambda) {
  const Index d = x.cols(), dt = lambda > 0 ? t.cols() : 0;
  MatrixD u(x.rows(), d + dt);
  u.leftCols(d) = x.cast<double>();
  if (dt > 0) u.rightCols(dt) = lambda * t.cast<double>();
  return u;
}

// The state both descents move: z (as s.w), beta and J, with what they read.
struct Descent {
  const SampleGram& gram;
  const VectorXd& u_sq;
  double gamma, self_term;
  const RkmeOptions& options;
  const RkmeProgress& progress;
  Kernels& s;
  VectorXd& beta;
  double& j;
};

// beta re-solved for the current z. The constrained step warm-starts at the current beta and
// is kept only if the QP improved J; the closed form minimises J + ridge ||beta||^2, which is
// what decreases monotonically there, so it is always taken.
void update_beta(Descent& f) {
  VectorXd next = beta_step(f.s, f.beta, f.options);
  const double jn = objective(f.self_term, f.s, next);
  if (!f.options.constrained || jn <= f.j) {
    f.beta = std::move(next);
    f.j = jn;
  }
}

// The dot products are updated in closed form along each step; recomputed from scratch every
// kRefreshEvery iterations to shed rounding drift.
void refresh(Descent& f) {
  evaluate(f.gram, f.u_sq, f.gamma, f.s);
  f.j = objective(f.self_term, f.s, f.beta);
}

// Backtracking (Armijo) along z - eta * dir (dir.v, dir.ug, dir.zg, dir.gg filled), beta fixed:
// halves eta from its given value until J falls by kArmijo * eta * slope, where slope =
// <dJ/dz, dir> > 0. On success moves f.s and f.j there and leaves the accepted eta in `eta`;
// false when no step of kMaxHalvings decreases J (the rounding floor).
bool line_search(Descent& f, const Direction& dir, double slope, double& eta, Kernels& trial) {
  for (int h = 0; h < kMaxHalvings; ++h, eta *= 0.5) {
    evaluate_step(f.s, dir, eta, f.u_sq, f.gamma, trial);
    const double jt = objective(f.self_term, trial, f.beta);
    if (jt <= f.j - kArmijo * eta * slope) {
      trial.w = f.s.w - eta * dir.v;
      std::swap(f.s, trial);
      f.j = jt;
      return true;
    }
  }
  return false;
}

bool converged(const RkmeOptions& options, double j_prev, double j) {
  return j_prev - j < options.relative_tolerance * j_prev || j <= 0;
}

// RkmeOptimizer::kGradient: kGradientStepsPerIteration Armijo gradient steps on z per outer
// iteration, then beta. Returns the iterations run.
int descend_gradient(Descent& f) {
  const SampleGram& gram = f.gram;
  const double gamma = f.gamma;
  const RkmeOptions& options = f.options;
  Kernels& s = f.s;
  VectorXd& beta = f.beta;
  double& j = f.j;
  Kernels trial;
  int iterations = 0;
  // Step size for z: persists across iterations, x2 after an accepted step, /2 on a rejection.
  double eta = 1.0 / (4.0 * gamma * std::max(beta.cwiseAbs().maxCoeff(), 1e-12));
  Direction dir;
  for (int it = 1; it <= options.max_iterations; ++it) {
    const double j_prev = j;
    for (int step = 0; step < kGradientStepsPerIteration; ++step) {
      // G = V U; the one product with the samples per step is U G^T = U U^T V^T.
      dir.v = gradient_coefficients_at(s, beta, gamma);
      dir.ug = gram.apply(dir.v.transpose());
      dir.zg.noalias() = s.w * dir.ug;
      dir.gg.noalias() = dir.v * dir.ug;
      const double g2 = dir.gg.trace();  // ||G||^2
      if (!(g2 > 0) || !std::isfinite(g2)) break;
      double step_eta = eta;
      if (!line_search(f, dir, g2, step_eta, trial)) break;  // at the rounding floor
      eta = 2.0 * step_eta;
    }
    if (it % kRefreshEvery == 0) refresh(f);
    update_beta(f);
    iterations = it;
    if (f.progress) f.progress(it, j);
    if (converged(options, j_prev, j)) break;
  }
  return iterations;
}

// <A U, B U> (Frobenius) from A's coefficients (r x n) and B's U U^T B^T (n x r).
double inner(const MatrixD& a, const MatrixD& b_ug) {
  return (a.transpose().array() * b_ug.array()).sum();
}

// RkmeOptimizer::kLbfgs: one step per outer iteration along a limited-memory BFGS direction
// for F(z) = min_beta J(beta, z), then beta re-solved at the new z. By the envelope theorem
// dF/dz is dJ/dz at the re-solved beta, so the curvature pairs see one smooth function. Every
// vector lives in the samples' row space (coefficients W, as z = W U) next to its U U^T W^T,
// so inner products, the two-loop recursion and the line search's trials need no product
// with U; the one product per iteration is the new gradient's. The first step (and any step
// after the memory is dropped) is a gradient step with gmi's usual initial size.
int descend_lbfgs(Descent& f) {
  struct Pair {
    MatrixD s_w, s_ug, y_w, y_ug;  // step and gradient change, coefficients and U U^T (.)^T
    double rho;                     // 1 / <s, y>
  };
  std::vector<Pair> memory;  // oldest first
  Kernels trial;
  Direction dir;
  MatrixD v = gradient_coefficients_at(f.s, f.beta, f.gamma);
  MatrixD ug = f.gram.apply(v.transpose());
  const double eta_gradient =
      1.0 / (4.0 * f.gamma * std::max(f.beta.cwiseAbs().maxCoeff(), 1e-12));
  int iterations = 0;
  for (int it = 1; it <= f.options.max_iterations; ++it) {
    const double j_prev = f.j;
    // Two-loop recursion: dir = H G (the step is z - eta dir).
    dir.v = v;
    dir.ug = ug;
    std::vector<double> alpha(memory.size());
    for (std::size_t k = memory.size(); k-- > 0;) {
      alpha[k] = memory[k].rho * inner(memory[k].s_w, dir.ug);
      dir.v -= alpha[k] * memory[k].y_w;
      dir.ug -= alpha[k] * memory[k].y_ug;
    }
    // H0 = a diag(1 / |beta_j|) per reduced point: the gradient and the curvature for z_j both
    // scale with beta_j, so this undoes the worst of the conditioning; a from <s,y>/<y,H0 y>.
    // (|beta_j| floored at 1e-3 of the largest: a point of zero weight has zero gradient.)
    const VectorXd abs_beta = f.beta.cwiseAbs();
    const VectorXd precondition =
        (abs_beta.array().max(1e-3 * abs_beta.maxCoeff()).inverse() /
         static_cast<double>(abs_beta.size()))
            .matrix();
    double eta = 1.0;
    dir.v = precondition.asDiagonal() * dir.v;
    dir.ug = dir.ug * precondition.asDiagonal();
    if (memory.empty()) {
      eta = eta_gradient;
    } else {
      const Pair& last = memory.back();
      const double yhy = inner(precondition.asDiagonal() * last.y_w, last.y_ug);
      const double scale = 1.0 / (last.rho * yhy);  // <s,y> / <y,H0 y>
      dir.v *= scale;
      dir.ug *= scale;
    }
    for (std::size_t k = 0; k < memory.size(); ++k) {
      const double b = memory[k].rho * inner(memory[k].y_w, dir.ug);
      dir.v += (alpha[k] - b) * memory[k].s_w;
      dir.ug += (alpha[k] - b) * memory[k].s_ug;
    }
    double slope = inner(v, dir.ug);  // <G, H G>
    const auto gradient_direction = [&] {
      memory.clear();
      dir.v = v;
      dir.ug = ug;
      slope = inner(v, ug);
      eta = eta_gradient;
    };
    if (!(slope > 0) || !std::isfinite(slope)) gradient_direction();  // not a descent direction
    if (!(slope > 0) || !std::isfinite(slope)) break;
    dir.zg.noalias() = f.s.w * dir.ug;
    dir.gg.noalias() = dir.v * dir.ug;
    bool moved = line_search(f, dir, slope, eta, trial);
    if (!moved && !memory.empty()) {  // a poor quasi-Newton direction: retry from the gradient
      gradient_direction();
      dir.zg.noalias() = f.s.w * dir.ug;
      dir.gg.noalias() = dir.v * dir.ug;
      moved = line_search(f, dir, slope, eta, trial);
    }
    if (!moved) break;  // at the rounding floor: no step decreases J
    if (it % kRefreshEvery == 0) refresh(f);
    update_beta(f);
    MatrixD v_next = gradient_coefficients_at(f.s, f.beta, f.gamma);
    MatrixD ug_next = f.gram.apply(v_next.transpose());
    Pair p{-eta * dir.v, -eta * dir.ug, v_next - v, ug_next - ug, 0.0};
    const double sy = inner(p.s_w, p.y_ug);
    if (sy > 1e-12 * std::sqrt(inner(p.s_w, p.s_ug) * inner(p.y_w, p.y_ug))) {
      p.rho = 1.0 / sy;
      if (memory.size() == static_cast<std::size_t>(kLbfgsMemory)) memory.erase(memory.begin());
      memory.push_back(std::move(p));
    }
    v = std::move(v_next);
    ug = std::move(ug_next);
    iterations = it;
    if (f.progress) f.progress(it, f.j);
    if (converged(f.options, j_prev, f.j)) break;
  }
  return iterations;
}

}  // namespace

MatrixD squared_distances(const MatrixD& a, const VectorXd& a_sqnorm, const MatrixD& b,
                          const VectorXd& b_sqnorm) {
  MatrixD d(a.rows(), b.rows());
  d.noalias() = a * b.transpose();
  d.array() =
      (((-2.0 * d.array()).colwise() + a_sqnorm.array()).rowwise() + b_sqnorm.transpose().array())
          .max(0.0);
  return d;
}

MatrixD gaussian_kernel(const MatrixD& a, const MatrixD& b, double gamma) {
  MatrixD k = squared_distances(a, row_sqnorms(a), b, row_sqnorms(b));
  k.array() = (-gamma * k.array()).exp();
  return k;
}

double mean_self_kernel(const MatrixD& u, double gamma) {
  const Index n = u.rows();
  if (n == 0) return 0.0;
  const VectorXd sq = row_sqnorms(u);
  constexpr Index kBlock = 512;
  // Rows [a, a+b) against rows [0, a+b): pairs with the earlier rows count twice (symmetry),
  // the b x b diagonal block holds both orders already. Blocks run in parallel (this is the
  // fit's largest fixed cost at large n); their sums are added in block order, so the result
  // does not depend on the number of threads.
  const auto blocks = static_cast<std::size_t>((n + kBlock - 1) / kBlock);
  std::vector<double> partial(blocks, 0.0);
  parallel_for(blocks, n >= 2 * kBlock ? 0 : 1, [&](std::size_t k) {
    const Index a = static_cast<Index>(k) * kBlock, b = std::min(kBlock, n - a);
    MatrixD g(b, a + b);
    g.noalias() = u.middleRows(a, b) * u.topRows(a + b).transpose();
    g.array() = (-gamma * (((-2.0 * g.array()).colwise() + sq.segment(a, b).array()).rowwise() +
                           sq.head(a + b).transpose().array())
                              .max(0.0))
                    .exp();
    partial[k] = 2.0 * g.leftCols(a).sum() + g.rightCols(b).sum();
  });
  const double total = std::accumulate(partial.begin(), partial.end(), 0.0);
  return total / (static_cast<double>(n) * static_cast<double>(n));
}

double mmd2_objective(const MatrixD& u, double self_term, const MatrixD& z, const VectorXd& beta,
                      double gamma) {
  return objective(self_term, gaussian_kernel(z, z, gamma),
                   column_means(gaussian_kernel(u, z, gamma)), beta);
}

MatrixD mmd2_gradient(const MatrixD& u, const MatrixD& z, const VectorXd& beta, double gamma) {
  // G_j = 4 gamma beta_j [ -(1/n) sum_i K_ij u_i + c_j z_j
  //                        + sum_l K_jl beta_l z_l - (sum_l K_jl beta_l) z_j ]
  const MatrixD k_uz = gaussian_kernel(u, z, gamma), k_zz = gaussian_kernel(z, z, gamma);
  const VectorXd c = column_means(k_uz), k_beta = k_zz * beta;
  MatrixD g(z.rows(), z.cols());
  g.noalias() = (k_zz * beta.asDiagonal()) * z;
  g.noalias() -= (k_uz.transpose() * u) / static_cast<double>(u.rows());
  g += (c - k_beta).asDiagonal() * z;
  return (4.0 * gamma * beta).asDiagonal() * g;
}

MatrixD gradient_coefficients(const MatrixD& u, const MatrixD& w, const VectorXd& beta,
                              double gamma) {
  const SampleGram gram(u, SampleGram::Mode::kThroughSamples);
  Kernels s;
  s.w = w;
  evaluate(gram, row_sqnorms(u), gamma, s);
  return gradient_coefficients_at(s, beta, gamma);
}

SampleGram::SampleGram(const MatrixD& u, Mode mode) : u_(u) {
  const Index n = u.rows(), dim = u.cols();
  stored_ = mode == Mode::kStored || (mode == Mode::kAuto && n < 2 * dim && n <= 4096);
  if (stored_) {
    gram_.setZero(n, n);
    gram_.selfadjointView<Eigen::Lower>().rankUpdate(u);
    gram_.triangularView<Eigen::StrictlyUpper>() = gram_.transpose();
  }
}

MatrixD SampleGram::apply(const MatrixD& x) const {
  MatrixD out(u_.rows(), x.cols());
  if (stored_) {
    out.noalias() = gram_ * x;
  } else {
    const MatrixD utx = u_.transpose() * x;
    out.noalias() = u_ * utx;
  }
  return out;
}

double SampleGram::mean_kernel(double gamma) const {
  if (!stored_) return mean_self_kernel(u_, gamma);
  const Index n = u_.rows();
  if (n == 0) return 0.0;
  const VectorXd sq = gram_.diagonal();
  const double total =
      (-gamma * (((-2.0 * gram_.array()).colwise() + sq.array()).rowwise() + sq.transpose().array())
                    .max(0.0))
          .exp()
          .sum();
  return total / (static_cast<double>(n) * static_cast<double>(n));
}

MatrixD kmeans(const MatrixD& u, int r, std::uint64_t seed, int iterations) {
  const Index n = u.rows(), dim = u.cols();
  const VectorXd u_sq = row_sqnorms(u);
  std::mt19937_64 rng(seed);
  MatrixD z(r, dim);
  MatrixD w = MatrixD::Zero(r, n);  // z = w u, kept alongside
  std::vector<char> chosen(static_cast<std::size_t>(n), 0);

  // k-means++: each next centre drawn with probability proportional to D(u)^2.
  Index pick = static_cast<Index>(rng() % static_cast<std::uint64_t>(n));
  VectorXd min_d2 = VectorXd::Constant(n, std::numeric_limits<double>::infinity());
  VectorXd cumulative(n);
  for (int k = 0; k < r; ++k) {
    if (k > 0) {
      // Sequential cumulative sum so that the draw is reproducible elsewhere (NumPy's cumsum).
      double acc = 0.0;
      for (Index i = 0; i < n; ++i) cumulative(i) = (acc += min_d2(i));
      pick = -1;
      if (acc > 0) {
        const double target = static_cast<double>(rng() >> 11) * 0x1.0p-53 * acc;
        pick =
            std::upper_bound(cumulative.data(), cumulative.data() + n, target) - cumulative.data();
        if (pick >= n) pick = n - 1;
        while (pick > 0 && min_d2(pick) <= 0) --pick;  // rounding at the very end of the sum
      }
      if (pick < 0 || chosen[static_cast<std::size_t>(pick)]) {
        // Every remaining sample coincides with a centre: take the first unused one.
        pick = std::find(chosen.begin(), chosen.end(), 0) - chosen.begin();
      }
    }
    chosen[static_cast<std::size_t>(pick)] = 1;
    z.row(k) = u.row(pick);
    w(k, pick) = 1.0;
    const VectorXd d2 =
        ((u_sq.array() + u_sq(pick)) - 2.0 * (u * u.row(pick).transpose()).array()).max(0.0);
    min_d2 = min_d2.cwiseMin(d2);
  }

  // Lloyd iterations; an empty cluster keeps its centre.
  std::vector<Index> assign(static_cast<std::size_t>(n), -1), previous;
  MatrixD sums(r, dim);
  VectorXd counts(r);
  for (int it = 0; it < iterations; ++it) {
    const MatrixD d2 = squared_distances(u, u_sq, z, row_sqnorms(z));
    previous = assign;
    for (Index i = 0; i < n; ++i) d2.row(i).minCoeff(&assign[static_cast<std::size_t>(i)]);
    if (assign == previous) break;
    sums.setZero();
    counts.setZero();
    for (Index i = 0; i < n; ++i) {
      const Index j = assign[static_cast<std::size_t>(i)];
      sums.row(j) += u.row(i);
      counts(j) += 1.0;
    }
    for (Index j = 0; j < r; ++j) {
      if (counts(j) == 0) continue;
      z.row(j) = sums.row(j) / counts(j);
      w.row(j).setZero();
    }
    for (Index i = 0; i < n; ++i) {
      const Index j = assign[static_cast<std::size_t>(i)];
      w(j, i) = 1.0 / counts(j);
    }
  }
  return w;
}

VectorXd solve_simplex_qp_from(const Eigen::MatrixXd& k, const VectorXd& c, const VectorXd& start,
                               int max_iterations, double tolerance) {
  const Index r = c.size();
  if (r == 0 || k.rows() != r || k.cols() != r || start.size() != r)
    throw InputError("solve_simplex_qp: K must be r x r and c of size r, r >= 1 (got K " +
                     std::to_string(k.rows()) + "x" + std::to_string(k.cols()) + ", c " +
                     std::to_string(r) + ")");
  if (!k.allFinite() || !c.allFinite())
    throw InputError("solve_simplex_qp: K and c must be finite");
  if (r == 1) return VectorXd::Ones(1);

  // f(b) = b^T K b - 2 c^T b, grad = 2 (K b - c), Lipschitz constant 2 lambda_max(K).
  double lipschitz = 2.0 * largest_eigenvalue(k);
  if (!(lipschitz > 0)) lipschitz = 1.0;  // K == 0: f is linear, any step works
  const double step = 1.0 / lipschitz;

  // FISTA with O'Donoghue-Candes gradient restart; stops when an iterate barely moves.
  VectorXd x = project_to_simplex(start), y = x, x_next(r);
  double t = 1.0;
  for (int it = 0; it < max_iterations; ++it) {
    x_next = project_to_simplex(y - step * 2.0 * (k * y - c));
    const double change = (x_next - x).lpNorm<Eigen::Infinity>();
    double t_next = 0.5 * (1.0 + std::sqrt(1.0 + 4.0 * t * t));
    if ((y - x_next).dot(x_next - x) > 0) {  // momentum points uphill: restart it
      t_next = 1.0;
      y = x_next;
    } else {
      y = x_next + ((t - 1.0) / t_next) * (x_next - x);
    }
    x.swap(x_next);
    t = t_next;
    if (change <= tolerance) break;
  }
  return x;
}

}  // namespace detail

using detail::MatrixD;
using Eigen::Index;
using Eigen::VectorXd;

namespace detail {

// The fit: k-means++ / Lloyd centres; then each outer iteration moves z (descend_lbfgs: one
// L-BFGS step; descend_gradient: kGradientStepsPerIteration gradient steps; both with Armijo
// backtracking, so J never increases), then re-solves beta for the new z (simplex QP
// warm-started at the current beta, or the ridge closed form); it stops when J improved by
// less than relative_tolerance * J over the iteration, or after max_iterations. z is held as
// coefficients over the samples (z = W U, see SampleGram), which makes each gradient one
// n x n x r (or two n x D x r) product and each line-search trial O(n r).
ReducedSet fit_rkme_impl(const RowMatrix& x, const RowMatrix& t, const RkmeOptions& options,
                         const RkmeProgress& progress, SampleGram::Mode mode) {
  const std::string where = "fit_rkme";
  if (x.rows() == 0) detail::fail(where, "x has no samples (n must be >= 1)");
  if (x.rows() != t.rows())
    detail::fail(where, "x and t must have one row per sample (x has " + std::to_string(x.rows()) +
                            " rows, t has " + std::to_string(t.rows()) + ")");
  detail::require_finite(x, where, "x");
  detail::require_finite(t, where, "t");
  detail::require_gamma_lambda(options.gamma, options.lambda, where, "options.gamma",
                               "options.lambda");
  if (options.reduced_size < 1)
    detail::fail(where, "options.reduced_size must be >= 1 (got " +
                            std::to_string(options.reduced_size) + ")");
  if (!(options.ridge >= 0) || !std::isfinite(options.ridge))
    detail::fail(where, "options.ridge must be non-negative and finite");
  if (!(options.relative_tolerance >= 0) || !std::isfinite(options.relative_tolerance))
    detail::fail(where, "options.relative_tolerance must be non-negative and finite");
  if (options.max_iterations < 0) detail::fail(where, "options.max_iterations must be >= 0");
  if (options.kmeans_iterations < 0) detail::fail(where, "options.kmeans_iterations must be >= 0");

  const Index n = x.rows(), d = x.cols(), dt = t.cols();
  const double gamma = options.gamma, lambda = options.lambda;
  const int r = static_cast<int>(std::min<Index>(options.reduced_size, n));
  const MatrixD u = detail::joint(x, t, lambda);
  const VectorXd u_sq = detail::row_sqnorms(u);
  ReducedSet out;
  if (r == n) {
    // The samples themselves, equally weighted: J = 0 up to rounding.
    const double self_term = detail::mean_self_kernel(u, gamma);
    out.zx = x;
    out.zt = t;
    out.beta = Eigen::VectorXf::Constant(r, 1.0f / static_cast<float>(n));
    out.residual_mmd2 = out.initial_mmd2 = std::max(
        0.0, detail::mmd2_objective(u, self_term, u, VectorXd::Constant(n, 1.0 / n), gamma));
    return out;
  }

  const SampleGram gram(u, mode);
  const double self_term = gram.mean_kernel(gamma);
  detail::Kernels s, trial;
  s.w = detail::kmeans(u, r, options.seed, options.kmeans_iterations);
  detail::evaluate(gram, u_sq, gamma, s);
  VectorXd beta = detail::beta_step(s, VectorXd::Constant(r, 1.0 / r), options);
  double j = detail::objective(self_term, s, beta);
  out.initial_mmd2 = std::max(0.0, j);

  detail::Descent descent{gram, u_sq, gamma, self_term, options, progress, s, beta, j};
  out.iterations = options.optimizer == RkmeOptimizer::kLbfgs ? detail::descend_lbfgs(descent)
                                                              : detail::descend_gradient(descent);

  const MatrixD z = s.w * u;
  out.zx = z.leftCols(d).cast<float>();
  if (lambda > 0) {
    out.zt = (z.rightCols(dt) / lambda).cast<float>();
  } else {
    // The prompt part carries no weight in J; give each point the kernel-weighted mean prompt
    // of the samples it stands for (the nearest sample's when the weights underflow).
    const MatrixD td = t.cast<double>();
    MatrixD zt(r, dt);
    for (Index jj = 0; jj < r; ++jj) {
      const double mass = s.k_uz.col(jj).sum();
      if (mass > 0) {
        zt.row(jj) = (s.k_uz.col(jj).transpose() * td) / mass;
      } else {
        Index nearest;
        (u_sq.array() - 2.0 * s.uz.col(jj).array()).minCoeff(&nearest);
        zt.row(jj) = td.row(nearest);
      }
    }
    out.zt = zt.cast<float>();
  }
  out.beta = beta.cast<float>();
  // The residual of what is stored (float), not of the double iterate.
  out.residual_mmd2 =
      std::max(0.0, detail::mmd2_objective(u, self_term, detail::joint(out.zx, out.zt, lambda),
                                           out.beta.cast<double>(), gamma));
  return out;
}

}  // namespace detail

ReducedSet fit_rkme(const RowMatrix& x, const RowMatrix& t, const RkmeOptions& options,
                    const RkmeProgress& progress) {
  return detail::fit_rkme_impl(x, t, options, progress, detail::SampleGram::Mode::kAuto);
}

double rkme_mmd2(const RowMatrix& x, const RowMatrix& t, const RowMatrix& zx, const RowMatrix& zt,
                 const Eigen::VectorXf& beta, double gamma, double lambda) {
  const std::string where = "rkme_mmd2";
  if (x.rows() == 0) detail::fail(where, "x has no samples");
  if (x.rows() != t.rows()) detail::fail(where, "x and t must have the same number of rows");
  if (zx.rows() != zt.rows() || zx.rows() != beta.size() || zx.rows() == 0)
    detail::fail(where, "zx, zt and beta must describe the same r >= 1 reduced points");
  if (zx.cols() != x.cols() || zt.cols() != t.cols())
    detail::fail(where, "zx/zt must have the dimensions of x/t");
  detail::require_finite(x, where, "x");
  detail::require_finite(t, where, "t");
  detail::require_finite(zx, where, "zx");
  detail::require_finite(zt, where, "zt");
  if (!beta.allFinite()) detail::fail(where, "beta contains non-finite values");
  detail::require_gamma_lambda(gamma, lambda, where, "gamma", "lambda");
  const MatrixD u = detail::joint(x, t, lambda);
  return std::max(
      0.0, detail::mmd2_objective(u, detail::mean_self_kernel(u, gamma),
                                  detail::joint(zx, zt, lambda), beta.cast<double>(), gamma));
}

RowMatrix gaussian_gram(const RowMatrix& a, double gamma) {
  if (!(gamma > 0) || !std::isfinite(gamma))
    detail::fail("gaussian_gram",
                 "gamma must be positive and finite (got " + detail::num(gamma) + ")");
  detail::require_finite(a, "gaussian_gram", "a");
  const MatrixD ad = a.cast<double>();
  MatrixD k = detail::gaussian_kernel(ad, ad, gamma);
  k.diagonal().setOnes();  // exact, whatever the rounding of ||a||^2 + ||a||^2 - 2 a.a
  return k.cast<float>();
}

double median_heuristic_gamma(const RowMatrix& a, std::size_t max_pairs, std::uint64_t seed) {
  const std::string where = "median_heuristic_gamma";
  const Index n = a.rows();
  if (n < 2) detail::fail(where, "needs at least 2 rows (got " + std::to_string(n) + ")");
  if (max_pairs == 0) detail::fail(where, "max_pairs must be >= 1");
  detail::require_finite(a, where, "a");
  const MatrixD ad = a.cast<double>();
  const double all_pairs = 0.5 * static_cast<double>(n) * static_cast<double>(n - 1);
  std::vector<double> d2;
  if (all_pairs <= static_cast<double>(max_pairs)) {
    const VectorXd sq = detail::row_sqnorms(ad);
    const MatrixD dist = detail::squared_distances(ad, sq, ad, sq);
    d2.reserve(static_cast<std::size_t>(all_pairs));
    for (Index i = 0; i < n; ++i)
      for (Index j = i + 1; j < n; ++j) d2.push_back(dist(i, j));
  } else {
    std::mt19937_64 rng(seed);
    const auto un = static_cast<std::uint64_t>(n);
    d2.reserve(max_pairs);
    for (std::size_t p = 0; p < max_pairs; ++p) {
      const Index i = static_cast<Index>(rng() % un);
      Index j = static_cast<Index>(rng() % (un - 1));
      if (j >= i) ++j;
      d2.push_back((ad.row(i) - ad.row(j)).squaredNorm());
    }
  }
  auto median = [](std::vector<double>& v) {
    const std::size_t mid = v.size() / 2;
    std::nth_element(v.begin(), v.begin() + static_cast<std::ptrdiff_t>(mid), v.end());
    double m = v[mid];
    if (v.size() % 2 == 0) m = 0.5 * (m + *std::max_element(v.begin(), v.begin() + mid));
    return m;
  };
  double m = median(d2);
  if (!(m > 0)) {
    // More than half the pairs coincide (duplicated samples): use the distinct pairs.
    d2.erase(std::remove_if(d2.begin(), d2.end(), [](double v) { return !(v > 0); }), d2.end());
    if (d2.empty()) detail::fail(where, "all rows are identical: no scale to take");
    m = median(d2);
  }
  return 1.0 / m;
}

VectorXd project_to_simplex(const VectorXd& v) {
  if (v.size() == 0) throw InputError("project_to_simplex: empty vector");
  if (!v.allFinite()) throw InputError("project_to_simplex: non-finite input");
  // Sort-based exact projection (Held et al.; Duchi et al. 2008): b = max(v - theta, 0).
  std::vector<double> sorted(v.data(), v.data() + v.size());
  std::sort(sorted.begin(), sorted.end(), std::greater<>());
  double cumulative = 0.0, theta = 0.0;
  for (std::size_t k = 0; k < sorted.size(); ++k) {
    cumulative += sorted[k];
    const double candidate = (cumulative - 1.0) / static_cast<double>(k + 1);
    if (sorted[k] - candidate > 0) theta = candidate;
  }
  return (v.array() - theta).max(0.0).matrix();
}

VectorXd solve_simplex_qp(const Eigen::MatrixXd& k, const VectorXd& c, int max_iterations,
                          double tolerance) {
  const Index r = c.size();
  return detail::solve_simplex_qp_from(
      k, c, VectorXd::Constant(std::max<Index>(r, 0), 1.0 / std::max<Index>(r, 1)), max_iterations,
      tolerance);
}

}  // namespace gmi
