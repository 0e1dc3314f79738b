// RKME fit: closed-form cases, an independent scalar check of J, and the pieces of the fit.
#include "gmi/rkme.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "../../core/src/rkme_internal.hpp"
#include "gmi/error.hpp"

namespace gmi {
namespace {

using Eigen::VectorXd;

// L2-normalised rows drawn around `clusters` random unit centres (images), with prompts that
// follow the cluster (one prompt direction per cluster plus noise).
struct Samples {
  RowMatrix x, t;
};

RowMatrix normalised(RowMatrix m) {
  for (Eigen::Index i = 0; i < m.rows(); ++i) m.row(i).normalize();
  return m;
}

Samples clustered(int n, int d, int dt, int clusters, double noise, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> g(0.0f, 1.0f);
  RowMatrix cx(clusters, d), ct(clusters, dt);
  for (auto& v : cx.reshaped()) v = g(rng);
  for (auto& v : ct.reshaped()) v = g(rng);
  cx = normalised(cx);
  ct = normalised(ct);
  Samples s{RowMatrix(n, d), RowMatrix(n, dt)};
  for (int i = 0; i < n; ++i) {
    const int c = i % clusters;
    for (int k = 0; k < d; ++k) s.x(i, k) = cx(c, k) + static_cast<float>(noise) * g(rng);
    for (int k = 0; k < dt; ++k) s.t(i, k) = ct(c, k) + static_cast<float>(noise) * g(rng);
  }
  s.x = normalised(s.x);
  s.t = normalised(s.t);
  return s;
}

// J written out pair by pair, independently of the GEMM-shaped code under test.
double scalar_mmd2(const RowMatrix& x, const RowMatrix& t, const RowMatrix& zx, const RowMatrix& zt,
                   const Eigen::VectorXf& beta, double gamma, double lambda) {
  auto kappa = [&](const RowMatrix& ax, const RowMatrix& at, int i, const RowMatrix& bx,
                   const RowMatrix& bt, int j) {
    double d2 = 0;
    for (int k = 0; k < ax.cols(); ++k) {
      const double diff = static_cast<double>(ax(i, k)) - bx(j, k);
      d2 += diff * diff;
    }
    for (int k = 0; k < at.cols(); ++k) {
      const double diff = lambda * (static_cast<double>(at(i, k)) - bt(j, k));
      d2 += diff * diff;
    }
    return std::exp(-gamma * d2);
  };
  const int n = static_cast<int>(x.rows()), r = static_cast<int>(zx.rows());
  double uu = 0, uz = 0, zz = 0;
  for (int i = 0; i < n; ++i)
    for (int i2 = 0; i2 < n; ++i2) uu += kappa(x, t, i, x, t, i2);
  for (int i = 0; i < n; ++i)
    for (int j = 0; j < r; ++j) uz += beta(j) * kappa(x, t, i, zx, zt, j);
  for (int j = 0; j < r; ++j)
    for (int l = 0; l < r; ++l)
      zz += static_cast<double>(beta(j)) * beta(l) * kappa(zx, zt, j, zx, zt, l);
  return uu / (static_cast<double>(n) * n) - 2.0 * uz / n + zz;
}

RkmeOptions options_for(const Samples& s, int r) {
  RkmeOptions o;
  o.reduced_size = r;
  o.gamma = median_heuristic_gamma(s.x);
  o.lambda = 1.0;
  return o;
}

TEST(Rkme, FullSizeReducedSetIsTheSamplesWithUniformWeights) {
  const Samples s = clustered(24, 16, 8, 3, 0.3, 1);
  for (int r : {24, 100}) {  // r > n is clamped to n
    RkmeOptions o = options_for(s, r);
    const ReducedSet rs = fit_rkme(s.x, s.t, o);
    ASSERT_EQ(rs.beta.size(), 24);
    for (int j = 0; j < 24; ++j) EXPECT_FLOAT_EQ(rs.beta(j), 1.0f / 24);
    EXPECT_EQ(rs.zx, s.x);
    EXPECT_EQ(rs.zt, s.t);
    EXPECT_NEAR(rs.residual_mmd2, 0.0, 1e-12);
    EXPECT_EQ(rs.iterations, 0);
  }
}

TEST(Rkme, SinglePointDistributionIsFittedExactly) {
  RowMatrix x(30, 6), t(30, 4);
  x.rowwise() = Eigen::RowVectorXf::LinSpaced(6, -1.0f, 1.0f);
  t.rowwise() = Eigen::RowVectorXf::LinSpaced(4, 0.5f, 2.0f);
  for (int r : {1, 4, 30}) {
    RkmeOptions o;
    o.reduced_size = r;
    o.gamma = 0.7;
    const ReducedSet rs = fit_rkme(x, t, o);
    EXPECT_NEAR(rs.residual_mmd2, 0.0, 1e-12) << "r = " << r;
    EXPECT_NEAR(rs.beta.cast<double>().sum(), 1.0, 1e-6);
    for (int j = 0; j < rs.zx.rows(); ++j) {
      EXPECT_LT((rs.zx.row(j) - x.row(0)).norm(), 1e-5);
      EXPECT_LT((rs.zt.row(j) - t.row(0)).norm(), 1e-5);
    }
  }
}

TEST(Rkme, TwoAtomsInTheJointSpaceAreFittedExactlyWithTheirContent) {
  // Every image identical, the prompts split in two: only the joint space tells them apart.
  RowMatrix x(40, 5), t(40, 3);
  x.rowwise() = Eigen::RowVectorXf::Constant(5, 0.2f);
  t.setZero();
  for (int i = 0; i < 40; ++i) t(i, i < 10 ? 0 : 1) = 1.0f;  // 1/4 and 3/4 of the mass
  RkmeOptions o;
  o.reduced_size = 2;
  o.gamma = 1.0;
  const ReducedSet rs = fit_rkme(x, t, o);
  EXPECT_NEAR(rs.residual_mmd2, 0.0, 1e-10);
  const int first = rs.zt(0, 0) > 0.5f ? 0 : 1;
  EXPECT_NEAR(rs.zt(first, 0), 1.0f, 1e-4);
  EXPECT_NEAR(rs.zt(1 - first, 1), 1.0f, 1e-4);
  EXPECT_NEAR(rs.beta(first), 0.25f, 1e-4);
  EXPECT_NEAR(rs.beta(1 - first), 0.75f, 1e-4);
}

TEST(Rkme, ResidualEqualsAnIndependentScalarComputation) {
  const Samples s = clustered(120, 12, 6, 4, 0.25, 2);
  RkmeOptions o = options_for(s, 8);
  o.lambda = 0.7;
  const ReducedSet rs = fit_rkme(s.x, s.t, o);
  const double expected = scalar_mmd2(s.x, s.t, rs.zx, rs.zt, rs.beta, o.gamma, o.lambda);
  EXPECT_GT(expected, 0.0);
  EXPECT_NEAR(rs.residual_mmd2, expected, 1e-12 + 1e-9 * expected);
  EXPECT_NEAR(rkme_mmd2(s.x, s.t, rs.zx, rs.zt, rs.beta, o.gamma, o.lambda), expected,
              1e-12 + 1e-9 * expected);
  // And for weights and points that are no fit at all.
  const RowMatrix zx = s.x.topRows(5), zt = s.t.bottomRows(5);
  const Eigen::VectorXf beta = Eigen::VectorXf::LinSpaced(5, 0.1f, 0.5f);
  EXPECT_NEAR(rkme_mmd2(s.x, s.t, zx, zt, beta, 0.8, 1.3),
              scalar_mmd2(s.x, s.t, zx, zt, beta, 0.8, 1.3), 1e-11);
}

TEST(Rkme, ObjectiveNeverIncreasesAcrossIterations) {
  const Samples s = clustered(200, 16, 8, 5, 0.3, 3);
  for (const RkmeOptimizer optimizer : {RkmeOptimizer::kLbfgs, RkmeOptimizer::kGradient}) {
    SCOPED_TRACE(optimizer == RkmeOptimizer::kLbfgs ? "lbfgs" : "gradient");
    RkmeOptions o = options_for(s, 10);
    o.optimizer = optimizer;
    o.relative_tolerance = 0;  // run every iteration
    o.max_iterations = 40;
    std::vector<double> history;
    std::vector<int> iterations;
    const ReducedSet rs = fit_rkme(s.x, s.t, o, [&](int it, double j) {
      iterations.push_back(it);
      history.push_back(j);
    });
    ASSERT_FALSE(history.empty());
    EXPECT_EQ(static_cast<int>(history.size()), rs.iterations);
    EXPECT_EQ(iterations.front(), 1);
    EXPECT_LE(history.front(), rs.initial_mmd2);
    for (std::size_t k = 1; k < history.size(); ++k) {
      EXPECT_EQ(iterations[k], static_cast<int>(k) + 1);
      // (up to rounding: every 10 iterations the dot products are recomputed from scratch)
      EXPECT_LE(history[k], history[k - 1] * (1 + 1e-13)) << "iteration " << k + 1;
    }
    // What is reported is J of the stored (float) values: equal up to that rounding.
    EXPECT_NEAR(rs.residual_mmd2, history.back(), 1e-6 * history.back() + 1e-12);
  }
}

// L-BFGS takes one product with the samples per iteration, the gradient descent three: in a
// third of the gradient descent's products it must already fit better (and both must end at
// the same optimum when run long).
TEST(Rkme, LbfgsFitsBetterForTheSameProductsWithTheSamples) {
  const Samples s = clustered(400, 32, 16, 12, 0.5, 31);
  RkmeOptions o = options_for(s, 16);
  o.relative_tolerance = 0;
  o.optimizer = RkmeOptimizer::kGradient;
  o.max_iterations = 20;  // 60 gradient steps
  const ReducedSet gradient = fit_rkme(s.x, s.t, o);
  o.optimizer = RkmeOptimizer::kLbfgs;
  o.max_iterations = 20;  // 20 quasi-Newton steps
  const ReducedSet lbfgs = fit_rkme(s.x, s.t, o);
  EXPECT_LT(lbfgs.residual_mmd2, gradient.residual_mmd2);
  o.max_iterations = 2000;
  const ReducedSet long_lbfgs = fit_rkme(s.x, s.t, o);
  o.optimizer = RkmeOptimizer::kGradient;
  const ReducedSet long_gradient = fit_rkme(s.x, s.t, o);
  EXPECT_LT(long_lbfgs.residual_mmd2, 1.01 * long_gradient.residual_mmd2);
}

// The default stopping rule ends the fit near its plateau: before the cap, within a few per
// cent of what a long fit reaches.
TEST(Rkme, DefaultRuleStopsNearThePlateau) {
  const Samples s = clustered(400, 32, 16, 12, 0.5, 31);
  RkmeOptions o = options_for(s, 16);
  const ReducedSet fit = fit_rkme(s.x, s.t, o);
  EXPECT_LT(fit.iterations, o.max_iterations);
  o.relative_tolerance = 0;
  o.max_iterations = 2000;
  const ReducedSet converged = fit_rkme(s.x, s.t, o);
  EXPECT_GT(converged.iterations, fit.iterations);
  EXPECT_LT(fit.residual_mmd2, 1.05 * converged.residual_mmd2);
}

TEST(Rkme, WeightsSumToOneAndStayNonNegative) {
  const Samples s = clustered(150, 10, 5, 6, 0.4, 4);
  const ReducedSet rs = fit_rkme(s.x, s.t, options_for(s, 12));
  ASSERT_EQ(rs.beta.size(), 12);
  EXPECT_EQ(rs.zx.rows(), 12);
  EXPECT_EQ(rs.zx.cols(), 10);
  EXPECT_EQ(rs.zt.rows(), 12);
  EXPECT_EQ(rs.zt.cols(), 5);
  EXPECT_GE(rs.beta.minCoeff(), 0.0f);
  EXPECT_NEAR(rs.beta.cast<double>().sum(), 1.0, 1e-6);
}

TEST(Rkme, FitImprovesOnTheKMeansInitialisation) {
  const Samples s = clustered(300, 16, 8, 6, 0.35, 5);
  const ReducedSet rs = fit_rkme(s.x, s.t, options_for(s, 8));
  EXPECT_GT(rs.iterations, 0);
  EXPECT_LT(rs.residual_mmd2, 0.9 * rs.initial_mmd2);
}

TEST(Rkme, UnconstrainedWeightsMatchTheClosedForm) {
  const Samples s = clustered(100, 8, 4, 4, 0.3, 6);
  RkmeOptions o = options_for(s, 6);
  o.constrained = false;
  o.ridge = 1e-2;  // well conditioned, so float rounding of z barely moves the solution
  o.lambda = 0.5;
  const ReducedSet rs = fit_rkme(s.x, s.t, o);
  // beta = (K_zz + ridge I)^-1 c, c_j = (1/n) sum_i kappa(u_i, z_j), written out here.
  const int n = 100, r = 6;
  auto kappa = [&](const RowMatrix& ax, const RowMatrix& at, int i, const RowMatrix& bx,
                   const RowMatrix& bt, int j) {
    const double d2 =
        (ax.row(i).cast<double>() - bx.row(j).cast<double>()).squaredNorm() +
        o.lambda * o.lambda * (at.row(i).cast<double>() - bt.row(j).cast<double>()).squaredNorm();
    return std::exp(-o.gamma * d2);
  };
  Eigen::MatrixXd k(r, r);
  VectorXd c = VectorXd::Zero(r);
  for (int j = 0; j < r; ++j) {
    for (int l = 0; l < r; ++l) k(j, l) = kappa(rs.zx, rs.zt, j, rs.zx, rs.zt, l);
    for (int i = 0; i < n; ++i) c(j) += kappa(s.x, s.t, i, rs.zx, rs.zt, j) / n;
  }
  k.diagonal().array() += o.ridge;
  const VectorXd expected = k.fullPivLu().solve(c);
  for (int j = 0; j < r; ++j)
    EXPECT_NEAR(rs.beta(j), expected(j), 1e-4 * (1 + std::abs(expected(j))));
}

TEST(Rkme, GradientMatchesFiniteDifferences) {
  std::mt19937_64 rng(7);
  std::normal_distribution<double> g;
  const int n = 30, r = 4, dim = 5;
  detail::MatrixD u(n, dim), z(r, dim);
  for (auto& v : u.reshaped()) v = 0.5 * g(rng);
  for (auto& v : z.reshaped()) v = 0.5 * g(rng);
  VectorXd beta(r);
  beta << 0.4, 0.1, 0.3, 0.2;
  const double gamma = 0.6;
  const double self = detail::mean_self_kernel(u, gamma);
  const detail::MatrixD grad = detail::mmd2_gradient(u, z, beta, gamma);
  ASSERT_EQ(grad.rows(), r);
  ASSERT_EQ(grad.cols(), dim);
  const double h = 1e-6;
  for (int j = 0; j < r; ++j) {
    for (int k = 0; k < dim; ++k) {
      detail::MatrixD zp = z, zm = z;
      zp(j, k) += h;
      zm(j, k) -= h;
      const double fd = (detail::mmd2_objective(u, self, zp, beta, gamma) -
                         detail::mmd2_objective(u, self, zm, beta, gamma)) /
                        (2 * h);
      EXPECT_NEAR(grad(j, k), fd, 1e-7 + 1e-5 * std::abs(fd)) << "z[" << j << "][" << k << "]";
    }
  }
  EXPECT_GT(grad.norm(), 1e-3);  // the check above means something
}

TEST(Rkme, CoefficientGradientEqualsTheExplicitGradient) {
  // The fit moves z = W U along G = V U; V U must be the exact gradient at W U.
  std::mt19937_64 rng(17);
  std::normal_distribution<double> g;
  std::uniform_real_distribution<double> uni(0.0, 1.0);
  const int n = 25, r = 3, dim = 6;
  detail::MatrixD u(n, dim), w(r, n);
  for (auto& v : u.reshaped()) v = 0.4 * g(rng);
  for (auto& v : w.reshaped()) v = uni(rng);
  for (int j = 0; j < r; ++j) w.row(j) /= w.row(j).sum();
  const VectorXd beta = Eigen::Vector3d(0.5, 0.2, 0.3);
  const detail::MatrixD v = detail::gradient_coefficients(u, w, beta, 0.9);
  const detail::MatrixD expected = detail::mmd2_gradient(u, w * u, beta, 0.9);
  EXPECT_LT((v * u - expected).lpNorm<Eigen::Infinity>(), 1e-13);
  EXPECT_GT(expected.norm(), 1e-3);
}

TEST(Rkme, StoredGramAndProductsThroughTheSamplesAgree) {
  const Samples s = clustered(60, 48, 16, 4, 0.4, 18);  // n < 2D: kAuto would store the Gram
  const detail::MatrixD u = [&] {
    detail::MatrixD m(60, 64);
    m << s.x.cast<double>(), s.t.cast<double>();
    return m;
  }();
  const detail::SampleGram stored(u, detail::SampleGram::Mode::kStored);
  const detail::SampleGram through(u, detail::SampleGram::Mode::kThroughSamples);
  ASSERT_TRUE(stored.stored());
  ASSERT_FALSE(through.stored());
  EXPECT_TRUE(detail::SampleGram(u, detail::SampleGram::Mode::kAuto).stored());
  const detail::MatrixD probe = detail::MatrixD::Random(60, 5);
  EXPECT_LT((stored.apply(probe) - u * (u.transpose() * probe)).norm(), 1e-10);
  EXPECT_LT((through.apply(probe) - u * (u.transpose() * probe)).norm(), 1e-10);
  EXPECT_NEAR(stored.mean_kernel(0.7), detail::mean_self_kernel(u, 0.7), 1e-13);
  EXPECT_NEAR(through.mean_kernel(0.7), detail::mean_self_kernel(u, 0.7), 1e-15);

  for (const RkmeOptimizer optimizer : {RkmeOptimizer::kLbfgs, RkmeOptimizer::kGradient}) {
    SCOPED_TRACE(optimizer == RkmeOptimizer::kLbfgs ? "lbfgs" : "gradient");
    RkmeOptions o = options_for(s, 6);
    o.optimizer = optimizer;
    o.relative_tolerance = 0;
    o.max_iterations = 25;
    const ReducedSet a =
        detail::fit_rkme_impl(s.x, s.t, o, {}, detail::SampleGram::Mode::kStored);
    const ReducedSet b =
        detail::fit_rkme_impl(s.x, s.t, o, {}, detail::SampleGram::Mode::kThroughSamples);
    EXPECT_NEAR(a.residual_mmd2, b.residual_mmd2, 1e-9 * b.residual_mmd2);
    EXPECT_LT((a.zx - b.zx).lpNorm<Eigen::Infinity>(), 1e-4);
    EXPECT_LT((a.beta - b.beta).lpNorm<Eigen::Infinity>(), 1e-4);
    EXPECT_NEAR(a.residual_mmd2, scalar_mmd2(s.x, s.t, a.zx, a.zt, a.beta, o.gamma, o.lambda),
                1e-9 * a.residual_mmd2);
  }
}

TEST(Rkme, KMeansCentresAreTheMeansOfSeparatedGroups) {
  detail::MatrixD u(7, 2);
  u << 0, 0, 0.2, 0, 0, 0.2, 10, 10, 10.2, 10, 10, 10.2, 9.9, 9.9;
  const detail::MatrixD w = detail::kmeans(u, 2, 5, 10);
  ASSERT_EQ(w.rows(), 2);
  ASSERT_EQ(w.cols(), 7);
  const detail::MatrixD centres = w * u;
  const int low = centres(0, 0) < 5 ? 0 : 1;
  EXPECT_NEAR(centres(low, 0), 0.2 / 3, 1e-12);
  EXPECT_NEAR(centres(low, 1), 0.2 / 3, 1e-12);
  EXPECT_NEAR(centres(1 - low, 0), (10 + 10.2 + 10 + 9.9) / 4, 1e-12);
  for (int j = 0; j < 2; ++j) {
    EXPECT_NEAR(w.row(j).sum(), 1.0, 1e-12);
    EXPECT_GE(w.row(j).minCoeff(), 0.0);
  }
}

TEST(Rkme, MeanSelfKernelMatchesPairSum) {
  std::mt19937_64 rng(8);
  std::normal_distribution<double> g;
  const int n = 1100;  // crosses the 512-row blocks
  detail::MatrixD u(n, 3);
  for (auto& v : u.reshaped()) v = g(rng);
  double total = 0;
  for (int i = 0; i < n; ++i)
    for (int j = 0; j < n; ++j) total += std::exp(-0.3 * (u.row(i) - u.row(j)).squaredNorm());
  EXPECT_NEAR(detail::mean_self_kernel(u, 0.3), total / (double(n) * n), 1e-12);
}

TEST(Rkme, SameSeedSameFit) {
  const Samples s = clustered(90, 8, 4, 3, 0.3, 9);
  const RkmeOptions o = options_for(s, 5);
  const ReducedSet a = fit_rkme(s.x, s.t, o), b = fit_rkme(s.x, s.t, o);
  EXPECT_EQ(a.zx, b.zx);
  EXPECT_EQ(a.zt, b.zt);
  EXPECT_EQ(a.beta, b.beta);
  EXPECT_EQ(a.residual_mmd2, b.residual_mmd2);
}

TEST(Rkme, ZeroLambdaFitsImagesAlone) {
  const Samples s = clustered(80, 8, 4, 4, 0.3, 10);
  RkmeOptions o = options_for(s, 4);
  o.lambda = 0;
  const RowMatrix other_prompts = -s.t;
  const ReducedSet a = fit_rkme(s.x, s.t, o), b = fit_rkme(s.x, other_prompts, o);
  EXPECT_EQ(a.zx, b.zx);
  EXPECT_EQ(a.beta, b.beta);
  EXPECT_TRUE(a.zt.allFinite());
  EXPECT_EQ(a.zt.rows(), 4);
  EXPECT_LT((a.zt + b.zt).norm(), 1e-4);  // the prompt part follows the prompts
}

TEST(Rkme, MaxIterationsZeroStopsAfterInitialisation) {
  const Samples s = clustered(60, 6, 3, 3, 0.3, 11);
  RkmeOptions o = options_for(s, 4);
  o.max_iterations = 0;
  int calls = 0;
  const ReducedSet rs = fit_rkme(s.x, s.t, o, [&](int, double) { ++calls; });
  EXPECT_EQ(rs.iterations, 0);
  EXPECT_EQ(calls, 0);
  EXPECT_NEAR(rs.residual_mmd2, rs.initial_mmd2, 1e-6 * rs.initial_mmd2);
}

void expect_input_error(const std::function<void()>& f, const std::string& field) {
  try {
    f();
    ADD_FAILURE() << "no InputError for " << field;
  } catch (const InputError& e) {
    EXPECT_NE(std::string(e.what()).find(field), std::string::npos) << e.what();
  }
}

TEST(Rkme, RejectsInvalidInputNamingTheField) {
  const Samples s = clustered(10, 4, 2, 2, 0.3, 12);
  RkmeOptions o;
  expect_input_error([&] { fit_rkme(RowMatrix(0, 4), RowMatrix(0, 2), o); }, "x");
  expect_input_error([&] { fit_rkme(s.x, s.t.topRows(9), o); }, "t");
  RowMatrix bad = s.x;
  bad(3, 1) = std::nanf("");
  expect_input_error([&] { fit_rkme(bad, s.t, o); }, "x");
  bad = s.t;
  bad(0, 0) = INFINITY;
  expect_input_error([&] { fit_rkme(s.x, bad, o); }, "t");
  for (double g : {0.0, -1.0, double(NAN)}) {
    RkmeOptions b = o;
    b.gamma = g;
    expect_input_error([&] { fit_rkme(s.x, s.t, b); }, "options.gamma");
  }
  RkmeOptions b = o;
  b.lambda = -0.1;
  expect_input_error([&] { fit_rkme(s.x, s.t, b); }, "options.lambda");
  b = o;
  b.reduced_size = 0;
  expect_input_error([&] { fit_rkme(s.x, s.t, b); }, "options.reduced_size");
  b = o;
  b.max_iterations = -1;
  expect_input_error([&] { fit_rkme(s.x, s.t, b); }, "options.max_iterations");
}

TEST(ProjectToSimplex, KnownCases) {
  auto check = [](std::vector<double> in, std::vector<double> expected) {
    const VectorXd v = Eigen::Map<VectorXd>(in.data(), static_cast<Eigen::Index>(in.size()));
    const VectorXd p = project_to_simplex(v);
    ASSERT_EQ(p.size(), v.size());
    for (std::size_t i = 0; i < in.size(); ++i)
      EXPECT_NEAR(p(static_cast<Eigen::Index>(i)), expected[i], 1e-15) << "component " << i;
  };
  check({0.25, 0.75}, {0.25, 0.75});  // already on the simplex
  check({1, 0, 0}, {1, 0, 0});
  check({2, 0}, {1, 0});
  check({0, 0}, {0.5, 0.5});
  check({-1, -1, -1}, {1.0 / 3, 1.0 / 3, 1.0 / 3});
  check({0.3, 0.2, 2.0}, {0, 0, 1});
  check({1, 1, 0}, {0.5, 0.5, 0});
  check({0.5, 0.3, -0.2}, {0.6, 0.4, 0});
  check({7}, {1});
  EXPECT_THROW(project_to_simplex(VectorXd()), InputError);
}

TEST(ProjectToSimplex, IsTheNearestPointOfTheSimplex) {
  std::mt19937_64 rng(13);
  std::normal_distribution<double> g;
  for (int trial = 0; trial < 50; ++trial) {
    VectorXd v(5);
    for (auto& e : v) e = g(rng);
    const VectorXd p = project_to_simplex(v);
    EXPECT_NEAR(p.sum(), 1.0, 1e-12);
    EXPECT_GE(p.minCoeff(), 0.0);
    // Optimality: (v - p) . (q - p) <= 0 for every vertex q of the simplex.
    for (int k = 0; k < 5; ++k) {
      VectorXd q = VectorXd::Zero(5);
      q(k) = 1;
      EXPECT_LE((v - p).dot(q - p), 1e-12);
    }
  }
}

// Exact minimum of b^T K b - 2 c^T b on the simplex by enumerating supports (KKT on each face).
VectorXd brute_force_qp(const Eigen::MatrixXd& k, const VectorXd& c) {
  const int r = static_cast<int>(c.size());
  double best = INFINITY;
  VectorXd best_b;
  for (int mask = 1; mask < (1 << r); ++mask) {
    std::vector<int> idx;
    for (int j = 0; j < r; ++j)
      if (mask & (1 << j)) idx.push_back(j);
    const int s = static_cast<int>(idx.size());
    Eigen::MatrixXd a = Eigen::MatrixXd::Zero(s + 1, s + 1);
    VectorXd rhs(s + 1);
    for (int p = 0; p < s; ++p) {
      for (int q = 0; q < s; ++q) a(p, q) = 2 * k(idx[p], idx[q]);
      a(p, s) = a(s, p) = 1;
      rhs(p) = 2 * c(idx[p]);
    }
    rhs(s) = 1;
    const VectorXd sol = a.fullPivLu().solve(rhs);
    if ((a * sol - rhs).norm() > 1e-9) continue;
    VectorXd b = VectorXd::Zero(r);
    for (int p = 0; p < s; ++p) b(idx[p]) = sol(p);
    if (b.minCoeff() < -1e-12) continue;
    const double f = b.dot(k * b) - 2 * c.dot(b);
    if (f < best) {
      best = f;
      best_b = b;
    }
  }
  return best_b;
}

TEST(SolveSimplexQp, MatchesBruteForceOnTwoAndThreePoints) {
  std::mt19937_64 rng(14);
  std::normal_distribution<double> g;
  for (int r : {2, 3}) {
    for (int trial = 0; trial < 40; ++trial) {
      Eigen::MatrixXd a(r, r);
      for (auto& e : a.reshaped()) e = g(rng);
      const Eigen::MatrixXd k = a * a.transpose() + 0.1 * Eigen::MatrixXd::Identity(r, r);
      VectorXd c(r);
      for (auto& e : c) e = 2 * g(rng);
      const VectorXd expected = brute_force_qp(k, c);
      const VectorXd got = solve_simplex_qp(k, c);
      auto f = [&](const VectorXd& b) { return b.dot(k * b) - 2 * c.dot(b); };
      EXPECT_NEAR(f(got), f(expected), 1e-10) << "r = " << r << ", trial " << trial;
      EXPECT_LT((got - expected).lpNorm<Eigen::Infinity>(), 1e-6);
      EXPECT_NEAR(got.sum(), 1.0, 1e-12);
      EXPECT_GE(got.minCoeff(), 0.0);
    }
  }
}

TEST(SolveSimplexQp, RejectsShapeMismatch) {
  EXPECT_THROW(solve_simplex_qp(Eigen::MatrixXd::Identity(3, 3), VectorXd::Ones(2)), InputError);
  EXPECT_THROW(solve_simplex_qp(Eigen::MatrixXd(0, 0), VectorXd()), InputError);
}

TEST(GaussianGram, IsTheKernelOfEveryPair) {
  RowMatrix a(4, 3);
  a << 0, 0, 0, 1, 0, 0, 0, 2, 0, 1, 1, 1;
  const RowMatrix k = gaussian_gram(a, 0.5);
  for (int i = 0; i < 4; ++i) {
    EXPECT_EQ(k(i, i), 1.0f);
    for (int j = 0; j < 4; ++j)
      EXPECT_NEAR(k(i, j), std::exp(-0.5 * (a.row(i) - a.row(j)).squaredNorm()), 1e-7);
  }
  EXPECT_THROW(gaussian_gram(a, 0.0), InputError);
}

TEST(MedianHeuristic, IsOneOverTheMedianSquaredDistance) {
  RowMatrix a(3, 1);
  a << 0, 1, 3;  // squared distances 1, 9, 4: median 4
  EXPECT_DOUBLE_EQ(median_heuristic_gamma(a), 0.25);
  RowMatrix b(4, 1);
  b << 0, 1, 3, 6;  // 1, 9, 36, 4, 25, 9 -> sorted 1 4 9 9 25 36: median 9
  EXPECT_DOUBLE_EQ(median_heuristic_gamma(b), 1.0 / 9);
  // Sampled pairs: deterministic in the seed, and close to the exact value.
  const Samples s = clustered(400, 8, 2, 4, 0.3, 15);
  const double exact = median_heuristic_gamma(s.x);
  const double sampled = median_heuristic_gamma(s.x, 5000, 3);
  EXPECT_EQ(sampled, median_heuristic_gamma(s.x, 5000, 3));
  EXPECT_NEAR(sampled, exact, 0.1 * exact);
  EXPECT_THROW(median_heuristic_gamma(RowMatrix(1, 3)), InputError);
  EXPECT_THROW(median_heuristic_gamma(RowMatrix::Ones(5, 3)), InputError);
}

}  // namespace
}  // namespace gmi
