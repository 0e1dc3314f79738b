// The hub-learned metric: what it learns (whitening, the discriminant step), its file
// format, and scoring in its mapped space.
#include "gmi/metric.hpp"

#include <gtest/gtest.h>

#include <random>
#include <string>
#include <vector>

#include "gmi/error.hpp"
#include "gmi/pipeline.hpp"
#include "gmi/rkme.hpp"
#include "gmi/scoring.hpp"
#include "spec_fixtures.hpp"

namespace gmi {
namespace {

constexpr int kD = 12;       // raw dimension
constexpr int kStyle = 3;    // the first kStyle dims carry each model's style
constexpr int kDt = 4;

const EncoderIdentity kImage{"synthetic", "1", kD, 1.0};
const EncoderIdentity kText{"synthetic-text", "1", kDt, 1.0};

// The style dims vary 300x less than the content dims here, far more unevenly than real
// features: the default shrinkage (relative to the mean variance) would swamp them.
MetricOptions light_shrinkage() {
  MetricOptions o;
  o.shrinkage = 0.01;
  return o;
}

// Samples of model m: its style offset in the first kStyle dims plus content that varies a
// lot in the other dims and is the same distribution for every model (the nuisance).
RowMatrix samples(const RowMatrix& styles, int m, int n, std::mt19937& rng) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  RowMatrix x(n, kD);
  for (int i = 0; i < n; ++i)
    for (int j = 0; j < kD; ++j)
      x(i, j) = (j < kStyle ? styles(m, j) + 0.06f * normal(rng) : 1.5f * normal(rng));
  return x;
}

struct Hub {
  RowMatrix styles;
  std::vector<Spec> specs;
};

Hub make_hub(int models, unsigned seed, int n = 48) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  Hub hub;
  hub.styles.resize(models, kStyle);
  for (Eigen::Index i = 0; i < hub.styles.size(); ++i) hub.styles.data()[i] = 0.5f * normal(rng);
  SpecBuildOptions opt;
  opt.rkme.reduced_size = 12;
  opt.rkme.gamma = 0.02;
  opt.rkme.lambda = 0.5;
  for (int m = 0; m < models; ++m) {
    RowMatrix x = samples(hub.styles, m, n, rng);
    RowMatrix t(n, kDt);
    for (Eigen::Index i = 0; i < t.size(); ++i) t.data()[i] = normal(rng);
    hub.specs.push_back(build_spec_from_embeddings("m" + std::to_string(100 + m), x, t, kImage, kText, opt));
  }
  return hub;
}

double top1(const SpecIndex& index, const Hub& hub, unsigned seed, int per_model = 6) {
  std::mt19937 rng(seed);
  const auto m_count = static_cast<int>(hub.specs.size());
  int right = 0;
  ScoreOptions o;
  o.scorer = Scorer::kRkme;
  o.top_k = 1;
  for (int m = 0; m < m_count; ++m) {
    RowMatrix q = samples(hub.styles, m, per_model, rng);
    auto ranked = index.rank_batch(q, RowMatrix(0, 0), o);
    for (const auto& r : ranked) right += r.front().model == hub.specs[static_cast<std::size_t>(m)].model_id;
  }
  return static_cast<double>(right) / (m_count * per_model);
}

TEST(Metric, WhitensTheWithinModelScatterOfTheReducedPoints) {
  const Hub hub = make_hub(12, 3);
  const MetricOptions o;  // the default shrinkage
  const Metric m = learn_metric(hub.specs, o);
  ASSERT_EQ(m.dim_in(), kD);
  ASSERT_EQ(m.dim_out(), kD);
  EXPECT_EQ(m.models, 12);
  EXPECT_EQ(m.discriminant, "none");
  // The same weighted scatter, recomputed here in the mapped space, is the identity
  // (up to the small shrinkage).
  Eigen::MatrixXd sw = Eigen::MatrixXd::Zero(kD, kD);
  double raw_trace = 0;
  for (const auto& s : hub.specs) {
    const Eigen::VectorXd w = s.beta.cast<double>() / s.beta.cast<double>().sum();
    const RowMatrixD z = (s.zx * m.p.transpose()).cast<double>();
    const Eigen::RowVectorXd mu = w.transpose() * z;
    for (Eigen::Index j = 0; j < z.rows(); ++j) sw += w(j) * (z.row(j) - mu).transpose() * (z.row(j) - mu);
    const RowMatrixD zr = s.zx.cast<double>();
    const Eigen::RowVectorXd mr = w.transpose() * zr;
    for (Eigen::Index j = 0; j < zr.rows(); ++j) raw_trace += w(j) * (zr.row(j) - mr).squaredNorm();
  }
  raw_trace /= 12.0;
  sw /= 12.0;
  // ... regularised as documented, is mapped to the identity.
  sw += o.shrinkage * raw_trace / kD * (m.p * m.p.transpose()).cast<double>();
  EXPECT_LT((sw - Eigen::MatrixXd::Identity(kD, kD)).cwiseAbs().maxCoeff(), 1e-3) << sw;
  EXPECT_GT(m.gamma, 0);
}

