// The score/interrogate workers' hub cache and the hub's metric: a stored metric is swapped
// in with the specs, a new version replaces it, one of another encoder is refused.
#include "gmi/workers/hub_cache.hpp"

#include <gtest/gtest.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <thread>

#include "gmi/metric.hpp"
#include "gmi/ops.hpp"
#include "gmi/redis.hpp"
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

// The live specs of a store, ranked by one index, against a snapshot's ranking.
void expect_ranks_as_the_store(const Identifier& hub, SpecStore& store, SpecStorage storage = SpecStorage::kF32) {
  std::vector<Spec> specs;
  for (const auto& id : store.list()) specs.push_back(*store.get(id));
  ASSERT_EQ(hub.size(), specs.size());
  const SpecIndex reference(specs, nullptr, SpecSpace::kRaw, storage);
  RowMatrix xs(3, specs.front().image_encoder.dim);
  for (Eigen::Index q = 0; q < 3; ++q) xs.row(q) = specs[static_cast<std::size_t>(q)].zx.row(0);
  RowMatrix ts(3, specs.front().text_encoder.dim);
  for (Eigen::Index q = 0; q < 3; ++q) ts.row(q) = specs[static_cast<std::size_t>(q)].zt.row(0);
  ScoreOptions so;
  so.top_k = 4;
  const auto want = reference.rank_batch(xs, ts, so);
  const auto got = hub.rank(xs, ts, so);
  for (std::size_t q = 0; q < want.size(); ++q) {
    ASSERT_EQ(got[q].results.size(), want[q].size());
    for (std::size_t j = 0; j < want[q].size(); ++j) {
      EXPECT_EQ(got[q].results[j].model, want[q][j].model);
      EXPECT_NEAR(got[q].results[j].score, want[q][j].score, 1e-6);
    }
  }
}

HubCacheOptions segmented_options(const std::string& uri) {
  HubCacheOptions o;
  o.store_uri = uri;
  o.refresh_ms = 20;
  o.stage = "segments-test";
  o.identify.build_interrogator = false;
  o.segmented = true;
  o.load_chunk = 3;
  o.segments.tail_max = 2;
  return o;
}

// The same, with no compaction: the segments stay as loaded.
HubCacheOptions uncompacted_options(const std::string& uri) {
  HubCacheOptions o = segmented_options(uri);
  o.segments.merge_factor = 100;
  o.segments.dead_fraction = 1.0;
  return o;
}

// The store's change log is what lets a refresh fetch only what changed.
void uploads_and_removals_touch_only_the_tail(const std::string& uri) {
  auto store = open_spec_store(uri);
  for (int m = 0; m < 7; ++m) store->put(testing::make_random_spec("model-" + std::to_string(m), 40 + m, 5));
  HubCacheOptions o = uncompacted_options(uri);
  const Spec any = testing::make_random_spec("x", 1, 5);
  HubCache cache(o, any.image_encoder, any.text_encoder, nullptr);
  auto loaded = wait_for(cache, [](const Identifier& id) { return id.size() == 7; });
  ASSERT_NE(loaded, nullptr);
  const auto& first = loaded->hub().segments();
  ASSERT_EQ(loaded->hub().sealed_segments(), 3u) << "a full load packs load_chunk specs per segment";
  expect_ranks_as_the_store(*loaded, *store);
  auto same_segments = [&](const Identifier& id) {
    for (const Segment& s : first) {
      bool found = false;
      for (const Segment& t : id.hub().segments()) found = found || t.index == s.index;
      if (!found) return false;
    }
    return true;
  };

  store->put(testing::make_random_spec("model-new", 90, 5));  // an upload
  auto up = wait_for(cache, [](const Identifier& id) { return id.size() == 8; });
  ASSERT_NE(up, nullptr);
  EXPECT_TRUE(same_segments(*up)) << "an upload touches the tail only";
  EXPECT_EQ(up->hub().tail_size(), 1u);
  expect_ranks_as_the_store(*up, *store);

  store->put(testing::make_random_spec("model-1", 91, 5));  // a new version of a loaded model
  auto replaced = wait_for(cache, [](const Identifier& id) { return id.hub().dead() == 1; });
  ASSERT_NE(replaced, nullptr);
  EXPECT_TRUE(same_segments(*replaced));
  expect_ranks_as_the_store(*replaced, *store);

  ASSERT_TRUE(store->remove("model-4"));
  auto removed = wait_for(cache, [](const Identifier& id) { return id.size() == 7 && id.hub().dead() == 2; });
  ASSERT_NE(removed, nullptr);
  EXPECT_TRUE(same_segments(*removed));
  expect_ranks_as_the_store(*removed, *store);
}

