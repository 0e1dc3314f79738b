// Two-stage search: a compact summary of every spec estimates its score, then the exact scorer
// runs on each query's best estimates. See scoring.hpp (SpecIndex::TwoStage).
//
// The summary of model m: its reduced points grouped into C groups g by beta-weighted kernel
// k-means on its own Gram matrix (so the groups are compact where the kernel sees them), and
// per group its mass B_g = sum beta_j, its weighted mean point c_g, the spread s_g^2 (weighted
// mean of ||z_j - c_g||^2), its weighted mean unit prompt u_g, and the block Gram
// G_gh = sum_{j in g, l in h} beta_j beta_l K_jl / (B_g B_h). The estimate is the scorer with
// the groups as points:
//   k_g ~ exp(-gamma (||c_g - x||^2 + s_g^2))  (the mean squared distance of the group's points)
//   rkme:      1 - 2 sum_g B_g k_g + beta' K beta        (the self term is exact)
//   weighted:  w_g = softmax(log B_g + (u_g . t / ||t|| - 1) / tau),
//              1 - 2 sum_g w_g k_g + sum_gh w_g w_h G_gh
//   nearest:   -max_g k_g
// With C >= r every point is its own group and the estimate is the exact score.
//
// With residuals (residual_dims R > 0) the groups do not stand for their points: each point
// z_j keeps its offset from its group's mean, z_j - c_g, in the R leading principal directions
// of such offsets (of a sample of models), and its unit prompt in prompt_dims directions, so
//   z_j . x ~ c_g . x + (B (z_j - c_g)) . (B x)          (||z_j||^2 exact)
// and the estimate is the scorer's own formula over the points with the model's exact Gram:
// what a near-duplicate differs in is mostly within its groups, which R directions hold.
//
// The dot products c_g . x and u_g . t are taken in the leading principal directions of the
// groups' means and prompts (of a sample of models; with residuals, of the points' prompts),
// the norms ||c_g||^2 in full.
//
// The inverted file (lists > 0): k-means cells over the group mean points (in the same basis),
// trained on a strided sample of groups, every group then filed in its nearest cell; a cell
// lists each model with a group in it once. A query visits the `probe` cells whose centres are
// nearest to it and estimates only the models they list: a model with no group near the
// query has little kernel mass there, so its score is near its worst.
#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <limits>
#include <mutex>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "gmi/error.hpp"
#include "gmi/parallel.hpp"
#include "gmi/scoring.hpp"
#include "scoring_internal.hpp"