TEST(Metric, MakesStyleDecideTheRankingWhereContentDominatesTheRawSpace) {
  const Hub hub = make_hub(16, 5);
  const SpecIndex raw(hub.specs);
  auto metric = std::make_shared<const Metric>(learn_metric(hub.specs, light_shrinkage()));
  const SpecIndex mapped(hub.specs, metric);
  const double before = top1(raw, hub, 11), after = top1(mapped, hub, 11);
  EXPECT_LT(before, 0.6) << "the raw space should be hard on this hub";

  EXPECT_GT(after, 0.9) << "raw " << before;
}

TEST(Metric, LearntOnHalfTheModelsItHelpsTheOtherHalf) {
  const Hub hub = make_hub(16, 8);
  std::vector<Spec> half(hub.specs.begin(), hub.specs.begin() + 8);
  auto metric = std::make_shared<const Metric>(learn_metric(half, light_shrinkage()));
  EXPECT_EQ(metric->models, 8);
  Hub unseen;
  unseen.styles = hub.styles.bottomRows(8);
  unseen.specs.assign(hub.specs.begin() + 8, hub.specs.end());
  const double before = top1(SpecIndex(unseen.specs), unseen, 4);
  const double after = top1(SpecIndex(unseen.specs, metric), unseen, 4);
  EXPECT_GT(after, before + 0.2) << before << " -> " << after;
}

TEST(Metric, TheDiscriminantStepKeepsTheDirectionsThatSeparateModels) {
  const Hub hub = make_hub(16, 9);
  MetricOptions o = light_shrinkage();
  o.dims = kStyle;
  const Metric m = learn_metric(hub.specs, o);
  ASSERT_EQ(m.dim_out(), kStyle);
  EXPECT_EQ(m.discriminant, "lda");
  // Mapped, the style dims carry nearly all of P's weight: the content dims are dropped.
  const double style = m.p.leftCols(kStyle).squaredNorm(), content = m.p.rightCols(kD - kStyle).squaredNorm();
  EXPECT_GT(style, 20 * content) << m.p;
  auto metric = std::make_shared<const Metric>(m);
  EXPECT_GT(top1(SpecIndex(hub.specs, metric), hub, 21), 0.9);
}

TEST(Metric, AnIndexWithAMetricScoresAsTheSpecsMappedByHand) {
  const Hub hub = make_hub(6, 12);
  auto metric = std::make_shared<const Metric>(learn_metric(hub.specs));
  std::vector<Spec> by_hand = hub.specs;
  EncoderIdentity mapped_id = kImage;
  mapped_id.dim = metric->dim_out();
  for (auto& s : by_hand) {
    s.image_encoder = mapped_id;
    s.zx = s.zx * metric->p.transpose();
    s.gamma = metric->gamma;
    s.gram_x = gaussian_gram(s.zx, s.gamma);
    s.mean_x = metric->p * s.mean_x;
  }
  const SpecIndex expected(by_hand), got(hub.specs, metric);
  std::mt19937 rng(2);
  const RowMatrix q = samples(hub.styles, 2, 3, rng);
  RowMatrix t(3, kDt);
  t.setConstant(0.5f);
  for (Scorer s : {Scorer::kWeighted, Scorer::kRkme, Scorer::kMean, Scorer::kNearest}) {
    ScoreOptions o;
    o.scorer = s;
    const RowMatrixD a = expected.score_all_batch(q * metric->p.transpose(), t, o);
    const RowMatrixD b = got.score_all_batch(q, t, o);
    EXPECT_LT((a - b).cwiseAbs().maxCoeff(), 1e-5) << to_string(s);
  }
  // Queries are raw: a mapped-size query is refused with the raw dimension in the message.
  try {
    got.score_all_batch(RowMatrix::Zero(1, metric->dim_out() - 1), t.topRows(1), {});
    FAIL();
  } catch (const InputError& e) {
    EXPECT_NE(std::string(e.what()).find(std::to_string(kD)), std::string::npos) << e.what();
  }
}

