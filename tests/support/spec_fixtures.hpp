#pragma once
/// Test helpers for specs: a small random valid Spec, a bit-exact comparison, and the
/// behaviour every SpecStore backend must show (shared by the directory and Redis tests).
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "gmi/error.hpp"
#include "gmi/metric.hpp"
#include "gmi/spec.hpp"
#include "gmi/spec_store.hpp"

namespace gmi::testing {

/// A valid spec with random contents: r reduced points in d (image) and dt (text) dims,
/// beta a probability vector, gram_x the true Gaussian Gram matrix of zx.
inline Spec make_random_spec(const std::string& model_id = "model-a", unsigned seed = 1, int r = 4,
                             int d = 8, int dt = 6) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_real_distribution<float> uniform(0.05f, 1.0f);
  Spec s;
  s.model_id = model_id;
  s.image_encoder = {"builtin-style", "1.2.0", d, 0.75};
  s.text_encoder = {"builtin-ngram", "1.0.0", dt, 1.5};
  s.n = 100 + static_cast<int>(seed);
  s.gamma = 0.731 + seed * 1e-3;
  s.lambda = 0.5;
  s.residual_mmd2 = 0.0123456789 / (seed + 1);
  s.zx.resize(r, d);
  s.zt.resize(r, dt);
  s.beta.resize(r);
  s.mean_x.resize(d);
  for (Eigen::Index i = 0; i < s.zx.size(); ++i) s.zx.data()[i] = normal(rng);
  for (Eigen::Index i = 0; i < s.zt.size(); ++i) s.zt.data()[i] = normal(rng);
  for (Eigen::Index i = 0; i < r; ++i) s.beta[i] = uniform(rng);
  s.beta /= s.beta.sum();
  for (Eigen::Index i = 0; i < d; ++i) s.mean_x[i] = normal(rng);
  s.gram_x.resize(r, r);
  for (int j = 0; j < r; ++j) {
    for (int l = 0; l < r; ++l) {
      s.gram_x(j, l) =
          std::exp(-static_cast<float>(s.gamma) * (s.zx.row(j) - s.zx.row(l)).squaredNorm());
    }
  }
  s.downloads = 1000.0 * seed + 0.5;
  s.card = "A test model \xE2\x80\x94 \"quoted\", with\nnewlines and caf\xC3\xA9.";
  s.created_at = "2024-05-01T12:34:56Z";
  s.extra = {
      {"source", "unit-test"}, {"seed", seed}, {"tags", {"a", "b"}}, {"nested", {{"x", 1.25}}}};
  return s;
}

/// n random queries: unit image embeddings of d dims and Gaussian prompt embeddings of dt.
struct RandomQueries {
  RowMatrix xs, ts;
};
inline RandomQueries random_queries(int n, unsigned seed, int d = 8, int dt = 6) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  RandomQueries q{RowMatrix(n, d), RowMatrix(n, dt)};
  for (Eigen::Index i = 0; i < q.xs.size(); ++i) q.xs.data()[i] = normal(rng);
  for (Eigen::Index i = 0; i < q.ts.size(); ++i) q.ts.data()[i] = normal(rng);
  q.xs.rowwise().normalize();
  return q;
}

template <typename M>
void expect_bit_exact(const M& a, const M& b, const char* name) {
  ASSERT_EQ(a.rows(), b.rows()) << name;
  ASSERT_EQ(a.cols(), b.cols()) << name;
  EXPECT_EQ(0, a.size() == 0 ? 0 : std::memcmp(a.data(), b.data(), sizeof(float) * a.size()))
      << name << " differs";
}

