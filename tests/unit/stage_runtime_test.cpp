// The runtime's promise about stage failures: a failure belongs to one task.
#include <gtest/gtest.h>

#include <new>
#include <stdexcept>

#include "gmi/error.hpp"
#include "gmi/workers/runtime.hpp"

namespace gmi::workers {
namespace {

// Throws for the whole batch when any task's params name a failure; alone, each task
// either succeeds or throws what it names.
class Fussy : public Stage {
 public:
  std::string name() const override { return "fussy"; }
  BatchPolicy batch_policy() const override { return {}; }
  std::vector<StageResult> process(std::vector<StageTask>& batch) override {
    ++calls;
    for (const auto& t : batch) {
      const std::string what = t.params.value("throw", "");
      if (what == "input") throw InputError("this task's image is not an image");
      if (what == "alloc") throw std::bad_alloc();
      if (what == "io") throw IoError("the disk went away");
    }
    std::vector<StageResult> out;
    for (const auto& t : batch) {
      StageResult r;
      r.meta = {{"done", t.id}};
      out.push_back(r);
    }
    return out;
  }
  int calls = 0;
};

StageTask task(const std::string& id, const std::string& what = "") {
  StageTask t;
  t.id = id;
  t.params = what.empty() ? nlohmann::json::object() : nlohmann::json{{"throw", what}};
  return t;
}

TEST(StageRuntime, AFailingTaskFailsAloneAndItsBatchMatesFinish) {
  Fussy stage;
  std::vector<StageTask> batch{task("a"), task("b", "input"), task("c"), task("d", "alloc"),
                               task("e", "io")};
  const auto results = process_batch(stage, batch);
  ASSERT_EQ(results.size(), 5u);
  EXPECT_TRUE(results[0].ok);
  EXPECT_EQ(results[0].meta["done"], "a");
  EXPECT_TRUE(results[2].ok);
  EXPECT_EQ(results[2].meta["done"], "c");
  // Bad input is the task's own error, not retryable (it was retried 4 times as a batch).
  EXPECT_FALSE(results[1].ok);
  EXPECT_FALSE(results[1].retryable);
  EXPECT_NE(results[1].error.find("not an image"), std::string::npos) << results[1].error;
  // An allocation this input cannot get is this input's error too.
  EXPECT_FALSE(results[3].ok);
  EXPECT_FALSE(results[3].retryable);
  EXPECT_NE(results[3].error.find("out of memory"), std::string::npos) << results[3].error;
  // An environment failure may pass: retryable.
  EXPECT_FALSE(results[4].ok);
  EXPECT_TRUE(results[4].retryable);
  EXPECT_EQ(stage.calls, 1 + 5);  // the batch, then each task alone
}

TEST(StageRuntime, AGoodBatchRunsOnce) {
  Fussy stage;
  std::vector<StageTask> batch{task("a"), task("b")};
  const auto results = process_batch(stage, batch);
  ASSERT_EQ(results.size(), 2u);
  EXPECT_TRUE(results[0].ok && results[1].ok);
  EXPECT_EQ(stage.calls, 1);
}

TEST(StageRuntime, AStageReturningTheWrongNumberOfResultsFailsRetryably) {
  class Short : public Fussy {
   public:
    std::vector<StageResult> process(std::vector<StageTask>&) override { return {}; }
  } stage;
  std::vector<StageTask> batch{task("a")};
  const auto results = process_batch(stage, batch);
  ASSERT_EQ(results.size(), 1u);
  EXPECT_FALSE(results[0].ok);
  EXPECT_TRUE(results[0].retryable);
}

}  // namespace
}  // namespace gmi::workers
