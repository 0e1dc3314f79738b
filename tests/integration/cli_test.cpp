// End-to-end tests of the `gmi` binary: real processes, real files, a real redis-server.
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cmath>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>

#include "gmi/encoder.hpp"
#include "gmi/image.hpp"
#include "gmi/metric.hpp"
#include "gmi/pipeline.hpp"
#include "gmi/spec_store.hpp"
#include "synthetic_images.hpp"
#include "test_support.hpp"

namespace gmi {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;
using testing::ProcessResult;
using testing::run_process;
using testing::content_image;
using testing::styled;
using testing::write_file;

class CliTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new testing::TempDir();
    for (int style = 0; style < 3; ++style) {
      fs::path mdir = root() / "models" / model(style);
      fs::create_directories(mdir);
      std::ofstream mf(mdir / "manifest.jsonl");
      for (int content = 0; content < 8; ++content) {
        std::string rel = "img" + std::to_string(content) + ".jpg";
        write_file(mdir / rel, encode_jpeg(styled(content_image(content, style), style, content), 92));
        mf << json{{"image", rel}, {"prompt", "pattern number " + std::to_string(content)}}.dump() << "\n";
      }
    }
    // Held-out content (not in any manifest), one query per model.
    std::ofstream qf(root() / "queries.jsonl");
    for (int style = 0; style < 3; ++style) {
      std::string rel = "q" + std::to_string(style) + ".jpg";
      write_file(root() / rel, encode_jpeg(styled(content_image(20 + style, 9), style, 99), 92));
      qf << json{{"image", rel}, {"model", model(style)}}.dump() << "\n";
    }
    qf << "this line is not json\n";
    qf << json{{"image", "missing.jpg"}, {"model", "x"}}.dump() << "\n";
    qf << "   \n";  // blank: answered too, so that output line N is input line N
    for (int style = 0; style < 3; ++style) {
      ProcessResult r = gmi({"spec", "build", "--model", model(style), "--manifest",
                             (root() / "models" / model(style) / "manifest.jsonl").string(), "--store",
                             "dir:" + specs().string(), "--downloads", std::to_string(100 * (style + 1))});
      if (r.exit_code != 0) {
        setup_error_ = "spec build failed (exit " + std::to_string(r.exit_code) + "): " + r.err;
        return;
      }
    }
  }
  static void TearDownTestSuite() { delete dir_; }
  // A failed fixture must fail every test, not skip it.
  void SetUp() override { ASSERT_TRUE(setup_error_.empty()) << setup_error_; }

  static fs::path root() { return dir_->path(); }
  static fs::path specs() { return dir_->path() / "specs"; }
  static std::string model(int style) { return "style-" + std::to_string(style); }
  static ProcessResult gmi(std::vector<std::string> args, std::vector<std::string> env = {}) {
    return testing::run_gmi(std::move(args), env);
  }
  static testing::TempDir* dir_;
  static std::string setup_error_;
};
testing::TempDir* CliTest::dir_ = nullptr;
std::string CliTest::setup_error_;