namespace gmi {
namespace {

using Eigen::Index;
using scoring_detail::BoundedTopK;
using scoring_detail::parallel_for_rethrow;

// Models sampled to learn the bases from; the randomised range finder's settings.
constexpr Index kBasisSample = 2048;
constexpr Index kOversample = 16;
constexpr int kPowerIterations = 3;
constexpr int kKMeansIterations = 10;
// The inverted file's k-means: Lloyd steps, and groups sampled per cell to train on.
constexpr int kCellIterations = 8;
constexpr Index kCellSample = 48;
// Models per block of stage 1 (their group centres stay in L2 while a batch passes).
constexpr std::size_t kEstimateBlock = 1024;
// Models per task while building the summary.
constexpr std::size_t kBuildBlock = 512;

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Orthonormal columns spanning those of y (thin Q of a Householder QR).
Eigen::MatrixXd orthonormal_columns(const Eigen::MatrixXd& y) {
  const Eigen::HouseholderQR<Eigen::MatrixXd> qr(y);
  return qr.householderQ() * Eigen::MatrixXd::Identity(y.rows(), y.cols());
}

// The `dims` leading uncentred principal directions of the rows of a (dims x a.cols(),
// orthonormal rows), by a randomised range finder with power iterations:
// O(rows x cols x (dims + 16)) instead of a cols x cols eigenproblem.
RowMatrix leading_directions(const Eigen::MatrixXd& a, int dims, std::uint64_t seed) {
  const Index cols = a.cols();
  const Index width = std::min<Index>(cols, dims + kOversample);
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> normal;
  Eigen::MatrixXd q(cols, width);
  for (Index i = 0; i < q.size(); ++i) q.data()[i] = normal(rng);
  for (int it = 0; it < kPowerIterations; ++it) q = orthonormal_columns(a.transpose() * (a * q));
  const Eigen::MatrixXd b = a * q;
  const Eigen::SelfAdjointEigenSolver<Eigen::MatrixXd> eig(b.transpose() * b);
  // Eigenvalues ascending: the last `dims` vectors are the leading directions.
  return (q * eig.eigenvectors().rightCols(dims)).transpose().cast<float>();
}

// Beta-weighted kernel k-means of one model's r points (<= groups groups) from its Gram
// matrix, deterministic: seeds are the heaviest point, then each time the point of largest
// beta x squared feature-space distance to its nearest seed; then Lloyd steps until no point
// moves. label[j] in [0, groups).
void kernel_kmeans(const float* gram, const float* beta, int r, int groups, std::uint8_t* label) {
  const auto k = [&](int j, int l) { return static_cast<double>(gram[j * r + l]); };
  std::vector<int> seeds;
  std::vector<double> nearest(static_cast<std::size_t>(r), std::numeric_limits<double>::infinity());
  int first = 0;
  for (int j = 1; j < r; ++j)
    if (beta[j] > beta[first]) first = j;
  seeds.push_back(first);
  while (static_cast<int>(seeds.size()) < groups) {
    const int s = seeds.back();
    int best = -1;
    double best_value = 0;
    for (int j = 0; j < r; ++j) {
      nearest[j] = std::min(nearest[j], std::max(0.0, k(j, j) + k(s, s) - 2 * k(j, s)));
      const double value = beta[j] * nearest[j];
      if (value > best_value) best = j, best_value = value;
    }
    if (best < 0) break;  // every weighted point already sits on a seed
    seeds.push_back(best);
  }
  const int g = static_cast<int>(seeds.size());
  for (int j = 0; j < r; ++j) {
    int c = 0;
    for (int s = 1; s < g; ++s)
      if (k(j, j) + k(seeds[s], seeds[s]) - 2 * k(j, seeds[s]) <
          k(j, j) + k(seeds[c], seeds[c]) - 2 * k(j, seeds[c]))
        c = s;
    label[j] = static_cast<std::uint8_t>(c);
  }
  std::vector<double> mass(static_cast<std::size_t>(g)), self(static_cast<std::size_t>(g));
  std::vector<double> cross(static_cast<std::size_t>(r) * static_cast<std::size_t>(g));
  for (int it = 0; it < kKMeansIterations; ++it) {
    std::fill(mass.begin(), mass.end(), 0.0);
    std::fill(self.begin(), self.end(), 0.0);
    std::fill(cross.begin(), cross.end(), 0.0);
    for (int l = 0; l < r; ++l) mass[label[l]] += beta[l];
    // cross[j][c] = sum_{l in c} beta_l K_jl / B_c; self[c] = ||mu_c||^2.
    for (int j = 0; j < r; ++j)
      for (int l = 0; l < r; ++l) cross[static_cast<std::size_t>(j * g + label[l])] += beta[l] * k(j, l);
    for (int c = 0; c < g; ++c)
      if (mass[c] > 0)
        for (int j = 0; j < r; ++j) cross[static_cast<std::size_t>(j * g + c)] /= mass[c];
    for (int l = 0; l < r; ++l)
      if (mass[label[l]] > 0) self[label[l]] += beta[l] * cross[static_cast<std::size_t>(l * g + label[l])] / mass[label[l]];
    bool moved = false;
    for (int j = 0; j < r; ++j) {
      int best = label[j];
      double best_d = std::numeric_limits<double>::infinity();
      for (int c = 0; c < g; ++c) {
        if (!(mass[c] > 0)) continue;
        const double dist = self[c] - 2 * cross[static_cast<std::size_t>(j * g + c)];
        if (dist < best_d) best = c, best_d = dist;
      }
      moved = moved || best != label[j];
      label[j] = static_cast<std::uint8_t>(best);
    }
    if (!moved) break;
  }
}

}  // namespace

struct SpecIndex::Summary {
  int groups = 1;               // C slots per model (an empty slot has mass 0)
  RowMatrix basis, basis_t;     // dims x d, prompt_dims x dt (empty: all dimensions)
  RowMatrix centres;            // M*C x dims: group mean points, in the basis
  RowMatrix prompts;            // M*C x prompt_dims: group mean unit prompts, in basis_t
  Eigen::VectorXf far;          // M*C: -(||c_g||^2 + s_g^2)
  Eigen::VectorXf log_mass;     // M*C: log B_g (-inf for an empty slot)
  std::vector<float> gram;      // M*C*C: each model's block Gram, row-major
  // Residuals (residual_dims > 0): per reduced point its group, its offset from its group's
  // mean point in the residual basis, and its unit prompt in basis_t (P rows each).
  int residual_dims = 0;
  RowMatrix basis_r;            // residual_dims x d
  std::vector<std::uint8_t> point_group;
  RowMatrix point_residuals;    // P x residual_dims
  RowMatrix point_prompts;      // P x prompt_dims
  // The inverted file (no rows: none): cell centres in the basis, their squared norms, and
  // per cell the models listed, ascending (cell c: members[offsets[c] .. offsets[c + 1])).
  RowMatrix cells;
  Eigen::VectorXf cell_sqnorm;
  std::vector<std::size_t> cell_offsets;
  std::vector<std::uint32_t> cell_members;
  std::size_t bytes() const {
    return static_cast<std::size_t>(basis.size() + basis_t.size() + centres.size() + prompts.size() +
                                    far.size() + log_mass.size() + cells.size() + cell_sqnorm.size() +
                                    basis_r.size() + point_residuals.size() + point_prompts.size()) *
               sizeof(float) +
           point_group.size() +
           gram.size() * sizeof(float) + cell_offsets.size() * sizeof(std::size_t) +
           cell_members.size() * sizeof(std::uint32_t);
  }
};

namespace {

// Index of the nearest row of `centres` (squared norms `sqnorm`) to each row of `points`,
// by blocks of one GEMM each: ||c - x||^2 = ||c||^2 - 2 c.x + ||x||^2 (the last is common).
std::vector<int> nearest_centres(const RowMatrix& points, const RowMatrix& centres, const Eigen::VectorXf& sqnorm,
                                 int threads) {
  constexpr Index kBlock = 2048;
  const Index n = points.rows();
  std::vector<int> out(static_cast<std::size_t>(n));
  const auto blocks = static_cast<std::size_t>((n + kBlock - 1) / kBlock);
  parallel_for(blocks, threads, [&](std::size_t b) {
    const Index a = static_cast<Index>(b) * kBlock, len = std::min(kBlock, n - a);
    const RowMatrix dots = points.middleRows(a, len) * centres.transpose();
    for (Index i = 0; i < len; ++i) {
      Index best = 0;
      float best_d = std::numeric_limits<float>::infinity();
      for (Index c = 0; c < centres.rows(); ++c) {
        const float dist = sqnorm(c) - 2.0f * dots(i, c);
        if (dist < best_d) best = c, best_d = dist;
      }
      out[static_cast<std::size_t>(a + i)] = static_cast<int>(best);
    }
  });
  return out;
}

// The inverted file over the summary's non-empty groups (see the file's comment).
template <class Summary>
void build_cells(Summary& s, int lists, int threads) {
  std::vector<Index> used;
  for (Index slot = 0; slot < s.log_mass.size(); ++slot)
    if (s.log_mass(slot) > kNegInf) used.push_back(slot);
  const Index cols = s.centres.cols();
  const Index cells = std::min<Index>(lists, static_cast<Index>(used.size()));
  if (cells == 0) return;
  // Train on a strided sample; start from every (sample / cells)-th of it.
  const Index sample = std::min<Index>(static_cast<Index>(used.size()), cells * kCellSample);
  RowMatrix train(sample, cols);
  for (Index i = 0; i < sample; ++i)
    train.row(i) = s.centres.row(used[static_cast<std::size_t>(i * static_cast<Index>(used.size()) / sample)]);
  RowMatrix centres(cells, cols);
  for (Index c = 0; c < cells; ++c) centres.row(c) = train.row(c * sample / cells);
  for (int it = 0; it < kCellIterations; ++it) {
    const Eigen::VectorXf sqnorm = centres.rowwise().squaredNorm();
    const std::vector<int> label = nearest_centres(train, centres, sqnorm, threads);
    RowMatrix sum = RowMatrix::Zero(cells, cols);
    Eigen::VectorXi count = Eigen::VectorXi::Zero(cells);
    for (Index i = 0; i < sample; ++i) {
      sum.row(label[static_cast<std::size_t>(i)]) += train.row(i);
      ++count(label[static_cast<std::size_t>(i)]);
    }
    for (Index c = 0; c < cells; ++c)
      if (count(c) > 0) centres.row(c) = sum.row(c) / static_cast<float>(count(c));  // else kept
  }
  s.cell_sqnorm = centres.rowwise().squaredNorm();
  RowMatrix points(static_cast<Index>(used.size()), cols);
  for (std::size_t i = 0; i < used.size(); ++i) points.row(static_cast<Index>(i)) = s.centres.row(used[i]);
  const std::vector<int> cell = nearest_centres(points, centres, s.cell_sqnorm, threads);
  // A model's groups are consecutive slots, so filing them in slot order lists each cell's
  // models ascending, and a repeat is always the cell's last entry.
  const Index groups = s.groups;
  std::vector<std::size_t> count(static_cast<std::size_t>(cells), 0);
  std::vector<Index> last(static_cast<std::size_t>(cells), -1);
  for (std::size_t i = 0; i < used.size(); ++i) {
    const auto c = static_cast<std::size_t>(cell[i]);
    const Index m = used[i] / groups;
    if (last[c] != m) ++count[c], last[c] = m;
  }
  s.cell_offsets.assign(static_cast<std::size_t>(cells) + 1, 0);
  for (std::size_t c = 0; c < count.size(); ++c) s.cell_offsets[c + 1] = s.cell_offsets[c] + count[c];
  s.cell_members.resize(s.cell_offsets.back());
  std::vector<std::size_t> fill(s.cell_offsets.begin(), s.cell_offsets.end() - 1);
  std::fill(last.begin(), last.end(), -1);
  for (std::size_t i = 0; i < used.size(); ++i) {
    const auto c = static_cast<std::size_t>(cell[i]);
    const Index m = used[i] / groups;
    if (last[c] != m) s.cell_members[fill[c]++] = static_cast<std::uint32_t>(m), last[c] = m;
  }
  s.cells = std::move(centres);
}

}  // namespace

std::shared_ptr<const SpecIndex::Summary> SpecIndex::summary(const TwoStage& search) const {
  if (search.dims < 0 || search.prompt_dims < 0)
    throw InputError("two-stage search: dims and prompt_dims must be >= 0 (got " +
                     std::to_string(search.dims) + ", " + std::to_string(search.prompt_dims) + ")");
  if (search.residual_dims < 0)
    throw InputError("two-stage search: residual_dims must be >= 0 (got " + std::to_string(search.residual_dims) + ")");
  if (search.clusters < 1 || search.clusters > 255)
    throw InputError("two-stage search: clusters must be in 1..255 (got " + std::to_string(search.clusters) + ")");
  if (search.lists < 0 || (search.lists > 0 && (search.probe < 1 || search.probe > search.lists)))
    throw InputError("two-stage search: lists must be >= 0 and probe in 1..lists (got lists " +
                     std::to_string(search.lists) + ", probe " + std::to_string(search.probe) + ")");
  if (size() > std::numeric_limits<std::uint32_t>::max())
    throw InputError("two-stage search: more than 2^32 models in one index");
  const Index d = dx_, dt = dt_;
  const auto shape = summary_shape(search);
  const int dims = shape[0], pdims = shape[1], groups = shape[2], rdims = shape[4];
  std::lock_guard lock(summaries_->mutex);
  auto& slot = summaries_->by_shape[shape];
  if (slot) return slot;

  const auto models = size();
  auto out = std::make_shared<Summary>();
  Summary& s = *out;
  s.groups = groups;
  s.residual_dims = rdims;
  const auto slots = static_cast<Index>(models) * groups;

  // Pass 1: every model's groups.
  std::vector<std::uint8_t> labels(points());
  parallel_for_rethrow((models + kBuildBlock - 1) / kBuildBlock, default_threads(), [&](std::size_t b) {
    for (std::size_t m = b * kBuildBlock; m < std::min(models, (b + 1) * kBuildBlock); ++m) {
      const auto r = static_cast<int>(offsets_[m + 1] - offsets_[m]);
      kernel_kmeans(grams_.data() + gram_offsets_[m], beta_.data() + offsets_[m], r, std::min(groups, r),
                    labels.data() + offsets_[m]);
    }
  });

  // A model's group means (points and unit prompts), in all dimensions: rows of cx / ct
  // (groups x d / dt, double), with masses, spreads; zero rows for empty slots.
  struct Groups {
    Eigen::MatrixXd cx, ct;
    Eigen::VectorXd mass, spread;
    std::vector<float> x, t;  // the model's points as float32
  };
  const auto group_means = [&](std::size_t m, Groups& g) {
    const auto p = static_cast<Index>(offsets_[m]);
    const auto r = static_cast<Index>(offsets_[m + 1] - offsets_[m]);
    g.x.resize(static_cast<std::size_t>(r * d));
    g.t.resize(static_cast<std::size_t>(r * dt));
    load_points(false, p, r, g.x.data());
    load_points(true, p, r, g.t.data());
    g.cx.setZero(groups, d);
    g.ct.setZero(groups, dt);
    g.mass.setZero(groups);
    g.spread.setZero(groups);
    for (Index j = 0; j < r; ++j) {
      const int c = labels[static_cast<std::size_t>(p + j)];
      const double b = beta_(p + j);
      g.mass(c) += b;
      g.cx.row(c) += b * Eigen::Map<const Eigen::RowVectorXf>(g.x.data() + j * d, d).cast<double>();
      g.ct.row(c) += (b * zt_inv_norm_(p + j)) *
                     Eigen::Map<const Eigen::RowVectorXf>(g.t.data() + j * dt, dt).cast<double>();
      g.spread(c) += b * zx_sqnorm_(p + j);
    }
    for (int c = 0; c < groups; ++c) {
      if (!(g.mass(c) > 0)) continue;
      g.cx.row(c) /= g.mass(c);
      g.ct.row(c) /= g.mass(c);
      // E||z - c||^2 = E||z||^2 - ||c||^2
      g.spread(c) = std::max(0.0, g.spread(c) / g.mass(c) - g.cx.row(c).squaredNorm());
    }
  };

  // The bases, from a strided sample of models: the groups' means and prompts, or (with
  // residuals) the points' offsets from their group means and the points' unit prompts.
  if (dims > 0 || pdims > 0 || rdims > 0) {
    const auto sample = static_cast<std::size_t>(std::min<Index>(static_cast<Index>(models), kBasisSample));
    Eigen::MatrixXd ax(static_cast<Index>(sample) * groups, d), at(static_cast<Index>(sample) * groups, dt);
    std::vector<Eigen::MatrixXd> res(sample), unit(sample);
    parallel_for_rethrow(sample, default_threads(), [&](std::size_t i) {
      Groups g;
      const std::size_t m = i * models / sample;
      group_means(m, g);
      ax.middleRows(static_cast<Index>(i) * groups, groups) = g.cx;
      at.middleRows(static_cast<Index>(i) * groups, groups) = g.ct;
      if (rdims == 0) return;
      const auto p = static_cast<Index>(offsets_[m]);
      const auto r = static_cast<Index>(offsets_[m + 1] - offsets_[m]);
      res[i].resize(r, d);
      unit[i].resize(r, dt);
      for (Index j = 0; j < r; ++j) {
        res[i].row(j) = Eigen::Map<const Eigen::RowVectorXf>(g.x.data() + j * d, d).cast<double>() -
                        g.cx.row(labels[static_cast<std::size_t>(p + j)]);
        unit[i].row(j) = zt_inv_norm_(p + j) * Eigen::Map<const Eigen::RowVectorXf>(g.t.data() + j * dt, dt).cast<double>();
      }
    });
    const auto stack = [](const std::vector<Eigen::MatrixXd>& parts, Index cols) {
      Index rows = 0;
      for (const auto& part : parts) rows += part.rows();
      Eigen::MatrixXd all(rows, cols);
      rows = 0;
      for (const auto& part : parts) all.middleRows(rows, part.rows()) = part, rows += part.rows();
      return all;
    };
    if (dims > 0) s.basis = leading_directions(ax, dims, 0x5eedULL + static_cast<std::uint64_t>(dims));
    if (rdims > 0) {
      s.basis_r = leading_directions(stack(res, d), rdims, 0x4e5dULL + static_cast<std::uint64_t>(rdims));
      if (pdims > 0) s.basis_t = leading_directions(stack(unit, dt), pdims, 0x7e47ULL + static_cast<std::uint64_t>(pdims));
    } else if (pdims > 0) {
      s.basis_t = leading_directions(at, pdims, 0x7e47ULL + static_cast<std::uint64_t>(pdims));
    }
  }

  // Pass 2: every model's summary.
  s.centres.resize(slots, dims > 0 ? dims : d);
  s.prompts.resize(slots, pdims > 0 ? pdims : dt);
  s.far.resize(slots);
  s.log_mass.resize(slots);
  s.gram.assign(static_cast<std::size_t>(slots) * static_cast<std::size_t>(groups), 0.0f);
  if (rdims > 0) {
    s.point_group = labels;
    s.point_residuals.resize(static_cast<Index>(points()), rdims);
    s.point_prompts.resize(static_cast<Index>(points()), pdims > 0 ? pdims : dt);
  }
  parallel_for_rethrow((models + kBuildBlock - 1) / kBuildBlock, default_threads(), [&](std::size_t b) {
    Groups g;
    for (std::size_t m = b * kBuildBlock; m < std::min(models, (b + 1) * kBuildBlock); ++m) {
      group_means(m, g);
      const Index row = static_cast<Index>(m) * groups;
      const Eigen::MatrixXf cx = g.cx.cast<float>(), ct = g.ct.cast<float>();
      if (dims > 0)
        s.centres.middleRows(row, groups).noalias() = cx * s.basis.transpose();
      else
        s.centres.middleRows(row, groups) = cx;
      if (pdims > 0)
        s.prompts.middleRows(row, groups).noalias() = ct * s.basis_t.transpose();
      else
        s.prompts.middleRows(row, groups) = ct;
      if (rdims > 0) {
        const auto p = static_cast<Index>(offsets_[m]);
        const auto r = static_cast<Index>(offsets_[m + 1] - offsets_[m]);
        Eigen::MatrixXf res(r, d), unit(r, dt);
        for (Index j = 0; j < r; ++j) {
          res.row(j) = Eigen::Map<const Eigen::RowVectorXf>(g.x.data() + j * d, d) -
                       cx.row(labels[static_cast<std::size_t>(p + j)]);
          unit.row(j) = zt_inv_norm_(p + j) * Eigen::Map<const Eigen::RowVectorXf>(g.t.data() + j * dt, dt);
        }
        s.point_residuals.middleRows(p, r).noalias() = res * s.basis_r.transpose();
        if (pdims > 0)
          s.point_prompts.middleRows(p, r).noalias() = unit * s.basis_t.transpose();
        else
          s.point_prompts.middleRows(p, r) = unit;
      }
      for (int c = 0; c < groups; ++c) {
        const bool used = g.mass(c) > 0;
        s.far(row + c) = used ? static_cast<float>(-(g.cx.row(c).squaredNorm() + g.spread(c))) : 0.0f;
        s.log_mass(row + c) = used ? static_cast<float>(std::log(g.mass(c))) : kNegInf;
      }
      const auto p = offsets_[m];
      const auto r = static_cast<int>(offsets_[m + 1] - p);
      const float* k = grams_.data() + gram_offsets_[m];
      float* out_gram = s.gram.data() + static_cast<std::size_t>(row) * static_cast<std::size_t>(groups);
      std::vector<double> block(static_cast<std::size_t>(groups * groups), 0.0);
      for (int j = 0; j < r; ++j)
        for (int l = 0; l < r; ++l)
          block[static_cast<std::size_t>(labels[p + j] * groups + labels[p + l])] +=
              static_cast<double>(beta_(static_cast<Index>(p) + j)) * beta_(static_cast<Index>(p) + l) * k[j * r + l];
      for (int c = 0; c < groups; ++c)
        for (int e = 0; e < groups; ++e)
          if (g.mass(c) > 0 && g.mass(e) > 0)
            out_gram[c * groups + e] = static_cast<float>(block[static_cast<std::size_t>(c * groups + e)] / (g.mass(c) * g.mass(e)));
    }
  });
  if (search.lists > 0) build_cells(s, search.lists, default_threads());
  slot = std::move(out);
  return slot;
}

std::size_t SpecIndex::prepare_two_stage(const TwoStage& search) const {
  std::size_t bytes = summary(search)->bytes();
  if (uses_coarse(search)) bytes += summary(search.coarse_shape())->bytes();
  return bytes;
}

bool SpecIndex::uses_coarse(const TwoStage& search) const {
  return search.coarse > search.candidates && search.coarse < size() && search.residual_dims > 0;
}

std::array<int, 5> SpecIndex::summary_shape(const TwoStage& search) const {
  // No fewer dimensions than there are: all of them.
  return {search.dims >= dx_ ? 0 : search.dims, search.prompt_dims >= dt_ ? 0 : search.prompt_dims, search.clusters,
          search.lists, static_cast<int>(std::min<Index>(search.residual_dims, dx_))};
}

bool SpecIndex::two_stage_ready(const TwoStage& search) const {
  std::unique_lock lock(summaries_->mutex, std::try_to_lock);  // held while a summary builds
  if (!lock.owns_lock()) return false;
  const auto ready = [&](const TwoStage& shape) {
    const auto it = summaries_->by_shape.find(summary_shape(shape));
    return it != summaries_->by_shape.end() && it->second != nullptr;
  };
  return ready(search) && (!uses_coarse(search) || ready(search.coarse_shape()));
}

namespace {

// The estimate of one model from its groups' summary (slots [row, row + groups)): dots[c] =
// c_g . x and tdots[c] = u_g . t in the basis (tdots null without a usable pseudo-prompt for
// the weighted scorer). Scratch w and kg hold `groups` values each.
template <class Summary, class Terms>
double estimate_model(const Summary& s, Index row, double gamma, double beta_k_beta, const float* dots,
                      const float* tdots, const Terms& qterms, const ScoreOptions& options, float inv_tau,
                      double* w, double* kg) {
  const int groups = s.groups;
  double nearest = 0;
  for (int c = 0; c < groups; ++c) {
    // -(||c||^2 + s^2 + ||x||^2 - 2 c.x), never above 0 (a distance is >= 0)
    const double e = s.far(row + c) - qterms.x_sqnorm + 2.0 * dots[c];
    kg[c] = s.log_mass(row + c) == kNegInf ? 0.0 : std::exp(gamma * std::min(e, 0.0));
    nearest = std::max(nearest, kg[c]);
  }
  if (options.scorer == Scorer::kNearest) return -nearest;
  if (!tdots) {
    double lin = 0;
    for (int c = 0; c < groups; ++c) lin += std::exp(static_cast<double>(s.log_mass(row + c))) * kg[c];
    return 1.0 - 2.0 * lin + beta_k_beta;
  }
  float emax = kNegInf;
  for (int c = 0; c < groups; ++c) {
    const float e = s.log_mass(row + c) + (tdots[c] * qterms.inv_t_norm - 1.0f) * inv_tau;
    w[c] = e;
    emax = std::max(emax, e);
  }
  if (!(emax > kNegInf)) return 1.0;
  double total = 0;
  for (int c = 0; c < groups; ++c) total += (w[c] = std::exp(w[c] - emax));
  double lin = 0, quad = 0;
  const float* gram = s.gram.data() + static_cast<std::size_t>(row) * static_cast<std::size_t>(groups);
  for (int c = 0; c < groups; ++c) {
    const double wc = w[c] / total;
    lin += wc * kg[c];
    double a = 0;
    for (int e = 0; e < groups; ++e) a += static_cast<double>(gram[c * groups + e]) * w[e];
    quad += wc * a / total;
  }
  return 1.0 - 2.0 * lin + quad;
}

// The estimate with residuals: each point's kernel from its group's mean point plus its own
// offset (dots: the groups' c_g . x; rdots: the points' residual . x in the residual basis),
// its weight from its own prompt (tdots, per point; null without a usable pseudo-prompt), and
// the model's exact Gram (gram, r x r). Points of the model are [pa, pa + r) of the index.
template <class Summary, class Terms>
double estimate_with_residuals(const Summary& s, Index pa, Index r, double gamma, double beta_k_beta,
                               const float* dots, const float* rdots, const float* tdots, const float* sqnorm,
                               const float* beta, const float* log_beta, const float* gram, const Terms& qterms,
                               const ScoreOptions& options, float inv_tau, Eigen::ArrayXf& w, Eigen::ArrayXf& k) {
  if (w.size() < r) w.resize(r), k.resize(r);
  auto kj = k.head(r);
  auto wj = w.head(r);
  const std::uint8_t* group = s.point_group.data() + pa;
  for (Index j = 0; j < r; ++j) wj(j) = dots[group[j]] + rdots[j];  // z_j . x
  // k_j = exp(-gamma max(0, ||z_j||^2 + ||x||^2 - 2 z_j . x))
  kj = (-static_cast<float>(gamma) *
        (Eigen::Map<const Eigen::ArrayXf>(sqnorm, r) + qterms.x_sqnorm - 2.0f * wj).max(0.0f))
           .exp();
  if (options.scorer == Scorer::kNearest) return -static_cast<double>(kj.maxCoeff());
  if (!tdots) return 1.0 - 2.0 * static_cast<double>((Eigen::Map<const Eigen::ArrayXf>(beta, r) * kj).sum()) + beta_k_beta;
  // log omega_j = log beta_j + (cos(z_j^t, t) - 1) / tau, normalised against the largest.
  wj = Eigen::Map<const Eigen::ArrayXf>(log_beta, r) +
       (Eigen::Map<const Eigen::ArrayXf>(tdots, r) * qterms.inv_t_norm - 1.0f) * inv_tau;
  const float emax = wj.maxCoeff();
  if (!(emax > kNegInf)) return 1.0;
  wj = (wj - emax).exp();
  const double total = wj.sum();
  const double lin = (wj * kj).sum();
  const double quad = wj.matrix().dot(Eigen::Map<const Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>>(gram, r, r) * wj.matrix());
  return 1.0 - 2.0 * lin / total + quad / (total * total);
}

}  // namespace

void SpecIndex::estimate_range(const Summary& s, const RowMatrix& qx, const RowMatrix& qt, const RowMatrix& qr,
                               const QueryTerms* terms, const ScoreOptions& options, std::size_t m_begin,
                               std::size_t m_end, const EstimateSink& sink) const {
  const int groups = s.groups;
  const Index queries = qx.rows();
  const bool weighted = options.scorer == Scorer::kWeighted && qt.rows() > 0;
  const bool residuals = s.residual_dims > 0;
  const float inv_tau = static_cast<float>(1.0 / options.tau);
  RowMatrix dots, tdots, rdots;
  std::vector<float> estimates;
  std::vector<double> w(static_cast<std::size_t>(groups)), kg(static_cast<std::size_t>(groups));
  Eigen::ArrayXf pw, pk;  // per point (residuals)
  for (std::size_t ma = m_begin; ma < m_end; ma += kEstimateBlock) {
    const std::size_t mb = std::min(m_end, ma + kEstimateBlock);
    const auto row = static_cast<Index>(ma) * groups, n = static_cast<Index>(mb - ma) * groups;
    const auto pa = static_cast<Index>(offsets_[ma]), len = static_cast<Index>(offsets_[mb]) - pa;
    dots.noalias() = qx * s.centres.middleRows(row, n).transpose();  // B x n
    if (residuals) {
      rdots.noalias() = qr * s.point_residuals.middleRows(pa, len).transpose();  // B x points
      if (weighted) tdots.noalias() = qt * s.point_prompts.middleRows(pa, len).transpose();
    } else if (weighted) {
      tdots.noalias() = qt * s.prompts.middleRows(row, n).transpose();
    }
    estimates.resize(mb - ma);
    for (Index q = 0; q < queries; ++q) {
      const QueryTerms& qterms = terms[q];
      const bool weights = weighted && qterms.weighted;
      for (std::size_t m = ma; m < mb; ++m) {
        const auto mi = static_cast<Index>(m);
        const Index o = static_cast<Index>(m - ma) * groups;
        if (residuals) {
          const auto p = static_cast<Index>(offsets_[m]), r = static_cast<Index>(offsets_[m + 1]) - p;
          estimates[m - ma] = static_cast<float>(estimate_with_residuals(
              s, p, r, gamma_(mi), beta_k_beta_(mi), &dots(q, o), &rdots(q, p - pa),
              weights ? &tdots(q, p - pa) : nullptr, zx_sqnorm_.data() + p, beta_.data() + p, log_beta_.data() + p,
              grams_.data() + gram_offsets_[m], qterms, options, inv_tau, pw, pk));
          continue;
        }
        estimates[m - ma] = static_cast<float>(estimate_model(s, row + o, gamma_(mi), beta_k_beta_(mi), &dots(q, o),
                                                              weights ? &tdots(q, o) : nullptr, qterms, options,
                                                              inv_tau, w.data(), kg.data()));
      }
      sink(q, ma, mb, estimates.data());
    }
  }
}

void SpecIndex::estimate_listed(const Summary& s, const float* qx, const float* qt, const float* qr,
                                const QueryTerms& terms, const ScoreOptions& options, const std::uint32_t* models,
                                std::size_t count, float* out) const {
  const int groups = s.groups;
  const bool weights = options.scorer == Scorer::kWeighted && qt && terms.weighted;
  const bool residuals = s.residual_dims > 0;
  const float inv_tau = static_cast<float>(1.0 / options.tau);
  const Eigen::Map<const Eigen::VectorXf> x(qx, s.centres.cols());
  const Eigen::Map<const Eigen::VectorXf> t(qt, weights ? s.prompts.cols() : 0);
  const Eigen::Map<const Eigen::VectorXf> xr(qr, residuals ? s.residual_dims : 0);
  Eigen::VectorXf dots(groups), tdots(groups), rdots;
  std::vector<double> w(static_cast<std::size_t>(groups)), kg(static_cast<std::size_t>(groups));
  Eigen::ArrayXf pw, pk;  // per point (residuals)
  for (std::size_t i = 0; i < count; ++i) {
    const auto m = static_cast<Index>(models[i]);
    const Index row = m * groups;
    dots.noalias() = s.centres.middleRows(row, groups) * x;
    if (residuals) {
      const auto p = static_cast<Index>(offsets_[static_cast<std::size_t>(m)]);
      const auto r = static_cast<Index>(offsets_[static_cast<std::size_t>(m) + 1]) - p;
      rdots.noalias() = s.point_residuals.middleRows(p, r) * xr;
      if (weights) tdots.noalias() = s.point_prompts.middleRows(p, r) * t;
      out[i] = static_cast<float>(estimate_with_residuals(
          s, p, r, gamma_(m), beta_k_beta_(m), dots.data(), rdots.data(), weights ? tdots.data() : nullptr,
          zx_sqnorm_.data() + p, beta_.data() + p, log_beta_.data() + p,
          grams_.data() + gram_offsets_[static_cast<std::size_t>(m)], terms, options, inv_tau, pw, pk));
      continue;
    }
    if (weights) tdots.noalias() = s.prompts.middleRows(row, groups) * t;
    out[i] = static_cast<float>(estimate_model(s, row, gamma_(m), beta_k_beta_(m), dots.data(),
                                               weights ? tdots.data() : nullptr, terms, options, inv_tau,
                                               w.data(), kg.data()));
  }
}

std::vector<std::uint32_t> SpecIndex::probed_models(const Summary& s, const RowMatrix& qx, Index q,
                                                    int probe, std::size_t least) const {
  const Index cells = s.cells.rows();
  const Eigen::VectorXf dist = s.cell_sqnorm - 2.0f * (s.cells * qx.row(q).transpose());
  std::vector<Index> order(static_cast<std::size_t>(cells));
  for (Index c = 0; c < cells; ++c) order[static_cast<std::size_t>(c)] = c;
  // Nearest first; NaN (a non-finite query) last; ties by cell.
  std::sort(order.begin(), order.end(), [&](Index a, Index b) {
    const bool na = std::isnan(dist(a)), nb = std::isnan(dist(b));
    if (na != nb) return nb;
    if (!na && dist(a) != dist(b)) return dist(a) < dist(b);
    return a < b;
  });
  // `probe` cells, and more while they list fewer than `least` models.
  std::vector<std::uint32_t> out;
  std::vector<bool> seen(size(), false);
  for (Index i = 0; i < cells && (i < probe || out.size() < least); ++i) {
    const auto c = static_cast<std::size_t>(order[static_cast<std::size_t>(i)]);
    for (std::size_t e = s.cell_offsets[c]; e < s.cell_offsets[c + 1]; ++e) {
      const std::uint32_t m = s.cell_members[e];
      if (!seen[m]) seen[m] = true, out.push_back(m);
    }
  }
  std::sort(out.begin(), out.end());
  return out;
}

namespace {

// The queries of a batch in a summary's bases (pseudo-prompts: no rows when the batch has
// none; their norms are in the query terms).
struct StageOneQueries {
  RowMatrix qx, qt, qr;  // qr: in the residual basis (no rows without residuals)
};

template <class Summary, class Prepared>
StageOneQueries in_bases(const Summary& s, const Prepared& p) {
  StageOneQueries q;
  q.qx = s.basis.size() ? RowMatrix(*p.qx * s.basis.transpose()) : *p.qx;
  if (p.prompts->rows() > 0) q.qt = s.basis_t.size() ? RowMatrix(*p.prompts * s.basis_t.transpose()) : *p.prompts;
  if (s.residual_dims > 0) q.qr = *p.qx * s.basis_r.transpose();
  return q;
}

void check_two_stage(const ScoreOptions& options, std::size_t candidates) {
  scoring_detail::check_options(options);
  if (!has_exact_stage(options.scorer))
    throw InputError(std::string("two-stage search: scorer ") + to_string(options.scorer) +
                     " has no exact stage (use weighted, rkme or nearest)");
  if (candidates == 0) throw InputError("two-stage search: candidates must be > 0");
}

// One query's best estimates so far: (estimate, model), at most 2 x keep before a cut back to
// the best `keep`, so an offer costs O(1) amortised.
class Shortlist {
 public:
  explicit Shortlist(std::size_t keep) : keep_(keep) { items_.reserve(2 * keep); }
  void offer(float estimate, std::size_t model) {
    if (items_.size() >= keep_ && !(Item{estimate, model} < bound_)) return;
    items_.push_back({estimate, model});
    if (items_.size() >= 2 * keep_) cut();
  }
  void merge(const Shortlist& other) {
    for (const Item& i : other.items_) offer(i.estimate, i.model);
  }
  // The best `keep` models, in index order (neighbouring models share a block in stage 2).
  std::vector<std::size_t> models() {
    cut();
    std::vector<std::size_t> out;
    out.reserve(items_.size());
    for (const Item& i : items_) out.push_back(i.model);
    std::sort(out.begin(), out.end());
    return out;
  }