/// Every field equal, arrays equal bit for bit.
inline void expect_same_spec(const Spec& a, const Spec& b) {
  EXPECT_EQ(a.model_id, b.model_id);
  EXPECT_EQ(a.image_encoder, b.image_encoder);
  EXPECT_EQ(a.image_encoder.default_gamma, b.image_encoder.default_gamma);
  EXPECT_EQ(a.text_encoder, b.text_encoder);
  EXPECT_EQ(a.text_encoder.default_gamma, b.text_encoder.default_gamma);
  EXPECT_EQ(a.n, b.n);
  EXPECT_EQ(a.gamma, b.gamma);
  EXPECT_EQ(a.lambda, b.lambda);
  EXPECT_EQ(a.residual_mmd2, b.residual_mmd2);
  EXPECT_EQ(a.downloads, b.downloads);
  EXPECT_EQ(a.card, b.card);
  EXPECT_EQ(a.created_at, b.created_at);
  EXPECT_EQ(a.extra, b.extra);
  expect_bit_exact(a.zx, b.zx, "zx");
  expect_bit_exact(a.zt, b.zt, "zt");
  expect_bit_exact(a.beta, b.beta, "beta");
  expect_bit_exact(a.gram_x, b.gram_x, "gram_x");
  expect_bit_exact(a.mean_x, b.mean_x, "mean_x");
}

/// The behaviour every backend must show, starting from an empty store.
inline void check_store_behaviour(SpecStore& store) {
  EXPECT_TRUE(store.list().empty());
  EXPECT_FALSE(store.get("model-a").has_value());
  const auto g0 = store.generation();

  const Spec b = make_random_spec("model-b", 1);
  const Spec a = make_random_spec("model-a", 2);
  store.put(b);
  const auto g1 = store.generation();
  EXPECT_NE(g1, g0);
  store.put(a);
  const auto g2 = store.generation();
  EXPECT_NE(g2, g1);
  EXPECT_EQ(store.list(), (std::vector<std::string>{"model-a", "model-b"}));
  auto got = store.get("model-b");
  ASSERT_TRUE(got.has_value());
  expect_same_spec(*got, b);

  // Replace: same id, new contents.
  const Spec b2 = make_random_spec("model-b", 7, 5, 8, 6);
  store.put(b2);
  const auto g3 = store.generation();
  EXPECT_NE(g3, g2);
  got = store.get("model-b");
  ASSERT_TRUE(got.has_value());
  expect_same_spec(*got, b2);
  EXPECT_EQ(store.list(), (std::vector<std::string>{"model-a", "model-b"}));

  EXPECT_TRUE(store.remove("model-a"));
  const auto g4 = store.generation();
  EXPECT_NE(g4, g3);
  EXPECT_FALSE(store.get("model-a").has_value());
  EXPECT_EQ(store.list(), (std::vector<std::string>{"model-b"}));

  // Removing what is not there changes nothing.
  EXPECT_FALSE(store.remove("model-a"));
  EXPECT_EQ(store.generation(), g4);

  // Ids that could escape the store are refused, not looked up.
  EXPECT_THROW(store.get("../etc/passwd"), InputError);
  EXPECT_THROW(store.remove("../model-b"), InputError);

  // An invalid spec is refused before anything is written.
  Spec bad = make_random_spec("model-c", 3);
  bad.zx(0, 0) = std::nanf("");
  EXPECT_THROW(store.put(bad), SpecFormatError);
  Spec bad_id = make_random_spec("bad/id", 3);
  EXPECT_THROW(store.put(bad_id), SpecFormatError);
  EXPECT_EQ(store.generation(), g4);
  EXPECT_EQ(store.list(), (std::vector<std::string>{"model-b"}));
}

/// A small valid metric for the encoder of make_random_spec (d = 8 by default).
inline Metric make_test_metric(unsigned seed = 1, int k = 5, int d = 8) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  Metric m;
  m.image_encoder = make_random_spec("x", 1, 4, d).image_encoder;
  m.models = 10 + static_cast<int>(seed);
  m.points = 40 + seed;
  m.shrinkage = 0.3;
  m.gamma = 0.05 * seed;
  m.gamma_scale = 0.1;
  m.discriminant = k < d ? "lda" : "none";
  m.created_at = "2026-12-01T10:00:00Z";
  m.p.resize(k, d);
  for (Eigen::Index i = 0; i < m.p.size(); ++i) m.p.data()[i] = normal(rng);
  return m;
}

