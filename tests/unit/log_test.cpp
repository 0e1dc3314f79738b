#include <gtest/gtest.h>

#include <fcntl.h>
#include <unistd.h>

#include <fstream>
#include <functional>
#include <regex>
#include <string>
#include <thread>
#include <vector>

#include "gmi/error.hpp"
#include "gmi/log.hpp"
#include "test_support.hpp"

namespace gmi {
namespace {

/// Runs `f` with stderr redirected to a file and returns what it wrote, line by line.
std::vector<std::string> capture_stderr(const std::function<void()>& f) {
  testing::TempDir dir;
  auto path = (dir.path() / "stderr").string();
  int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
  EXPECT_GE(fd, 0);
  int saved = ::dup(STDERR_FILENO);
  ::dup2(fd, STDERR_FILENO);
  ::close(fd);
  try {
    f();
  } catch (...) {
    ::dup2(saved, STDERR_FILENO);
    ::close(saved);
    throw;
  }
  ::dup2(saved, STDERR_FILENO);
  ::close(saved);
  std::ifstream in(path, std::ios::binary);
  std::vector<std::string> lines;
  std::string line;
  while (std::getline(in, line)) lines.push_back(line);
  return lines;
}

const std::regex kTimestamp(R"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z)");

/// Puts the process-wide settings back to the documented defaults after each test.
class Log : public ::testing::Test {
 protected:
  void TearDown() override { log::configure("gmi", "info", "text"); }
};

// Runs in a fresh process (threadsafe death-test style re-executes the binary), so no other
// test's configure() can have run first.
TEST_F(Log, DefaultsBeforeConfigureAreTextInfoAndProcessGmi) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_EXIT(
      {
        log::debug("hidden");
        log::info("before configure", {{"k", "v"}});
        std::exit(0);
      },
      ::testing::ExitedWithCode(0), "^[0-9T:.-]+Z info gmi: before configure k=v\n$");
}

TEST_F(Log, JsonLinesAreValidJson) {
  log::configure("broker", "debug", "json");
  auto lines = capture_stderr([] {
    log::info("job finished", {{"job_id", "j-1"}, {"stage", "score"}, {"n", 3}});
    log::debug("no fields");
    log::warn("line\nbreak \"quoted\"", {{"msg", "shadow"}, {"ts", 1}, {"nested", {{"a", 1}}}});
    log::error("fields not an object", nlohmann::json::array({1, 2}));
  });
  ASSERT_EQ(lines.size(), 4u);
  std::vector<nlohmann::json> parsed;
  for (const auto& l : lines) {
    EXPECT_EQ(l.rfind("{\"ts\":\"", 0), 0u) << "ts must come first: " << l;
    parsed.push_back(nlohmann::json::parse(l));  // throws, failing the test, if invalid
  }
  EXPECT_TRUE(std::regex_match(parsed[0]["ts"].get<std::string>(), kTimestamp)) << lines[0];
  EXPECT_EQ(parsed[0]["level"], "info");
  EXPECT_EQ(parsed[0]["proc"], "broker");
  EXPECT_EQ(parsed[0]["msg"], "job finished");
  EXPECT_EQ(parsed[0]["job_id"], "j-1");
  EXPECT_EQ(parsed[0]["n"], 3);
  EXPECT_EQ(parsed[1]["level"], "debug");
  EXPECT_EQ(parsed[1].size(), 4u);
  EXPECT_EQ(parsed[2]["msg"], "line\nbreak \"quoted\"");
  EXPECT_EQ(parsed[2]["field_msg"], "shadow");
  EXPECT_EQ(parsed[2]["field_ts"], 1);
  EXPECT_EQ(parsed[2]["nested"]["a"], 1);
  EXPECT_EQ(parsed[2]["level"], "warn");
  EXPECT_EQ(parsed[3]["fields"], nlohmann::json::array({1, 2}));
}

TEST_F(Log, TextLinesAreOneLineWithKeyValues) {
  log::configure("worker", "info", "text");
  auto lines = capture_stderr([] {
    log::info("job finished", {{"job", "j-1"}, {"path", "a b"}, {"n", 3}, {"ok", true}});
    log::error("two\nlines");
  });
  ASSERT_EQ(lines.size(), 2u);
  std::smatch m;
  ASSERT_TRUE(std::regex_match(lines[0], m, std::regex(R"((\S+) (.*))"))) << lines[0];
  EXPECT_TRUE(std::regex_match(m[1].str(), kTimestamp)) << lines[0];
  EXPECT_EQ(m[2].str(), "info worker: job finished job=j-1 n=3 ok=true path=\"a b\"");
  EXPECT_NE(lines[1].find(" error worker: two\\nlines"), std::string::npos) << lines[1];
}

TEST_F(Log, LevelFiltersLessSevereLines) {
  log::configure("gmi", "warn", "json");
  EXPECT_FALSE(log::enabled(log::Level::kInfo));
  EXPECT_TRUE(log::enabled(log::Level::kWarn));
  EXPECT_TRUE(log::enabled(log::Level::kError));
  auto lines = capture_stderr([] {
    log::debug("d");
    log::info("i");
    log::warn("w");
    log::error("e");
  });
  ASSERT_EQ(lines.size(), 2u);
  EXPECT_EQ(nlohmann::json::parse(lines[0])["msg"], "w");
  EXPECT_EQ(nlohmann::json::parse(lines[1])["msg"], "e");
}

TEST_F(Log, UnknownLevelOrFormatIsAnInputError) {
  EXPECT_THROW(log::configure("gmi", "verbose", "json"), InputError);
  EXPECT_THROW(log::configure("gmi", "info", "xml"), InputError);
  // A failed configure() changes nothing.
  EXPECT_FALSE(log::enabled(log::Level::kDebug));
  EXPECT_TRUE(log::enabled(log::Level::kInfo));
}

TEST_F(Log, InvalidUtf8NeverThrowsAndStaysValidJson) {
  const std::string bad = "caf\xc3\x28 \xff";
  log::configure("gmi", "info", "json");
  std::vector<std::string> lines;
  EXPECT_NO_THROW(lines = capture_stderr([&] {
                    log::info(bad, {{bad, bad}, {"list", nlohmann::json::array({bad})}});
                  }));
  ASSERT_EQ(lines.size(), 1u);
  auto j = nlohmann::json::parse(lines[0]);
  EXPECT_EQ(j["msg"].get<std::string>().rfind("caf", 0), 0u);
  log::configure("gmi", "info", "text");
  EXPECT_NO_THROW(lines = capture_stderr([&] { log::info(bad, {{"k", bad}}); }));
  EXPECT_EQ(lines.size(), 1u);
}

TEST_F(Log, ConcurrentLinesNeverInterleave) {
  log::configure("gmi", "info", "json");
  constexpr int kThreads = 4, kLines = 300;
  auto lines = capture_stderr([] {
    std::vector<std::thread> threads;
    for (int t = 0; t < kThreads; ++t) {
      threads.emplace_back([t] {
        const std::string padding(200, static_cast<char>('a' + t));
        for (int i = 0; i < kLines; ++i) log::info("tick", {{"t", t}, {"i", i}, {"pad", padding}});
      });
    }
    for (auto& th : threads) th.join();
  });
  ASSERT_EQ(lines.size(), static_cast<size_t>(kThreads * kLines));
  std::vector<int> next(kThreads, 0);
  for (const auto& l : lines) {
    auto j = nlohmann::json::parse(l);
    int t = j["t"];
    EXPECT_EQ(j["i"], next[t]++) << "lines of one thread out of order";
    EXPECT_EQ(j["pad"], std::string(200, static_cast<char>('a' + t)));
  }
}

}  // namespace
}  // namespace gmi
