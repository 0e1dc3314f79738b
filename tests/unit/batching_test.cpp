// The batching policy in work units: tasks per batch by their charges, and encoder passes
// that count images across tasks.
#include "gmi/workers/batching.hpp"

#include <gtest/gtest.h>

#include <numeric>

namespace gmi::workers {
namespace {

TEST(Batching, TakesTasksWhileTheirUnitsFit) {
  EXPECT_EQ(tasks_for_batch({1, 1, 1, 1}, 3), 3u);  // tasks as units
  EXPECT_EQ(tasks_for_batch({8, 1, 1}, 64), 3u);    // an upload of 8 images and two queries share
  EXPECT_EQ(tasks_for_batch({60, 8, 1}, 64), 1u);   // the next one does not fit: it waits
  EXPECT_EQ(tasks_for_batch({64, 1}, 64), 1u);      // full
  EXPECT_EQ(tasks_for_batch({64}, 16), 1u);         // larger than a batch: alone
  EXPECT_EQ(tasks_for_batch({}, 16), 0u);
}

TEST(Batching, PassesHoldAtMostMaxImagesAndMixJobs) {
  // An upload of 1000 images: passes of 64 (15 full, one of 40), never one giant batch.
  const auto big = image_passes({1000}, 64);
  ASSERT_EQ(big.size(), 16u);
  std::size_t total = 0;
  for (const auto& pass : big) {
    std::size_t n = 0;
    for (const auto& r : pass) n += r.count;
    EXPECT_LE(n, 64u);
    total += n;
  }
  EXPECT_EQ(total, 1000u);
  EXPECT_EQ(big.back(), (std::vector<ImageRange>{{0, 960, 40}}));

  // Queries of different jobs and a small upload share passes; a task may span two.
  const auto mixed = image_passes({1, 5, 1, 0, 2}, 3);
  const std::vector<std::vector<ImageRange>> want{
      {{0, 0, 1}, {1, 0, 2}}, {{1, 2, 3}}, {{2, 0, 1}, {4, 0, 2}}};
  EXPECT_EQ(mixed, want);
  EXPECT_TRUE(image_passes({0, 0}, 4).empty());
}

}  // namespace
}  // namespace gmi::workers