TEST(HubCache, ASegmentedShardTakesUploadsAndRemovalsWithoutRepackingItsSegments) {
  testing::RedisServer redis;
  if (!redis.started()) GTEST_SKIP() << "no redis-server";
  uploads_and_removals_touch_only_the_tail(redis.uri());
}

// The same on a Redis Cluster: the shard's cursor follows every partition's change log.
TEST(HubCache, ASegmentedShardFollowsAClusterStoresPartitions) {
  testing::RedisClusterServers cluster(3);
  if (!cluster.started()) GTEST_SKIP() << "no redis-server / redis-cli";
  uploads_and_removals_touch_only_the_tail(cluster.uri("?partitions=4"));
}

// A full load packs its segments in parts as the specs arrive and merges each segment's parts:
// the segments hold load_chunk specs each, score as the store says, and nothing is lost at a
// part's or a chunk's edge.
TEST(HubCache, AFullLoadPacksInPartsAndMergesThemIntoSegmentsOfLoadChunk) {
  testing::TempDir dir;
  const std::string uri = "dir:" + dir.path().string();
  auto store = open_spec_store(uri);
  for (int m = 0; m < 12; ++m) store->put(testing::make_random_spec("model-" + std::to_string(m), 70 + m, 5));
  HubCacheOptions o = uncompacted_options(uri);
  o.load_chunk = 5;
  o.load_part = 2;
  const Spec any = testing::make_random_spec("x", 1, 5);
  HubCache cache(o, any.image_encoder, any.text_encoder, nullptr);
  auto loaded = wait_for(cache, [](const Identifier& id) { return id.size() == 12; });
  ASSERT_NE(loaded, nullptr);
  std::vector<std::size_t> sizes;
  for (const Segment& s : loaded->hub().segments()) sizes.push_back(s.index->size());
  EXPECT_EQ(sizes, (std::vector<std::size_t>{5, 5, 2})) << "parts of 2, 2 and 1 merged per segment";
  expect_ranks_as_the_store(*loaded, *store);
}

TEST(HubCache, ASegmentedShardCompactsInTheBackgroundAndCountsIt) {
  testing::TempDir dir;
  const std::string uri = "dir:" + dir.path().string();
  auto store = open_spec_store(uri);
  for (int m = 0; m < 7; ++m) store->put(testing::make_random_spec("model-" + std::to_string(m), 60 + m, 5));
  HubCacheOptions o = segmented_options(uri);
  o.segments.merge_factor = 2;
  o.segments.dead_fraction = 0.4;
  const Spec any = testing::make_random_spec("x", 1, 5);
  HubCache cache(o, any.image_encoder, any.text_encoder, nullptr);
  // Loaded as 3 + 3 + 1; the two smallest of the band merge.
  auto merged = wait_for(cache, [](const Identifier& id) { return id.size() == 7 && id.hub().sealed_segments() == 2; });
  ASSERT_NE(merged, nullptr);
  expect_ranks_as_the_store(*merged, *store);
  // Two of a segment's models removed: past dead_fraction, it is rewritten without them.
  const auto& ids = merged->hub().segments().front().index->model_ids();
  ASSERT_GE(ids.size(), 3u);
  ASSERT_TRUE(store->remove(ids[0]));
  ASSERT_TRUE(store->remove(ids[1]));
  auto rewritten = wait_for(cache, [](const Identifier& id) { return id.size() == 5 && id.hub().dead() == 0; });
  ASSERT_NE(rewritten, nullptr);
  expect_ranks_as_the_store(*rewritten, *store);
  const std::string metrics = Metrics::instance().serialize();
  EXPECT_NE(metrics.find("gmi_compactions_total{outcome=\"installed\",shard=\"0\",stage=\"segments-test\"}"),
            std::string::npos)
      << metrics;
  EXPECT_NE(metrics.find("gmi_segment_models{shard=\"0\",stage=\"segments-test\",state=\"live\"} 5"),
            std::string::npos);
}

