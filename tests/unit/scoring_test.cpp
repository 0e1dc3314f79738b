// SpecIndex scoring and ranking against hand-made specs and a direct scalar computation.
#include "gmi/scoring.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <initializer_list>
#include <limits>
#include <map>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "gmi/error.hpp"
#include "gmi/pipeline.hpp"
#include "gmi/rkme.hpp"

namespace gmi {
namespace {

const EncoderIdentity kImage{"test-image", "1", 4, 1.0};
const EncoderIdentity kText{"test-text", "1", 3, 1.0};

Spec make_spec(const std::string& id, const RowMatrix& zx, const RowMatrix& zt,
               const Eigen::VectorXf& beta, double gamma = 1.0, double downloads = 0,
               const EncoderIdentity& image = kImage, const EncoderIdentity& text = kText) {
  Spec s;
  s.model_id = id;
  s.image_encoder = image;
  s.text_encoder = text;
  s.image_encoder.dim = static_cast<int>(zx.cols());
  s.text_encoder.dim = static_cast<int>(zt.cols());
  s.n = 100;
  s.gamma = gamma;
  s.zx = zx;
  s.zt = zt;
  s.beta = beta;
  s.gram_x = gaussian_gram(zx, gamma);
  s.mean_x = zx.colwise().mean().transpose();
  s.downloads = downloads;
  return s;
}

RowMatrix random_rows(int rows, int cols, std::mt19937_64& rng) {
  std::normal_distribution<float> g;
  RowMatrix m(rows, cols);
  for (auto& v : m.reshaped()) v = g(rng);
  for (int i = 0; i < rows; ++i) m.row(i).normalize();
  return m;
}

// rows x cols with orthonormal rows.
RowMatrix orthonormal_rows(int rows, int cols, std::mt19937_64& rng) {
  const Eigen::MatrixXf g = random_rows(cols, rows, rng);
  const Eigen::HouseholderQR<Eigen::MatrixXf> qr(g);
  return (qr.householderQ() * Eigen::MatrixXf::Identity(cols, rows)).transpose();
}

Eigen::VectorXf random_simplex(int r, std::mt19937_64& rng) {
  std::uniform_real_distribution<float> u(0.05f, 1.0f);
  Eigen::VectorXf b(r);
  for (auto& v : b) v = u(rng);
  return b / b.sum();
}

std::vector<Spec> random_specs(int models, int d, int dt, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<Spec> specs;
  for (int m = 0; m < models; ++m) {
    const int r = 1 + (m * 5) % 9;  // r differs between models
    specs.push_back(make_spec("model-" + std::to_string(m), random_rows(r, d, rng),
                              random_rows(r, dt, rng), random_simplex(r, rng), 0.5 + 0.25 * (m % 3),
                              10.0 * m));
  }
  return specs;
}

// D_m written out from the definitions, in double, with no log-space tricks.
double direct_score(const Spec& s, const Eigen::VectorXf& x, const Eigen::VectorXf& t,
                    Scorer scorer, double tau) {
  const int r = s.r();
  auto k = [&](int j) {
    double d2 = 0;
    for (int c = 0; c < x.size(); ++c) {
      const double diff = static_cast<double>(s.zx(j, c)) - x(c);
      d2 += diff * diff;
    }
    return std::exp(-s.gamma * d2);
  };
  if (scorer == Scorer::kNearest) {
    double best = 0;
    for (int j = 0; j < r; ++j) best = std::max(best, k(j));
    return best;
  }
  if (scorer == Scorer::kMean) {
    double dot = 0, nm = 0, nx = 0;
    for (int c = 0; c < x.size(); ++c) {
      dot += static_cast<double>(s.mean_x(c)) * x(c);
      nm += static_cast<double>(s.mean_x(c)) * s.mean_x(c);
      nx += static_cast<double>(x(c)) * x(c);
    }
    return dot / std::sqrt(nm * nx);
  }
  if (scorer == Scorer::kPopularity) return s.downloads;
  std::vector<double> w(r);
  double total = 0;
  for (int j = 0; j < r; ++j) {
    w[j] = s.beta(j);
    if (scorer == Scorer::kWeighted) {
      double dot = 0, nz = 0, nt = 0;
      for (int c = 0; c < t.size(); ++c) {
        dot += static_cast<double>(s.zt(j, c)) * t(c);
        nz += static_cast<double>(s.zt(j, c)) * s.zt(j, c);
        nt += static_cast<double>(t(c)) * t(c);
      }
      w[j] *= std::exp((dot / std::sqrt(nz * nt) - 1) / tau);
    }
    total += w[j];
  }
  if (scorer == Scorer::kWeighted)
    for (auto& v : w) v /= total;
  double score = 1;
  for (int j = 0; j < r; ++j) {
    score -= 2 * w[j] * k(j);
    for (int l = 0; l < r; ++l)
      score += w[j] * w[l] *
               std::exp(-s.gamma * (s.zx.row(j) - s.zx.row(l)).cast<double>().squaredNorm());
  }
  return score;
}

Eigen::VectorXf unit(Eigen::VectorXf v) { return v / v.norm(); }

Eigen::VectorXf vec(std::initializer_list<float> values) {
  Eigen::VectorXf v(static_cast<Eigen::Index>(values.size()));
  std::copy(values.begin(), values.end(), v.data());
  return v;
}

TEST(Scoring, ScoresMatchADirectComputationAndMmdIsNonNegative) {
  const std::vector<Spec> specs = random_specs(9, 4, 3, 1);
  const SpecIndex index(specs);
  ASSERT_EQ(index.size(), 9u);
  std::mt19937_64 rng(2);
  for (int trial = 0; trial < 5; ++trial) {
    const Eigen::VectorXf x = random_rows(1, 4, rng).row(0).transpose();
    const Eigen::VectorXf t = random_rows(1, 3, rng).row(0).transpose();
    for (Scorer scorer :
         {Scorer::kWeighted, Scorer::kRkme, Scorer::kNearest, Scorer::kMean, Scorer::kPopularity}) {
      ScoreOptions o;
      o.scorer = scorer;
      o.tau = 0.3;
      const Eigen::VectorXd scores = index.score_all(x, t, o);
      ASSERT_EQ(scores.size(), 9);
      for (int m = 0; m < 9; ++m) {
        const double expected = direct_score(specs[m], x, t, scorer, o.tau);
        EXPECT_NEAR(scores(m), expected, 2e-5) << to_string(scorer) << " model " << m;
        if (ascending(scorer)) {
          EXPECT_GE(scores(m), 0.0);
        }
      }
    }
  }
}

TEST(Scoring, ModelOrderDoesNotChangeScores) {
  std::vector<Spec> specs = random_specs(6, 4, 3, 3);
  const SpecIndex forward(specs);
  std::reverse(specs.begin(), specs.end());
  const SpecIndex backward(specs);
  std::mt19937_64 rng(4);
  const Eigen::VectorXf x = random_rows(1, 4, rng).row(0).transpose();
  const Eigen::VectorXf t = random_rows(1, 3, rng).row(0).transpose();
  const Eigen::VectorXd a = forward.score_all(x, t, {}), b = backward.score_all(x, t, {});
  for (int m = 0; m < 6; ++m) {
    EXPECT_EQ(forward.model_ids()[m], backward.model_ids()[5 - m]);
    EXPECT_NEAR(a(m), b(5 - m), 1e-6);  // float dot products may round differently by row
  }
}

TEST(Scoring, EachModelScoresAsIfItWereAlone) {
  // Big enough to be split across threads and blocks: packing must keep every model intact.
  std::mt19937_64 rng(5);
  std::vector<Spec> specs;
  for (int m = 0; m < 500; ++m) {
    const int r = 20 + m % 13;
    specs.push_back(make_spec("m" + std::to_string(m), random_rows(r, 64, rng),
                              random_rows(r, 16, rng), random_simplex(r, rng), 0.8));
  }
  const std::vector<Spec> copy = specs;
  const SpecIndex index(std::move(specs));
  const Eigen::VectorXf x = random_rows(1, 64, rng).row(0).transpose();
  const Eigen::VectorXf t = random_rows(1, 16, rng).row(0).transpose();
  for (Scorer scorer : {Scorer::kWeighted, Scorer::kRkme, Scorer::kNearest}) {
    ScoreOptions o;
    o.scorer = scorer;
    const Eigen::VectorXd all = index.score_all(x, t, o);
    for (int m = 0; m < 500; m += 37) {
      const SpecIndex alone(std::vector<Spec>{copy[m]});
      EXPECT_NEAR(all(m), alone.score_all(x, t, o)(0), 1e-6) << to_string(scorer) << " " << m;
      EXPECT_NEAR(all(m), direct_score(copy[m], x, t, scorer, o.tau), 2e-5);
    }
  }
  EXPECT_EQ(index.offsets().size(), 501u);
  EXPECT_EQ(index.points(), index.offsets().back());
  EXPECT_EQ(index.all_zx().row(static_cast<Eigen::Index>(index.offsets()[7])), copy[7].zx.row(0));
}

TEST(Scoring, ScoreDecreasesAsTheQueryApproachesTheModel) {
  const Eigen::VectorXf p = unit(vec({1, 2, 0, 1}));
  const Eigen::VectorXf far = unit(vec({-1, 0, 3, -2}));
  RowMatrix zx1(1, 4), zt1(1, 3);
  zx1.row(0) = p.transpose();
  zt1 << 1, 0, 0;
  RowMatrix zx2(2, 4), zt2(2, 3);
  zx2.row(0) = p.transpose();
  zx2.row(1) = unit(vec({0, 1, 1, 1})).transpose();
  zt2 << 1, 0, 0, 0, 1, 0;
  const SpecIndex index({make_spec("one", zx1, zt1, Eigen::VectorXf::Ones(1), 2.0),
                         make_spec("two", zx2, zt2, vec({0.7f, 0.3f}), 2.0)});
  const Eigen::VectorXf t = vec({1, 0, 0});
  for (Scorer scorer : {Scorer::kWeighted, Scorer::kRkme}) {
    ScoreOptions o;
    o.scorer = scorer;
    Eigen::VectorXd previous = Eigen::VectorXd::Constant(2, INFINITY);
    for (int step = 0; step <= 10; ++step) {
      const float a = step / 10.0f;
      const Eigen::VectorXf x = unit((1 - a) * far + a * p);
      const Eigen::VectorXd s = index.score_all(x, t, o);
      EXPECT_LT(s(0), previous(0)) << to_string(scorer) << " step " << step;
      EXPECT_LT(s(1), previous(1)) << to_string(scorer) << " step " << step;
      previous = s;
    }
    EXPECT_NEAR(previous(0), 0.0, 1e-6);  // the query is the model's only point
  }
}

TEST(Scoring, LargeTauGivesTheUnweightedScore) {
  const SpecIndex index(random_specs(7, 4, 3, 6));
  std::mt19937_64 rng(7);
  const Eigen::VectorXf x = random_rows(1, 4, rng).row(0).transpose();
  const Eigen::VectorXf t = random_rows(1, 3, rng).row(0).transpose();
  ScoreOptions rkme;
  rkme.scorer = Scorer::kRkme;
  const Eigen::VectorXd expected = index.score_all(x, t, rkme);
  for (double tau : {1e9, double(INFINITY)}) {
    ScoreOptions o;
    o.tau = tau;
    const Eigen::VectorXd got = index.score_all(x, t, o);
    for (int m = 0; m < 7; ++m) EXPECT_NEAR(got(m), expected(m), 1e-6) << "tau " << tau;
  }
}

TEST(Scoring, SmallTauWeighsTheContentMatchedPoints) {
  // A and B hold the same images with the same weights, but the contents swapped: the
  // unweighted score cannot tell them apart, the prompt-weighted one must.
  const Eigen::VectorXf a1 = unit(vec({1, 0.2f, 0, 0}));
  const Eigen::VectorXf a2 = unit(vec({0, 0, 1, 0.3f}));
  const Eigen::VectorXf c1 = vec({1, 0, 0}), c2 = vec({0, 1, 0});
  RowMatrix zx(2, 4), zt_a(2, 3), zt_b(2, 3);
  zx.row(0) = a1.transpose();
  zx.row(1) = a2.transpose();
  zt_a.row(0) = c1.transpose();
  zt_a.row(1) = c2.transpose();
  zt_b.row(0) = c2.transpose();
  zt_b.row(1) = c1.transpose();
  RowMatrix zx_c(1, 4), zt_c(1, 3);
  zx_c.row(0) = unit(vec({1, 1, 1, 1})).transpose();
  zt_c.row(0) = unit(vec({1, 1, 1})).transpose();
  const Eigen::VectorXf half = vec({0.5f, 0.5f});
  const SpecIndex index({make_spec("b", zx, zt_b, half), make_spec("a", zx, zt_a, half),
                         make_spec("c", zx_c, zt_c, Eigen::VectorXf::Ones(1))});
  const Eigen::VectorXf x = unit(a1 + 0.05f * vec({0, 1, 0, 0}));
  ScoreOptions weighted;
  weighted.tau = 0.05;
  ScoreOptions rkme;
  rkme.scorer = Scorer::kRkme;
  const Eigen::VectorXd unweighted = index.score_all(x, c1, rkme);
  EXPECT_NEAR(unweighted(0), unweighted(1), 1e-9);
  EXPECT_EQ(index.rank(x, c1, weighted).front().model, "a");
  EXPECT_EQ(index.rank(x, c2, weighted).front().model, "b");
  const Eigen::VectorXd s = index.score_all(x, c1, weighted);
  EXPECT_LT(s(1), 0.01);  // a: nearly all weight on its point at a1
  EXPECT_GT(s(0), 0.5);   // b: nearly all weight on its point at a2
}

TEST(Scoring, TinyTauDoesNotUnderflow) {
  const SpecIndex index(random_specs(5, 4, 3, 8));
  std::mt19937_64 rng(9);
  const Eigen::VectorXf x = random_rows(1, 4, rng).row(0).transpose();
  const Eigen::VectorXf t = random_rows(1, 3, rng).row(0).transpose();
  ScoreOptions o;
  o.tau = 1e-6;  // exp((cos - 1) / tau) underflows to 0 for all but the best-matching point
  const Eigen::VectorXd s = index.score_all(x, t, o);
  EXPECT_TRUE(s.allFinite());
  EXPECT_GE(s.minCoeff(), 0.0);
}

TEST(Scoring, MissingOrZeroPseudoPromptFallsBackToBeta) {
  const SpecIndex index(random_specs(6, 4, 3, 10));
  std::mt19937_64 rng(11);
  const Eigen::VectorXf x = random_rows(1, 4, rng).row(0).transpose();
  ScoreOptions rkme;
  rkme.scorer = Scorer::kRkme;
  const Eigen::VectorXd expected = index.score_all(x, Eigen::VectorXf(), rkme);
  ScoreOptions o;
  o.tau = 0.01;
  EXPECT_TRUE(index.score_all(x, Eigen::VectorXf(), o).isApprox(expected, 1e-12));
  EXPECT_TRUE(index.score_all(x, Eigen::VectorXf::Zero(3), o).isApprox(expected, 1e-12));
}

TEST(Scoring, BatchScoresEqualSingleScores) {
  const SpecIndex index(random_specs(40, 4, 3, 12));
  std::mt19937_64 rng(13);
  for (int batch : {1, 5, 130}) {  // 130 spans two GEMM chunks of queries
    const RowMatrix xs = random_rows(batch, 4, rng);
    RowMatrix ts = random_rows(batch, 3, rng);
    ts.row(0).setZero();  // one query without a pseudo-prompt
    for (Scorer scorer :
         {Scorer::kWeighted, Scorer::kRkme, Scorer::kNearest, Scorer::kMean, Scorer::kPopularity}) {
      ScoreOptions o;
      o.scorer = scorer;
      const RowMatrixD all = index.score_all_batch(xs, ts, o);
      ASSERT_EQ(all.rows(), batch);
      ASSERT_EQ(all.cols(), 40);
      for (int q = 0; q < batch; ++q) {
        const Eigen::VectorXd one =
            index.score_all(xs.row(q).transpose(), ts.row(q).transpose(), o);
        for (int m = 0; m < 40; ++m)
          ASSERT_NEAR(all(q, m), one(m), 1e-5) << to_string(scorer) << " q" << q << " m" << m;
      }
      const auto ranked = index.rank_batch(xs, ts, o);
      ASSERT_EQ(static_cast<int>(ranked.size()), batch);
      EXPECT_EQ(ranked[0].size(), 10u);
    }
  }
}

TEST(Scoring, RankPutsTheBestFirstAndStopsAtK) {
  const std::vector<Spec> specs = random_specs(12, 4, 3, 14);
  const SpecIndex index(specs);
  std::mt19937_64 rng(15);
  const Eigen::VectorXf x = random_rows(1, 4, rng).row(0).transpose();
  const Eigen::VectorXf t = random_rows(1, 3, rng).row(0).transpose();
  for (Scorer scorer : {Scorer::kWeighted, Scorer::kNearest}) {
    ScoreOptions o;
    o.scorer = scorer;
    o.top_k = 4;
    const Eigen::VectorXd scores = index.score_all(x, t, o);
    const std::vector<RankedModel> top = index.rank(x, t, o);
    ASSERT_EQ(top.size(), 4u);
    std::vector<double> sorted(scores.data(), scores.data() + scores.size());
    if (ascending(scorer))
      std::sort(sorted.begin(), sorted.end());
    else
      std::sort(sorted.rbegin(), sorted.rend());
    for (int i = 0; i < 4; ++i) EXPECT_DOUBLE_EQ(top[i].score, sorted[i]);
    o.top_k = 0;
    EXPECT_EQ(index.rank(x, t, o).size(), 12u);
  }
}

// The streamed top-k (scores folded into a bounded heap per block, per thread) is exactly
// top_k of every score: the same models, in the same order, with the same scores, ties
// (identical specs under other ids) broken by id, on an index large enough to be split
// over threads, for single queries and batches, k below, at and above the hub's size.
TEST(Scoring, StreamedRankIsTopKOfEveryScore) {
  std::mt19937_64 rng(31);
  std::vector<Spec> specs;
  for (int m = 0; m < 700; ++m) {
    const int r = 4 + m % 13;
    specs.push_back(make_spec("m" + std::to_string(1000 + (m * 7919) % 700), random_rows(r, 64, rng),
                              random_rows(r, 16, rng), random_simplex(r, rng), 0.8, m));
  }
  for (int m = 0; m < 40; ++m) {  // exact duplicates: equal scores, told apart by id
    Spec twin = specs[static_cast<std::size_t>(m * 3)];
    twin.model_id = "dup-" + std::to_string(m);
    specs.push_back(std::move(twin));
  }
  const SpecIndex index(specs);
  const RowMatrix xs = random_rows(24, 64, rng), ts = random_rows(24, 16, rng);
  for (Scorer scorer : {Scorer::kWeighted, Scorer::kRkme, Scorer::kNearest, Scorer::kMean}) {
    for (int k : {1, 4, 37, 740, 5000}) {
      ScoreOptions o;
      o.scorer = scorer;
      o.top_k = k;
      const RowMatrixD all = index.score_all_batch(xs, ts, o);
      const auto batch = index.rank_batch(xs, ts, o);
      ASSERT_EQ(batch.size(), 24u);
      for (Eigen::Index q = 0; q < xs.rows(); ++q) {
        const auto want = top_k(all.row(q).transpose(), index.model_ids(), ascending(scorer), k);
        // One query goes through matrix-vector products: compare it with its own scores.
        const Eigen::VectorXf x = xs.row(q).transpose(), t = ts.row(q).transpose();
        const auto single = index.rank(x, t, o);
        const auto want_single = top_k(index.score_all(x, t, o), index.model_ids(), ascending(scorer), k);
        ASSERT_EQ(batch[q].size(), want.size());
        ASSERT_EQ(single.size(), want_single.size());
        for (std::size_t i = 0; i < want.size(); ++i) {
          EXPECT_EQ(batch[q][i].model, want[i].model) << to_string(scorer) << " k=" << k << " q=" << q << " i=" << i;
          EXPECT_EQ(batch[q][i].score, want[i].score);
          EXPECT_EQ(single[i].model, want_single[i].model);
          EXPECT_EQ(single[i].score, want_single[i].score);
        }
      }
    }
  }
  // The comparisons above met real ties: in a batch, a duplicate scores exactly as its
  // original (a single query's matrix-vector products may differ in the last bit).
  ScoreOptions o;
  const RowMatrixD all = index.score_all_batch(xs, ts, o);
  std::map<std::string, Eigen::Index> column;
  for (std::size_t m = 0; m < index.model_ids().size(); ++m) column[index.model_ids()[m]] = static_cast<Eigen::Index>(m);
  int ties = 0;
  for (int m = 0; m < 40; ++m) {
    const auto a = column[specs[static_cast<std::size_t>(m * 3)].model_id], b = column["dup-" + std::to_string(m)];
    for (Eigen::Index q = 0; q < all.rows(); ++q) ties += all(q, a) == all(q, b) ? 1 : 0;
  }
  EXPECT_GT(ties, 100);
}

// 300 random specs "m0".."m299", model m with r_min + m % r_span points of d (and dt) dims.
std::vector<Spec> specs_m0_to_m299(int r_min, int r_span, int d, int dt, double gamma, std::mt19937_64& rng) {
  std::vector<Spec> specs;
  for (int m = 0; m < 300; ++m) {
    const int r = r_min + m % r_span;
    specs.push_back(make_spec("m" + std::to_string(m), random_rows(r, d, rng), random_rows(r, dt, rng),
                              random_simplex(r, rng), gamma, m));
  }
  return specs;
}

// Checks that `two` (a two-stage answer, top 5) is the exact top-5 of the c models of best
// estimate in `estimates` (B x M, as candidate_scores gives them).
void expect_exact_top5_of_best(const SpecIndex& index, const RowMatrixD& exact, const RowMatrixD& estimates,
                               std::size_t c, Scorer scorer, const std::vector<std::vector<RankedModel>>& two) {
  ASSERT_EQ(two.size(), static_cast<std::size_t>(exact.rows()));
  for (Eigen::Index q = 0; q < exact.rows(); ++q) {
    const auto near = top_k(estimates.row(q).transpose(), index.model_ids(), true, static_cast<int>(c));
    std::vector<std::string> ids;
    Eigen::VectorXd sub(static_cast<Eigen::Index>(near.size()));
    for (const auto& n : near) {
      const auto m = std::stoi(n.model.substr(1));
      sub(static_cast<Eigen::Index>(ids.size())) = exact(q, m);
      ids.push_back(n.model);
    }
    const auto want = top_k(sub, ids, ascending(scorer), 5);
    ASSERT_EQ(two[q].size(), want.size()) << to_string(scorer) << " c=" << c;
    for (std::size_t i = 0; i < want.size(); ++i) {
      EXPECT_EQ(two[q][i].model, want[i].model) << to_string(scorer) << " c=" << c << " q=" << q;
      EXPECT_NEAR(two[q][i].score, want[i].score, 1e-6 * (1 + std::abs(want[i].score)));
    }
  }
}

// Two-stage search is the exact top-k of the candidates its first stage picks: the C models
// of best estimate (candidate_scores), whatever runs of consecutive models they form; C at or
// above the hub's size is exact search; scorers without an exact stage, C = 0 and summaries
// of impossible shapes are refused.
TEST(Scoring, TwoStageIsTheExactTopKOfItsBestEstimates) {
  std::mt19937_64 rng(53);
  const SpecIndex index(specs_m0_to_m299(3, 7, 24, 8, 0.9, rng));
  const RowMatrix xs = random_rows(9, 24, rng), ts = random_rows(9, 8, rng);
  for (Scorer scorer : {Scorer::kWeighted, Scorer::kRkme, Scorer::kNearest}) {
    ScoreOptions o;
    o.scorer = scorer;
    o.top_k = 5;
    const RowMatrixD exact = index.score_all_batch(xs, ts, o);
    SpecIndex::TwoStage search;
    search.clusters = 2;
    const RowMatrixD estimates = index.candidate_scores(xs, ts, o, search);
    for (std::size_t c : {std::size_t{5}, std::size_t{17}, std::size_t{120}}) {
      search.candidates = c;
      expect_exact_top5_of_best(index, exact, estimates, c, scorer, index.rank_batch_two_stage(xs, ts, o, search));
    }
    search.candidates = 300;
    const auto all = index.rank_batch_two_stage(xs, ts, o, search), full = index.rank_batch(xs, ts, o);
    for (std::size_t q = 0; q < full.size(); ++q)
      for (std::size_t i = 0; i < full[q].size(); ++i) EXPECT_EQ(all[q][i].model, full[q][i].model);
  }
  ScoreOptions mean;
  mean.scorer = Scorer::kMean;
  EXPECT_THROW(index.rank_batch_two_stage(xs, ts, mean, {}), InputError);
  EXPECT_THROW(index.candidate_scores(xs, ts, mean, {}), InputError);
  ScoreOptions w;
  EXPECT_THROW(index.rank_batch_two_stage(xs, ts, w, {0, 64, 32, 4}), InputError);
  EXPECT_THROW(index.rank_batch_two_stage(xs, ts, w, {10, -1, 32, 4}), InputError);
  EXPECT_THROW(index.rank_batch_two_stage(xs, ts, w, {10, 64, -1, 4}), InputError);
  EXPECT_THROW(index.rank_batch_two_stage(xs, ts, w, {10, 64, 32, 0}), InputError);
  EXPECT_THROW(index.rank_batch_two_stage(xs, ts, w, {10, 64, 32, 256}), InputError);
  EXPECT_THROW(index.rank_batch_two_stage(xs, ts, w, {10, 0, 0, 4, -1, 1}), InputError);
  EXPECT_THROW(index.rank_batch_two_stage(xs, ts, w, {10, 0, 0, 4, 8, 0}), InputError);
  EXPECT_THROW(index.rank_batch_two_stage(xs, ts, w, {10, 0, 0, 4, 8, 9}), InputError);
}

// The coarse pass: the residual estimate sees only the `coarse` models of best coarse
// estimate (groups alone, in their own directions), and the answer is the exact top-k of the
// best of those; it is skipped when it would keep every model (or no more than the
// candidates), and excluded models never come back from it.
TEST(Scoring, TheCoarsePassHandsOnItsBestEstimates) {
  std::mt19937_64 rng(71);
  const SpecIndex index(specs_m0_to_m299(3, 7, 24, 8, 0.9, rng));
  const RowMatrix xs = random_rows(9, 24, rng), ts = random_rows(9, 8, rng);
  for (Scorer scorer : {Scorer::kWeighted, Scorer::kRkme, Scorer::kNearest}) {
    ScoreOptions o;
    o.scorer = scorer;
    o.top_k = 5;
    const RowMatrixD exact = index.score_all_batch(xs, ts, o);
    SpecIndex::TwoStage search;
    search.candidates = 17;
    search.clusters = 2;
    search.residual_dims = 6;
    search.coarse = 60;
    search.coarse_dims = 4;
    search.coarse_prompt_dims = 2;
    search.coarse_clusters = 1;
    ASSERT_TRUE(index.uses_coarse(search));
    const RowMatrixD coarse = index.candidate_scores(xs, ts, o, search.coarse_shape());
    RowMatrixD fine = index.candidate_scores(xs, ts, o, search);
    for (Eigen::Index q = 0; q < xs.rows(); ++q) {
      const auto kept = top_k(coarse.row(q).transpose(), index.model_ids(), true, 60);
      std::set<std::string> ids;
      for (const auto& k : kept) ids.insert(k.model);
      for (Eigen::Index m = 0; m < fine.cols(); ++m)
        if (!ids.count(index.model_ids()[static_cast<std::size_t>(m)]))
          fine(q, m) = std::numeric_limits<double>::infinity();
    }
    expect_exact_top5_of_best(index, exact, fine, 17, scorer, index.rank_batch_two_stage(xs, ts, o, search));
    // With the inverted file, the coarse pass runs on the probed cells' models: probing every
    // cell, that is every model, and the answer is the one without the inverted file.
    SpecIndex::TwoStage cells = search;
    cells.lists = 8;
    cells.probe = 8;
    const auto with_cells = index.rank_batch_two_stage(xs, ts, o, cells),
               without = index.rank_batch_two_stage(xs, ts, o, search);
    for (std::size_t q = 0; q < without.size(); ++q)
      for (std::size_t i = 0; i < without[q].size(); ++i) EXPECT_EQ(with_cells[q][i].model, without[q][i].model);
    // A coarse pass that would keep every model is the search without it.
    SpecIndex::TwoStage all = search, none = search;
    all.coarse = 300;
    none.coarse = 0;
    EXPECT_FALSE(index.uses_coarse(all));
    const auto a = index.rank_batch_two_stage(xs, ts, o, all), b = index.rank_batch_two_stage(xs, ts, o, none);
    for (std::size_t q = 0; q < a.size(); ++q)
      for (std::size_t i = 0; i < a[q].size(); ++i) EXPECT_EQ(a[q][i].model, b[q][i].model);
    // Excluding every model but the first 100 keeps the answer among them.
    std::vector<bool> exclude(index.size(), false);
    for (std::size_t m = 100; m < index.size(); ++m) exclude[m] = true;
    for (const auto& ranked : index.rank_batch_two_stage(xs, ts, o, search, &exclude))
      for (const auto& r : ranked) {
        const auto it = std::find(index.model_ids().begin(), index.model_ids().end(), r.model);
        EXPECT_LT(it - index.model_ids().begin(), 100) << r.model;
      }
  }
  EXPECT_FALSE(index.uses_coarse({}));  // off by default
}

// The inverted file: a query's estimates are the full scan's for the models its probed cells
// list and +inf for the others; probing every cell lists every model; a probe whose cells
// list fewer models than the candidates visits more cells; a query at one of a model's
// points (a group per point) finds that model in its nearest cell; and the two-stage answer
// is the exact top-k of the best listed estimates.
TEST(Scoring, TheInvertedFileEstimatesOnlyTheModelsItsProbedCellsList) {
  std::mt19937_64 rng(67);
  const std::vector<Spec> specs = specs_m0_to_m299(3, 7, 24, 8, 0.9, rng);
  const SpecIndex index(specs);
  const RowMatrix xs = random_rows(9, 24, rng), ts = random_rows(9, 8, rng);
  for (Scorer scorer : {Scorer::kWeighted, Scorer::kRkme, Scorer::kNearest}) {
    ScoreOptions o;
    o.scorer = scorer;
    o.top_k = 5;
    const RowMatrixD full = index.candidate_scores(xs, ts, o, {17, 0, 0, 2});
    const RowMatrixD two_cells = index.candidate_scores(xs, ts, o, {17, 0, 0, 2, 16, 2});
    const RowMatrixD every_cell = index.candidate_scores(xs, ts, o, {17, 0, 0, 2, 16, 16});
    const RowMatrixD wide = index.candidate_scores(xs, ts, o, {200, 0, 0, 2, 16, 1});
    for (Eigen::Index q = 0; q < xs.rows(); ++q) {
      int listed = 0, listed_wide = 0;
      for (Eigen::Index m = 0; m < full.cols(); ++m) {
        if (std::isfinite(two_cells(q, m))) {
          ++listed;
          EXPECT_NEAR(two_cells(q, m), full(q, m), 1e-4);
        } else {
          EXPECT_EQ(two_cells(q, m), std::numeric_limits<double>::infinity());
        }
        ASSERT_TRUE(std::isfinite(every_cell(q, m)));
        EXPECT_NEAR(every_cell(q, m), full(q, m), 1e-4);
        listed_wide += std::isfinite(wide(q, m)) ? 1 : 0;
      }
      EXPECT_GE(listed, 17) << to_string(scorer) << " q=" << q;
      EXPECT_LT(listed, 250) << to_string(scorer) << " q=" << q;
      EXPECT_GE(listed_wide, 200) << to_string(scorer) << " q=" << q;
    }
    const RowMatrixD exact = index.score_all_batch(xs, ts, o);
    expect_exact_top5_of_best(index, exact, two_cells, 17, scorer,
                              index.rank_batch_two_stage(xs, ts, o, {17, 0, 0, 2, 16, 2}));
  }
  RowMatrix at_points(30, 24), prompts = random_rows(30, 8, rng);
  for (int q = 0; q < 30; ++q) at_points.row(q) = specs[static_cast<std::size_t>(q * 10)].zx.row(q % 3);
  const RowMatrixD own = index.candidate_scores(at_points, prompts, {}, {1, 0, 0, 9, 40, 1});
  for (int q = 0; q < 30; ++q) EXPECT_TRUE(std::isfinite(own(q, q * 10))) << "query " << q;
}

// With a group per reduced point and every dimension kept, the first stage's estimate is the
// exact score of every scorer (the nearest scorer's negated); with fewer groups it is not,
// unless each point's residual from its group's mean is kept in every direction.
TEST(Scoring, AGroupPerPointEstimatesTheExactScore) {
  std::mt19937_64 rng(59);
  const SpecIndex index(specs_m0_to_m299(3, 7, 24, 8, 0.9, rng));
  const RowMatrix xs = random_rows(6, 24, rng), ts = random_rows(6, 8, rng);
  for (Scorer scorer : {Scorer::kWeighted, Scorer::kRkme, Scorer::kNearest}) {
    ScoreOptions o;
    o.scorer = scorer;
    const RowMatrixD exact = index.score_all_batch(xs, ts, o);
    const RowMatrixD each = index.candidate_scores(xs, ts, o, {256, 0, 0, 9, 0, 32, 0});
    const RowMatrixD two = index.candidate_scores(xs, ts, o, {256, 0, 0, 2, 0, 32, 0});
    // Two groups, and every point's offset from its group's mean in all 24 directions: exact
    // again; in 2 directions, not.
    const RowMatrixD residuals = index.candidate_scores(xs, ts, o, {256, 0, 0, 2, 0, 32, 24});
    const RowMatrixD few = index.candidate_scores(xs, ts, o, {256, 0, 0, 2, 0, 32, 2});
    const double sign = scorer == Scorer::kNearest ? -1.0 : 1.0;
    double worst = 0, two_off = 0, residual_worst = 0, few_off = 0;
    for (Eigen::Index q = 0; q < xs.rows(); ++q)
      for (Eigen::Index m = 0; m < exact.cols(); ++m) {
        worst = std::max(worst, std::abs(sign * each(q, m) - exact(q, m)));
        two_off = std::max(two_off, std::abs(sign * two(q, m) - exact(q, m)));
        residual_worst = std::max(residual_worst, std::abs(sign * residuals(q, m) - exact(q, m)));
        few_off = std::max(few_off, std::abs(sign * few(q, m) - exact(q, m)));
      }
    EXPECT_LT(worst, 2e-5) << to_string(scorer);
    EXPECT_GT(two_off, 1e-3) << to_string(scorer);
    EXPECT_LT(residual_worst, 2e-5) << to_string(scorer);
    EXPECT_GT(few_off, 1e-3) << to_string(scorer);
  }
}

// The summary compares group means (and prompts) in their leading principal directions. When
// every reduced point lies in a 6-dimensional subspace, 6 directions lose nothing (the same
// estimates as in all d); 2 directions do lose something, so they are really used. The bytes
// are those of the bases and the per-group arrays.
TEST(Scoring, TheSummaryInItsPrincipalDirectionsLosesNothingWhenTheyHoldThePoints) {
  std::mt19937_64 rng(61);
  const RowMatrix basis = orthonormal_rows(6, 24, rng);
  std::vector<Spec> specs;
  for (int m = 0; m < 300; ++m)
    specs.push_back(make_spec("m" + std::to_string(m), random_rows(5, 6, rng) * basis, random_rows(5, 8, rng),
                              random_simplex(5, rng), 0.9, m));
  const SpecIndex index(std::move(specs));
  const RowMatrix xs = random_rows(12, 24, rng), ts = random_rows(12, 8, rng);
  ScoreOptions o;
  const std::size_t groups = 3, slots = 300 * groups;
  EXPECT_EQ(index.prepare_two_stage({17, 6, 0, 3, 0, 32, 0}),
            (6 * 24 + slots * 6 + slots * 8 + 2 * slots + slots * groups) * sizeof(float));
  EXPECT_EQ(index.prepare_two_stage({17, 24, 8, 3, 0, 32, 0}),
            (slots * 24 + slots * 8 + 2 * slots + slots * groups) * sizeof(float));
  // Residuals add a basis, and per point its group (a byte), offset and prompt.
  const std::size_t points = 300 * 5;
  EXPECT_EQ(index.prepare_two_stage({17, 24, 8, 3, 0, 32, 4}),
            (slots * 24 + slots * 8 + 2 * slots + slots * groups + 4 * 24 + points * 4 + points * 8) * sizeof(float) +
                points);
  const RowMatrixD full = index.candidate_scores(xs, ts, o, {17, 0, 0, 3});
  const RowMatrixD six = index.candidate_scores(xs, ts, o, {17, 6, 0, 3});
  const RowMatrixD two = index.candidate_scores(xs, ts, o, {17, 2, 0, 3});
  EXPECT_LT((six - full).cwiseAbs().maxCoeff(), 1e-5);
  EXPECT_GT((two - full).cwiseAbs().maxCoeff(), 1e-3);
  // The same for prompts: 8 of 8 directions is all of them, 2 are not.
  const RowMatrixD p2 = index.candidate_scores(xs, ts, o, {17, 0, 2, 3});
  EXPECT_GT((p2 - full).cwiseAbs().maxCoeff(), 1e-4);
  const auto a = index.rank_batch_two_stage(xs, ts, o, {17, 6, 0, 3});
  const auto b = index.rank_batch_two_stage(xs, ts, o, {17, 0, 0, 3});
  for (std::size_t q = 0; q < a.size(); ++q)
    for (std::size_t i = 0; i < a[q].size(); ++i) EXPECT_EQ(a[q][i].model, b[q][i].model);
}

// binary16 storage: about half the bytes, every score within binary16's rounding of the
// float32 one, the same top-4 (on unit embeddings whose models are not near-ties), and one
// query or a batch alike.
TEST(Scoring, HalfStorageHalvesTheBytesAndKeepsTheRanking) {
  std::mt19937_64 rng(41);
  const std::vector<Spec> specs = specs_m0_to_m299(8, 9, 96, 32, 6.0, rng);
  const SpecIndex f32(specs);
  const SpecIndex f16(specs, nullptr, SpecSpace::kRaw, SpecStorage::kF16);
  EXPECT_EQ(f16.storage(), SpecStorage::kF16);
  EXPECT_EQ(f16.points(), f32.points());
  EXPECT_LT(static_cast<double>(f16.memory_bytes()), 0.6 * static_cast<double>(f32.memory_bytes()));
  EXPECT_THROW(f16.all_zx(), InputError);
  // Queries near a model's points, as real queries are.
  RowMatrix xs(40, 96), ts(40, 32);
  for (int q = 0; q < 40; ++q) {
    const Spec& near = specs[static_cast<std::size_t>((q * 37) % 300)];
    xs.row(q) = near.zx.row(q % near.zx.rows()) + 0.3f * random_rows(1, 96, rng).row(0);
    ts.row(q) = near.zt.row(q % near.zt.rows()) + 0.3f * random_rows(1, 32, rng).row(0);
    xs.row(q).normalize();
    ts.row(q).normalize();
  }
  for (Scorer scorer : {Scorer::kWeighted, Scorer::kRkme, Scorer::kNearest}) {
    ScoreOptions o;
    o.scorer = scorer;
    o.top_k = 4;
    const RowMatrixD a = f32.score_all_batch(xs, ts, o), b = f16.score_all_batch(xs, ts, o);
    EXPECT_LT((a - b).cwiseAbs().maxCoeff(), 5e-3) << to_string(scorer);
    const auto ra = f32.rank_batch(xs, ts, o), rb = f16.rank_batch(xs, ts, o);
    int same = 0;
    for (std::size_t q = 0; q < ra.size(); ++q) {
      bool equal = true;
      for (std::size_t i = 0; i < 4; ++i) equal = equal && ra[q][i].model == rb[q][i].model;
      same += equal ? 1 : 0;
    }
    EXPECT_GE(same, 39) << to_string(scorer) << ": top-4 changed on " << 40 - same << " of 40 queries";
    for (Eigen::Index q = 0; q < 3; ++q) {
      const auto one = f16.rank(xs.row(q).transpose(), ts.row(q).transpose(), o);
      for (std::size_t i = 0; i < 4; ++i) EXPECT_EQ(one[i].model, rb[q][i].model);
    }
  }
  EXPECT_EQ(parse_storage("f16"), SpecStorage::kF16);
  EXPECT_THROW(parse_storage("bf16"), InputError);
}

// A hub held as binary16 has no float32 points to learn an interrogator from: asking for one
// is a clear error; without one (a score worker) it ranks with the prompts given.
TEST(Scoring, AHalfStorageHubBuildsNoHubLearnedInterrogator) {
  const std::vector<Spec> specs = random_specs(6, 4, 3, 21);
  IdentifyOptions o;
  o.storage = SpecStorage::kF16;
  EXPECT_THROW(Identifier(specs, specs[0].image_encoder, specs[0].text_encoder, nullptr, o), InputError);
  o.build_interrogator = false;
  const Identifier id(specs, specs[0].image_encoder, specs[0].text_encoder, nullptr, o);
  EXPECT_EQ(id.index().storage(), SpecStorage::kF16);
  std::mt19937_64 rng(22);
  const RowMatrix xs = random_rows(2, 4, rng), ts = random_rows(2, 3, rng);
  ScoreOptions so;
  so.top_k = 3;
  EXPECT_EQ(id.rank(xs, ts, so).at(1).results.size(), 3u);
}

// The identifier's search: exact below two_stage_from models, two-stage from there (or when
// asked for) once prepare_search() has built the summary; stage 2 sees only the candidates (2 of them: a top-2 whatever top_k, each with
// its exact score), and a scorer without an exact stage stays exact.
TEST(Scoring, TheIdentifierSearchesTwoStageFromItsThreshold) {
  const std::vector<Spec> specs = random_specs(40, 6, 3, 23);
  std::mt19937_64 rng(24);
  const RowMatrix xs = random_rows(3, 6, rng), ts = random_rows(3, 3, rng);
  IdentifyOptions o;
  o.build_interrogator = false;
  o.two_stage.candidates = 2;
  o.two_stage_from = 41;
  ScoreOptions so;
  so.top_k = 5;
  const auto make = [&] { return Identifier(specs, specs[0].image_encoder, specs[0].text_encoder, nullptr, o); };
  const Identifier small = make();
  EXPECT_FALSE(small.two_stage());
  EXPECT_EQ(small.rank(xs, ts, so).at(0).results.size(), 5u);
  o.two_stage_from = 40;
  const Identifier big = make();
  EXPECT_TRUE(big.two_stage());
  // Exact until its summary is built.
  EXPECT_EQ(big.rank(xs, ts, so).at(0).results.size(), 5u);
  big.prepare_search();
  const RowMatrixD exact = big.index().score_all_batch(xs, ts, so);
  const auto two = big.rank(xs, ts, so);
  for (Eigen::Index q = 0; q < xs.rows(); ++q) {
    ASSERT_EQ(two[static_cast<std::size_t>(q)].results.size(), 2u);
    for (const auto& r : two[static_cast<std::size_t>(q)].results) {
      const auto m = std::find(big.index().model_ids().begin(), big.index().model_ids().end(), r.model) -
                     big.index().model_ids().begin();
      EXPECT_NEAR(r.score, exact(q, m), 1e-6 * (1 + std::abs(exact(q, m))));
    }
  }
  ScoreOptions mean = so;
  mean.scorer = Scorer::kMean;
  EXPECT_EQ(big.rank(xs, ts, mean).at(0).results.size(), 5u);
  o.search = SearchMode::kExact;
  o.two_stage_from = 1;
  EXPECT_FALSE(make().two_stage());
  o.search = SearchMode::kTwoStage;
  o.two_stage_from = 1000;
  EXPECT_TRUE(make().two_stage());
  EXPECT_EQ(parse_search("two-stage"), SearchMode::kTwoStage);
  EXPECT_EQ(parse_search(to_string(SearchMode::kExact)), SearchMode::kExact);
  EXPECT_EQ(parse_search("auto"), SearchMode::kAuto);
  EXPECT_THROW(parse_search("fast"), InputError);
}

TEST(TopK, BreaksTiesByModelIdAndHandlesK) {
  const std::vector<std::string> ids{"d", "b", "a", "c", "e"};
  Eigen::VectorXd scores(5);
  scores << 0.5, 0.2, 0.5, 0.2, 0.9;
  auto names = [](const std::vector<RankedModel>& r) {
    std::string out;
    for (const auto& m : r) out += m.model;
    return out;
  };
  EXPECT_EQ(names(top_k(scores, ids, true, 3)), "bca");
  EXPECT_EQ(names(top_k(scores, ids, false, 3)), "ead");
  EXPECT_EQ(names(top_k(scores, ids, true, 0)), "bcade");
  EXPECT_EQ(names(top_k(scores, ids, true, -1)), "bcade");
  EXPECT_EQ(names(top_k(scores, ids, true, 50)), "bcade");
  EXPECT_EQ(top_k(scores, ids, true, 1).front().score, 0.2);
  EXPECT_TRUE(top_k(Eigen::VectorXd(), {}, true, 3).empty());
  EXPECT_THROW(top_k(scores, {"a"}, true, 3), InputError);
}

TEST(Scoring, PopularityRanksByDownloads) {
  std::vector<Spec> specs = random_specs(4, 4, 3, 16);
  specs[0].downloads = 5;
  specs[1].downloads = 500;
  specs[2].downloads = 50;
  specs[3].downloads = 500;
  const SpecIndex index(specs);
  ScoreOptions o;
  o.scorer = Scorer::kPopularity;
  const auto ranked = index.rank(Eigen::VectorXf::Zero(4), Eigen::VectorXf(), o);
  ASSERT_EQ(ranked.size(), 4u);
  EXPECT_EQ(ranked[0].model, "model-1");  // tie with model-3, broken by id
  EXPECT_EQ(ranked[1].model, "model-3");
  EXPECT_EQ(ranked[2].model, "model-2");
  EXPECT_EQ(ranked[3].model, "model-0");
  EXPECT_EQ(ranked[0].score, 500);
}

TEST(Scoring, MeanBaselineIsTheCosineToTheSampleMean) {
  RowMatrix zx(1, 4), zt(1, 3);
  zx << 1, 0, 0, 0;
  zt << 1, 0, 0;
  Spec near = make_spec("near", zx, zt, Eigen::VectorXf::Ones(1));
  near.mean_x = vec({2, 0, 0, 0});
  Spec far = make_spec("far", zx, zt, Eigen::VectorXf::Ones(1));
  far.mean_x = vec({1, 1, 0, 0});
  Spec none = make_spec("none", zx, zt, Eigen::VectorXf::Ones(1));
  none.mean_x = Eigen::VectorXf();  // no mean recorded: cosine 0
  const SpecIndex index({far, none, near});
  ScoreOptions o;
  o.scorer = Scorer::kMean;
  const Eigen::VectorXd s = index.score_all(vec({3, 0, 0, 0}), Eigen::VectorXf(), o);
  EXPECT_NEAR(s(0), std::sqrt(0.5), 1e-6);
  EXPECT_EQ(s(1), 0.0);
  EXPECT_NEAR(s(2), 1.0, 1e-6);
  EXPECT_EQ(index.rank(vec({3, 0, 0, 0}), Eigen::VectorXf(), o).front().model, "near");
}

TEST(Scoring, NearestBaselineIsTheBestKernelValue) {
  RowMatrix zx_a(2, 4), zx_b(1, 4), zt_a(2, 3), zt_b(1, 3);
  zx_a << 1, 0, 0, 0, 0, 1, 0, 0;
  zx_b << 0.6f, 0.8f, 0, 0;
  zt_a.setOnes();
  zt_b.setOnes();
  // a's second point sits on the query, with little weight: nearest picks a, rkme picks b.
  const SpecIndex index({make_spec("a", zx_a, zt_a, vec({0.95f, 0.05f})),
                         make_spec("b", zx_b, zt_b, Eigen::VectorXf::Ones(1))});
  const Eigen::VectorXf x = vec({0, 1, 0, 0});
  ScoreOptions o;
  o.scorer = Scorer::kNearest;
  const Eigen::VectorXd s = index.score_all(x, Eigen::VectorXf(), o);
  EXPECT_NEAR(s(0), 1.0, 1e-6);
  EXPECT_NEAR(s(1), std::exp(-(0.36 + 0.04)), 1e-6);
  EXPECT_EQ(index.rank(x, Eigen::VectorXf(), o).front().model, "a");
  o.scorer = Scorer::kRkme;
  EXPECT_EQ(index.rank(x, Eigen::VectorXf(), o).front().model, "b");
}

TEST(Scoring, SpecsFromAnotherEncoderAreRejected) {
  std::vector<Spec> specs = random_specs(3, 4, 3, 17);
  specs[2].image_encoder.version = "2";
  try {
    SpecIndex index(specs);
    FAIL() << "no EncoderMismatchError";
  } catch (const EncoderMismatchError& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find("model-2"), std::string::npos) << what;
    EXPECT_NE(what.find("test-image/2/4"), std::string::npos) << what;
    EXPECT_NE(what.find("test-image/1/4"), std::string::npos) << what;
  }
  specs = random_specs(3, 4, 3, 17);
  specs[1].text_encoder.name = "other";
  EXPECT_THROW(SpecIndex{specs}, EncoderMismatchError);

