// Segments: a shard held as immutable packed segments, tombstones and a mutable tail must rank
// exactly as one index of its live specs, through upserts, removals, seals and compactions.
#include "gmi/segments.hpp"

#include <gtest/gtest.h>

#include <map>
#include <random>

#include "gmi/error.hpp"
#include "gmi/pipeline.hpp"
#include "spec_fixtures.hpp"

namespace gmi {
namespace {

using testing::make_random_spec;

constexpr int kD = 8, kDt = 6;

Spec spec_of(const std::string& id, unsigned seed) {
  return make_random_spec(id, seed, 3 + static_cast<int>(seed % 4), kD, kDt);
}

using Queries = testing::RandomQueries;

Queries queries(unsigned seed, int n = 5) { return testing::random_queries(n, seed, kD, kDt); }

// The ranking of the live specs by one SpecIndex, against the segmented snapshot's.
void expect_same_ranking(const SegmentedIndex& hub, const std::map<std::string, Spec>& live, unsigned seed,
                         const SegmentSearch& search = {}) {
  ASSERT_EQ(hub.size(), live.size());
  std::vector<Spec> specs;
  for (const auto& [id, s] : live) specs.push_back(s);
  const SpecIndex reference(std::move(specs));
  const Queries q = queries(seed);
  for (Scorer scorer : {Scorer::kWeighted, Scorer::kRkme, Scorer::kNearest, Scorer::kMean, Scorer::kPopularity}) {
    for (int k : {3, 0}) {
      ScoreOptions o;
      o.scorer = scorer;
      o.top_k = k;
      const auto want = reference.rank_batch(q.xs, q.ts, o);
      const auto got = hub.rank_batch(q.xs, q.ts, o, search);
      ASSERT_EQ(got.size(), want.size());
      for (std::size_t i = 0; i < want.size(); ++i) {
        ASSERT_EQ(got[i].size(), want[i].size()) << to_string(scorer) << " k=" << k;
        for (std::size_t j = 0; j < want[i].size(); ++j) {
          EXPECT_EQ(got[i][j].model, want[i][j].model) << to_string(scorer) << " k=" << k << " rank " << j;
          EXPECT_NEAR(got[i][j].score, want[i][j].score, 1e-6) << to_string(scorer);
        }
      }
    }
  }
}

// Runs every compaction due, at once (as the compaction thread would, but in line).
int compact_all(SegmentBuilder& builder) {
  int done = 0;
  while (auto plan = builder.plan()) {
    auto merged = std::make_shared<const SpecIndex>(SegmentBuilder::run(*plan));
    EXPECT_TRUE(builder.install(*plan, merged));
    if (++done > 100) break;
  }
  return done;
}

TEST(Segments, RandomUpsertsRemovalsSealsAndCompactionsRankAsOneIndexOfTheLiveSpecs) {
  SegmentPolicy policy;
  policy.tail_max = 4;
  policy.merge_factor = 2;
  policy.dead_fraction = 0.3;
  SegmentBuilder builder(nullptr, SpecSpace::kRaw, SpecStorage::kF32, policy);
  std::map<std::string, Spec> live;
  std::mt19937 rng(42);
  unsigned seed = 1;
  int compactions = 0;
  std::size_t most_segments = 0, most_dead = 0;
  for (int step = 0; step < 120; ++step) {
    const int op = std::uniform_int_distribution<int>(0, 9)(rng);
    const std::string id = "m" + std::to_string(std::uniform_int_distribution<int>(0, 29)(rng));
    if (op < 7) {  // an upload: new, or a new version of a model already there
      Spec s = spec_of(id, ++seed);
      live[id] = s;
      builder.upsert(std::move(s));
    } else {
      live.erase(id);
      builder.remove(id);
    }
    ASSERT_EQ(builder.size(), live.size());
    if (step % 7 == 6) compactions += compact_all(builder);
    const SegmentedIndex hub = builder.snapshot();
    most_segments = std::max(most_segments, hub.sealed_segments());
    most_dead = std::max(most_dead, hub.dead());
    if (step % 5 == 0 || step == 119) expect_same_ranking(hub, live, static_cast<unsigned>(step));
  }
  // The run exercised what it is about: seals, tombstones, compactions.
  EXPECT_GE(most_segments, 2u);
  EXPECT_GT(most_dead, 0u);
  EXPECT_GT(compactions, 0);
}

TEST(Segments, TheTailSealsAtItsSizeAndAReplacedModelLeavesATombstone) {
  SegmentPolicy policy;
  policy.tail_max = 3;
  policy.dead_fraction = 0.5;
  SegmentBuilder builder(nullptr, SpecSpace::kRaw, SpecStorage::kF32, policy);
  for (unsigned i = 0; i < 3; ++i) builder.upsert(spec_of("a" + std::to_string(i), i + 1));
  SegmentedIndex hub = builder.snapshot();
  EXPECT_EQ(hub.sealed_segments(), 1u);
  EXPECT_EQ(hub.tail_size(), 0u);
  EXPECT_EQ(hub.dead(), 0u);
  const auto sealed = hub.segments().front().index;

  builder.upsert(spec_of("a1", 50));  // a new version: into the tail, the old one dead
  hub = builder.snapshot();
  EXPECT_EQ(hub.segments().front().index, sealed) << "the sealed segment is not repacked";
  EXPECT_EQ(hub.dead(), 1u);
  EXPECT_EQ(hub.tail_size(), 1u);
  EXPECT_EQ(hub.size(), 3u);
  EXPECT_FALSE(builder.plan().has_value()) << "1 of 3 dead is under dead_fraction 0.5";

  builder.remove("a2");
  hub = builder.snapshot();
  EXPECT_EQ(hub.dead(), 2u);
  EXPECT_EQ(hub.size(), 2u);
  const auto plan = builder.plan();
  ASSERT_TRUE(plan.has_value()) << "2 of 3 dead: the segment is rewritten";
  EXPECT_EQ(plan->inputs.size(), 1u);
  EXPECT_EQ(plan->live, 1u);
  ASSERT_TRUE(builder.install(*plan, std::make_shared<const SpecIndex>(SegmentBuilder::run(*plan))));
  hub = builder.snapshot();
  EXPECT_EQ(hub.dead(), 0u);
  EXPECT_EQ(hub.segments().front().index->size(), 1u);
  EXPECT_EQ(hub.segments().front().index->model_ids().front(), "a0");
  std::map<std::string, Spec> live{{"a0", spec_of("a0", 1)}, {"a1", spec_of("a1", 50)}};
  expect_same_ranking(hub, live, 7);
  // An older snapshot is untouched by later changes.
  EXPECT_EQ(sealed->size(), 3u);

  // A segment whose every model is gone is dropped, not kept empty.
  builder.remove("a0");
  const auto empty = builder.plan();
  ASSERT_TRUE(empty.has_value());
  ASSERT_TRUE(builder.install(*empty, std::make_shared<const SpecIndex>(SegmentBuilder::run(*empty))));
  hub = builder.snapshot();
  EXPECT_EQ(hub.sealed_segments(), 0u);
  EXPECT_EQ(hub.size(), 1u);
  live.erase("a0");
  expect_same_ranking(hub, live, 8);
}

TEST(Segments, ACompactionInstalledAfterChangesTombstonesWhatChangedMeanwhile) {
  SegmentPolicy policy;
  policy.tail_max = 2;
  policy.merge_factor = 2;
  SegmentBuilder builder(nullptr, SpecSpace::kRaw, SpecStorage::kF32, policy);
  std::map<std::string, Spec> live;
  for (unsigned i = 0; i < 4; ++i) {
    const std::string id = "b" + std::to_string(i);
    live[id] = spec_of(id, i + 1);
    builder.upsert(live[id]);
    builder.snapshot();  // seals every second upload
  }
  ASSERT_EQ(builder.snapshot().sealed_segments(), 2u);
  const auto plan = builder.plan();
  ASSERT_TRUE(plan.has_value());
  ASSERT_EQ(plan->inputs.size(), 2u);
  auto merged = std::make_shared<const SpecIndex>(SegmentBuilder::run(*plan));
  EXPECT_EQ(merged->size(), 4u);
  // While it ran: b0 replaced, b3 removed, b9 added.
  live["b0"] = spec_of("b0", 77);
  builder.upsert(live["b0"]);
  live.erase("b3");
  builder.remove("b3");
  live["b9"] = spec_of("b9", 9);
  builder.upsert(live["b9"]);
  ASSERT_TRUE(builder.install(*plan, merged));
  const SegmentedIndex hub = builder.snapshot();
  EXPECT_EQ(hub.segments().front().index, merged) << "the merged segment takes its inputs' place";
  EXPECT_EQ(hub.segments().front().dead_count, 2u) << "b0's old copy and b3 are tombstones in it";
  EXPECT_EQ(hub.dead(), 2u);
  expect_same_ranking(hub, live, 3);
  // The same plan again: its inputs are gone.
  EXPECT_FALSE(builder.install(*plan, merged));
}

TEST(Segments, TwoStageSegmentsNeverRankATombstone) {
  SegmentPolicy policy;
  policy.tail_max = 40;
  SegmentBuilder builder(nullptr, SpecSpace::kRaw, SpecStorage::kF32, policy);
  std::map<std::string, Spec> live;
  for (unsigned i = 0; i < 40; ++i) {
    const std::string id = "c" + std::to_string(i);
    live[id] = spec_of(id, i + 1);
    builder.upsert(live[id]);
  }
  builder.snapshot();
  for (unsigned i = 0; i < 40; i += 3) {  // a third of them replaced: tombstones in the segment
    const std::string id = "c" + std::to_string(i);
    live[id] = spec_of(id, 500 + i);
    builder.upsert(live[id]);
  }
  const SegmentedIndex hub = builder.snapshot();
  ASSERT_EQ(hub.sealed_segments(), 1u);
  ASSERT_EQ(hub.dead(), 14u);
  SegmentSearch search;
  search.two_stage = true;
  search.options.clusters = 2;
  search.options.candidates = 8;
  EXPECT_GT(hub.prepare(search), 0u) << "a segment of more models than candidates gets a summary";
  EXPECT_TRUE(hub.segments().front().index->two_stage_ready(search.options));
  search.options.candidates = 40;  // every model of the segment: the two-stage search is exact
  expect_same_ranking(hub, live, 11, search);
  // Fewer candidates than models: whatever it picks, every model ranked is a live copy (its
  // score is the live spec's; a tombstone's would be its replaced spec's).
  search.options.candidates = 8;
  std::vector<Spec> specs;
  for (const auto& [id, s] : live) specs.push_back(s);
  const SpecIndex reference(std::move(specs));
  const Queries q = queries(5, 20);
  ScoreOptions o;
  o.top_k = 8;
  const RowMatrixD exact = reference.score_all_batch(q.xs, q.ts, o);
  const auto& ids = reference.model_ids();
  const auto ranked = hub.rank_batch(q.xs, q.ts, o, search);
  for (std::size_t i = 0; i < ranked.size(); ++i) {
    ASSERT_EQ(ranked[i].size(), 8u);
    for (const auto& r : ranked[i]) {
      const auto m = std::find(ids.begin(), ids.end(), r.model) - ids.begin();
      EXPECT_NEAR(r.score, exact(static_cast<Eigen::Index>(i), m), 1e-6) << r.model;
    }
  }
}

TEST(Segments, ASpecTheShardCannotHoldIsRefusedWithoutChangingIt) {
  SegmentBuilder builder(nullptr, SpecSpace::kRaw, SpecStorage::kF32, {});
  builder.upsert(spec_of("ok", 1));
  Spec other = spec_of("other-encoder", 2);
  other.image_encoder.version = "9.9.9";
  EXPECT_THROW(builder.upsert(other), EncoderMismatchError);
  Spec nan = spec_of("nan", 3);
  nan.zx(0, 0) = std::numeric_limits<float>::quiet_NaN();
  EXPECT_THROW(builder.upsert(nan), SpecFormatError);
  Spec shape = spec_of("shape", 4);
  shape.zt.resize(shape.zt.rows(), kDt + 1);
  EXPECT_THROW(builder.upsert(shape), SpecFormatError);
  EXPECT_EQ(builder.size(), 1u);
  EXPECT_EQ(builder.snapshot().size(), 1u);
  EXPECT_THROW(SegmentBuilder(nullptr, SpecSpace::kRaw, SpecStorage::kF32, SegmentPolicy{0}), InputError);
}

TEST(Segments, MergeKeepsF16PointsAsPackedAndRefusesMixedParts) {
  std::vector<Spec> a, b;
  for (unsigned i = 0; i < 5; ++i) a.push_back(spec_of("d" + std::to_string(i), i + 1));
  for (unsigned i = 5; i < 9; ++i) b.push_back(spec_of("d" + std::to_string(i), i + 1));
  std::vector<Spec> all = a;
  all.insert(all.end(), b.begin(), b.end());
  const SpecIndex ia(a, nullptr, SpecSpace::kRaw, SpecStorage::kF16);
  const SpecIndex ib(b, nullptr, SpecSpace::kRaw, SpecStorage::kF16);
  const SpecIndex whole(all, nullptr, SpecSpace::kRaw, SpecStorage::kF16);
  const SpecIndex merged = SpecIndex::merge({{&ia, nullptr}, {&ib, nullptr}});
  EXPECT_EQ(merged.storage(), SpecStorage::kF16);
  EXPECT_EQ(merged.model_ids(), whole.model_ids());
  EXPECT_EQ(merged.memory_bytes(), whole.memory_bytes());
  const Queries q = queries(2);
  ScoreOptions o;
  o.top_k = 0;
  EXPECT_EQ(merged.score_all_batch(q.xs, q.ts, o), whole.score_all_batch(q.xs, q.ts, o)) << "bit for bit";
  const SpecIndex f32(b);
  EXPECT_THROW(SpecIndex::merge({{&ia, nullptr}, {&f32, nullptr}}), InputError);
  EXPECT_THROW(SpecIndex::merge({{&ia, nullptr}, {&ia, nullptr}}), InputError) << "a model kept twice";
  const std::vector<bool> wrong(3, false);
  EXPECT_THROW(SpecIndex::merge({{&ia, &wrong}}), InputError);
}

TEST(Segments, AnIdentifierOverSegmentsRanksAndRefusesAHubLearnedInterrogator) {
  SegmentPolicy policy;
  policy.tail_max = 2;
  SegmentBuilder builder(nullptr, SpecSpace::kRaw, SpecStorage::kF32, policy);
  std::map<std::string, Spec> live;
  for (unsigned i = 0; i < 5; ++i) {
    const std::string id = "e" + std::to_string(i);
    live[id] = spec_of(id, i + 1);
    builder.upsert(live[id]);
    builder.snapshot();
  }
  const SegmentedIndex hub = builder.snapshot();
  ASSERT_GE(hub.segments().size(), 2u);
  const Spec& any = live.begin()->second;
  IdentifyOptions io;
  io.build_interrogator = false;
  const Identifier id(hub, any.image_encoder, any.text_encoder, nullptr, io);
  EXPECT_EQ(id.size(), 5u);
  EXPECT_THROW(id.index(), InputError) << "several segments are not one packed index";
  const Queries q = queries(9);
  ScoreOptions o;
  o.top_k = 3;
  const auto got = id.rank(q.xs, q.ts, o);
  const auto want = hub.rank_batch(q.xs, q.ts, o, {});
  for (std::size_t i = 0; i < want.size(); ++i) EXPECT_EQ(got[i].results.size(), 3u);
  EXPECT_EQ(got[0].results[0].model, want[0][0].model);
  io.build_interrogator = true;
  io.interrogator = "neighbour";
  EXPECT_THROW(Identifier(hub, any.image_encoder, any.text_encoder, nullptr, io), InputError);
  Spec other = any;
  other.image_encoder.version = "0.0.1";
  io.build_interrogator = false;
  EXPECT_THROW(Identifier(hub, other.image_encoder, any.text_encoder, nullptr, io), EncoderMismatchError);
}

// Each segment's two-stage search keeps its share of the hub's candidates and coarse pass
// (times 1.5, at least 64 candidates); a segment holding every live model keeps them all.
TEST(Segments, EachSegmentSearchesItsShareOfTheCandidates) {
  std::vector<Spec> big, small;
  for (int m = 0; m < 300; ++m) big.push_back(spec_of("b" + std::to_string(m), 500 + m));
  for (int m = 0; m < 100; ++m) small.push_back(spec_of("s" + std::to_string(m), 900 + m));
  Segment a, b;
  a.index = std::make_shared<const SpecIndex>(std::move(big));
  b.index = std::make_shared<const SpecIndex>(std::move(small));
  b.id = 1;
  const SegmentedIndex hub({a, b}, nullptr);
  SpecIndex::TwoStage whole;
  whole.candidates = 256;
  whole.coarse = 1000;
  const auto small_search = hub.segment_search(whole, hub.segments()[1]);
  EXPECT_EQ(small_search.candidates, 96u);  // 1.5 x 256 x 100 / 400
  EXPECT_EQ(small_search.coarse, 375u);
  const auto big_search = hub.segment_search(whole, hub.segments()[0]);
  EXPECT_EQ(big_search.candidates, 256u);   // 1.5 x 256 x 3/4 > 256: all of them
  EXPECT_EQ(big_search.coarse, 1000u);
  whole.candidates = 20;
  EXPECT_EQ(hub.segment_search(whole, hub.segments()[1]).candidates, 20u) << "never more than the hub's";
  whole.candidates = 100;
  EXPECT_EQ(hub.segment_search(whole, hub.segments()[1]).candidates, 64u) << "at least 64";
  const SegmentedIndex alone(b.index);
  whole.candidates = 256;
  EXPECT_EQ(alone.segment_search(whole, alone.segments()[0]).candidates, 256u);
  EXPECT_EQ(alone.segment_search(whole, alone.segments()[0]).coarse, 1000u);
}

}  // namespace
}  // namespace gmi
