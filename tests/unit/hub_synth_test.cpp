// The benchmarks' overlapping synthetic hub: reproducible per model, overlapping the way the
// header says (families, popular styles), queries that are fresh samples yet identifiable.
#include "hub_synth.hpp"

#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <map>

#include "gmi/error.hpp"
#include "gmi/scoring.hpp"
#include "gmi/spec.hpp"
#include "test_support.hpp"

namespace {

using gmi::bench::OverlapHub;
using gmi::bench::OverlapOptions;

OverlapOptions small_options() {
  OverlapOptions o;
  o.r = 8;
  o.d = 64;
  o.dt = 32;
  o.seed = 11;
  return o;
}

OverlapHub small_hub(long models, const OverlapOptions& o = small_options()) {
  return OverlapHub(gmi::bench::seeded_base(12, o.r, o.d, o.dt, 3), o, models);
}

TEST(OverlapHub, AModelIsTheSameWhateverWasMadeBefore) {
  const OverlapHub a = small_hub(500), b = small_hub(500);
  for (long m : {0L, 17L, 499L}) {
    const gmi::Spec late = (a.spec(3), a.spec(m));
    const gmi::Spec alone = b.spec(m);
    EXPECT_EQ(late.model_id, "model-" + std::to_string(m));
    EXPECT_TRUE(late.zx.isApprox(alone.zx, 0));
    EXPECT_TRUE(late.zt.isApprox(alone.zt, 0));
    EXPECT_TRUE(late.beta.isApprox(alone.beta, 0));
    EXPECT_NO_THROW(gmi::validate(late));
  }
  EXPECT_FALSE(a.spec(1).zx.isApprox(a.spec(2).zx, 1e-3f));
}

TEST(OverlapHub, FamiliesAreNearDuplicatesAndSomeStylesRecurOften) {
  const long models = 2000;
  const OverlapHub hub = small_hub(models);
  std::map<long, std::vector<long>> members;
  for (long m = 0; m < models; ++m) members[hub.family(m)].push_back(m);
  ASSERT_EQ(static_cast<long>(members.size()), hub.families());
  // Mean family size near the option's 8.
  const double mean_size = static_cast<double>(models) / static_cast<double>(hub.families());
  EXPECT_GT(mean_size, 5.0);
  EXPECT_LT(mean_size, 12.0);
  // Sample means: within a family far closer than between families.
  double within = 0, between = 0;
  int nw = 0, nb = 0;
  for (const auto& [f, ms] : members) {
    if (ms.size() < 2 || nw >= 200) continue;
    within += (hub.spec(ms[0]).mean_x - hub.spec(ms[1]).mean_x).norm();
    between += (hub.spec(ms[0]).mean_x - hub.spec((ms[0] + 1) % models).mean_x).norm();
    ++nw;
    ++nb;
  }
  ASSERT_GT(nw, 50);
  EXPECT_LT(within / nw, 0.5 * between / nb);
}

TEST(OverlapHub, QueriesAreFreshSamplesThatExactScoringMostlyTracesToTheirFamily) {
  const long models = 300;
  const OverlapOptions o = small_options();
  const OverlapHub hub = small_hub(models, o);
  std::vector<gmi::Spec> specs;
  for (long m = 0; m < models; ++m) specs.push_back(hub.spec(m));
  const gmi::SpecIndex index(specs);
  const int queries = 200;
  gmi::RowMatrix xs(queries, o.d), ts(queries, o.dt);
  std::vector<long> source(queries);
  for (int q = 0; q < queries; ++q) {
    source[q] = (q * 37) % models;
    hub.query(source[q], static_cast<std::uint64_t>(q), xs.row(q).data(), ts.row(q).data());
    EXPECT_NEAR(xs.row(q).norm(), 1.0f, 1e-4f);
    // Never one of the spec's own points.
    const gmi::Spec& s = specs[static_cast<std::size_t>(source[q])];
    EXPECT_GT((s.zx.rowwise() - xs.row(q)).rowwise().norm().minCoeff(), 1e-3f);
  }
  gmi::ScoreOptions options;
  options.top_k = 1;
  const auto ranked = index.rank_batch(xs, ts, options);
  int family_hits = 0;
  for (int q = 0; q < queries; ++q) {
    const long top = std::stol(ranked[q][0].model.substr(6));
    family_hits += hub.family(top) == hub.family(source[q]) ? 1 : 0;
  }
  // Identifiable, but not trivially: the content noise is real.
  EXPECT_GT(family_hits, queries / 2);
  // The same draw number gives the same sample; another gives another.
  std::vector<float> x1(o.d), x2(o.d), t(o.dt);
  hub.query(5, 1, x1.data(), t.data());
  hub.query(5, 1, x2.data(), t.data());
  EXPECT_EQ(x1, x2);
  hub.query(5, 2, x2.data(), t.data());
  EXPECT_NE(x1, x2);
}

TEST(OverlapHub, ABaseFromAStoreIsProjectedToTheHubsDimensions) {
  gmi::testing::TempDir dir;
  const gmi::bench::HubBase seeded = gmi::bench::seeded_base(3, 6, 40, 20, 5);
  for (std::size_t b = 0; b < seeded.zx.size(); ++b) {
    gmi::Spec s;
    s.model_id = "base-" + std::to_string(b);
    s.image_encoder = {"e", "1", 40, 0.7};
    s.text_encoder = {"t", "1", 20, 1.0};
    s.n = 50;
    s.gamma = 0.7;
    s.zx = seeded.zx[b];
    s.zt = seeded.zt[b];
    s.beta = seeded.beta[b];
    s.gram_x = gmi::RowMatrix::Identity(6, 6);
    s.mean_x = s.zx.colwise().mean().transpose();
    const auto bytes = gmi::serialize_spec(s);
    std::ofstream(dir.path() / (s.model_id + ".gmispec"), std::ios::binary)
        .write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
  }
  const gmi::bench::HubBase base = gmi::bench::load_base(dir.path().string());
  EXPECT_EQ(base.zx.size(), 3u);
  EXPECT_DOUBLE_EQ(base.gamma, 0.7);
  OverlapOptions o = small_options();
  const OverlapHub hub(base, o, 50);
  const gmi::Spec s = hub.spec(7);
  EXPECT_EQ(s.zx.cols(), o.d);
  EXPECT_EQ(s.zt.cols(), o.dt);
  EXPECT_NEAR(s.zx.row(0).norm(), 1.0f, 1e-4f);
  EXPECT_DOUBLE_EQ(s.gamma, 0.7);

  gmi::testing::TempDir lonely;
  std::filesystem::copy(dir.path() / "base-0.gmispec", lonely.path() / "base-0.gmispec");
  EXPECT_THROW(gmi::bench::load_base(lonely.path().string()), gmi::InputError);
  EXPECT_THROW(gmi::bench::load_base((dir.path() / "absent").string()), gmi::InputError);
}

}  // namespace
