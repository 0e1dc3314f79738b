#pragma once
/// Reduced Kernel Mean Embedding (RKME) fitting in the joint (image, prompt) space.
///
/// Pure maths: no I/O, no logging. See shared METHOD.md, "The specification".
/// u_i = [x_i ; lambda * t_i], kappa(a, b) = exp(-gamma * ||a - b||^2).
/// Thread-safety: free functions on values; safe to call concurrently.
#include <cstdint>
#include <functional>

#include "gmi/linalg.hpp"

namespace gmi {

/// How z moves between beta steps: one limited-memory BFGS step per iteration (the default),
/// or three Armijo gradient steps per iteration (the original fit: about 4x slower to reach
/// the same MMD^2; kept for comparison and for scripts/bench_fit_numpy.py).
enum class RkmeOptimizer { kLbfgs, kGradient };

struct RkmeOptions {
  int reduced_size = 32;        ///< r; clamped to n
  double gamma = 1.0;           ///< kernel width, shared by the whole hub
  double lambda = 1.0;          ///< weight of the prompt part of the joint space
  bool constrained = true;      ///< beta on the simplex (QP) vs closed form (K + eps I)^-1 c
  double ridge = 1e-6;          ///< eps of the closed form
  int max_iterations = 100;     ///< outer alternations (z step(s) + beta step)
  /// Stop when (J_prev - J) < tol * J_prev over one iteration. 1e-3 with L-BFGS stops within
  /// 1-8% of the converged MMD^2 at n = 200..5000, r = 16..64 (scripts/bench_fit_plateau.sh).
  double relative_tolerance = 1e-3;
  int kmeans_iterations = 10;   ///< Lloyd iterations after k-means++ seeding
  RkmeOptimizer optimizer = RkmeOptimizer::kLbfgs;
  std::uint64_t seed = 0x9e3779b97f4a7c15ull;
};

/// The fitted reduced set, split back into its image and prompt parts.
struct ReducedSet {
  RowMatrix zx;            ///< r x d   image part
  RowMatrix zt;            ///< r x dt  prompt part (already divided by lambda)
  Eigen::VectorXf beta;    ///< r       weights (on the simplex when constrained)
  double residual_mmd2 = 0;  ///< final J(beta, z)
  double initial_mmd2 = 0;   ///< J after initialisation (k-means + first beta)
  int iterations = 0;        ///< outer iterations run
};

/// Called after each outer iteration with (iteration, J); for progress bars.
using RkmeProgress = std::function<void(int, double)>;

/// Fits an RKME to the n samples (rows of x: n x d, rows of t: n x dt).
/// Throws InputError when n == 0, shapes disagree, or options are out of range.
ReducedSet fit_rkme(const RowMatrix& x, const RowMatrix& t, const RkmeOptions& options,
                    const RkmeProgress& progress = {});

/// Exact squared MMD between the empirical embedding of the n joint samples and the
/// weighted reduced set (joint space, same gamma/lambda). Used for tests and reports.
double rkme_mmd2(const RowMatrix& x, const RowMatrix& t, const RowMatrix& zx,
                 const RowMatrix& zt, const Eigen::VectorXf& beta, double gamma, double lambda);

/// Gram matrix K[j,l] = exp(-gamma ||a_j - a_l||^2) of the rows of a.
RowMatrix gaussian_gram(const RowMatrix& a, double gamma);

/// Median heuristic: 1 / median of pairwise squared distances among the rows of a
/// (at most `max_pairs` random pairs, deterministic in `seed`).
double median_heuristic_gamma(const RowMatrix& a, std::size_t max_pairs = 100000,
                              std::uint64_t seed = 1);

/// Projects v onto the probability simplex {b >= 0, sum b = 1} (Euclidean projection).
Eigen::VectorXd project_to_simplex(const Eigen::VectorXd& v);

/// Minimises b^T K b - 2 c^T b over the simplex (K symmetric PSD). Projected, accelerated
/// gradient; exact enough for r <= a few hundred.
Eigen::VectorXd solve_simplex_qp(const Eigen::MatrixXd& k, const Eigen::VectorXd& c,
                                 int max_iterations = 2000, double tolerance = 1e-12);

}  // namespace gmi