// Restarts from disk: a score worker with score.snapshot_dir writes its segments and their
// position; a restarted one maps them back, serves at once, and fetches only what changed
// while it was down. A snapshot whose position the trimmed change log no longer reaches, or
// a damaged one, means a full load, and the worker still serves every spec.
TEST(HubCache, ARestartedShardRestoresItsSnapshotAndFetchesOnlyTheChangesSince) {
  testing::RedisServer redis;
  if (!redis.started()) GTEST_SKIP() << "no redis-server";
  testing::TempDir snaps;
  const std::string uri = redis.uri();
  auto store = open_spec_store(uri);
  for (int m = 0; m < 9; ++m) store->put(testing::make_random_spec("model-" + std::to_string(m), 140 + m, 5));
  HubCacheOptions o = segmented_options(uri);
  o.segments.merge_factor = 100;
  o.segments.dead_fraction = 1.0;
  o.identify.storage = SpecStorage::kF16;
  o.snapshot_dir = snaps.path().string();
  o.snapshot_every_s = 1;
  const Spec any = testing::make_random_spec("x", 1, 5);
  const auto manifest = snaps.path() / "shard-0-of-1.json";
  const auto snapshot_files = [&] {
    int n = 0;
    for (const auto& e : std::filesystem::directory_iterator(snaps.path()))
      n += e.path().extension() == ".gmisnap" ? 1 : 0;
    return n;
  };
  {
    HubCache cache(o, any.image_encoder, any.text_encoder, nullptr);
    ASSERT_NE(wait_for(cache, [](const Identifier& id) { return id.size() == 9; }), nullptr);
    ASSERT_TRUE(store->remove("model-2"));
    ASSERT_NE(wait_for(cache, [](const Identifier& id) { return id.size() == 8 && id.hub().dead() == 1; }), nullptr);
  }  // shut down: the last state is written
  ASSERT_TRUE(std::filesystem::exists(manifest));
  EXPECT_EQ(snapshot_files(), 3) << "9 specs loaded 3 a segment";

  // While it is down: an upload and a removal.
  store->put(testing::make_random_spec("model-new", 190, 5));
  ASSERT_TRUE(store->remove("model-5"));
  {
    HubCache cache(o, any.image_encoder, any.text_encoder, nullptr);
    auto restored = wait_for(cache, [](const Identifier& id) { return id.size() == 8 && id.hub().dead() >= 2; });
    ASSERT_NE(restored, nullptr) << "restored, and the two changes applied on top";
    EXPECT_GT(restored->hub().segments().front().index->mapped_bytes(), 0u) << "the points are mapped";
    EXPECT_EQ(restored->hub().tail_size(), 1u) << "only the upload was fetched";
    expect_ranks_as_the_store(*restored, *store, SpecStorage::kF16);
    const std::string metrics = Metrics::instance().serialize();
    EXPECT_NE(metrics.find("gmi_snapshot_writes_total{outcome=\"written\",shard=\"0\",stage=\"segments-test\"}"),
              std::string::npos);
  }

  // The change log trimmed past the snapshot's position: a full load (every segment new).
  store->put(testing::make_random_spec("model-newer", 191, 5));
  {
    RedisConnection r(parse_redis_uri(uri));
    r.command({"XTRIM", r.key("spec-changes"), "MAXLEN", "0"});
    store->put(testing::make_random_spec("model-newest", 192, 5));
  }
  {
    HubCache cache(o, any.image_encoder, any.text_encoder, nullptr);
    auto reloaded = wait_for(cache, [](const Identifier& id) { return id.size() == 10 && id.hub().dead() == 0; });
    ASSERT_NE(reloaded, nullptr);
    EXPECT_EQ(reloaded->hub().tail_size(), 0u) << "a full load packs every spec into segments";
    EXPECT_EQ(reloaded->hub().segments().front().index->mapped_bytes(), 0u);
    expect_ranks_as_the_store(*reloaded, *store, SpecStorage::kF16);
  }

  // A damaged segment file: refused with a warning, then a full load.
  for (const auto& e : std::filesystem::directory_iterator(snaps.path())) {
    if (e.path().extension() != ".gmisnap") continue;
    std::fstream f(e.path(), std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(4096 + 3);
    f.put('\x7f');
  }
  {
    HubCache cache(o, any.image_encoder, any.text_encoder, nullptr);
    auto reloaded = wait_for(cache, [](const Identifier& id) { return id.size() == 10; });
    ASSERT_NE(reloaded, nullptr);
    EXPECT_EQ(reloaded->hub().segments().front().index->mapped_bytes(), 0u);
    expect_ranks_as_the_store(*reloaded, *store, SpecStorage::kF16);
  }
}

}  // namespace
}  // namespace gmi::workers