TEST_F(CliTest, ConfigShowNamesWhereEachSettingCameFrom) {
  ProcessResult r = gmi({"config", "show", "--json", "--set", "score.shards=3"},
                        {"GMI_BROKER_HEARTBEAT_MS=250"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  json all = json::parse(r.out);
  EXPECT_EQ(all["score.shards"]["value"], "3");
  EXPECT_EQ(all["score.shards"]["source"], "flag");
  EXPECT_EQ(all["broker.heartbeat_ms"]["value"], "250");
  EXPECT_EQ(all["broker.heartbeat_ms"]["source"], "env GMI_BROKER_HEARTBEAT_MS");
  EXPECT_EQ(all["redis.uri"]["source"], "default");
  EXPECT_EQ(all["broker.heartbeat_ms"]["type"], "an integer in [10, 600000]");
  ProcessResult bad = gmi({"config", "show", "--set", "broker.hartbeat_ms=1"});
  EXPECT_EQ(bad.exit_code, 2);
  EXPECT_NE(bad.err.find("broker.hartbeat_ms"), std::string::npos) << bad.err;
  // It validates what it prints: every bad value is named, and it exits 2.
  ProcessResult values =
      gmi({"config", "show", "--set", "broker.heartbeat_ms=5", "--set", "log.format=xml"},
          {"GMI_CURVE_ENABLED=maybe"});
  EXPECT_EQ(values.exit_code, 2);
  for (const char* key : {"broker.heartbeat_ms", "log.format", "curve.enabled"}) {
    EXPECT_NE(values.err.find(key), std::string::npos) << key << ": " << values.err;
  }
  EXPECT_NE(values.out.find("broker.heartbeat_ms"), std::string::npos);  // still printed
  // A process refuses to start on the same values, naming them.
  ProcessResult broker = gmi({"broker", "--set", "log.format=xml"});
  EXPECT_EQ(broker.exit_code, 2);
  EXPECT_NE(broker.err.find("log.format"), std::string::npos) << broker.err;
}

TEST_F(CliTest, DuplicateYamlKeysAreAnError) {
  const fs::path file = root() / "dup.yaml";
  std::ofstream(file) << "broker:\n  heartbeat_ms: 200\n  liveness: 3\n  heartbeat_ms: 900\n";
  ProcessResult r = gmi({"config", "show", "--config", file.string()});
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_NE(r.err.find("broker.heartbeat_ms"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("line 4"), std::string::npos) << r.err;
}

// Holds a TCP port (listening on all addresses) for the scope.
class TakenPort {
 public:
  TakenPort() : port_(testing::free_port()) {
    fd_ = ::socket(AF_INET, SOCK_STREAM, 0);
    int one = 1;
    ::setsockopt(fd_, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_port = htons(static_cast<std::uint16_t>(port_));
    a.sin_addr.s_addr = htonl(INADDR_ANY);
    ok_ = ::bind(fd_, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0 && ::listen(fd_, 4) == 0;
  }
  ~TakenPort() { ::close(fd_); }
  int port() const { return port_; }
  bool ok() const { return ok_; }

 private:
  int port_;
  int fd_ = -1;
  bool ok_ = false;
};

TEST_F(CliTest, ATakenPortIsAMessageAndExit1NeverAnAbort) {
  const std::vector<std::string> base = {
      "GMI_REDIS_URI=redis://127.0.0.1:1", "GMI_LOG_FORMAT=text",
      "GMI_BROKER_FRONTEND=tcp://127.0.0.1:" + std::to_string(testing::free_port()),
      "GMI_BROKER_BACKEND=tcp://127.0.0.1:" + std::to_string(testing::free_port())};
  {
    TakenPort ops;
    ASSERT_TRUE(ops.ok());
    auto env = base;
    env.push_back("GMI_SERVE_OPS_PORT=" + std::to_string(ops.port()));
    env.push_back("GMI_GATEWAY_PORT=" + std::to_string(testing::free_port()));
    ProcessResult r = gmi({"serve"}, env);  // it aborted with SIGABRT here
    EXPECT_EQ(r.exit_code, 1) << r.err;
    EXPECT_NE(r.err.find(std::to_string(ops.port())), std::string::npos) << r.err;
  }
  {
    TakenPort http;
    ASSERT_TRUE(http.ok());
    auto env = base;
    env.push_back("GMI_SERVE_OPS_PORT=-1");
    env.push_back("GMI_GATEWAY_PORT=" + std::to_string(http.port()));
    ProcessResult r = gmi({"serve"}, env);
    EXPECT_EQ(r.exit_code, 1) << r.err;
    EXPECT_NE(r.err.find(std::to_string(http.port())), std::string::npos) << r.err;
  }
  {
    TakenPort ops;
    auto env = base;
    env.push_back("GMI_BROKER_OPS_PORT=" + std::to_string(ops.port()));
    ProcessResult r = gmi({"broker"}, env);
    EXPECT_EQ(r.exit_code, 1) << r.err;
  }
}

TEST_F(CliTest, UsageErrorsAndBadIdsExit2) {
  for (auto args : std::vector<std::vector<std::string>>{
           {"no-such-command"},
           {"identify", "--top", "x", "q.jpg"},
           {"spec"},
           {"config", "show", "--bogus"},
           {"spec", "remove", "--store", "dir:" + specs().string(), "bad id!"},
           {"job", "not-a-job-id", "--broker", "tcp://127.0.0.1:1"}}) {
    ProcessResult r = gmi(args);
    EXPECT_EQ(r.exit_code, 2) << args.front() << ": " << r.err;
    EXPECT_FALSE(r.err.empty()) << args.front();
  }
}

TEST_F(CliTest, HelpOnEverySubcommand) {
  for (auto args : std::vector<std::vector<std::string>>{
           {"--help"}, {"spec", "--help"}, {"spec", "build", "--help"}, {"spec", "inspect", "--help"},
           {"identify", "--help"}, {"serve", "--help"}, {"broker", "--help"},
           {"worker", "--help"}, {"gateway", "--help"}, {"query", "--help"}, {"upload", "--help"},
           {"job", "--help"}, {"keygen", "--help"}, {"config", "show", "--help"}}) {
    ProcessResult r = gmi(args);
    EXPECT_EQ(r.exit_code, 0) << args.back();
    EXPECT_NE(r.out.find("Usage"), std::string::npos);
  }
}

TEST_F(CliTest, IdentifyJsonRanksTheTrueModelFirst) {
  for (int style = 0; style < 3; ++style) {
    ProcessResult r = gmi({"identify", "--store", "dir:" + specs().string(), "--top", "3", "--json",
                           (root() / ("q" + std::to_string(style) + ".jpg")).string()});
    ASSERT_EQ(r.exit_code, 0) << r.err;
    json j = json::parse(r.out);
    ASSERT_EQ(j["results"].size(), 3u);
    EXPECT_EQ(j["results"][0]["rank"], 1);
    EXPECT_EQ(j["results"][0]["model"], model(style)) << r.out;
    EXPECT_LE(j["results"][0]["score"].get<double>(), j["results"][1]["score"].get<double>());
  }
}

TEST_F(CliTest, IdentifyTableForPeople) {
  ProcessResult r = gmi({"identify", "--store", "dir:" + specs().string(), "--top", "2",
                         (root() / "q1.jpg").string()});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("rank"), std::string::npos);
  EXPECT_NE(r.out.find(model(1)), std::string::npos);
}

TEST_F(CliTest, BatchKeepsFieldsAndOrderAndReportsBadLines) {
  for (std::string scorer : {"weighted", "rkme", "mean", "nearest", "popularity"}) {
    ProcessResult r = gmi({"identify", "--store", "dir:" + specs().string(), "--top", "0", "--scorer",
                           scorer, "--batch", (root() / "queries.jsonl").string()});
    ASSERT_EQ(r.exit_code, 0) << r.err;
    std::vector<json> lines;
    std::istringstream in(r.out);
    for (std::string l; std::getline(in, l);) lines.push_back(json::parse(l));
    ASSERT_EQ(lines.size(), 6u) << r.out;
    for (int i = 0; i < 3; ++i) {
      EXPECT_EQ(lines[i]["model"], model(i));  // input fields kept, in input order
      ASSERT_EQ(lines[i]["results"].size(), 3u);
      if (scorer != "popularity") EXPECT_EQ(lines[i]["results"][0]["model"], model(i)) << scorer;
    }
    if (scorer == "popularity") EXPECT_EQ(lines[0]["results"][0]["model"], model(2));
    EXPECT_EQ(lines[3]["line"], 4);
    EXPECT_TRUE(lines[3].contains("error"));
    EXPECT_TRUE(lines[4].contains("error"));
    EXPECT_FALSE(lines[4].contains("results"));
    EXPECT_EQ(lines[5]["line"], 6);
    EXPECT_NE(lines[5].value("error", "").find("blank"), std::string::npos) << lines[5];
  }
}

TEST_F(CliTest, InspectShowsQuality) {
  ProcessResult r = gmi({"spec", "inspect", "--json", "--store", "dir:" + specs().string()});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  json j = json::parse(r.out);
  ASSERT_EQ(j["specs"].size(), 3u);
  EXPECT_GE(j["specs"][0]["residual_mmd2"].get<double>(), 0.0);
  EXPECT_EQ(j["specs"][0]["n"], 8);
  ProcessResult missing = gmi({"spec", "inspect", "--store", "dir:" + specs().string(), "nope"});
  EXPECT_EQ(missing.exit_code, 2);
}

TEST_F(CliTest, BadQueryImagesGiveClearErrors) {
  struct Case {
    std::string name;
    std::vector<std::uint8_t> bytes;
    std::string expect;
  };
  auto jpeg = encode_jpeg(content_image(1, 1), 90);
  std::vector<Case> cases = {
      {"empty.jpg", {}, "empty"},
      {"text.jpg", {'h', 'e', 'l', 'l', 'o', ' ', 'w', 'o', 'r', 'l', 'd'}, "unsupported"},
      {"truncated.jpg", std::vector<std::uint8_t>(jpeg.begin(), jpeg.begin() + jpeg.size() / 2), "truncated"},
      {"gif.gif", {'G', 'I', 'F', '8', '9', 'a', 0, 0, 0, 0, 0, 0}, "GIF"},
  };
  for (const auto& c : cases) {
    write_file(root() / "bad" / c.name, c.bytes);
    ProcessResult r = gmi({"identify", "--store", "dir:" + specs().string(), (root() / "bad" / c.name).string()});
    EXPECT_EQ(r.exit_code, 2) << c.name << ": " << r.err;
    EXPECT_NE(r.err.find(c.expect), std::string::npos) << c.name << ": " << r.err;
  }
  ProcessResult r = gmi({"identify", "--store", "dir:" + specs().string(), (root() / "nothere.jpg").string()});
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.err.find("nothere.jpg"), std::string::npos);
}

TEST_F(CliTest, SpecBuildReportsBadLinesAndSkipsBadImages) {
  fs::path mdir = root() / "messy";
  fs::create_directories(mdir);
  for (int i = 0; i < 5; ++i)
    write_file(mdir / ("ok" + std::to_string(i) + ".jpg"), encode_jpeg(styled(content_image(i, 0), 1, i)));
  write_file(mdir / "broken.jpg", {0xFF, 0xD8, 0xFF, 0xE0, 0, 0x10});
  std::ofstream mf(mdir / "manifest.jsonl");
  for (int i = 0; i < 5; ++i) mf << json{{"image", "ok" + std::to_string(i) + ".jpg"}, {"prompt", "p"}}.dump() << "\n";
  mf << "{broken json\n";
  mf << json{{"image", "broken.jpg"}, {"prompt", "p"}}.dump() << "\n";
  mf << json{{"prompt", "no image"}}.dump() << "\n";
  mf.close();
  testing::TempDir out;
  ProcessResult r = gmi({"spec", "build", "--model", "messy", "--manifest", (mdir / "manifest.jsonl").string(),
                         "--store", "dir:" + out.path().string(), "--json"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.err.find("manifest.jsonl:6"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("manifest.jsonl:7"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("manifest.jsonl:8"), std::string::npos) << r.err;
  json j = json::parse(r.out);
  EXPECT_EQ(j["spec"]["n"], 5);
}

TEST_F(CliTest, TooFewUsableImagesFailsClearly) {
  fs::path mdir = root() / "tiny";
  fs::create_directories(mdir);
  write_file(mdir / "a.jpg", encode_jpeg(content_image(1, 0)));
  std::ofstream(mdir / "manifest.jsonl") << json{{"image", "a.jpg"}, {"prompt", "p"}}.dump() << "\n"
                                         << json{{"image", "gone.jpg"}, {"prompt", "p"}}.dump() << "\n";
  testing::TempDir out;
  ProcessResult r = gmi({"spec", "build", "--model", "tiny", "--manifest", (mdir / "manifest.jsonl").string(),
                         "--store", "dir:" + out.path().string()});
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_NE(r.err.find("usable samples"), std::string::npos) << r.err;
  EXPECT_TRUE(fs::is_empty(out.path()) || !fs::exists(out.path() / "tiny.gmispec"));
}

TEST_F(CliTest, BadModelIdAndMissingManifestAreRejected) {
  ProcessResult r = gmi({"spec", "build", "--model", "../evil", "--manifest", "/nonexistent.jsonl", "--store",
                         "dir:" + specs().string()});
  EXPECT_EQ(r.exit_code, 2) << r.err;
  r = gmi({"spec", "build", "--model", "ok", "--manifest", "/nonexistent.jsonl", "--store",
           "dir:" + specs().string()});
  EXPECT_EQ(r.exit_code, 1) << r.err;
  EXPECT_NE(r.err.find("nonexistent.jsonl"), std::string::npos);
}

TEST_F(CliTest, RefusesSpecsFromAnotherEncoder) {
  testing::TempDir store_dir;
  auto store = open_spec_store("dir:" + store_dir.path().string());
  auto te = make_builtin_text_encoder();
  EncoderIdentity other{"clip-vit-b32", "openai", 512, 1.0};
  RowMatrix x = RowMatrix::Random(6, 512).rowwise().normalized();
  RowMatrix t = te->encode({"a", "b", "c", "d", "e", "f"});
  SpecBuildOptions opt;
  opt.rkme.reduced_size = 3;
  opt.rkme.gamma = 1.0;
  store->put(build_spec_from_embeddings("clip-model", x, t, other, te->identity(), opt));
  ProcessResult r = gmi({"identify", "--store", "dir:" + store_dir.path().string(), (root() / "q0.jpg").string()});
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_NE(r.err.find("clip-vit-b32"), std::string::npos) << r.err;
}

// The documented flow with the hub-learned metric: identify learns one on the fly from the
// specs it loaded; `gmi hub learn-metric` stores versions 1, 2, ... which identify then
// uses; --metric none turns it off; a metric of another encoder is refused, naming both.
TEST_F(CliTest, IdentifyUsesTheHubMetricStoredOrLearntOnTheFly) {
  testing::TempDir tmp;
  const fs::path store_dir = tmp.path() / "specs";
  fs::copy(specs(), store_dir, fs::copy_options::recursive);
  const std::string store = "dir:" + store_dir.string();
  // Two more models (near-duplicates of styles 0 and 1): five, enough to learn from.
  for (int style = 0; style < 2; ++style) {
    const fs::path mdir = tmp.path() / ("twin-" + std::to_string(style));
    fs::create_directories(mdir);
    std::ofstream mf(mdir / "manifest.jsonl");
    for (int content = 0; content < 8; ++content) {
      const std::string rel = "img" + std::to_string(content) + ".jpg";
      write_file(mdir / rel, encode_jpeg(styled(content_image(30 + content, style), style, 50 + content), 80));
      mf << json{{"image", rel}, {"prompt", "pattern number " + std::to_string(content)}}.dump() << "\n";
    }
    mf.close();
    ProcessResult b = gmi({"spec", "build", "--model", "twin-" + std::to_string(style), "--manifest",
                           (mdir / "manifest.jsonl").string(), "--store", store});
    ASSERT_EQ(b.exit_code, 0) << b.err;
  }
  const std::string query = (root() / "q2.jpg").string();
  ProcessResult r = gmi({"identify", "--store", store, "--json", "--top", "5", query});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.err.find("learnt on the fly"), std::string::npos) << r.err;
  json on_the_fly = json::parse(r.out);
  EXPECT_EQ(on_the_fly["metric"]["version"], 0);
  EXPECT_EQ(on_the_fly["results"][0]["model"], model(2));

  r = gmi({"identify", "--store", store, "--json", "--top", "5", "--metric", "none", query});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_TRUE(json::parse(r.out)["metric"].is_null());
  EXPECT_NE(json::parse(r.out)["results"], on_the_fly["results"]) << "the metric changes the scores";

  r = gmi({"identify", "--store", store, "--metric", "stored", query});
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_NE(r.err.find("no metric"), std::string::npos) << r.err;

  r = gmi({"hub", "learn-metric", "--store", store, "--json"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  json learnt = json::parse(r.out);
  EXPECT_EQ(learnt["version"], 1);
  EXPECT_EQ(learnt["models"], 5);
  EXPECT_EQ(learnt["checksum"], on_the_fly["metric"]["checksum"]) << "the same specs learn the same metric";
  r = gmi({"hub", "learn-metric", "--store", store, "--metric-dims", "4"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("v2"), std::string::npos) << r.out;
  r = gmi({"identify", "--store", store, "--json", "--top", "5", query});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.err.find("(stored)"), std::string::npos) << r.err;
  EXPECT_EQ(json::parse(r.out)["metric"]["version"], 2);
  EXPECT_EQ(json::parse(r.out)["metric"]["dim"], 4);
  r = gmi({"hub", "metric", "--store", store});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("lda"), std::string::npos) << r.out;

  // A metric of another image encoder, stored over this hub's: refused with both names.
  {
    auto s = open_spec_store(store);
    Metric foreign = *s->get_metric();
    foreign.image_encoder.name = "other-encoder";
    s->put_metric(foreign, 2);
  }
  r = gmi({"identify", "--store", store, query});
  EXPECT_EQ(r.exit_code, 2) << r.out;
  EXPECT_NE(r.err.find("other-encoder"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("learn-metric"), std::string::npos) << r.err;
  r = gmi({"identify", "--store", store, "--metric", "none", query});
  EXPECT_EQ(r.exit_code, 0) << r.err;

  r = gmi({"hub", "remove-metric", "--store", store});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  r = gmi({"hub", "metric", "--store", store});
  EXPECT_EQ(r.exit_code, 2);
  // Too few specs to learn from is a clear bad-input exit.
  testing::TempDir small;
  fs::copy(specs(), small.path(), fs::copy_options::recursive);
  r = gmi({"hub", "learn-metric", "--store", "dir:" + small.path().string()});
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_NE(r.err.find("at least 4"), std::string::npos) << r.err;
}

TEST_F(CliTest, RedisStoreRoundTripThroughTheCli) {
  testing::RedisServer redis("s3cret");
  if (!redis.started()) GTEST_SKIP() << "no redis-server";
  std::vector<std::string> env = {"GMI_REDIS_PASSWORD=s3cret"};
  ProcessResult r = gmi({"spec", "build", "--model", model(1), "--manifest",
                         (root() / "models" / model(1) / "manifest.jsonl").string(), "--store", redis.uri()},
                        env);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  r = gmi({"spec", "build", "--model", model(2), "--manifest",
           (root() / "models" / model(2) / "manifest.jsonl").string(), "--store", redis.uri()},
          env);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  r = gmi({"identify", "--store", redis.uri(), "--json", "--top", "1", (root() / "q2.jpg").string()}, env);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(json::parse(r.out)["results"][0]["model"], model(2));
  // Without the password the store refuses, and the CLI says so.
  r = gmi({"identify", "--store", redis.uri(), (root() / "q2.jpg").string()});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("auth"), std::string::npos) << r.err;
}

}  // namespace
}  // namespace gmi