/// The metric behaviour every backend must show, starting from a store without one:
/// versions increase from 1, a stale expected version is refused, removal works.
inline void check_metric_store_behaviour(SpecStore& store) {
  EXPECT_EQ(store.metric_version(), 0u);
  EXPECT_FALSE(store.get_metric().has_value());
  const auto generation = store.generation();
  const Metric m1 = make_test_metric(1);
  EXPECT_EQ(store.put_metric(m1, 0), 1u);
  EXPECT_EQ(store.metric_version(), 1u);
  auto got = store.get_metric();
  ASSERT_TRUE(got.has_value());
  EXPECT_EQ(got->version, 1u);
  EXPECT_EQ(got->checksum(), m1.checksum());
  EXPECT_EQ(got->models, m1.models);
  expect_bit_exact(got->p, m1.p, "P");
  // A learner that read version 0 lost the race to the one that stored version 1.
  const Metric m2 = make_test_metric(2, 8);
  EXPECT_THROW(store.put_metric(m2, 0), MetricConflictError);
  EXPECT_EQ(store.get_metric()->checksum(), m1.checksum());
  EXPECT_EQ(store.put_metric(m2, 1), 2u);
  EXPECT_EQ(store.metric_version(), 2u);
  EXPECT_EQ(store.get_metric()->dim_out(), 8);
  // A metric is not a spec: the specs' generation and listing do not move.
  EXPECT_EQ(store.generation(), generation);
  EXPECT_TRUE(store.list().empty());
  EXPECT_TRUE(store.remove_metric());
  EXPECT_FALSE(store.remove_metric());
  EXPECT_EQ(store.metric_version(), 0u);
  EXPECT_FALSE(store.get_metric().has_value());
}

/// Fenced writes: a spec is stored only when its upload sequence is newer than the one
/// stored for the model; a stale one leaves the newer spec in place, and says so.
inline void check_fenced_put_behaviour(SpecStore& store) {
  Spec newer = make_random_spec("fenced", 7);
  newer.extra["upload_seq"] = 5;
  const auto before = store.generation();
  FencedPut put = store.put_fenced(newer, 5);
  EXPECT_TRUE(put.stored);
  EXPECT_EQ(put.stored_seq, 5u);
  EXPECT_GT(put.generation, before);
  EXPECT_EQ(store.generation(), put.generation);
  const auto after_first = store.generation();
  Spec stale = make_random_spec("fenced", 8);
  stale.extra["upload_seq"] = 3;
  put = store.put_fenced(stale, 3);  // a retry of an older upload, arriving late
  EXPECT_FALSE(put.stored);
  EXPECT_EQ(put.stored_seq, 5u);
  EXPECT_EQ(store.generation(), after_first);  // nothing changed, nothing for caches to reload
  auto got = store.get("fenced");
  ASSERT_TRUE(got.has_value());
  EXPECT_EQ(got->extra.value("upload_seq", 0), 5);
  EXPECT_TRUE(got->zx.isApprox(newer.zx));
  // The same number is a retry of the same upload (a crash between write and report): it
  // writes again, and must not fail as superseded.
  Spec again = newer;
  EXPECT_TRUE(store.put_fenced(again, 5).stored);
  EXPECT_TRUE(store.get("fenced")->zx.isApprox(newer.zx));
  Spec next = make_random_spec("fenced", 9);
  next.extra["upload_seq"] = 6;
  EXPECT_TRUE(store.put_fenced(next, 6).stored);
  EXPECT_EQ(store.get("fenced")->extra.value("upload_seq", 0), 6);
  EXPECT_THROW(store.put_fenced(next, 0), InputError);
}

}  // namespace gmi::testing
