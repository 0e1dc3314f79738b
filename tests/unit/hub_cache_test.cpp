// The score/interrogate workers' hub cache and the hub's metric: a stored metric is swapped
// in with the specs, a new version replaces it, one of another encoder is refused.
#include "gmi/workers/hub_cache.hpp"

#include <gtest/gtest.h>

#include <chrono>
#include <thread>

#include "gmi/metric.hpp"
#include "gmi/spec_store.hpp"
#include "spec_fixtures.hpp"
#include "test_support.hpp"

namespace gmi::workers {
namespace {

using namespace std::chrono_literals;

// Waits (up to 10 s) until the cache's snapshot satisfies `ok`.
template <class Pred>
std::shared_ptr<const Identifier> wait_for(const HubCache& cache, Pred ok) {
  for (int i = 0; i < 500; ++i) {
    auto current = cache.current();
    if (current && ok(*current)) return current;
    std::this_thread::sleep_for(20ms);
  }
  return nullptr;
}

TEST(HubCache, SwapsInTheStoredMetricAndRefusesOneOfAnotherEncoder) {
  testing::TempDir dir;
  const std::string uri = "dir:" + dir.path().string();
  auto store = open_spec_store(uri);
  std::vector<Spec> specs;
  for (int m = 0; m < 6; ++m) {
    specs.push_back(testing::make_random_spec("model-" + std::to_string(m), 10 + m, 6));
    store->put(specs.back());
  }
  HubCacheOptions o;
  o.store_uri = uri;
  o.refresh_ms = 20;
  const EncoderIdentity image = specs.front().image_encoder, text = specs.front().text_encoder;
  HubCache cache(o, image, text, nullptr);
  auto raw = wait_for(cache, [](const Identifier& id) { return id.index().size() == 6; });
  ASSERT_NE(raw, nullptr);
  EXPECT_EQ(raw->metric(), nullptr);

  MetricOptions mo;
  mo.dims = 5;
  store->put_metric(learn_metric(specs, mo), 0);
  auto v1 = wait_for(cache, [](const Identifier& id) { return id.metric() && id.metric()->version == 1; });
  ASSERT_NE(v1, nullptr);
  EXPECT_EQ(v1->index().size(), 6u);
  EXPECT_EQ(v1->index().all_zx().cols(), 5) << "the snapshot scores in the metric's space";
  // The same ranking as an index that maps the raw specs itself.
  const SpecIndex expected(specs, v1->metric());
  RowMatrix q = specs[2].zx.topRows(1);
  ScoreOptions so;
  so.scorer = Scorer::kRkme;
  EXPECT_LT((expected.score_all_batch(q, RowMatrix(0, 0), so) - v1->index().score_all_batch(q, RowMatrix(0, 0), so))
                .cwiseAbs()
                .maxCoeff(),
            1e-6);

  // An upload after the metric: mapped as it comes.
  store->put(testing::make_random_spec("model-new", 99, 6));
  ASSERT_NE(wait_for(cache, [](const Identifier& id) { return id.index().size() == 7 && id.metric(); }), nullptr);

  Metric foreign = *store->get_metric();
  foreign.image_encoder.version = "9.9";
  store->put_metric(foreign, 1);
  auto refused = wait_for(cache, [](const Identifier& id) { return id.metric() == nullptr; });
  ASSERT_NE(refused, nullptr) << "a metric of another encoder must not be used";
  EXPECT_EQ(refused->index().size(), 7u) << "the hub keeps serving, in the raw space";

  MetricOptions full;
  store->put_metric(learn_metric(specs, full), 2);
  auto v3 = wait_for(cache, [](const Identifier& id) { return id.metric() && id.metric()->version == 3; });
  ASSERT_NE(v3, nullptr);
  EXPECT_EQ(v3->index().all_zx().cols(), specs.front().image_encoder.dim);
}

TEST(HubCache, MetricUseNoneIgnoresTheStoredMetric) {
  testing::TempDir dir;
  const std::string uri = "dir:" + dir.path().string();
  auto store = open_spec_store(uri);
  std::vector<Spec> specs;
  for (int m = 0; m < 5; ++m) {
    specs.push_back(testing::make_random_spec("model-" + std::to_string(m), 30 + m, 6));
    store->put(specs.back());
  }
  store->put_metric(learn_metric(specs), 0);
  HubCacheOptions o;
  o.store_uri = uri;
  o.refresh_ms = 20;
  o.use_metric = false;
  HubCache cache(o, specs.front().image_encoder, specs.front().text_encoder, nullptr);
  auto current = wait_for(cache, [](const Identifier& id) { return id.index().size() == 5; });
  ASSERT_NE(current, nullptr);
  EXPECT_EQ(current->metric(), nullptr);
}

}  // namespace
}  // namespace gmi::workers
