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
// With C >= r every point is its own group and the estimate is the exact score. The dot
// products c_g . x and u_g . t are taken in the leading principal directions of the groups'
// means and prompts (of a sample of models), the norms ||c_g||^2 in full.
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
  std::size_t bytes() const {
    return static_cast<std::size_t>(basis.size() + basis_t.size() + centres.size() + prompts.size() +
                                    far.size() + log_mass.size()) *
               sizeof(float) +
           gram.size() * sizeof(float);
  }
};

std::shared_ptr<const SpecIndex::Summary> SpecIndex::summary(const TwoStage& search) const {
  if (search.dims < 0 || search.prompt_dims < 0)
    throw InputError("two-stage search: dims and prompt_dims must be >= 0 (got " +
                     std::to_string(search.dims) + ", " + std::to_string(search.prompt_dims) + ")");
  if (search.clusters < 1 || search.clusters > 255)
    throw InputError("two-stage search: clusters must be in 1..255 (got " + std::to_string(search.clusters) + ")");
  const Index d = dx_, dt = dt_;
  // No fewer dimensions than there are: all of them.
  const int dims = search.dims >= d ? 0 : search.dims;
  const int pdims = search.prompt_dims >= dt ? 0 : search.prompt_dims;
  const int groups = search.clusters;
  std::lock_guard lock(summaries_->mutex);
  auto& slot = summaries_->by_shape[{dims, pdims, groups}];
  if (slot) return slot;

  const auto models = size();
  auto out = std::make_shared<Summary>();
  Summary& s = *out;
  s.groups = groups;
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

  // The bases, from the groups of a strided sample of models.
  if (dims > 0 || pdims > 0) {
    const auto sample = static_cast<std::size_t>(std::min<Index>(static_cast<Index>(models), kBasisSample));
    Eigen::MatrixXd ax(static_cast<Index>(sample) * groups, d), at(static_cast<Index>(sample) * groups, dt);
    parallel_for_rethrow(sample, default_threads(), [&](std::size_t i) {
      Groups g;
      group_means(i * models / sample, g);
      ax.middleRows(static_cast<Index>(i) * groups, groups) = g.cx;
      at.middleRows(static_cast<Index>(i) * groups, groups) = g.ct;
    });
    if (dims > 0) s.basis = leading_directions(ax, dims, 0x5eedULL + static_cast<std::uint64_t>(dims));
    if (pdims > 0) s.basis_t = leading_directions(at, pdims, 0x7e47ULL + static_cast<std::uint64_t>(pdims));
  }

  // Pass 2: every model's summary.
  s.centres.resize(slots, dims > 0 ? dims : d);
  s.prompts.resize(slots, pdims > 0 ? pdims : dt);
  s.far.resize(slots);
  s.log_mass.resize(slots);
  s.gram.assign(static_cast<std::size_t>(slots) * static_cast<std::size_t>(groups), 0.0f);
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
  slot = std::move(out);
  return slot;
}

std::size_t SpecIndex::prepare_two_stage(const TwoStage& search) const { return summary(search)->bytes(); }

void SpecIndex::estimate_range(const Summary& s, const RowMatrix& qx, const RowMatrix& qt,
                               const QueryTerms* terms, const ScoreOptions& options, std::size_t m_begin,
                               std::size_t m_end, const EstimateSink& sink) const {
  const int groups = s.groups;
  const Index queries = qx.rows();
  const bool weighted = options.scorer == Scorer::kWeighted && qt.rows() > 0;
  const float inv_tau = static_cast<float>(1.0 / options.tau);
  RowMatrix dots, tdots;
  std::vector<float> estimates;
  std::vector<double> w(static_cast<std::size_t>(groups)), kg(static_cast<std::size_t>(groups));
  for (std::size_t ma = m_begin; ma < m_end; ma += kEstimateBlock) {
    const std::size_t mb = std::min(m_end, ma + kEstimateBlock);
    const auto row = static_cast<Index>(ma) * groups, n = static_cast<Index>(mb - ma) * groups;
    dots.noalias() = qx * s.centres.middleRows(row, n).transpose();  // B x n
    if (weighted) tdots.noalias() = qt * s.prompts.middleRows(row, n).transpose();
    estimates.resize(mb - ma);
    for (Index q = 0; q < queries; ++q) {
      const QueryTerms& qterms = terms[q];
      const bool weights = weighted && qterms.weighted;
      for (std::size_t m = ma; m < mb; ++m) {
        const auto mi = static_cast<Index>(m);
        const Index o = static_cast<Index>(m - ma) * groups;
        const double gamma = gamma_(mi);
        double nearest = 0;
        for (int c = 0; c < groups; ++c) {
          // -(||c||^2 + s^2 + ||x||^2 - 2 c.x), never above 0 (a distance is >= 0)
          const double e = s.far(row + o + c) - qterms.x_sqnorm + 2.0 * dots(q, o + c);
          kg[static_cast<std::size_t>(c)] = s.log_mass(row + o + c) == kNegInf ? 0.0 : std::exp(gamma * std::min(e, 0.0));
          nearest = std::max(nearest, kg[static_cast<std::size_t>(c)]);
        }
        double estimate;
        if (options.scorer == Scorer::kNearest) {
          estimate = -nearest;
        } else if (!weights) {
          double lin = 0;
          for (int c = 0; c < groups; ++c) lin += std::exp(static_cast<double>(s.log_mass(row + o + c))) * kg[static_cast<std::size_t>(c)];
          estimate = 1.0 - 2.0 * lin + beta_k_beta_(mi);
        } else {
          float emax = kNegInf;
          for (int c = 0; c < groups; ++c) {
            const float e = s.log_mass(row + o + c) + (tdots(q, o + c) * qterms.inv_t_norm - 1.0f) * inv_tau;
            w[static_cast<std::size_t>(c)] = e;
            emax = std::max(emax, e);
          }
          if (!(emax > kNegInf)) {
            estimate = 1.0;
          } else {
            double total = 0;
            for (auto& v : w) total += (v = std::exp(v - emax));
            double lin = 0, quad = 0;
            const float* gram = s.gram.data() + static_cast<std::size_t>(row + o) * static_cast<std::size_t>(groups);
            for (int c = 0; c < groups; ++c) {
              const double wc = w[static_cast<std::size_t>(c)] / total;
              lin += wc * kg[static_cast<std::size_t>(c)];
              double a = 0;
              for (int e = 0; e < groups; ++e) a += static_cast<double>(gram[c * groups + e]) * w[static_cast<std::size_t>(e)];
              quad += wc * a / total;
            }
            estimate = 1.0 - 2.0 * lin + quad;
          }
        }
        estimates[m - ma] = static_cast<float>(estimate);
      }
      sink(q, ma, mb, estimates.data());
    }
  }
}