 private:
  struct Item {
    float estimate;
    std::size_t model;
    // NaN last, then by estimate, then by index: a total order, so the cut is deterministic.
    bool operator<(const Item& o) const {
      const bool na = std::isnan(estimate), nb = std::isnan(o.estimate);
      if (na != nb) return nb;
      if (!na && estimate != o.estimate) return estimate < o.estimate;
      return model < o.model;
    }
  };
  void cut() {
    if (items_.size() > keep_) {
      std::nth_element(items_.begin(), items_.begin() + static_cast<std::ptrdiff_t>(keep_ - 1), items_.end());
      items_.resize(keep_);
    }
    if (items_.size() >= keep_) bound_ = *std::max_element(items_.begin(), items_.end());
  }
  std::size_t keep_;
  std::vector<Item> items_;
  Item bound_{std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<std::size_t>::max()};
};

}  // namespace

// Stage 1 over every model: the whole batch against every model's summary, the models split
// into one contiguous range per thread (each summary block read once per batch), each range
// keeping a shortlist per query; then the shortlists merged per query.
std::vector<std::vector<std::size_t>> SpecIndex::shortlist_all(const Summary& s, const RowMatrix& qx,
                                                               const RowMatrix& qt, const RowMatrix& qr,
                                                               const QueryTerms* terms, const ScoreOptions& options,
                                                               std::size_t keep, const std::vector<bool>* exclude) const {
  const std::size_t models = size();
  const auto batch = static_cast<std::size_t>(qx.rows());
  const auto threads = static_cast<std::size_t>(default_threads());
  const std::size_t ranges = std::max<std::size_t>(1, std::min(threads, models / kEstimateBlock));
  std::vector<std::vector<Shortlist>> lists(ranges, std::vector<Shortlist>(batch, Shortlist(keep)));
  parallel_for_rethrow(ranges, static_cast<int>(ranges), [&](std::size_t part) {
    std::vector<Shortlist>& mine = lists[part];
    estimate_range(s, qx, qt, qr, terms, options, models * part / ranges, models * (part + 1) / ranges,
                   [&](Index qi, std::size_t ma, std::size_t mb, const float* e) {
                     Shortlist& list = mine[static_cast<std::size_t>(qi)];
                     for (std::size_t m = ma; m < mb; ++m)
                       if (!exclude || !(*exclude)[m]) list.offer(e[m - ma], m);
                   });
  });
  std::vector<std::vector<std::size_t>> picks(batch);
  parallel_for_rethrow(batch, static_cast<int>(threads), [&](std::size_t qi) {
    for (std::size_t part = 1; part < ranges; ++part) lists[0][qi].merge(lists[part][qi]);
    picks[qi] = lists[0][qi].models();
  });
  return picks;
}

RowMatrixD SpecIndex::candidate_scores(const RowMatrix& xs, const RowMatrix& ts, const ScoreOptions& options,
                                       const TwoStage& search) const {
  check_two_stage(options, search.candidates);
  const std::shared_ptr<const Summary> s = summary(search);
  Prepared p;
  prepare(xs, ts, options, p);
  const StageOneQueries q = in_bases(*s, p);
  RowMatrixD out(xs.rows(), static_cast<Index>(size()));
  if (s->cells.rows() > 0) {  // the inverted file: only the probed cells' models
    out.setConstant(std::numeric_limits<double>::infinity());
    parallel_for_rethrow(static_cast<std::size_t>(xs.rows()), default_threads(), [&](std::size_t qi) {
      const auto qr = static_cast<Index>(qi);
      const std::vector<std::uint32_t> listed = probed_models(*s, q.qx, qr, search.probe, search.candidates);
      std::vector<float> e(listed.size());
      estimate_listed(*s, q.qx.row(qr).data(), q.qt.rows() > 0 ? q.qt.row(qr).data() : nullptr,
                      q.qr.rows() > 0 ? q.qr.row(qr).data() : nullptr, p.terms[qi], options, listed.data(),
                      listed.size(), e.data());
      for (std::size_t i = 0; i < listed.size(); ++i) out(qr, static_cast<Index>(listed[i])) = e[i];
    });
    return out;
  }
  const std::size_t blocks = (size() + kEstimateBlock - 1) / kEstimateBlock;
  parallel_for_rethrow(blocks, default_threads(), [&](std::size_t b) {
    estimate_range(*s, q.qx, q.qt, q.qr, p.terms.data(), options, b * kEstimateBlock,
                   std::min(size(), (b + 1) * kEstimateBlock),
                   [&](Index qi, std::size_t ma, std::size_t mb, const float* e) {
                     for (std::size_t m = ma; m < mb; ++m) out(qi, static_cast<Index>(m)) = e[m - ma];
                   });
  });
  return out;
}

std::vector<std::vector<RankedModel>> SpecIndex::rank_batch_two_stage(const RowMatrix& xs,
                                                                      const RowMatrix& ts,
                                                                      const ScoreOptions& options,
                                                                      const TwoStage& search,
                                                                      const std::vector<bool>* exclude) const {
  check_two_stage(options, search.candidates);
  const std::size_t candidates = search.candidates;
  const Index queries = xs.rows();
  const std::shared_ptr<const Summary> s = summary(search);  // (checks the shape, whatever follows)
  if (options.top_k <= 0 || candidates >= size() || size() == 0 || queries == 0)
    return rank_batch(xs, ts, options, exclude);
  if (exclude && exclude->size() != size())
    throw InputError("rank: the exclusion mask has " + std::to_string(exclude->size()) + " flags for " +
                     std::to_string(size()) + " models");
  const auto live = [exclude](std::size_t m) { return !exclude || !(*exclude)[m]; };
  Prepared p;
  prepare(xs, ts, options, p);
  const StageOneQueries q1 = in_bases(*s, p);
  const auto batch = static_cast<std::size_t>(queries);
  const auto threads = static_cast<std::size_t>(default_threads());

  // Stage 1 on a list of models per query, each list split into parts so that one query
  // still uses every core, each part keeping a shortlist, merged per query.
  const auto shortlist_listed = [&](const Summary& sum, const StageOneQueries& q,
                                    const std::vector<std::vector<std::uint32_t>>& listed, std::size_t keep) {
    const std::size_t parts = std::max<std::size_t>(1, (threads + batch - 1) / batch);
    std::vector<Shortlist> lists(batch * parts, Shortlist(keep));
    parallel_for_rethrow(batch * parts, static_cast<int>(threads), [&](std::size_t item) {
      const std::size_t qi = item / parts, part = item % parts;
      const std::vector<std::uint32_t>& mine = listed[qi];
      const std::size_t lo = mine.size() * part / parts, hi = mine.size() * (part + 1) / parts;
      std::vector<float> e(hi - lo);
      const auto qr = static_cast<Index>(qi);
      estimate_listed(sum, q.qx.row(qr).data(), q.qt.rows() > 0 ? q.qt.row(qr).data() : nullptr,
                      q.qr.rows() > 0 ? q.qr.row(qr).data() : nullptr, p.terms[qi], options, mine.data() + lo,
                      hi - lo, e.data());
      for (std::size_t i = lo; i < hi; ++i)
        if (live(mine[i])) lists[item].offer(e[i - lo], mine[i]);
    });
    std::vector<std::vector<std::size_t>> out(batch);
    parallel_for_rethrow(batch, static_cast<int>(threads), [&](std::size_t qi) {
      for (std::size_t part = 1; part < parts; ++part) lists[qi * parts].merge(lists[qi * parts + part]);
      out[qi] = lists[qi * parts].models();
    });
    return out;
  };
  const auto as_lists = [](const std::vector<std::vector<std::size_t>>& best) {
    std::vector<std::vector<std::uint32_t>> out(best.size());
    for (std::size_t qi = 0; qi < best.size(); ++qi) out[qi].assign(best[qi].begin(), best[qi].end());
    return out;
  };

  std::vector<std::vector<std::size_t>> picks;
  const bool cells = s->cells.rows() > 0, coarse = uses_coarse(search);
  if (!cells && !coarse) {
    picks = shortlist_all(*s, q1.qx, q1.qt, q1.qr, p.terms.data(), options, candidates, exclude);
  } else {
    // The models each query's residual estimate sees: its probed cells' (the inverted file),
    // then of those (or of all) the coarse pass's best.
    std::vector<std::vector<std::uint32_t>> listed(batch);
    if (cells)
      parallel_for_rethrow(batch, static_cast<int>(threads), [&](std::size_t qi) {
        listed[qi] = probed_models(*s, q1.qx, static_cast<Index>(qi), search.probe,
                                   coarse ? search.coarse : candidates);
      });
    if (coarse) {
      const std::shared_ptr<const Summary> c = summary(search.coarse_shape());
      const StageOneQueries qc = in_bases(*c, p);
      listed = as_lists(cells ? shortlist_listed(*c, qc, listed, search.coarse)
                              : shortlist_all(*c, qc.qx, qc.qt, qc.qr, p.terms.data(), options, search.coarse,
                                              exclude));
    }
    picks = shortlist_listed(*s, q1, listed, candidates);
  }

  // Stage 2: the exact score of each query's candidates, runs of consecutive models at a time.
  // A query's candidates are split into parts so that a small batch (one query) still uses
  // every core; each part keeps its own top-k, merged per query.
  const std::size_t k = std::min(candidates, static_cast<std::size_t>(options.top_k));
  const bool asc = ascending(options.scorer);
  const std::size_t parts = std::max<std::size_t>(1, std::min((threads + batch - 1) / batch, candidates / 64));
  std::vector<BoundedTopK> best(batch, BoundedTopK(k, asc, model_ids_));
  std::vector<std::mutex> merge(batch);
  parallel_for_rethrow(batch * parts, static_cast<int>(threads), [&](std::size_t item) {
    const std::size_t q = item / parts, part = item % parts;
    const auto qi = static_cast<Index>(q);
    const std::vector<std::size_t>& pick = picks[q];
    const std::size_t lo = pick.size() * part / parts, hi = pick.size() * (part + 1) / parts;
    const RowMatrix qx = p.qx->row(qi);
    const RowMatrix qt = p.prompts->rows() > 0 ? RowMatrix(p.prompts->row(qi)) : RowMatrix(0, 0);
    const QueryTerms& terms = p.terms[q];
    BoundedTopK top(k, asc, model_ids_);
    const BlockSink sink = [&](std::size_t ma, std::size_t mb, Index, Index, const double* scores) {
      for (std::size_t m = ma; m < mb; ++m) top.offer(scores[m - ma], m);
    };
    for (std::size_t i = lo; i < hi;) {
      std::size_t j = i + 1;
      while (j < hi && pick[j] == pick[j - 1] + 1) ++j;
      score_range(pick[i], pick[j - 1] + 1, qx, qt, &terms, options, nullptr, 0, &sink);
      i = j;
    }
    std::lock_guard lock(merge[q]);
    best[q].merge(top);
  });
  std::vector<std::vector<RankedModel>> out;
  out.reserve(best.size());
  for (const auto& b : best) out.push_back(b.ranked());
  return out;
}

}  // namespace gmi
