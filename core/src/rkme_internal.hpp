#pragma once
/// Internals of the RKME fit (core/src/rkme.cpp), exposed for the unit tests only; not
/// part of the installed interface. Everything here works in double, in the joint space
/// u = [x ; lambda t], one point per row.
#include <Eigen/Dense>
#include <cstdint>

#include "gmi/rkme.hpp"

namespace gmi::detail {

using MatrixD = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

/// ||a_i - b_j||^2 for all rows, as ||a||^2 + ||b||^2 - 2 a b^T (one GEMM), clamped at 0.
MatrixD squared_distances(const MatrixD& a, const Eigen::VectorXd& a_sqnorm, const MatrixD& b,
                          const Eigen::VectorXd& b_sqnorm);

/// exp(-gamma ||a_i - b_j||^2) for all rows.
MatrixD gaussian_kernel(const MatrixD& a, const MatrixD& b, double gamma);

/// (1/n^2) sum_ii' kappa(u_i, u_i'): J's constant term. Blocked, O(n^2 D) time, O(n) memory
/// beyond a 512-row block.
double mean_self_kernel(const MatrixD& u, double gamma);

/// J(beta, z) = self_term - (2/n) sum_ij beta_j kappa(u_i, z_j) + beta^T K_zz beta.
double mmd2_objective(const MatrixD& u, double self_term, const MatrixD& z,
                      const Eigen::VectorXd& beta, double gamma);

/// The exact gradient dJ/dz (r x D), one row per reduced point:
///   -(4 gamma / n) beta_j sum_i kappa(u_i, z_j)(u_i - z_j)
///   + 4 gamma beta_j sum_l beta_l kappa(z_j, z_l)(z_l - z_j).
MatrixD mmd2_gradient(const MatrixD& u, const MatrixD& z, const Eigen::VectorXd& beta,
                      double gamma);

/// k-means++ seeding (std::mt19937_64(seed); index = draw % n, uniform = (draw >> 11) * 2^-53)
/// followed by at most `iterations` Lloyd steps. Returns the centres as coefficients over the
/// samples: W (r x n), centres = W u (each row of W averages the centre's members).
MatrixD kmeans(const MatrixD& u, int r, std::uint64_t seed, int iterations);

/// The fit keeps every reduced point in the row space of U (k-means centres are means of
/// samples, and the gradient below is a combination of samples and centres): z = W U. This is
/// dJ/dz in that form: V (r x n) with dJ/dz = V U, V = 4 gamma diag(beta) [ -(1/n) K_uz^T
/// + (K_zz diag beta) W + diag(c - K_zz beta) W ], c_j = (1/n) sum_i kappa(u_i, z_j).
MatrixD gradient_coefficients(const MatrixD& u, const MatrixD& w, const Eigen::VectorXd& beta,
                              double gamma);

/// The one product the fit needs from the samples: U U^T X (n x r -> n x r). Either from the
/// stored Gram matrix U U^T (n^2 r per product) or through U twice (2 n D r per product);
/// kAuto stores it when n < 2D and n <= 4096.
class SampleGram {
 public:
  enum class Mode { kAuto, kStored, kThroughSamples };
  SampleGram(const MatrixD& u, Mode mode);
  MatrixD apply(const MatrixD& x) const;
  /// (1/n^2) sum_ii' kappa(u_i, u_i').
  double mean_kernel(double gamma) const;
  bool stored() const { return stored_; }

 private:
  const MatrixD& u_;
  bool stored_ = false;
  MatrixD gram_;  // n x n when stored
};

/// fit_rkme with the Gram mode chosen by the caller (tests run both).
ReducedSet fit_rkme_impl(const RowMatrix& x, const RowMatrix& t, const RkmeOptions& options,
                         const RkmeProgress& progress, SampleGram::Mode mode);

/// solve_simplex_qp started from `start` (projected onto the simplex first).
Eigen::VectorXd solve_simplex_qp_from(const Eigen::MatrixXd& k, const Eigen::VectorXd& c,
                                      const Eigen::VectorXd& start, int max_iterations,
                                      double tolerance);

}  // namespace gmi::detail
