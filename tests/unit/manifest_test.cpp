#include <gtest/gtest.h>

#include <fstream>

#include "gmi/error.hpp"
#include "gmi/manifest.hpp"
#include "test_support.hpp"

namespace gmi {
namespace {

TEST(Manifest, ReadsGoodLinesAndReportsBadOnesWithLineNumbers) {
  testing::TempDir dir;
  auto path = dir.path() / "manifest.jsonl";
  std::ofstream(path) << R"({"image": "a.jpg", "prompt": "a cat"})" << "\n"
                      << "\n"
                      << "not json\n"
                      << R"({"prompt": "no image"})" << "\n"
                      << R"({"image": "b.jpg"})" << "\n"
                      << R"([1, 2])" << "\n"
                      << R"({"image": "sub/c.png", "prompt": "a dog", "seed": 3})" << "\n";
  Manifest m = read_manifest(path, /*require_prompt=*/true);
  ASSERT_EQ(m.entries.size(), 2u);
  EXPECT_EQ(m.entries[0].line, 1);
  EXPECT_EQ(m.entries[0].image, dir.path() / "a.jpg");
  EXPECT_EQ(m.entries[1].line, 7);
  EXPECT_EQ(m.entries[1].fields["seed"], 3);
  ASSERT_EQ(m.issues.size(), 4u);
  EXPECT_EQ(m.issues[0].line, 3);
  EXPECT_EQ(m.issues[1].line, 4);
  EXPECT_EQ(m.issues[2].line, 5);  // prompt required
  EXPECT_EQ(m.issues[3].line, 6);
}

TEST(Manifest, PromptOptionalForQueries) {
  testing::TempDir dir;
  auto path = dir.path() / "q.jsonl";
  std::ofstream(path) << R"({"image": "q.jpg", "model": "x"})" << "\n";
  Manifest m = read_manifest(path, /*require_prompt=*/false);
  ASSERT_EQ(m.entries.size(), 1u);
  EXPECT_TRUE(m.entries[0].prompt.empty());
}

TEST(Manifest, ConfinedPathsMayNotEscape) {
  testing::TempDir dir;
  auto path = dir.path() / "m.jsonl";
  std::ofstream(path) << R"({"image": "../etc/passwd", "prompt": "x"})" << "\n"
                      << R"({"image": "/etc/passwd", "prompt": "x"})" << "\n";
  Manifest m = read_manifest(path, true, /*confine=*/true);
  EXPECT_TRUE(m.entries.empty());
  EXPECT_EQ(m.issues.size(), 2u);
}

TEST(Manifest, MissingFileIsAnIoError) {
  EXPECT_THROW(read_manifest("/nonexistent/manifest.jsonl", true), IoError);
}

}  // namespace
}  // namespace gmi