TEST(Metric, AMetricOfAnotherEncoderIsRefusedWithAClearMessage) {
  const Hub hub = make_hub(6, 13);
  Metric other = learn_metric(hub.specs);
  other.image_encoder.version = "2";
  try {
    SpecIndex index(hub.specs, std::make_shared<const Metric>(other));
    FAIL() << "accepted a metric of another encoder";
  } catch (const EncoderMismatchError& e) {
    EXPECT_NE(std::string(e.what()).find("synthetic/2/12"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("synthetic/1/12"), std::string::npos) << e.what();
  }
  EXPECT_THROW(choose_metric(MetricMode::kAuto, other, hub.specs), EncoderMismatchError);
  MetricLearner learner(other.image_encoder);
  EXPECT_THROW(learner.add(hub.specs.front()), EncoderMismatchError);
}

TEST(Metric, TooFewModelsIsAnInputErrorAndAutoFallsBackToTheRawSpace) {
  const Hub hub = make_hub(3, 14);
  EXPECT_THROW(learn_metric(hub.specs), InputError);
  EXPECT_EQ(choose_metric(MetricMode::kAuto, std::nullopt, hub.specs), nullptr);
  EXPECT_THROW(choose_metric(MetricMode::kLearn, std::nullopt, hub.specs), InputError);
  EXPECT_THROW(choose_metric(MetricMode::kStored, std::nullopt, hub.specs), InputError);
  EXPECT_EQ(choose_metric(MetricMode::kNone, learn_metric(make_hub(6, 1).specs), hub.specs), nullptr);
}

TEST(Metric, ChooseMetricPrefersTheStoredOneAndLearnsOnTheFlyOtherwise) {
  const Hub hub = make_hub(8, 15);
  Metric stored = learn_metric(make_hub(8, 16).specs);
  stored.version = 7;
  auto a = choose_metric(MetricMode::kAuto, stored, hub.specs);
  ASSERT_NE(a, nullptr);
  EXPECT_EQ(a->version, 7u);
  auto b = choose_metric(MetricMode::kAuto, std::nullopt, hub.specs);
  ASSERT_NE(b, nullptr);
  EXPECT_EQ(b->version, 0u);
  EXPECT_EQ(b->models, 8);
  auto c = choose_metric(MetricMode::kLearn, stored, hub.specs);
  EXPECT_EQ(c->version, 0u);
  EXPECT_EQ(c->checksum(), b->checksum()) << "learning is deterministic";
  EXPECT_EQ(parse_metric_mode("none"), MetricMode::kNone);
  EXPECT_THROW(parse_metric_mode("whiten"), InputError);
}

TEST(MetricFormat, RoundTripsAndPeeksTheVersionFromTheHeader) {
  Metric m = testing::make_test_metric(3, 6);
  m.version = 42;
  const auto bytes = serialize_metric(m);
  const Metric back = parse_metric(bytes);
  EXPECT_EQ(back.version, 42u);
  EXPECT_EQ(back.image_encoder, m.image_encoder);
  EXPECT_EQ(back.models, m.models);
  EXPECT_EQ(back.points, m.points);
  EXPECT_EQ(back.gamma, m.gamma);
  EXPECT_EQ(back.discriminant, "lda");
  EXPECT_EQ(back.checksum(), m.checksum());
  testing::expect_bit_exact(back.p, m.p, "P");
  const auto stamp = peek_metric_stamp(bytes.data(), bytes.size());
  ASSERT_TRUE(stamp.has_value());
  EXPECT_EQ(stamp->version, 42u);
  EXPECT_EQ(stamp->models, m.models);
  EXPECT_EQ(back.label(), "v42 " + m.checksum());
}

TEST(MetricFormat, DamageIsAFormatErrorThatSaysWhat) {
  const auto bytes = serialize_metric(testing::make_test_metric(2));
  auto expect_error = [](std::vector<std::uint8_t> b, const std::string& what) {
    try {
      parse_metric(b);
      FAIL() << "accepted: " << what;
    } catch (const SpecFormatError& e) {
      EXPECT_NE(std::string(e.what()).find(what), std::string::npos) << e.what();
    }
  };
  auto flipped = bytes;
  flipped[flipped.size() - 10] ^= 1;
  expect_error(flipped, "checksum");
  auto magic = bytes;
  magic[0] = 'X';
  expect_error(magic, "magic");
  expect_error(std::vector<std::uint8_t>(bytes.begin(), bytes.begin() + 10), "bytes");
  auto truncated = std::vector<std::uint8_t>(bytes.begin(), bytes.end() - 8);
  expect_error(truncated, "checksum");
  EXPECT_FALSE(peek_metric_stamp(magic.data(), magic.size()).has_value());
  Metric wrong = testing::make_test_metric(1);
  wrong.p.resize(3, 5);
  EXPECT_THROW(serialize_metric(wrong), InputError);
}

TEST(Metric, IsDueOnceTheHubHasEnoughModelsAndAgainWhenItHasGrownEnough) {
  EXPECT_FALSE(metric_due(3, {}, 4, 0.25));
  EXPECT_TRUE(metric_due(4, {}, 4, 0.25));
  EXPECT_FALSE(metric_due(99, {3, 80}, 4, 0.25));
  EXPECT_TRUE(metric_due(100, {3, 80}, 4, 0.25));
  EXPECT_FALSE(metric_due(100, {3, 81}, 4, 0.25));
  EXPECT_FALSE(metric_due(100, {3, 100}, 4, 0.0)) << "growth 0 still needs growth";
  EXPECT_TRUE(metric_due(101, {3, 100}, 4, 0.0));
}

TEST(MetricOptions, BadOptionsAreRefusedByName) {
  MetricOptions o;
  o.shrinkage = 0;
  EXPECT_THROW(validate(o), InputError);
  o = {};
  o.dims = -1;
  EXPECT_THROW(validate(o), InputError);
  o = {};
  o.gamma_scale = -2;
  EXPECT_THROW(MetricLearner(kImage, o), InputError);
}

}  // namespace
}  // namespace gmi
