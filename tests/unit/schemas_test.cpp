// Keeps the JSON Schemas of the ZeroMQ protocol (schemas/*.schema.json) and the C++ header
// validator (core/service/src/wire.cpp) in step: both run over the same examples in
// schemas/examples/{valid,invalid}/. The C++ side runs here; the JSON Schema side runs in
// scripts/check_schemas.py, which the last test calls.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "gmi/wire.hpp"
#include "test_support.hpp"

namespace gmi {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;
using wire::Channel;

const fs::path kExamples = fs::path(GMI_SOURCE_DIR) / "schemas" / "examples";

struct Example {
  std::string name;  // "valid/b2c-job.json"
  std::string channel_name;
  Channel channel{};
  std::size_t frames = 0;
  json header;
  std::string why;
};

std::optional<Channel> channel_of(const std::string& name) {
  static const std::map<std::string, Channel> channels{
      {"client-to-broker", Channel::kClientToBroker},
      {"broker-to-client", Channel::kBrokerToClient},
      {"worker-to-broker", Channel::kWorkerToBroker},
      {"broker-to-worker", Channel::kBrokerToWorker}};
  auto it = channels.find(name);
  if (it == channels.end()) return std::nullopt;
  return it->second;
}

// Every example in schemas/examples/<kind>/, sorted by name. A malformed file is a test
// failure (reported here), never silently skipped.
std::vector<Example> load_examples(const std::string& kind) {
  std::vector<fs::path> paths;
  const fs::path dir = kExamples / kind;
  if (fs::is_directory(dir)) {
    for (const auto& entry : fs::directory_iterator(dir)) {
      if (entry.is_regular_file() && entry.path().extension() == ".json") {
        paths.push_back(entry.path());
      }
    }
  }
  std::sort(paths.begin(), paths.end());
  std::vector<Example> out;
  for (const auto& path : paths) {
    const std::string name = kind + "/" + path.filename().string();
    std::ifstream in(path);
    json file = json::parse(in, nullptr, /*allow_exceptions=*/false);
    if (file.is_discarded() || !file.is_object()) {
      ADD_FAILURE() << name << ": not a JSON object";
      continue;
    }
    Example ex;
    ex.name = name;
    ex.channel_name = file.value("channel", "");
    auto channel = channel_of(ex.channel_name);
    if (!channel) {
      ADD_FAILURE() << name << ": unknown channel \"" << ex.channel_name << "\"";
      continue;
    }
    ex.channel = *channel;
    if (!file.contains("frames") || !file["frames"].is_number_unsigned()) {
      ADD_FAILURE() << name << ": \"frames\" must be an integer >= 0";
      continue;
    }
    ex.frames = file["frames"].get<std::size_t>();
    if (!file.contains("header")) {
      ADD_FAILURE() << name << ": no \"header\"";
      continue;
    }
    ex.header = file["header"];
    if (file.contains("why") && file["why"].is_string()) ex.why = file["why"].get<std::string>();
    out.push_back(std::move(ex));
  }
  return out;
}

TEST(Schemas, CppValidatorAcceptsEveryValidExample) {
  const auto examples = load_examples("valid");
  ASSERT_GE(examples.size(), 15u) << "expected at least one valid example per message type in "
                                  << (kExamples / "valid");
  std::set<std::pair<std::string, std::string>> covered;
  for (const auto& ex : examples) {
    try {
      wire::validate_header(ex.header, ex.channel, ex.frames);
      covered.insert({ex.channel_name, ex.header.value("type", "")});
    } catch (const std::exception& e) {
      ADD_FAILURE() << ex.name << ": wire::validate_header rejects a valid example: " << e.what()
                    << "\n  header: " << ex.header.dump() << "\n  frames: " << ex.frames;
    }
  }
  // Every message type of schemas/README.md has a valid example on its channel.
  const std::vector<std::pair<std::string, std::string>> types{
      {"client-to-broker", "submit_query"}, {"client-to-broker", "submit_upload"},
      {"client-to-broker", "get_job"},      {"client-to-broker", "ping"},
      {"broker-to-client", "accepted"},     {"broker-to-client", "job"},
      {"broker-to-client", "error"},        {"broker-to-client", "pong"},
      {"worker-to-broker", "ready"},        {"worker-to-broker", "results"},
      {"worker-to-broker", "heartbeat"},    {"worker-to-broker", "bye"},
      {"broker-to-worker", "tasks"},        {"broker-to-worker", "heartbeat"},
      {"broker-to-worker", "reconnect"}};
  for (const auto& t : types) {
    EXPECT_TRUE(covered.count(t)) << "no valid example (accepted by wire.cpp) of \"" << t.second
                                  << "\" on " << t.first;
  }
}

TEST(Schemas, CppValidatorRejectsEveryInvalidExample) {
  const auto examples = load_examples("invalid");
  ASSERT_GE(examples.size(), 12u) << "expected at least 12 invalid examples in "
                                  << (kExamples / "invalid");
  for (const auto& ex : examples) {
    EXPECT_FALSE(ex.why.empty()) << ex.name << ": an invalid example must say \"why\"";
    try {
      wire::validate_header(ex.header, ex.channel, ex.frames);
      ADD_FAILURE() << ex.name << ": wire::validate_header accepts an invalid example (" << ex.why
                    << ")\n  header: " << ex.header.dump() << "\n  frames: " << ex.frames;
    } catch (const wire::WireError& e) {
      EXPECT_STRNE(e.what(), "") << ex.name << ": a WireError must name the problem";
    } catch (const std::exception& e) {
      ADD_FAILURE() << ex.name << ": wire::validate_header throws something other than "
                    << "wire::WireError (receivers catch only WireError): " << e.what();
    }
  }
}

TEST(Schemas, JsonSchemasAgreeWithTheExamples) {
  const std::string python = "/usr/bin/python3";
  const std::string script = std::string(GMI_SOURCE_DIR) + "/scripts/check_schemas.py";
  const bool required = std::getenv("GMI_REQUIRE_REDIS") != nullptr;
  if (!fs::exists(python)) {
    if (required) FAIL() << python << " not found but GMI_REQUIRE_REDIS is set";
    GTEST_SKIP() << python << " not found: the JSON Schema side is not checked";
  }
  auto r = testing::run_process({python, script});
  if (r.exit_code == 77) {  // check_schemas.py: jsonschema missing or too old
    if (required) {
      FAIL() << "python3-jsonschema is missing but GMI_REQUIRE_REDIS is set: " << r.err;
    }
    GTEST_SKIP() << "python3-jsonschema is not installed (apt-get install python3-jsonschema): "
                 << "the JSON Schema side is not checked";
  }
  EXPECT_EQ(r.exit_code, 0) << "scripts/check_schemas.py found a mismatch:\n" << r.out << r.err;
}

}  // namespace
}  // namespace gmi