namespace {

// The queries of a batch in a summary's bases (pseudo-prompts: no rows when the batch has
// none; their norms are in the query terms).
struct StageOneQueries {
  RowMatrix qx, qt;
};

template <class Summary, class Prepared>
StageOneQueries in_bases(const Summary& s, const Prepared& p) {
  StageOneQueries q;
  q.qx = s.basis.size() ? RowMatrix(*p.qx * s.basis.transpose()) : *p.qx;
  if (p.prompts->rows() > 0) q.qt = s.basis_t.size() ? RowMatrix(*p.prompts * s.basis_t.transpose()) : *p.prompts;
  return q;
}

void check_two_stage(const ScoreOptions& options, std::size_t candidates) {
  scoring_detail::check_options(options);
  if (options.scorer == Scorer::kMean || options.scorer == Scorer::kPopularity)
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

RowMatrixD SpecIndex::candidate_scores(const RowMatrix& xs, const RowMatrix& ts, const ScoreOptions& options,
                                       const TwoStage& search) const {
  check_two_stage(options, search.candidates);
  const std::shared_ptr<const Summary> s = summary(search);
  Prepared p;
  prepare(xs, ts, options, p);
  const StageOneQueries q = in_bases(*s, p);
  RowMatrixD out(xs.rows(), static_cast<Index>(size()));
  const std::size_t blocks = (size() + kEstimateBlock - 1) / kEstimateBlock;
  parallel_for_rethrow(blocks, default_threads(), [&](std::size_t b) {
    estimate_range(*s, q.qx, q.qt, p.terms.data(), options, b * kEstimateBlock,
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
                                                                      const TwoStage& search) const {
  check_two_stage(options, search.candidates);
  const std::size_t candidates = search.candidates;
  const Index queries = xs.rows();
  const std::shared_ptr<const Summary> s = summary(search);  // (checks the shape, whatever follows)
  if (options.top_k <= 0 || candidates >= size() || size() == 0 || queries == 0)
    return rank_batch(xs, ts, options);
  Prepared p;
  prepare(xs, ts, options, p);
  const StageOneQueries q1 = in_bases(*s, p);
  const auto batch = static_cast<std::size_t>(queries);
  const auto threads = static_cast<std::size_t>(default_threads());

  // Stage 1: the whole batch against every model's summary, the models split into one
  // contiguous range per thread (each summary block read once per batch), each range keeping
  // a shortlist per query; then the shortlists merged per query.
  const std::size_t ranges = std::max<std::size_t>(1, std::min(threads, size() / kEstimateBlock));
  std::vector<std::vector<Shortlist>> lists(ranges, std::vector<Shortlist>(batch, Shortlist(candidates)));
  parallel_for_rethrow(ranges, static_cast<int>(ranges), [&](std::size_t part) {
    std::vector<Shortlist>& mine = lists[part];
    estimate_range(*s, q1.qx, q1.qt, p.terms.data(), options, size() * part / ranges,
                   size() * (part + 1) / ranges, [&](Index q, std::size_t ma, std::size_t mb, const float* e) {
                     Shortlist& list = mine[static_cast<std::size_t>(q)];
                     for (std::size_t m = ma; m < mb; ++m) list.offer(e[m - ma], m);
                   });
  });
  std::vector<std::vector<std::size_t>> picks(batch);
  parallel_for_rethrow(batch, static_cast<int>(threads), [&](std::size_t q) {
    for (std::size_t part = 1; part < ranges; ++part) lists[0][q].merge(lists[part][q]);
    picks[q] = lists[0][q].models();
  });

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