  const SpecIndex index(random_specs(3, 4, 3, 17));
  EncoderIdentity image = kImage, text = kText;
  EXPECT_NO_THROW(index.check_compatible(image, text));
  image.name = "clip";
  EXPECT_THROW(index.check_compatible(image, text), EncoderMismatchError);
  image = kImage;
  text.dim = 512;
  EXPECT_THROW(index.check_compatible(image, text), EncoderMismatchError);
}

TEST(Scoring, MalformedSpecsAreRejected) {
  std::vector<Spec> specs = random_specs(3, 4, 3, 18);
  specs[1].gram_x = RowMatrix::Ones(2, 2);
  EXPECT_THROW(SpecIndex{specs}, SpecFormatError);
  specs = random_specs(3, 4, 3, 18);
  specs[2].beta(0) = -0.1f;
  EXPECT_THROW(SpecIndex{specs}, SpecFormatError);
  specs = random_specs(3, 4, 3, 18);
  specs[0].zx(0, 0) = NAN;
  EXPECT_THROW(SpecIndex{specs}, SpecFormatError);
  specs = random_specs(3, 4, 3, 18);
  specs[2].model_id = specs[0].model_id;
  EXPECT_THROW(SpecIndex{specs}, InputError);
}

TEST(Scoring, RejectsBadQueriesAndOptions) {
  const SpecIndex index(random_specs(3, 4, 3, 19));
  ScoreOptions o;
  EXPECT_THROW(index.score_all(Eigen::VectorXf::Ones(5), Eigen::VectorXf(), o), InputError);
  EXPECT_THROW(index.score_all(Eigen::VectorXf::Ones(4), Eigen::VectorXf::Ones(2), o), InputError);
  Eigen::VectorXf x = Eigen::VectorXf::Ones(4);
  x(2) = NAN;
  EXPECT_THROW(index.score_all(x, Eigen::VectorXf(), o), InputError);
  o.tau = 0;
  EXPECT_THROW(index.score_all(Eigen::VectorXf::Ones(4), Eigen::VectorXf(), o), InputError);
  o = ScoreOptions{};
  EXPECT_THROW(index.score_all_batch(RowMatrix::Ones(3, 4), RowMatrix::Ones(2, 3), o), InputError);
}

TEST(Scoring, EmptyIndexScoresNothing) {
  const SpecIndex index(std::vector<Spec>{});
  EXPECT_EQ(index.size(), 0u);
  EXPECT_EQ(index.score_all(Eigen::VectorXf::Ones(4), Eigen::VectorXf(), {}).size(), 0);
  EXPECT_TRUE(index.rank(Eigen::VectorXf::Ones(4), Eigen::VectorXf(), {}).empty());
  EXPECT_EQ(index.score_all_batch(RowMatrix::Ones(2, 4), RowMatrix(), {}).cols(), 0);
  EXPECT_NO_THROW(index.check_compatible(kImage, kText));
  EXPECT_EQ(SpecIndex().size(), 0u);
}

TEST(Scoring, ScorerNamesRoundTrip) {
  for (Scorer s :
       {Scorer::kWeighted, Scorer::kRkme, Scorer::kMean, Scorer::kNearest, Scorer::kPopularity})
    EXPECT_EQ(parse_scorer(to_string(s)), s);
  EXPECT_THROW(parse_scorer("cosine"), InputError);
  EXPECT_TRUE(ascending(Scorer::kWeighted));
  EXPECT_TRUE(ascending(Scorer::kRkme));
  EXPECT_FALSE(ascending(Scorer::kMean));
  EXPECT_FALSE(ascending(Scorer::kNearest));
  EXPECT_FALSE(ascending(Scorer::kPopularity));
}

}  // namespace
}  // namespace gmi
