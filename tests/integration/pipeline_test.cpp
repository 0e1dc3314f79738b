// The pipeline end to end: a real redis-server, a real broker process and real stage worker
// processes over TCP ZeroMQ sockets, all started here. Fault tests kill -9 each kind of
// process mid-job and check that every accepted job still ends (finished, or failed with a
// reason), once.
#include <signal.h>

#include <gtest/gtest.h>
#include <hiredis/hiredis.h>

#include <fstream>
#include <map>
#include <set>
#include <thread>

#include <nlohmann/json.hpp>
#include <zmq.hpp>

#include "gmi/broker_client.hpp"
#include "gmi/encoder_registry.hpp"
#include "gmi/image.hpp"
#include "gmi/job_store.hpp"
#include "gmi/redis.hpp"
#include "gmi/spec_store.hpp"
#include "gmi/wire.hpp"
#include "synthetic_images.hpp"
#include "test_support.hpp"

// After Eigen: <httplib.h> pulls in <resolv.h>, whose _res macro breaks Eigen's headers.
#include <httplib.h>

namespace gmi {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;
using namespace std::chrono_literals;
using testing::BackgroundProcess;
using testing::content_image;
using testing::styled;
using testing::write_file;

std::string as_string(const std::vector<std::uint8_t>& v) { return std::string(v.begin(), v.end()); }

/// The value of the first sample line of Prometheus text that starts with `series`; -1 if none.
double metric(const std::string& text, const std::string& series) {
  std::size_t at = 0;
  while ((at = text.find(series, at)) != std::string::npos) {
    if (at == 0 || text[at - 1] == '\n') {
      const std::size_t space = text.find(' ', at + series.size());
      if (space != std::string::npos && space == at + series.size()) return std::stod(text.substr(space + 1));
    }
    at += series.size();
  }
  return -1;
}

/// A tiny random CLIP (image + text towers, 32 dims) and a tiny captioner, exported once per
/// test process by scripts/export_clip.py (python3-torch).
const fs::path& tiny_clip() {
  static const testing::TempDir dir;
  static const bool made = [] {
    auto r = testing::run_process({"/usr/bin/python3", std::string(GMI_SOURCE_DIR) + "/scripts/export_clip.py",
                                   "--random-init", "--tiny", "--captioner-tiny", "--out", dir.path().string()});
    EXPECT_EQ(r.exit_code, 0) << r.err;
    return r.exit_code == 0;
  }();
  (void)made;
  return dir.path();
}

/// A whole deployment on loopback: Redis, a broker, and workers, each a real process.
class Cluster {
 public:
  explicit Cluster(bool persistent_redis = true, std::vector<std::string> extra_env = {})
      : redis_("", persistent_redis) {
    frontend_ = "tcp://127.0.0.1:" + std::to_string(testing::free_port());
    backend_ = "tcp://127.0.0.1:" + std::to_string(testing::free_port());
    broker_ops_ = testing::free_port();
    env_ = {"GMI_REDIS_URI=" + redis_.uri(),
            "GMI_BROKER_FRONTEND=" + frontend_,
            "GMI_BROKER_BACKEND=" + backend_,
            "GMI_WORKER_BROKER=" + backend_,
            "GMI_GATEWAY_BROKER=" + frontend_,
            "GMI_BROKER_OPS_PORT=" + std::to_string(broker_ops_),
            "GMI_WORKER_OPS_PORT=-1",
            "GMI_BROKER_HEARTBEAT_MS=100",
            "GMI_BROKER_LIVENESS=10",
            "GMI_BROKER_BACKOFF_MS=50",
            "GMI_BROKER_BACKOFF_MAX_MS=400",
            "GMI_SCORE_REFRESH_MS=100",
            "GMI_LOG_LEVEL=info",
            "GMI_LOG_FORMAT=text",
            "GMI_REDIS_PASSWORD=",
            "GMI_REDIS_PASSWORD_FILE="};
    env_.insert(env_.end(), extra_env.begin(), extra_env.end());
  }

  bool redis_started() const { return redis_.started(); }
  testing::RedisServer& redis() { return redis_; }
  const std::string& frontend() const { return frontend_; }
  const std::vector<std::string>& env() const { return env_; }
  fs::path dir() const { return dir_.path(); }

  void start_broker(std::vector<std::string> env = {}) {
    auto all = env_;
    all.insert(all.end(), env.begin(), env.end());
    broker_ = std::make_unique<BackgroundProcess>(
        std::vector<std::string>{testing::gmi_binary(), "broker"}, all, dir() / "broker.log");
  }
  BackgroundProcess& broker() { return *broker_; }

  BackgroundProcess& start_worker(const std::string& stage, std::vector<std::string> env = {}) {
    auto all = env_;
    all.insert(all.end(), env.begin(), env.end());
    const fs::path log = dir() / ("worker-" + stage + "-" + std::to_string(workers_.size()) + ".log");
    workers_.push_back(std::make_unique<BackgroundProcess>(
        std::vector<std::string>{testing::gmi_binary(), "worker", "--stage", stage}, all, log));
    by_stage_[stage] = workers_.back().get();
    return *workers_.back();
  }
  BackgroundProcess& worker(const std::string& stage) { return *by_stage_.at(stage); }

  /// A field of a job's record in Redis (P:job:ID), "" when absent.
  std::string job_field(const std::string& id, const std::string& field) {
    redisContext* c = redisConnect("127.0.0.1", redis_.port());
    auto* r = static_cast<redisReply*>(redisCommand(c, "HGET gmi:job:%s %s", id.c_str(), field.c_str()));
    std::string out = r != nullptr && r->type == REDIS_REPLY_STRING ? std::string(r->str, r->len) : "";
    if (r != nullptr) freeReplyObject(r);
    redisFree(c);
    return out;
  }

  void start_all() {
    start_broker();
    for (const char* s : {"decode", "embed", "interrogate", "score", "spec", "learn"}) start_worker(s);
  }

  BrokerClient& client() {
    if (!client_) {
      BrokerClientOptions o;
      o.endpoint = frontend_;
      o.timeout_ms = 3000;
      client_.emplace(ctx_, o);
    }
    return *client_;
  }

  /// Retries submission while the broker is (re)starting or Redis is away.
  std::string submit(const std::function<std::string(BrokerClient&)>& fn) {
    for (int i = 0; i < 100; ++i) {
      try {
        return fn(client());
      } catch (const IoError&) {
      } catch (const BrokerRefusal& e) {
        if (!e.retryable()) throw;
      }
      std::this_thread::sleep_for(100ms);
    }
    throw IoError("the broker never accepted the job");
  }

  std::string query(const std::string& image, int top = 3, const std::string& scorer = "") {
    return submit([&](BrokerClient& c) {
      QueryRequest q;
      q.image = image;
      q.top = top;
      q.scorer = scorer;
      return c.submit_query(q);
    });
  }

  /// The job once it ended, asking again across broker restarts; fails the test on timeout.
  json await(const std::string& id, std::chrono::seconds timeout = 60s) {
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    json last;
    while (std::chrono::steady_clock::now() < deadline) {
      try {
        last = client().get_job(id, 1000);
        const std::string state = last.value("state", "");
        if (state == "finished" || state == "failed") return last;
      } catch (const IoError&) {
      } catch (const BrokerRefusal& e) {
        if (!e.retryable()) throw;
      }
    }
    ADD_FAILURE() << "job " << id << " did not end in time; last seen: " << last.dump();
    return last;
  }

  /// Number of result keys in Redis (one per ended job) and of active jobs.
  std::pair<long long, long long> redis_counts() {
    redisContext* c = redisConnect("127.0.0.1", redis_.port());
    auto* keys = static_cast<redisReply*>(redisCommand(c, "KEYS gmi:result:*"));
    auto* active = static_cast<redisReply*>(redisCommand(c, "SCARD gmi:jobs:active"));
    std::pair<long long, long long> out{static_cast<long long>(keys->elements), active->integer};
    freeReplyObject(keys);
    freeReplyObject(active);
    redisFree(c);
    return out;
  }

  /// The broker's /metrics text.
  std::string broker_metrics() {
    httplib::Client http("127.0.0.1", broker_ops_);
    auto res = http.Get("/metrics");
    return res ? res->body : std::string();
  }

  std::string logs() {
    std::string all = broker_ ? "--- broker\n" + broker_->log() : "";
    for (auto& w : workers_) all += "--- worker\n" + w->log();
    return all;
  }

 private:
  testing::TempDir dir_;
  testing::RedisServer redis_;
  std::string frontend_, backend_;
  int broker_ops_ = 0;
  std::vector<std::string> env_;
  std::unique_ptr<BackgroundProcess> broker_;
  std::vector<std::unique_ptr<BackgroundProcess>> workers_;
  std::map<std::string, BackgroundProcess*> by_stage_;
  zmq::context_t ctx_;
  std::optional<BrokerClient> client_;
};

/// Three models of 8 samples each and one held-out query per model.
struct Hub {
  static constexpr int kModels = 3;
  std::vector<UploadRequest> uploads;
  std::vector<std::string> queries;  // query i comes from model i

  Hub() {
    for (int style = 0; style < kModels; ++style) {
      UploadRequest u;
      u.model_id = model(style);
      u.downloads = 100 * (style + 1);
      for (int content = 0; content < 8; ++content) {
        u.images.push_back(as_string(encode_jpeg(styled(content_image(content, style), style, content), 92)));
        u.prompts.push_back("pattern number " + std::to_string(content));
      }
      uploads.push_back(std::move(u));
      queries.push_back(as_string(encode_jpeg(styled(content_image(20 + style, 9), style, 99), 92)));
    }
  }
  static std::string model(int style) { return "style-" + std::to_string(style); }

  /// Writes the hub as manifests + images for the CLI.
  void write(const fs::path& root) const {
    for (const auto& u : uploads) {
      const fs::path mdir = root / u.model_id;
      fs::create_directories(mdir);
      std::ofstream mf(mdir / "manifest.jsonl");
      for (std::size_t i = 0; i < u.images.size(); ++i) {
        const std::string name = "img" + std::to_string(i) + ".jpg";
        std::ofstream(mdir / name, std::ios::binary) << u.images[i];
        mf << json{{"image", name}, {"prompt", u.prompts[i]}}.dump() << "\n";
      }
    }
    for (std::size_t i = 0; i < queries.size(); ++i) {
      std::ofstream(root / ("q" + std::to_string(i) + ".jpg"), std::ios::binary) << queries[i];
    }
  }
};

const Hub& hub() {
  static const Hub h;
  return h;
}

class PipelineTest : public ::testing::Test {
 protected:
  // Uploads every model through the pipeline and waits until queries can see them all.
  void upload_hub(Cluster& c) {
    for (const auto& u : hub().uploads) {
      json job = c.await(c.submit([&](BrokerClient& b) { return b.submit_upload(u); }));
      ASSERT_EQ(job.value("state", ""), "finished") << job.dump() << c.logs();
    }
    // The score and interrogate caches refresh within score.refresh_ms.
    for (int i = 0; i < 100; ++i) {
      json job = c.await(c.query(hub().queries[0], 10));
      if (job.value("state", "") == "finished" && job["result"]["results"].size() == Hub::kModels) return;
      std::this_thread::sleep_for(100ms);
    }
    FAIL() << "the uploaded models never became queryable\n" << c.logs();
  }

  static std::vector<std::string> ranking(const json& results) {
    std::vector<std::string> out;
    for (const auto& r : results) out.push_back(r["model"].get<std::string>());
    return out;
  }
};

#define START_CLUSTER(c, ...)                                       \
  Cluster c{__VA_ARGS__};                                           \
  if (!c.redis_started()) GTEST_SKIP() << "redis-server not available"

TEST_F(PipelineTest, UploadBecomesQueryableAndRanksLikeIdentify) {
  START_CLUSTER(c);
  c.start_all();
  hub().write(c.dir() / "hub");
  // Upload through the CLI client, as the hub's ingestion would.
  for (const auto& u : hub().uploads) {
    auto r = testing::run_process({testing::gmi_binary(), "upload", "--model", u.model_id, "--manifest",
                                   (c.dir() / "hub" / u.model_id / "manifest.jsonl").string(), "--json"},
                                  c.env());
    ASSERT_EQ(r.exit_code, 0) << r.err << c.logs();
    json job = json::parse(r.out);
    EXPECT_EQ(job["result"]["spec"]["n"], 8);
    if (u.model_id != hub().uploads.front().model_id) continue;  // one model is enough below
    // The service fits with the same options as `gmi spec build` on the same manifest: one
    // place decides them (it used gamma = lambda = 1, which ranks a model's own images last
    // in a store mixing both paths).
    auto built = testing::run_process({testing::gmi_binary(), "spec", "build", "--model", u.model_id,
                                       "--manifest", (c.dir() / "hub" / u.model_id / "manifest.jsonl").string(),
                                       "--store", "dir:" + (c.dir() / "cli-specs").string(), "--json"},
                                      c.env());
    ASSERT_EQ(built.exit_code, 0) << built.err;
    const json cli = json::parse(built.out)["spec"];
    const json& piped = job["result"]["spec"];
    EXPECT_EQ(piped["gamma"], cli["gamma"]) << piped.dump() << "\n" << cli.dump();
    EXPECT_EQ(piped["lambda"], cli["lambda"]);
    EXPECT_EQ(piped["r"], cli["r"]);
    EXPECT_NEAR(piped["residual_mmd2"].get<double>(), cli["residual_mmd2"].get<double>(), 1e-6);
  }
  upload_hub(c);  // re-uploading replaces the specs; also waits for the caches
  for (int q = 0; q < Hub::kModels; ++q) {
    const fs::path image = c.dir() / "hub" / ("q" + std::to_string(q) + ".jpg");
    auto piped = testing::run_process({testing::gmi_binary(), "query", image.string(), "--top", "3", "--json"},
                                      c.env());
    ASSERT_EQ(piped.exit_code, 0) << piped.err;
    auto local = testing::run_process({testing::gmi_binary(), "identify", "--store", c.redis().uri(),
                                       "--top", "3", "--json", image.string()},
                                      c.env());
    ASSERT_EQ(local.exit_code, 0) << local.err;
    json a = json::parse(piped.out), b = json::parse(local.out);
    ASSERT_EQ(ranking(a["results"]), ranking(b["results"]));
    EXPECT_EQ(ranking(a["results"]).front(), Hub::model(q));
    for (std::size_t i = 0; i < a["results"].size(); ++i) {
      EXPECT_NEAR(a["results"][i]["score"].get<double>(), b["results"][i]["score"].get<double>(), 1e-5);
    }
  }
}

TEST_F(PipelineTest, BadInputGetsClearErrorsAndEveryProcessStaysUp) {
  START_CLUSTER(c);
  c.start_all();
  upload_hub(c);

  // Malformed messages straight at the frontend socket.
  zmq::context_t ctx;
  zmq::socket_t raw(ctx, zmq::socket_type::dealer);
  raw.set(zmq::sockopt::linger, 0);
  raw.set(zmq::sockopt::rcvtimeo, 3000);
  raw.connect(c.frontend());
  auto exchange = [&](std::vector<std::string> parts) {
    for (std::size_t i = 0; i < parts.size(); ++i) {
      raw.send(zmq::buffer(parts[i]), i + 1 < parts.size() ? zmq::send_flags::sndmore : zmq::send_flags::none);
    }
    auto reply = wire::recv_raw(raw, false);
    return reply ? json::parse(reply->parts.front()) : json();
  };
  json r = exchange({"not json at all"});
  EXPECT_EQ(r["code"], "bad_request");
  EXPECT_NE(r["error"].get<std::string>().find("not valid JSON"), std::string::npos);
  r = exchange({R"({"v":1,"type":"submit_query","req":"x"})", "img"});
  EXPECT_EQ(r["code"], "bad_request");
  EXPECT_EQ(r["req"], "x");
  EXPECT_NE(r["error"].get<std::string>().find("version 1 (this side speaks 2)"), std::string::npos) << r.dump();
  r = exchange({R"({"v":2,"type":"launch_rockets"})"});
  EXPECT_NE(r["error"].get<std::string>().find("unknown message type"), std::string::npos);
  r = exchange({R"({"v":2,"type":"submit_query","top":0})", "img"});
  EXPECT_NE(r["error"].get<std::string>().find("\"top\""), std::string::npos);
  r = exchange({R"({"v":2,"type":"submit_upload","model_id":"../etc","prompts":["a"]})", "img"});
  EXPECT_EQ(r["code"], "bad_request");
  r = exchange({R"({"v":2,"type":"submit_query","top":null})", "img"});
  EXPECT_EQ(r["code"], "bad_request");
  EXPECT_NE(r["error"].get<std::string>().find("\"top\" must be an integer"), std::string::npos);
  r = exchange({R"({"v":2,"type":"get_job","job_id":"0123456789abcdef0123456789abcdef"})"});
  EXPECT_EQ(r["code"], "not_found");

  // Bad images are accepted (the gateway does not decode) and fail with the decoder's reason.
  const std::string jpeg = hub().queries[0];
  json garbage = c.await(c.query("this is not an image"));
  EXPECT_EQ(garbage["state"], "failed");
  EXPECT_EQ(garbage["failed_stage"], "decode");
  EXPECT_FALSE(garbage["dead_letter"].get<bool>());
  EXPECT_NE(garbage["error"].get<std::string>().find("unsupported"), std::string::npos) << garbage.dump();
  json truncated = c.await(c.query(jpeg.substr(0, jpeg.size() / 3)));
  EXPECT_EQ(truncated["state"], "failed");
  EXPECT_NE(truncated["error"].get<std::string>().find("truncated"), std::string::npos) << truncated.dump();
  // A decompression bomb: a PNG header claiming 100000 x 100000 pixels.
  Image tiny;
  tiny.width = tiny.height = 1;
  tiny.rgb = {1, 2, 3};
  std::string bomb = as_string(encode_png(tiny));
  bomb[16] = 0, bomb[17] = 1, bomb[18] = static_cast<char>(0x86), bomb[19] = static_cast<char>(0xa0);
  bomb[20] = 0, bomb[21] = 1, bomb[22] = static_cast<char>(0x86), bomb[23] = static_cast<char>(0xa0);
  json bombed = c.await(c.query(bomb));
  EXPECT_EQ(bombed["state"], "failed");

  // An upload whose images are all bad, and one with too few good ones.
  UploadRequest bad = hub().uploads[0];
  bad.model_id = "broken-model";
  for (auto& im : bad.images) im = "garbage";
  json bad_upload = c.await(c.submit([&](BrokerClient& b) { return b.submit_upload(bad); }));
  EXPECT_EQ(bad_upload["state"], "failed");
  EXPECT_NE(bad_upload["error"].get<std::string>().find("none of the 8 images"), std::string::npos);
  UploadRequest few = hub().uploads[1];
  few.model_id = "too-few";
  few.images.resize(2);
  few.prompts.resize(2);
  json few_upload = c.await(c.submit([&](BrokerClient& b) { return b.submit_upload(few); }));
  EXPECT_EQ(few_upload["state"], "failed");
  EXPECT_EQ(few_upload["failed_stage"], "spec");
  EXPECT_NE(few_upload["error"].get<std::string>().find("at least 4"), std::string::npos);

  // Everyone is still up and a good query still works.
  EXPECT_TRUE(c.broker().running());
  for (const char* s : {"decode", "embed", "interrogate", "score", "spec"}) EXPECT_TRUE(c.worker(s).running()) << s;
  json good = c.await(c.query(jpeg));
  ASSERT_EQ(good["state"], "finished") << good.dump();
  EXPECT_EQ(good["result"]["results"][0]["model"], Hub::model(0));
}

// kill -9 one worker of `stage` while it holds tasks; a replacement takes over and every job
// ends finished, exactly once.
class WorkerCrashTest : public PipelineTest, public ::testing::WithParamInterface<std::string> {};

TEST_P(WorkerCrashTest, KilledWorkerMidJobLosesNothing) {
  const std::string stage = GetParam();
  // A long liveness, so that the frozen worker still counts as alive when the jobs reach
  // it however slow the build; the kill itself is seen at once (the connection drops).
  // No metric jobs: the uploads below would make one, and this test counts every job.
  START_CLUSTER(c, true, {"GMI_BROKER_LIVENESS=100", "GMI_METRIC_AUTO_LEARN=false"});
  c.start_all();
  upload_hub(c);
  const auto [results_before, active_before] = c.redis_counts();
  ASSERT_EQ(active_before, 0);

  // Freeze the worker so that the tasks it is given stay in its hands, then submit.
  c.worker(stage).signal(SIGSTOP);
  std::vector<std::string> ids;
  const int jobs = 6;
  for (int i = 0; i < jobs; ++i) {
    if (stage == "spec") {
      UploadRequest u = hub().uploads[static_cast<std::size_t>(i % Hub::kModels)];
      u.model_id += "-copy" + std::to_string(i);
      ids.push_back(c.submit([&](BrokerClient& b) { return b.submit_upload(u); }));
    } else {
      ids.push_back(c.query(hub().queries[static_cast<std::size_t>(i % Hub::kModels)]));
    }
  }
  // Wait until a job reaches the frozen stage (the broker hands it to the frozen worker at
  // once: it has credit), then kill that worker and start a replacement.
  bool reached = false;
  for (int i = 0; i < 600 && !reached; ++i) {
    for (const auto& id : ids) {
      if (c.client().get_job(id, 0).value("stage", "") == stage) reached = true;
    }
    if (!reached) std::this_thread::sleep_for(50ms);
  }
  ASSERT_TRUE(reached) << "no job reached stage " << stage << "\n" << c.logs();
  std::this_thread::sleep_for(200ms);
  c.worker(stage).signal(SIGKILL);
  c.start_worker(stage);

  std::set<std::string> ended;
  for (const auto& id : ids) {
    json j = c.await(id);
    EXPECT_EQ(j.value("state", ""), "finished") << j.dump() << c.logs();
    ended.insert(id);
  }
  EXPECT_EQ(ended.size(), ids.size());
  const auto [results_after, active_after] = c.redis_counts();
  EXPECT_EQ(results_after - results_before, jobs);  // one result per job, no duplicates
  EXPECT_EQ(active_after, 0);
  EXPECT_NE(c.broker_metrics().find("gmi_retries_total{reason=\"worker_lost\",stage=\"" + stage + "\"}"),
            std::string::npos);
}

INSTANTIATE_TEST_SUITE_P(EveryStage, WorkerCrashTest,
                         ::testing::Values("decode", "embed", "interrogate", "score", "spec"));

TEST_F(PipelineTest, BrokerKilledWithJobsInFlightResumesAfterRestart) {
  START_CLUSTER(c);
  c.start_all();
  upload_hub(c);
  const auto [results_before, active_before] = c.redis_counts();
  // Jobs pile up in flight at a frozen score worker; the broker dies holding them.
  c.worker("score").signal(SIGSTOP);
  std::vector<std::string> ids;
  for (int i = 0; i < 8; ++i) ids.push_back(c.query(hub().queries[static_cast<std::size_t>(i % Hub::kModels)]));
  std::this_thread::sleep_for(500ms);
  c.broker().signal(SIGKILL);
  ASSERT_TRUE(c.broker().wait(5s).has_value());
  c.start_broker();
  c.worker("score").signal(SIGCONT);
  for (const auto& id : ids) {
    json j = c.await(id);
    EXPECT_EQ(j.value("state", ""), "finished") << j.dump() << c.logs();
    if (j.value("state", "") == "finished") {
      EXPECT_FALSE(j["result"]["results"].empty());
    }
  }
  const auto [results, active] = c.redis_counts();
  EXPECT_EQ(results - results_before, static_cast<long long>(ids.size()))
      << "every job has exactly one result";
  EXPECT_EQ(active, 0);
}

TEST_F(PipelineTest, JobsResumeOnTheRouteTheyWereAcceptedWithAfterARestartWithAnotherRoute) {
  START_CLUSTER(c);
  c.start_all();
  upload_hub(c);
  const json default_route = {"decode", "embed", "interrogate", "score"};
  // Accepted on the default route; held at a frozen score worker while the broker dies.
  c.worker("score").signal(SIGSTOP);
  std::vector<std::string> ids;
  for (int i = 0; i < 4; ++i) ids.push_back(c.query(hub().queries[static_cast<std::size_t>(i % Hub::kModels)]));
  std::this_thread::sleep_for(300ms);
  EXPECT_EQ(c.job_field(ids[0], "route"), "decode,embed,interrogate,score");
  auto shown = testing::run_process({testing::gmi_binary(), "job", ids[0], "--wait-ms", "0", "--json"}, c.env());
  ASSERT_EQ(shown.exit_code, 0) << shown.err;
  EXPECT_EQ(json::parse(shown.out)["route"], default_route) << shown.out;
  c.broker().signal(SIGKILL);
  ASSERT_TRUE(c.broker().wait(5s).has_value());
  // The new broker routes new queries without interrogate: the weighted scorer then has no
  // pseudo-prompts. The jobs accepted before must still run on their stored route.
  c.start_broker({"GMI_ROUTES_QUERY=decode,embed,score"});
  c.worker("score").signal(SIGCONT);
  for (const auto& id : ids) {
    json j = c.await(id);
    ASSERT_EQ(j.value("state", ""), "finished") << j.dump() << c.logs();
    EXPECT_EQ(j["route"], default_route);
    EXPECT_TRUE(j["timings"]["stages"].contains("interrogate")) << j.dump();
    EXPECT_EQ(j["result"]["results"].size(), static_cast<std::size_t>(Hub::kModels));
  }
  // New jobs take the new route: a weighted query fails naming the slot it lacks, the score
  // worker stays up, and a scorer that needs no prompts finishes on it.
  json weighted = c.await(c.query(hub().queries[0]));
  EXPECT_EQ(weighted.value("state", ""), "failed") << weighted.dump();
  EXPECT_EQ(weighted["route"], json({"decode", "embed", "score"}));
  EXPECT_NE(weighted.value("error", "").find("slot \"pseudo_prompts\" is missing"), std::string::npos)
      << weighted.dump();
  json mean = c.await(c.query(hub().queries[1], 3, "mean"));
  ASSERT_EQ(mean.value("state", ""), "finished") << mean.dump() << c.logs();
  EXPECT_EQ(mean["route"], json({"decode", "embed", "score"}));
  EXPECT_FALSE(mean["timings"]["stages"].contains("interrogate"));
  EXPECT_TRUE(c.worker("score").running());
  EXPECT_EQ(c.redis_counts().second, 0);
}

TEST_F(PipelineTest, BrokerRefusesRoutesThatBreakTheRulesNamingTheKey) {
  START_CLUSTER(c);
  auto r = testing::run_process({testing::gmi_binary(), "broker"},
                                [&] {
                                  auto e = c.env();
                                  e.push_back("GMI_ROUTES_QUERY=decode,interrogate,embed,score");
                                  return e;
                                }());
  EXPECT_EQ(r.exit_code, 2) << r.err;
  EXPECT_NE(r.err.find("routes.query"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("after embed"), std::string::npos) << r.err;
  r = testing::run_process({testing::gmi_binary(), "broker"}, [&] {
    auto e = c.env();
    e.push_back("GMI_ROUTES_UPLOAD=decode,embed,score");
    return e;
  }());
  EXPECT_EQ(r.exit_code, 2) << r.err;
  EXPECT_NE(r.err.find("routes.upload"), std::string::npos) << r.err;
}

TEST_F(PipelineTest, EmbedBatchesCountImagesAcrossJobs) {
  // embed.max_batch = 4 images: an 8-image upload is charged 4 credit (all of it) and
  // encoded in passes of at most 4 images; single-image queries share batches.
  START_CLUSTER(c, true, {"GMI_EMBED_MAX_BATCH=4"});
  c.start_broker();
  const int embed_ops = testing::free_port();
  for (const char* s : {"decode", "interrogate", "score", "spec"}) c.start_worker(s);
  c.start_worker("embed", {"GMI_WORKER_OPS_PORT=" + std::to_string(embed_ops)});
  upload_hub(c);
  std::vector<std::string> ids;
  for (int i = 0; i < 6; ++i) ids.push_back(c.query(hub().queries[static_cast<std::size_t>(i % Hub::kModels)]));
  for (const auto& id : ids) EXPECT_EQ(c.await(id).value("state", ""), "finished");
  httplib::Client http("127.0.0.1", embed_ops);
  auto res = http.Get("/metrics");
  ASSERT_TRUE(res);
  const std::string& m = res->body;
  const double passes = metric(m, "gmi_embed_pass_images_count");
  ASSERT_GT(passes, 0) << m;
  // Every pass held at most 4 images...
  EXPECT_EQ(metric(m, "gmi_embed_pass_images_bucket{le=\"4\"}"), passes) << m;
  // ...and the uploads' 3 x 8 images needed passes of 4 (never one pass of 8).
  EXPECT_GE(metric(m, "gmi_embed_pass_images_sum"), 3 * 8 + 6);
  EXPECT_EQ(metric(m, "gmi_embed_pass_images_bucket{le=\"2\"}") < passes, true) << m;
  // The runtime's batches are in images too: none above max_batch.
  const double batches = metric(m, "gmi_worker_batch_size_count{stage=\"embed\"}");
  EXPECT_EQ(metric(m, "gmi_worker_batch_size_bucket{stage=\"embed\",le=\"4\"}"), batches) << m;
}

// The captioner's route: decode -> interrogate (captions the pixels) -> embed (embeds the
// images and the captions) -> score, with a tiny CLIP text tower and a tiny captioner.
TEST_F(PipelineTest, CaptionerRouteCaptionsBeforeEmbedAndSurvivesABrokerRestart) {
  if (!torch_available()) GTEST_SKIP() << "this gmi is built without LibTorch (-DGMI_TORCH=OFF)";
  const fs::path clip = tiny_clip();
  ASSERT_TRUE(fs::exists(clip / "captioner.card.json"));
  START_CLUSTER(c, true,
                {"GMI_ENCODER_IMAGE=" + (clip / "image.card.json").string(),
                 "GMI_ENCODER_TEXT=" + (clip / "text.card.json").string(),
                 "GMI_INTERROGATE_INTERROGATOR=captioner",
                 "GMI_INTERROGATE_CAPTIONER=" + (clip / "captioner.card.json").string(),
                 "GMI_ROUTES_QUERY=decode,interrogate,embed,score"});
  c.start_all();
  upload_hub(c);
  const json caption_route = {"decode", "interrogate", "embed", "score"};
  json one = c.await(c.query(hub().queries[0]));
  ASSERT_EQ(one.value("state", ""), "finished") << one.dump() << c.logs();
  EXPECT_EQ(one["route"], caption_route);
  EXPECT_EQ(one["result"]["results"].size(), static_cast<std::size_t>(Hub::kModels));
  EXPECT_TRUE(one["timings"]["stages"].contains("interrogate"));
  EXPECT_EQ(one["result"]["interrogator"], "captioner") << one.dump();
  ASSERT_EQ(one["result"]["captions"].size(), 1u) << one.dump();  // one caption per query image

  // Accepted on the caption route, the broker killed while score holds them; a new broker
  // resumes them on it.
  c.worker("score").signal(SIGSTOP);
  std::vector<std::string> ids;
  for (int i = 0; i < 3; ++i) ids.push_back(c.query(hub().queries[static_cast<std::size_t>(i)]));
  std::this_thread::sleep_for(300ms);
  EXPECT_EQ(c.job_field(ids[0], "route"), "decode,interrogate,embed,score");
  c.broker().signal(SIGKILL);
  ASSERT_TRUE(c.broker().wait(5s).has_value());
  c.start_broker();
  c.worker("score").signal(SIGCONT);
  for (const auto& id : ids) {
    json j = c.await(id);
    ASSERT_EQ(j.value("state", ""), "finished") << j.dump() << c.logs();
    EXPECT_EQ(j["route"], caption_route);
  }
  for (const char* s : {"decode", "embed", "interrogate", "score", "spec"}) EXPECT_TRUE(c.worker(s).running()) << s;
}

TEST_F(PipelineTest, PromptBankInterrogatesInTheSharedSpaceAndRefusesUnsharedEncoders) {
  if (!torch_available()) GTEST_SKIP() << "this gmi is built without LibTorch (-DGMI_TORCH=OFF)";
  const fs::path clip = tiny_clip();
  testing::TempDir dir;
  const fs::path bank = dir.path() / "bank.txt";
  std::ofstream(bank) << "# platform prompts\npattern number 1\npattern number 2\nwatercolour\nanime\n";
  START_CLUSTER(c, true,
                {"GMI_ENCODER_IMAGE=" + (clip / "image.card.json").string(),
                 "GMI_ENCODER_TEXT=" + (clip / "text.card.json").string(),
                 "GMI_INTERROGATE_INTERROGATOR=prompt-bank", "GMI_INTERROGATE_PROMPT_BANK=" + bank.string(),
                 "GMI_INTERROGATE_TOP_K=2"});
  c.start_all();
  upload_hub(c);
  json j = c.await(c.query(hub().queries[1]));
  ASSERT_EQ(j.value("state", ""), "finished") << j.dump() << c.logs();
  EXPECT_EQ(j["route"], json({"decode", "embed", "interrogate", "score"}));
  EXPECT_EQ(j["result"]["interrogator"], "prompt-bank") << j.dump();
  // Image and text encoders of different dims share no space: the stage refuses to start.
  auto refused = testing::run_process({testing::gmi_binary(), "worker", "--stage", "interrogate"},
                                      [&] {
                                        auto e = c.env();
                                        e.push_back("GMI_ENCODER_IMAGE=builtin");
                                        e.push_back("GMI_ENCODER_TEXT=builtin");
                                        return e;
                                      }());
  EXPECT_EQ(refused.exit_code, 2) << refused.err;
  EXPECT_NE(refused.err.find("share one (CLIP) space"), std::string::npos) << refused.err;
}

// A real worker process against a broker socket driven by the test: tasks whose slots are
// bad fail alone with a reason naming the slot, and the worker keeps serving.
TEST_F(PipelineTest, BadSlotsFailTheirTaskNamingTheSlotAndTheWorkerStaysUp) {
  testing::TempDir dir;
  zmq::context_t ctx;
  zmq::socket_t backend(ctx, zmq::socket_type::router);
  backend.set(zmq::sockopt::linger, 0);
  const std::string endpoint = "tcp://127.0.0.1:" + std::to_string(testing::free_port());
  backend.bind(endpoint);
  BackgroundProcess worker({testing::gmi_binary(), "worker", "--stage", "decode"},
                           {"GMI_WORKER_BROKER=" + endpoint, "GMI_WORKER_OPS_PORT=-1", "GMI_ENCODER_IMAGE=builtin",
                            "GMI_LOG_FORMAT=text", "GMI_BROKER_LIVENESS=1000"},
                           dir.path() / "worker.log");
  auto receive = [&](const std::string& type) -> std::optional<wire::Message> {
    for (int i = 0; i < 200; ++i) {
      zmq::pollitem_t item{backend.handle(), 0, ZMQ_POLLIN, 0};
      if (zmq::poll(&item, 1, std::chrono::milliseconds(100)) == 0) continue;
      auto raw = wire::recv_raw(backend, true, true);
      if (!raw) continue;
      wire::Message m = wire::decode(*raw, wire::Channel::kWorkerToBroker);
      m.header["routing"] = raw->routing;
      if (m.type() == type) return m;
    }
    return std::nullopt;
  };
  auto ready = receive("ready");
  ASSERT_TRUE(ready) << worker.log();
  EXPECT_EQ(ready->header["reads"], json({"images"}));
  const std::string routing = ready->header["routing"];
  auto task = [](const std::string& id, json slots) {
    return json{{"task", id}, {"job_id", "3f2a9c0d4e5b6a7f8091a2b3c4d5e6f7"}, {"kind", "query"}, {"stage", "decode"},
                {"attempt", 1}, {"params", json::object()}, {"meta", json::object()}, {"slots", std::move(slots)}};
  };
  json h = wire::header("tasks");
  h["tasks"] = {task("unknown-kind", {{{"name", "images"}, {"kind", "voxels"}, {"frames", 1}}}),
                task("missing", json::array()),
                task("good", {{{"name", "images"}, {"kind", "image_bytes"}, {"frames", 1}}})};
  wire::send(backend, routing, h, {"x", hub().queries[0]});
  std::map<std::string, json> results;
  for (int i = 0; i < 3 && results.size() < 3; ++i) {
    auto r = receive("results");
    ASSERT_TRUE(r) << worker.log();
    for (const auto& item : r->header["results"]) results[item["task"]] = item;
  }
  ASSERT_EQ(results.size(), 3u) << worker.log();
  EXPECT_FALSE(results["unknown-kind"]["ok"].get<bool>());
  EXPECT_FALSE(results["unknown-kind"]["retryable"].get<bool>());
  EXPECT_NE(results["unknown-kind"]["error"].get<std::string>().find("slot \"images\": unknown kind \"voxels\""),
            std::string::npos) << results["unknown-kind"].dump();
  EXPECT_FALSE(results["missing"]["ok"].get<bool>());
  EXPECT_NE(results["missing"]["error"].get<std::string>().find("slot \"images\" is missing"), std::string::npos)
      << results["missing"].dump();
  ASSERT_TRUE(results["good"]["ok"].get<bool>()) << results["good"].dump();
  EXPECT_EQ(results["good"]["slots"][0]["name"], "pixels");
  EXPECT_EQ(results["good"]["slots"][0]["kind"], "pixels");
  EXPECT_TRUE(worker.running());
  worker.signal(SIGTERM);
  EXPECT_EQ(worker.wait(10s), std::optional<int>(0)) << worker.log();
}

TEST_F(PipelineTest, RedisRestartLosesNoAcceptedJob) {
  START_CLUSTER(c);
  c.start_all();
  upload_hub(c);
  c.worker("score").signal(SIGSTOP);
  std::vector<std::string> ids;
  for (int i = 0; i < 6; ++i) ids.push_back(c.query(hub().queries[static_cast<std::size_t>(i % Hub::kModels)]));
  std::this_thread::sleep_for(300ms);
  c.redis().restart();  // kill -9; the append-only file has every accepted job
  c.worker("score").signal(SIGCONT);
  for (const auto& id : ids) {
    json j = c.await(id);
    EXPECT_EQ(j.value("state", ""), "finished") << j.dump() << c.logs();
  }
  // And the system keeps working after the outage.
  json after = c.await(c.query(hub().queries[2]));
  EXPECT_EQ(after.value("state", ""), "finished") << after.dump();
  EXPECT_EQ(c.redis_counts().second, 0);
  EXPECT_TRUE(c.broker().running());
}

// Redis at its memory limit (noeviction): the jobs in flight still end, because a job's end
// frees its input before it writes. It used to put the DEL in the same MULTI as the writes
// Redis refuses, so nothing was ever freed and nothing ended.
TEST_F(PipelineTest, JobsInFlightEndWhenRedisIsFull) {
  START_CLUSTER(c);
  c.start_all();
  upload_hub(c);
  c.worker("score").signal(SIGTERM);
  ASSERT_EQ(c.worker("score").wait(10s), std::optional<int>(0));
  std::vector<std::string> ids;
  for (int i = 0; i < 6; ++i) ids.push_back(c.query(hub().queries[static_cast<std::size_t>(i % Hub::kModels)]));
  // Let them reach the score queue, then put Redis over its memory limit.
  std::this_thread::sleep_for(1500ms);
  redisContext* r = redisConnect("127.0.0.1", c.redis().port());
  ASSERT_NE(r, nullptr);
  auto run = [&](const std::string& cmd) {
    auto* reply = static_cast<redisReply*>(redisCommand(r, cmd.c_str()));
    std::string out = reply && (reply->type == REDIS_REPLY_STRING || reply->type == REDIS_REPLY_ERROR ||
                                reply->type == REDIS_REPLY_STATUS)
                          ? std::string(reply->str, reply->len)
                          : "";
    if (reply) freeReplyObject(reply);
    return out;
  };
  const std::string info = run("INFO memory");
  const auto at = info.find("used_memory:");
  ASSERT_NE(at, std::string::npos);
  const long long used = std::stoll(info.substr(at + 12));
  // Over the limit by 1 MB, with no eviction: every write that needs memory is refused
  // (and a few freed bytes do not end that).
  run("CONFIG SET maxmemory-policy noeviction");
  run("CONFIG SET maxmemory " + std::to_string(std::max(1024LL * 1024, used - 1024 * 1024)));
  EXPECT_EQ(run("HSET probe a b").rfind("OOM", 0), 0u) << "a small write still went through";
  c.start_worker("score");
  for (const auto& id : ids) {
    json job = c.await(id, 60s);
    EXPECT_EQ(job.value("state", ""), "finished") << job.dump() << c.logs();
    EXPECT_EQ(c.job_field(id, "state"), "finished");  // saved, not only answered
    EXPECT_FALSE(c.job_field(id, "ended_ms").empty());
  }
  EXPECT_EQ(c.redis_counts().second, 0);  // nothing left active
  run("CONFIG SET maxmemory 0");
  redisFree(r);
}

// A job Redis recorded while its intake was answered "unavailable" (a reply lost after the
// transaction applied) is adopted by the running broker within broker.reconcile_s, instead
// of waiting in P:jobs:active for the next broker start.
TEST_F(PipelineTest, AnActiveJobTheBrokerDoesNotHoldIsAdopted) {
  START_CLUSTER(c, true, {"GMI_BROKER_RECONCILE_S=1"});
  c.start_all();
  upload_hub(c);
  StoredJob job;
  job.id = wire::random_id();
  job.kind = "query";
  job.params = {{"top", 3}};
  job.route = {"decode", "embed", "interrogate", "score"};
  job.created_ms = now_ms();  // (a record from long ago would be past its deadline)
  job.input.put(wire::Slot{wire::slot::kImages, wire::SlotKind::kImageBytes, json::object(), {hub().queries[1]}});
  JobStore(parse_redis_uri(c.redis().uri()), JobStoreOptions{}).create(job);
  json ended = c.await(job.id, 30s);
  EXPECT_EQ(ended.value("state", ""), "finished") << ended.dump() << c.logs();
  ASSERT_TRUE(ended.contains("result"));
  EXPECT_EQ(ended["result"]["results"][0]["model"], Hub::model(1));
  EXPECT_EQ(c.redis_counts().second, 0);
}

// Read-your-writes: a query accepted after an upload reported "finished" sees the model, on
// every score replica, even with caches that would refresh only every 10 minutes.
TEST_F(PipelineTest, AQueryAfterAFinishedUploadSeesItOnEveryReplica) {
  START_CLUSTER(c, true, {"GMI_SCORE_REFRESH_MS=600000"});
  c.start_all();
  c.start_worker("score");  // a second replica of the one shard
  for (int m = 0; m < Hub::kModels; ++m) {
    json up = c.await(c.submit([&](BrokerClient& b) { return b.submit_upload(hub().uploads[static_cast<std::size_t>(m)]); }));
    ASSERT_EQ(up.value("state", ""), "finished") << up.dump() << c.logs();
    EXPECT_EQ(up["result"]["spec"]["extra"].value("upload_seq", 0), m + 1);  // staleness is visible
    for (int q = 0; q < 4; ++q) {  // alternating replicas
      json job = c.await(c.query(hub().queries[static_cast<std::size_t>(m)], 10, "rkme"));
      ASSERT_EQ(job.value("state", ""), "finished") << job.dump() << c.logs();
      EXPECT_EQ(job["result"]["results"].size(), static_cast<std::size_t>(m + 1)) << job.dump();
      EXPECT_EQ(job["result"]["results"][0]["model"], Hub::model(m)) << job.dump();
    }
  }
}

// A spec write is fenced by its upload's sequence: an upload older than the spec stored
// (a stale retry) fails, naming both, and leaves the newer spec in place.
TEST_F(PipelineTest, AStaleUploadNeverReplacesANewerSpec) {
  START_CLUSTER(c);
  c.start_all();
  const auto& u = hub().uploads[0];
  json first = c.await(c.submit([&](BrokerClient& b) { return b.submit_upload(u); }));
  ASSERT_EQ(first.value("state", ""), "finished") << first.dump() << c.logs();
  // A newer upload of the model lands (sequence 1000, as if accepted later) ...
  auto store = open_spec_store(c.redis().uri());
  Spec newer = *store->get(u.model_id);
  newer.extra["upload_seq"] = 1000;
  newer.card = "the newer upload";
  ASSERT_TRUE(store->put_fenced(newer, 1000).stored);
  // ... so this one, numbered before it, is refused with its reason, and the spec stays.
  json stale = c.await(c.submit([&](BrokerClient& b) { return b.submit_upload(u); }));
  EXPECT_EQ(stale.value("state", ""), "failed") << stale.dump();
  EXPECT_NE(stale.value("error", "").find("superseded"), std::string::npos) << stale.dump();
  EXPECT_EQ(store->get(u.model_id)->card, "the newer upload");
}

// A worker that reconnects by itself (it heard nothing for a while, the broker still counts
// it alive) has lost what it held: the broker re-queues those tasks at once when the new
// connection registers, without spending an attempt, instead of letting them wait out
// broker.task_timeout_s (300 s).
TEST_F(PipelineTest, AWorkerThatReconnectsByItselfGetsItsTasksBackAtOnce) {
  START_CLUSTER(c);
  c.start_broker();
  c.start_worker("decode", {"GMI_FAULT_RECONNECT_ON=RECONNECT-NOW"});
  for (const char* s : {"embed", "interrogate", "score", "spec", "learn"}) c.start_worker(s);
  upload_hub(c);
  const std::string marked = hub().queries[2] + "RECONNECT-NOW";  // JPEG readers stop at EOI
  json job = c.await(c.query(marked, 3), 60s);  // well inside the 300 s task timeout
  ASSERT_EQ(job.value("state", ""), "finished") << job.dump() << c.logs();
  EXPECT_EQ(job["result"]["results"][0]["model"], Hub::model(2));
  EXPECT_NE(c.broker_metrics().find("gmi_retries_total{reason=\"worker_reconnected\",stage=\"decode\"} 1"),
            std::string::npos)
      << c.broker_metrics();
  EXPECT_NE(c.worker("decode").log().find("fault injection: reconnecting"), std::string::npos);
}

TEST_F(PipelineTest, PoisonImageIsDeadLetteredWhileItsBatchMatesFinish) {
  START_CLUSTER(c, true, {"GMI_BROKER_MAX_ATTEMPTS=3"});
  c.start_broker();
  for (const char* s : {"embed", "interrogate", "score", "spec"}) c.start_worker(s);
  // The decode worker dies on any image holding the marker; a supervisor restarts it, as
  // Kubernetes would.
  const std::vector<std::string> poison_env{"GMI_FAULT_ABORT_ON=POISON-PILL"};
  c.start_worker("decode", poison_env);
  std::atomic<bool> supervising{true};
  std::atomic<int> restarts{0};
  std::mutex mutex;
  std::thread supervisor([&] {
    while (supervising) {
      {
        std::lock_guard lock(mutex);
        if (!c.worker("decode").running()) {
          c.start_worker("decode", poison_env);
          ++restarts;
        }
      }
      std::this_thread::sleep_for(50ms);
    }
  });
  upload_hub(c);
  std::string poison = hub().queries[0] + "POISON-PILL";
  std::vector<std::string> good;
  std::string bad = c.query(poison);
  for (int i = 0; i < 6; ++i) good.push_back(c.query(hub().queries[static_cast<std::size_t>(i % Hub::kModels)]));
  json dead = c.await(bad);
  for (const auto& id : good) {
    json j = c.await(id);
    EXPECT_EQ(j.value("state", ""), "finished") << j.dump();
  }
  supervising = false;
  supervisor.join();
  EXPECT_EQ(dead.value("state", ""), "failed");
  EXPECT_TRUE(dead.value("dead_letter", false)) << dead.dump();
  EXPECT_NE(dead.value("error", "").find("gave up after 3 attempts at stage decode"), std::string::npos)
      << dead.dump();
  EXPECT_GE(restarts.load(), 3);
  EXPECT_NE(c.broker_metrics().find("gmi_dead_letters_total{stage=\"decode\"} 1"), std::string::npos);
}

// Shard 1 also holds its points as binary16 (score.storage) and searches two-stage
// (score.search): the merged ranking is still the one `gmi identify` computes exactly in float32.
TEST_F(PipelineTest, ShardedScoringMergesToTheSameRanking) {
  START_CLUSTER(c, true, {"GMI_SCORE_SHARDS=2"});
  c.start_broker();
  for (const char* s : {"decode", "embed", "interrogate", "spec"}) c.start_worker(s);
  c.start_worker("score", {"GMI_SCORE_SHARD=0"});
  auto& half = c.start_worker("score", {"GMI_SCORE_SHARD=1", "GMI_SCORE_STORAGE=f16", "GMI_SCORE_SEARCH=two-stage"});
  upload_hub(c);
  hub().write(c.dir() / "hub");
  for (int q = 0; q < Hub::kModels; ++q) {
    json job = c.await(c.query(hub().queries[static_cast<std::size_t>(q)], 3));
    ASSERT_EQ(job.value("state", ""), "finished") << job.dump();
    auto local = testing::run_process({testing::gmi_binary(), "identify", "--store", c.redis().uri(), "--top",
                                       "3", "--json", (c.dir() / "hub" / ("q" + std::to_string(q) + ".jpg")).string()},
                                      c.env());
    ASSERT_EQ(local.exit_code, 0) << local.err;
    EXPECT_EQ(ranking(job["result"]["results"]), ranking(json::parse(local.out)["results"]));
    EXPECT_EQ(job["result"]["models"], Hub::kModels);
  }
  EXPECT_NE(half.log().find("storage=f16"), std::string::npos) << half.log();
  EXPECT_NE(half.log().find("search=two-stage"), std::string::npos) << half.log();
}

// Replicas of a sharded score stage under load: two shards, two workers each. One replica
// of shard 0 is frozen while queries stream in (the broker hands it tasks: it has credit),
// then killed; its tasks go to the other replica, and every query ends finished with the
// whole hub ranked (no missing shard), exactly once.
TEST_F(PipelineTest, AScoreReplicaKilledDuringALoadRunLosesNoQueryAndNoShard) {
  START_CLUSTER(c, true, {"GMI_SCORE_SHARDS=2", "GMI_BROKER_LIVENESS=100", "GMI_METRIC_AUTO_LEARN=false"});
  c.start_broker();
  for (const char* s : {"decode", "embed", "interrogate", "spec"}) c.start_worker(s);
  auto& doomed = c.start_worker("score", {"GMI_SCORE_SHARD=0"});
  c.start_worker("score", {"GMI_SCORE_SHARD=0"});
  c.start_worker("score", {"GMI_SCORE_SHARD=1"});
  c.start_worker("score", {"GMI_SCORE_SHARD=1"});
  upload_hub(c);
  // Every replica has the whole of its shard before the load starts.
  for (int q = 0; q < 4; ++q) {
    json warm = c.await(c.query(hub().queries[0], 3));
    ASSERT_EQ(warm.value("state", ""), "finished") << warm.dump() << c.logs();
  }
  const auto [results_before, active_before] = c.redis_counts();
  ASSERT_EQ(active_before, 0);

  doomed.signal(SIGSTOP);
  std::vector<std::pair<std::string, int>> ids;  // job, the model its query shows
  for (int i = 0; i < 16; ++i) {
    const int model = i % Hub::kModels;
    ids.emplace_back(c.query(hub().queries[static_cast<std::size_t>(model)], 3), model);
  }
  std::this_thread::sleep_for(1500ms);  // some reach the frozen replica
  doomed.signal(SIGKILL);
  for (int i = 0; i < 8; ++i) {  // and the load goes on
    const int model = i % Hub::kModels;
    ids.emplace_back(c.query(hub().queries[static_cast<std::size_t>(model)], 3), model);
  }
  for (const auto& [id, model] : ids) {
    json j = c.await(id, 60s);
    ASSERT_EQ(j.value("state", ""), "finished") << j.dump() << c.logs();
    EXPECT_FALSE(j["result"].contains("missing_shards")) << j.dump();
    EXPECT_EQ(j["result"].value("models", 0), Hub::kModels) << j.dump();
    EXPECT_EQ(j["result"]["results"][0]["model"], Hub::model(model)) << j.dump();
  }
  const auto [results_after, active_after] = c.redis_counts();
  EXPECT_EQ(results_after - results_before, static_cast<long long>(ids.size()));  // one result each
  EXPECT_EQ(active_after, 0);
  EXPECT_NE(c.broker_metrics().find("gmi_retries_total{reason=\"worker_lost\",stage=\"score\"}"), std::string::npos)
      << "the frozen replica held tasks when it died";
}

// A process() that hangs: the worker's watchdog makes it suspect (its heartbeats say so and
// its /healthz fails), the broker retries the task elsewhere and sends the hung worker
// nothing more, and on SIGTERM it exits with a message instead of waiting on the batch.
// The task timeout applies to every stage: 6 s leaves room for an upload's embed under the
// sanitizers on a loaded 2-core machine (at 2 s, that embed itself timed out there).
TEST_F(PipelineTest, AHungWorkerIsSuspectGetsNoMoreTasksAndFailsItsLivenessProbe) {
  START_CLUSTER(c, true, {"GMI_BROKER_TASK_TIMEOUT_S=6"});
  c.start_broker();
  for (const char* s : {"embed", "interrogate", "score", "spec"}) c.start_worker(s);
  const int ops_port = testing::free_port();
  BackgroundProcess& hung = c.start_worker(
      "decode", {"GMI_FAULT_HANG_ON=HANG-NOW", "GMI_WORKER_OPS_PORT=" + std::to_string(ops_port)});
  upload_hub(c);
  const std::string marked = c.query(hub().queries[1] + "HANG-NOW", 3);
  for (int i = 0; i < 100 && hung.log().find("hanging on a marked image") == std::string::npos; ++i) {
    std::this_thread::sleep_for(50ms);
  }
  ASSERT_NE(hung.log().find("hanging on a marked image"), std::string::npos) << hung.log();
  c.start_worker("decode");  // a healthy one

  json j = c.await(marked, 60s);
  ASSERT_EQ(j.value("state", ""), "finished") << j.dump() << c.logs();
  EXPECT_EQ(j["result"]["results"][0]["model"], Hub::model(1)) << j.dump() << c.logs();
  httplib::Client http("127.0.0.1", ops_port);
  int status = 0;
  std::string body;
  for (int i = 0; i < 100 && status != 503; ++i) {
    if (auto res = http.Get("/healthz")) {
      status = res->status;
      body = res->body;
    }
    if (status != 503) std::this_thread::sleep_for(50ms);
  }
  EXPECT_EQ(status, 503);
  EXPECT_NE(body.find("decode compute stuck"), std::string::npos) << body;
  // Every later query goes to the healthy worker: the task that timed out is the only retry.
  for (int i = 0; i < 6; ++i) {
    json ok = c.await(c.query(hub().queries[static_cast<std::size_t>(i % Hub::kModels)], 3), 60s);
    EXPECT_EQ(ok.value("state", ""), "finished") << ok.dump();
  }
  const std::string m = c.broker_metrics();
  EXPECT_EQ(metric(m, "gmi_retries_total{reason=\"timeout\",stage=\"decode\"}"), 1) << m;
  EXPECT_EQ(metric(m, "gmi_workers_suspect{stage=\"decode\"}"), 1) << m;
  EXPECT_NE(c.broker().log().find("compute is stuck"), std::string::npos) << c.broker().log();
  hung.signal(SIGTERM);
  auto code = hung.wait(10s);
  ASSERT_TRUE(code.has_value()) << "a worker stuck in compute must still exit on SIGTERM";
  EXPECT_EQ(*code, 1);
  EXPECT_NE(hung.log().find("asked to stop with a stuck batch; exiting without it"), std::string::npos);
}

// Item 10: Redis stalls (CLIENT PAUSE, 3 s: three times the 1 s liveness window) while
// jobs arrive and end. Persistence is off the broker's thread: heartbeats flow, no worker
// is declared lost, no worker thinks the broker went silent, and every job finishes.
TEST_F(PipelineTest, ARedisStallFreezesNoHeartbeatAndLosesNoWorker) {
  START_CLUSTER(c);
  c.start_all();
  upload_hub(c);
  std::thread pause([&] {
    redisContext* rc = redisConnect("127.0.0.1", c.redis().port());
    freeReplyObject(redisCommand(rc, "CLIENT PAUSE 3000 ALL"));
    redisFree(rc);
  });
  pause.join();
  const auto t0 = std::chrono::steady_clock::now();
  std::vector<std::string> ids;
  for (int i = 0; i < 6; ++i) ids.push_back(c.query(hub().queries[static_cast<std::size_t>(i % Hub::kModels)], 3));
  for (const auto& id : ids) {
    json j = c.await(id, 60s);
    EXPECT_EQ(j.value("state", ""), "finished") << j.dump();
  }
  EXPECT_GE(std::chrono::steady_clock::now() - t0, 2s) << "the pause did hold the jobs' records back";
  const std::string all = c.logs();
  EXPECT_EQ(all.find("worker lost"), std::string::npos) << all;
  EXPECT_EQ(all.find("the broker went silent"), std::string::npos) << all;
  const std::string m = c.broker_metrics();
  for (const char* stage : {"decode", "embed", "interrogate", "score"}) {
    EXPECT_EQ(metric(m, std::string("gmi_retries_total{reason=\"worker_lost\",stage=\"") + stage + "\"}"), 0)
        << stage;
  }
}

// Item 14: bytes are bounded, not only jobs. With no decode worker, jobs wait holding their
// input; one that would take the held payload past broker.max_pending_bytes is refused as
// busy (retryable), and once the held jobs are done the same request is accepted.
TEST_F(PipelineTest, ABytesBudgetRefusesWhatWouldGoOverItAsBusy) {
  START_CLUSTER(c, true, {"GMI_BROKER_MAX_PENDING_BYTES=400000"});
  c.start_all();
  upload_hub(c);
  c.worker("decode").signal(SIGTERM);  // says bye: the broker forgets it at once
  ASSERT_TRUE(c.worker("decode").wait(20s).has_value());
  const std::string heavy = hub().queries[0] + std::string(150000, '\0');  // readers stop at EOI
  const std::string a = c.query(heavy), b = c.query(heavy);  // 2 x ~160 KB held
  try {
    QueryRequest q;
    q.image = heavy;
    c.client().submit_query(q);
    FAIL() << "a third heavy query was accepted over the budget";
  } catch (const BrokerRefusal& e) {
    EXPECT_EQ(e.code(), "busy");
    EXPECT_TRUE(e.retryable());
    EXPECT_NE(std::string(e.what()).find("broker.max_pending_bytes"), std::string::npos) << e.what();
  }
  std::this_thread::sleep_for(200ms);  // the gauge follows at the next housekeeping tick
  EXPECT_GT(metric(c.broker_metrics(), "gmi_pending_bytes"), 300000) << c.broker_metrics();
  c.start_worker("decode");
  for (const auto& id : {a, b}) {
    json j = c.await(id);
    EXPECT_EQ(j.value("state", ""), "finished") << j.dump();
  }
  json third = c.await(c.query(heavy));
  EXPECT_EQ(third.value("state", ""), "finished") << third.dump();
}

// Item 14's claim check: an input of at least broker.claim_bytes stays only in Redis and the
// first stage fetches it. Uploads and queries work through it (every input here is
// claimed), and a decode worker that finds the input gone says so.
TEST_F(PipelineTest, LargeInputsStayInRedisAndTheFirstStageFetchesThem) {
  START_CLUSTER(c, true, {"GMI_BROKER_CLAIM_BYTES=100"});
  c.start_all();
  upload_hub(c);
  json ok = c.await(c.query(hub().queries[1], 3));
  ASSERT_EQ(ok.value("state", ""), "finished") << ok.dump() << c.logs();
  EXPECT_EQ(ok["result"]["results"][0]["model"], Hub::model(1));

  c.worker("decode").signal(SIGTERM);
  ASSERT_TRUE(c.worker("decode").wait(20s).has_value());
  const std::string id = c.query(hub().queries[2], 3);
  redisContext* rc = redisConnect("127.0.0.1", c.redis().port());
  freeReplyObject(redisCommand(rc, "DEL gmi:job:%s:input", id.c_str()));
  redisFree(rc);
  c.start_worker("decode");
  json gone = c.await(id);
  EXPECT_EQ(gone.value("state", ""), "failed") << gone.dump();
  EXPECT_NE(gone.value("error", "").find("the job's input is no longer in Redis"), std::string::npos) << gone.dump();
}

// Item 9 of the reliability issue: a job waits for a worker that never comes no longer than
// its deadline (the request's, or the broker's default), and the broker goes on serving.
TEST_F(PipelineTest, AJobPastItsDeadlineFailsSayingSoAndTheBrokerGoesOnServing) {
  START_CLUSTER(c, true, {"GMI_BROKER_QUERY_DEADLINE_S=2", "GMI_BROKER_NO_WORKER_WAIT_S=0"});
  c.start_broker();
  c.start_worker("decode");  // no embed worker yet: queries wait at embed
  const auto t0 = std::chrono::steady_clock::now();
  const std::string own = c.submit([&](BrokerClient& b) {
    QueryRequest q;
    q.image = hub().queries[0];
    q.deadline_ms = 700;
    return b.submit_query(q);
  });
  const std::string by_default = c.query(hub().queries[1]);
  json a = c.await(own, 30s);
  const double a_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  json b = c.await(by_default, 30s);
  const double b_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  for (const json* j : {&a, &b}) {
    EXPECT_EQ(j->value("state", ""), "failed") << j->dump();
    EXPECT_NE(j->value("error", "").find("deadline exceeded"), std::string::npos) << j->dump();
    EXPECT_EQ(j->value("failed_stage", ""), "embed") << j->dump();
    EXPECT_FALSE(j->value("dead_letter", true)) << j->dump();
  }
  EXPECT_NE(a.value("error", "").find("within 0.7 s"), std::string::npos) << a.dump();
  EXPECT_LT(a_s, b_s) << "the request's own deadline (0.7 s) came before the default (2 s)";
  EXPECT_GE(b_s, 1.9);
  // The same broker serves the next jobs as soon as the workers are there.
  for (const char* s : {"embed", "interrogate", "score", "spec"}) c.start_worker(s);
  upload_hub(c);
  json ok = c.await(c.query(hub().queries[2], 3));
  ASSERT_EQ(ok.value("state", ""), "finished") << ok.dump() << c.logs();
  EXPECT_EQ(ok["result"]["results"][0]["model"], Hub::model(2));
  const auto [results, active] = c.redis_counts();
  EXPECT_EQ(active, 0) << "every job ended";
}

// A long-poll whose wait runs out after its job ended but before Redis took the end (paused
// here) is answered with the end, error included, not with the bare job object.
TEST_F(PipelineTest, ALongPollThatOutlivesAnUnsavedEndGetsTheEnd) {
  START_CLUSTER(c, true, {"GMI_BROKER_NO_WORKER_WAIT_S=0"});
  c.start_broker();
  const std::string id = c.submit([&](BrokerClient& b) {
    QueryRequest q;
    q.image = hub().queries[0];
    q.deadline_ms = 800;  // no decode worker: it fails "deadline exceeded" at 0.8 s
    return b.submit_query(q);
  });
  std::thread pause([&] {
    std::this_thread::sleep_for(300ms);
    redisContext* rc = redisConnect("127.0.0.1", c.redis().port());
    freeReplyObject(redisCommand(rc, "CLIENT PAUSE 4000 ALL"));
    redisFree(rc);
  });
  json j = c.client().get_job(id, 2000);  // its wait ends while the end waits for Redis
  pause.join();
  EXPECT_EQ(j.value("state", ""), "failed") << j.dump();
  EXPECT_NE(j.value("error", "").find("deadline exceeded"), std::string::npos) << j.dump();
}

// A query whose score shard has no live worker fails naming the shard after
// broker.no_worker_wait_s, or with score.allow_partial is ranked without it and says so.
TEST_F(PipelineTest, AQueryWhoseScoreShardHasNoWorkerFailsNamingItOrIsRankedWithoutIt) {
  START_CLUSTER(c, true, {"GMI_SCORE_SHARDS=2", "GMI_BROKER_NO_WORKER_WAIT_S=1"});
  c.start_broker();
  for (const char* s : {"decode", "embed", "interrogate", "spec"}) c.start_worker(s);
  c.start_worker("score", {"GMI_SCORE_SHARD=0"});
  for (const auto& u : hub().uploads) {
    json job = c.await(c.submit([&](BrokerClient& b) { return b.submit_upload(u); }));
    ASSERT_EQ(job.value("state", ""), "finished") << job.dump() << c.logs();
  }
  json failed = c.await(c.query(hub().queries[0], 3), 30s);
  EXPECT_EQ(failed.value("state", ""), "failed") << failed.dump();
  EXPECT_NE(failed.value("error", "").find("no live worker serves score shard 1 of 2"), std::string::npos)
      << failed.dump();
  EXPECT_EQ(failed.value("failed_stage", ""), "score");

  c.broker().signal(SIGTERM);
  ASSERT_TRUE(c.broker().wait(20s).has_value());
  c.start_broker({"GMI_SCORE_ALLOW_PARTIAL=true"});
  json partial = c.await(c.query(hub().queries[0], 3), 30s);
  ASSERT_EQ(partial.value("state", ""), "finished") << partial.dump() << c.logs();
  EXPECT_EQ(partial["result"].value("missing_shards", json()), json::array({1})) << partial.dump();
  EXPECT_LT(partial["result"].value("models", 99), Hub::kModels) << "shard 1's models are not in it";
  // Once shard 1 has a worker, rankings are whole again.
  c.start_worker("score", {"GMI_SCORE_SHARD=1"});
  for (int i = 0; i < 100; ++i) {
    json whole = c.await(c.query(hub().queries[0], 3), 30s);
    if (whole.value("state", "") == "finished" && !whole["result"].contains("missing_shards") &&
        whole["result"].value("models", 0) == Hub::kModels) {
      EXPECT_EQ(whole["result"]["results"][0]["model"], Hub::model(0));
      return;
    }
    std::this_thread::sleep_for(100ms);
  }
  FAIL() << "rankings never became whole again\n" << c.logs();
}

// The hub-learned metric through the pipeline: once uploads make the hub due, the broker
// makes a metric job, a learn worker stores version 1, every score shard swaps it in, and
// the pipeline, `gmi query`, HTTP and `gmi identify` give the same ranking with it.
TEST_F(PipelineTest, AMetricJobLearnsTheHubsMetricAndEveryPathRanksWithIt) {
  START_CLUSTER(c, true, {"GMI_METRIC_MIN_MODELS=3", "GMI_SCORE_SHARDS=2"});
  c.start_broker();
  for (const char* s : {"decode", "embed", "interrogate", "spec", "learn"}) c.start_worker(s);
  c.start_worker("score", {"GMI_SCORE_SHARD=0"});
  c.start_worker("score", {"GMI_SCORE_SHARD=1"});
  const int port = testing::free_port();
  BackgroundProcess gateway({testing::gmi_binary(), "gateway"},
                            [&] {
                              auto e = c.env();
                              e.push_back("GMI_GATEWAY_PORT=" + std::to_string(port));
                              return e;
                            }(),
                            c.dir() / "gateway.log");
  upload_hub(c);
  // The third upload made the hub due: a metric job, then version 1 on every shard.
  json last;
  for (int i = 0; i < 200; ++i) {
    last = c.await(c.query(hub().queries[0], 3));
    if (last["result"]["metric"].is_object() && last["result"]["metric"]["version"] == 1) break;
    std::this_thread::sleep_for(100ms);
  }
  ASSERT_TRUE(last["result"]["metric"].is_object()) << last.dump() << c.logs();
  ASSERT_EQ(last["result"]["metric"]["version"], 1) << last.dump();
  EXPECT_NE(c.broker().log().find("metric job made"), std::string::npos) << c.broker().log();
  EXPECT_NE(c.worker("learn").log().find("metric learnt"), std::string::npos) << c.worker("learn").log();
  auto shown = testing::run_process({testing::gmi_binary(), "hub", "metric", "--store", c.redis().uri(), "--json"},
                                    c.env());
  ASSERT_EQ(shown.exit_code, 0) << shown.err;
  const json stored = json::parse(shown.out);
  EXPECT_EQ(stored["version"], 1);
  EXPECT_EQ(stored["models"], Hub::kModels);
  EXPECT_EQ(stored["checksum"], last["result"]["metric"]["checksum"]);

  hub().write(c.dir() / "hub");
  httplib::Client http("127.0.0.1", port);
  http.set_read_timeout(60, 0);
  for (int i = 0; i < 600 && !http.Get("/healthz"); ++i) std::this_thread::sleep_for(50ms);
  for (int q = 0; q < Hub::kModels; ++q) {
    const fs::path image = c.dir() / "hub" / ("q" + std::to_string(q) + ".jpg");
    json piped = c.await(c.query(hub().queries[static_cast<std::size_t>(q)], 3))["result"];
    auto cli_query = testing::run_process({testing::gmi_binary(), "query", image.string(), "--top", "3", "--json"},
                                          c.env());
    ASSERT_EQ(cli_query.exit_code, 0) << cli_query.err;
    auto local = testing::run_process({testing::gmi_binary(), "identify", "--store", c.redis().uri(), "--top", "3",
                                       "--json", image.string()},
                                      c.env());
    ASSERT_EQ(local.exit_code, 0) << local.err;
    EXPECT_NE(local.err.find("(stored)"), std::string::npos) << local.err;
    auto posted = http.Post("/v1/queries?top=3", hub().queries[static_cast<std::size_t>(q)], "image/jpeg");
    ASSERT_TRUE(posted) << gateway.log();
    ASSERT_EQ(posted->status, 202) << posted->body;
    auto answer = http.Get("/v1/queries/" + json::parse(posted->body)["job_id"].get<std::string>() + "?wait_ms=20000");
    ASSERT_TRUE(answer);
    const json over_http = json::parse(answer->body)["result"];
    for (const json& other : {json::parse(cli_query.out), json::parse(local.out), over_http}) {
      ASSERT_EQ(ranking(other["results"]), ranking(piped["results"])) << other.dump() << " vs " << piped.dump();
      EXPECT_EQ(other["metric"], piped["metric"]);
      for (std::size_t i = 0; i < piped["results"].size(); ++i)
        EXPECT_NEAR(other["results"][i]["score"].get<double>(), piped["results"][i]["score"].get<double>(), 1e-5);
    }
    EXPECT_EQ(ranking(piped["results"]).front(), Hub::model(q));
  }
  // --metric none is the raw space, and says so.
  auto raw = testing::run_process({testing::gmi_binary(), "identify", "--store", c.redis().uri(), "--metric", "none",
                                   "--json", (c.dir() / "hub" / "q0.jpg").string()},
                                  c.env());
  ASSERT_EQ(raw.exit_code, 0) << raw.err;
  EXPECT_TRUE(json::parse(raw.out)["metric"].is_null()) << raw.out;
  // Re-uploading the same models does not grow the hub: no new version.
  upload_hub(c);
  std::this_thread::sleep_for(1s);
  auto again = testing::run_process({testing::gmi_binary(), "hub", "metric", "--store", c.redis().uri(), "--json"},
                                    c.env());
  EXPECT_EQ(json::parse(again.out)["version"], 1) << again.out;
}

// Shards that rank with different metric versions are never merged: the broker ranks again
// on every shard, and a query whose shards keep disagreeing fails saying so. (One shard is
// configured to ignore the metric, so here they disagree for good once a metric exists.)
TEST_F(PipelineTest, ShardsWithDifferentMetricVersionsAreNeverMerged) {
  START_CLUSTER(c, true, {"GMI_METRIC_MIN_MODELS=3", "GMI_SCORE_SHARDS=2"});
  c.start_broker();
  for (const char* s : {"decode", "embed", "interrogate", "spec", "learn"}) c.start_worker(s);
  c.start_worker("score", {"GMI_SCORE_SHARD=0"});
  c.start_worker("score", {"GMI_SCORE_SHARD=1", "GMI_METRIC_USE=none"});
  upload_hub(c);
  bool stored = false;
  for (int i = 0; i < 200 && !stored; ++i) {
    auto r = testing::run_process({testing::gmi_binary(), "hub", "metric", "--store", c.redis().uri()}, c.env());
    stored = r.exit_code == 0;
    if (!stored) std::this_thread::sleep_for(100ms);
  }
  ASSERT_TRUE(stored) << c.logs();
  std::this_thread::sleep_for(500ms);  // shard 0 swaps the metric in; shard 1 never does
  json job = c.await(c.query(hub().queries[0], 3));
  EXPECT_EQ(job.value("state", ""), "failed") << job.dump();
  EXPECT_NE(job.value("error", "").find("different metric versions"), std::string::npos) << job.dump();
  EXPECT_NE(c.broker_metrics().find("gmi_retries_total{reason=\"metric_skew\",stage=\"score\"}"), std::string::npos);
}

TEST_F(PipelineTest, RetriedSubmissionWithTheSameIdempotencyKeyIsOneJob) {
  START_CLUSTER(c);
  c.start_all();
  upload_hub(c);
  const auto [results_before, active_before] = c.redis_counts();
  QueryRequest q;
  q.image = hub().queries[0];
  q.idempotency_key = "client-retry-1";
  const std::string first = c.client().submit_query(q);
  const std::string again = c.client().submit_query(q);
  EXPECT_EQ(first, again);
  q.idempotency_key = "client-retry-2";
  const std::string other = c.client().submit_query(q);
  EXPECT_NE(first, other);
  EXPECT_EQ(c.await(first).value("state", ""), "finished");
  EXPECT_EQ(c.await(other).value("state", ""), "finished");

  // The same key on a different request is refused, naming the key: another image, other
  // parameters. It used to answer with the first job.
  QueryRequest changed = q;
  changed.idempotency_key = "client-retry-1";
  changed.image = hub().queries[1];
  try {
    c.client().submit_query(changed);
    ADD_FAILURE() << "a reused key with another image was accepted";
  } catch (const BrokerRefusal& e) {
    EXPECT_EQ(e.code(), "conflict") << e.what();
    EXPECT_NE(std::string(e.what()).find("client-retry-1"), std::string::npos) << e.what();
  }
  changed.image = q.image;
  changed.top = 7;
  EXPECT_THROW(c.client().submit_query(changed), BrokerRefusal);
  // Keys are scoped to the kind of request: an upload reusing a query's key is its own job,
  // and its spec gets built.
  UploadRequest up = hub().uploads[1];
  up.idempotency_key = "client-retry-1";
  const std::string upload = c.client().submit_upload(up);
  EXPECT_NE(upload, first);
  EXPECT_EQ(c.await(upload).value("state", ""), "finished");
  // ... and to the credential the gateway names.
  QueryRequest scoped = q;
  scoped.idempotency_scope = "key:another-client";
  const std::string theirs = c.client().submit_query(scoped);
  EXPECT_NE(theirs, first);
  EXPECT_EQ(c.await(theirs).value("state", ""), "finished");
  EXPECT_EQ(c.redis_counts().first - results_before, 4);
}

TEST_F(PipelineTest, SigtermDrainsAndEveryProcessExitsCleanly) {
  START_CLUSTER(c);
  c.start_all();
  upload_hub(c);
  std::vector<std::string> ids;
  for (int i = 0; i < 4; ++i) ids.push_back(c.query(hub().queries[static_cast<std::size_t>(i % Hub::kModels)]));
  for (const auto& id : ids) EXPECT_EQ(c.await(id).value("state", ""), "finished");
  // Nothing failed, and yet the failure counters are there, at 0, for rate() and alerts.
  const std::string m = c.broker_metrics();
  EXPECT_NE(m.find("gmi_retries_total{reason=\"timeout\",stage=\"embed\"} 0"), std::string::npos) << m;
  EXPECT_NE(m.find("gmi_dead_letters_total{stage=\"score\"} 0"), std::string::npos) << m;
  c.broker().signal(SIGTERM);
  EXPECT_EQ(c.broker().wait(10s), std::optional<int>(0)) << c.logs();
  for (const char* s : {"decode", "embed", "interrogate", "score", "spec", "learn"}) {
    c.worker(s).signal(SIGTERM);
    EXPECT_EQ(c.worker(s).wait(10s), std::optional<int>(0)) << s << c.logs();
  }
}

// The gateway's /readyz agrees with the broker's (it said ready while the broker's Redis
// was down), and with no broker a submission is a 503 within gateway.broker_timeout_ms
// (it took 3 tries of 10 s).
TEST_F(PipelineTest, GatewayReadinessFollowsTheBrokerAndNoBrokerIsA503InTwoSeconds) {
  START_CLUSTER(c);
  c.start_broker();
  const int port = testing::free_port();
  auto env = c.env();
  env.push_back("GMI_GATEWAY_PORT=" + std::to_string(port));
  BackgroundProcess gateway({testing::gmi_binary(), "gateway"}, env, c.dir() / "gateway.log");
  httplib::Client http("127.0.0.1", port);
  http.set_read_timeout(30, 0);
  int status = 0;
  for (int i = 0; i < 600 && status != 200; ++i) {
    if (auto r = http.Get("/readyz")) status = r->status;
    if (status != 200) std::this_thread::sleep_for(50ms);
  }
  ASSERT_EQ(status, 200) << gateway.log();
  c.redis().kill9();
  std::string body;
  for (int i = 0; i < 100 && status != 503; ++i) {
    std::this_thread::sleep_for(100ms);  // the gateway reuses a /readyz answer briefly
    if (auto r = http.Get("/readyz")) {
      status = r->status;
      body = r->body;
    }
  }
  EXPECT_EQ(status, 503);
  EXPECT_NE(body.find("is not ready: "), std::string::npos) << body;
  EXPECT_NE(body.find("redis"), std::string::npos) << body;
  c.redis().start();

  c.broker().signal(SIGKILL);
  ASSERT_TRUE(c.broker().wait(5s).has_value());
  const auto t0 = std::chrono::steady_clock::now();
  auto res = http.Post("/v1/queries", hub().queries[0], "image/jpeg");
  const double took = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 503) << res->body;
  EXPECT_LT(took, 4.0) << "gateway.broker_timeout_ms is 2 s";
  EXPECT_TRUE(gateway.running());
}

TEST_F(PipelineTest, GatewayServesQueriesUploadsAndModelsOverHttp) {
  START_CLUSTER(c, true, {"GMI_API_KEY=sesame"});
  c.start_all();
  const int port = testing::free_port();
  BackgroundProcess gateway({testing::gmi_binary(), "gateway"},
                            [&] {
                              auto e = c.env();
                              e.push_back("GMI_API_KEY=sesame");
                              e.push_back("GMI_GATEWAY_PORT=" + std::to_string(port));
                              e.push_back("GMI_GATEWAY_MAX_QUERY_BYTES=2000000");
                              return e;
                            }(),
                            c.dir() / "gateway.log");
  httplib::Client http("127.0.0.1", port);
  http.set_default_headers({{"X-API-Key", "sesame"}});
  // Generous: under a sanitizer on a loaded machine the gateway takes seconds to start, and
  // the upload waits for the embed worker's first (model-loading) batch.
  http.set_read_timeout(60, 0);
  for (int i = 0; i < 600 && !http.Get("/healthz"); ++i) std::this_thread::sleep_for(50ms);

  // Upload one model as multipart: a manifest plus its images.
  const auto& u = hub().uploads[0];
  httplib::MultipartFormDataItems items;
  std::string manifest;
  for (std::size_t i = 0; i < u.images.size(); ++i) {
    const std::string name = "img" + std::to_string(i) + ".jpg";
    manifest += json{{"image", name}, {"prompt", u.prompts[i]}}.dump() + "\n";
    items.push_back({name, u.images[i], name, "image/jpeg"});
  }
  items.push_back({"manifest", manifest, "", "application/jsonl"});
  auto up = http.Post("/v1/models/" + u.model_id + "/uploads", items);
  ASSERT_TRUE(up) << gateway.log();
  ASSERT_EQ(up->status, 202) << up->body;
  const std::string upload_id = json::parse(up->body)["job_id"];
  auto done = http.Get("/v1/jobs/" + upload_id + "?wait_ms=20000");
  ASSERT_TRUE(done);
  EXPECT_EQ(json::parse(done->body)["state"], "finished") << done->body;

  auto models = http.Get("/v1/models/" + u.model_id);
  ASSERT_TRUE(models);
  EXPECT_EQ(models->status, 200) << models->body;
  EXPECT_EQ(http.Get("/v1/models/no-such-model")->status, 404);

  // A query: 202, then the ranking; the model just uploaded is the only one.
  std::this_thread::sleep_for(500ms);
  auto q = http.Post("/v1/queries?top=2", hub().queries[0], "image/jpeg");
  ASSERT_TRUE(q);
  ASSERT_EQ(q->status, 202) << q->body;
  auto answer = http.Get("/v1/queries/" + json::parse(q->body)["job_id"].get<std::string>() + "?wait_ms=20000");
  ASSERT_TRUE(answer);
  json job = json::parse(answer->body);
  EXPECT_EQ(job["state"], "finished") << answer->body;
  EXPECT_EQ(job["result"]["results"][0]["model"], u.model_id);

  // An Idempotency-Key repeats its job for the same request and is a 422 for another one.
  httplib::Headers keyed{{"X-API-Key", "sesame"}, {"Idempotency-Key", "page-7"}};
  auto k1 = http.Post("/v1/queries?top=2", keyed, hub().queries[0], "image/jpeg");
  auto k2 = http.Post("/v1/queries?top=2", keyed, hub().queries[0], "image/jpeg");
  ASSERT_TRUE(k1 && k2);
  ASSERT_EQ(k1->status, 202) << k1->body;
  ASSERT_EQ(k2->status, 202) << k2->body;
  EXPECT_EQ(json::parse(k1->body)["job_id"], json::parse(k2->body)["job_id"]);
  auto k3 = http.Post("/v1/queries?top=3", keyed, hub().queries[0], "image/jpeg");
  ASSERT_TRUE(k3);
  EXPECT_EQ(k3->status, 422) << k3->body;
  EXPECT_EQ(json::parse(k3->body)["error"]["code"], "conflict") << k3->body;

  // Bad input over HTTP: 4xx, and the gateway stays up.
  EXPECT_EQ(http.Post("/v1/queries", std::string(3000000, 'x'), "image/jpeg")->status, 413);
  EXPECT_EQ(http.Post("/v1/queries", "", "image/jpeg")->status, 400);
  EXPECT_EQ(http.Get("/v1/queries/not-an-id")->status, 400);
  EXPECT_EQ(http.Get("/v1/queries/0123456789abcdef0123456789abcdef")->status, 404);
  httplib::Client anonymous("127.0.0.1", port);
  EXPECT_EQ(anonymous.Post("/v1/queries", hub().queries[0], "image/jpeg")->status, 401);
  EXPECT_TRUE(gateway.running());
  EXPECT_EQ(http.Get("/readyz")->status, 200);
}

TEST_F(PipelineTest, ServeRunsEverythingInOneProcess) {
  START_CLUSTER(c);
  const int port = testing::free_port();
  auto env = c.env();
  env.push_back("GMI_GATEWAY_PORT=" + std::to_string(port));
  env.push_back("GMI_SERVE_OPS_PORT=-1");
  BackgroundProcess serve({testing::gmi_binary(), "serve"}, env, c.dir() / "serve.log");
  upload_hub(c);  // through the TCP frontend that serve also binds
  httplib::Client http("127.0.0.1", port);
  auto q = http.Post("/v1/queries?top=3", hub().queries[1], "image/jpeg");
  ASSERT_TRUE(q) << serve.log();
  ASSERT_EQ(q->status, 202) << q->body;
  auto answer = http.Get("/v1/queries/" + json::parse(q->body)["job_id"].get<std::string>() + "?wait_ms=20000");
  ASSERT_TRUE(answer);
  EXPECT_EQ(json::parse(answer->body)["result"]["results"][0]["model"], Hub::model(1)) << answer->body;
  serve.signal(SIGTERM);
  EXPECT_EQ(serve.wait(15s), std::optional<int>(0)) << serve.log();
}

TEST_F(PipelineTest, CurveEncryptsEveryLinkAndRefusesStrangers) {
  testing::TempDir keys;
  const std::string server = (keys.path() / "broker.key").string();
  const std::string client = (keys.path() / "client.key").string();
  wire::generate_curve_key_files(server);
  wire::generate_curve_key_files(client);
  START_CLUSTER(c, true,
                {"GMI_CURVE_ENABLED=true", "GMI_CURVE_SERVER_KEYS=" + server,
                 "GMI_CURVE_SERVER_PUBLIC=" + server + ".pub", "GMI_CURVE_CLIENT_KEYS=" + client});
  c.start_all();
  hub().write(c.dir() / "hub");
  auto r = testing::run_process({testing::gmi_binary(), "upload", "--model", Hub::model(0), "--manifest",
                                 (c.dir() / "hub" / Hub::model(0) / "manifest.jsonl").string(), "--json"},
                                c.env());
  ASSERT_EQ(r.exit_code, 0) << r.err << c.logs();
  // A plain client gets no answer from a CURVE broker.
  zmq::context_t ctx;
  BrokerClientOptions plain;
  plain.endpoint = c.frontend();
  BrokerClient stranger(ctx, plain);
  EXPECT_FALSE(stranger.ping(500));
}

// With curve.clients_dir, holding the broker's public key is not enough: a client or worker
// whose key is not in the directory is refused on both sockets (it could read user images,
// forge rankings or skip the gateway's API key); a key added to the directory is admitted
// after SIGHUP.
TEST_F(PipelineTest, CurveAdmitsOnlyTheKeysOfTheAllowList) {
  testing::TempDir keys;
  const fs::path allowed = keys.path() / "allowed";
  fs::create_directories(allowed);
  const std::string server = (keys.path() / "broker.key").string();
  const std::string client = (allowed / "client.key").string();
  const std::string outsider = (keys.path() / "outsider.key").string();
  wire::generate_curve_key_files(server);
  wire::generate_curve_key_files(client);
  wire::generate_curve_key_files(outsider);
  START_CLUSTER(c, true,
                {"GMI_CURVE_ENABLED=true", "GMI_CURVE_SERVER_KEYS=" + server,
                 "GMI_CURVE_SERVER_PUBLIC=" + server + ".pub", "GMI_CURVE_CLIENT_KEYS=" + client,
                 "GMI_CURVE_CLIENTS_DIR=" + allowed.string()});
  c.start_all();
  hub().write(c.dir() / "hub");
  // The workers and this client hold allowed keys: an upload goes through.
  auto up = testing::run_process({testing::gmi_binary(), "upload", "--model", Hub::model(0), "--manifest",
                                  (c.dir() / "hub" / Hub::model(0) / "manifest.jsonl").string(), "--json"},
                                 c.env());
  ASSERT_EQ(up.exit_code, 0) << up.err << c.logs();
  zmq::context_t ctx;
  BrokerClientOptions o;
  o.endpoint = c.frontend();
  o.curve_server_public = wire::read_curve_key_file(server + ".pub").public_key;
  o.curve_client = wire::read_curve_key_file(outsider);
  {
    BrokerClient intruder(ctx, o);
    EXPECT_FALSE(intruder.ping(1000)) << "a client outside the allow-list was served";
  }
  // A worker outside the list gets no tasks: its registration never reaches the broker.
  auto& rogue = c.start_worker("score", {"GMI_CURVE_CLIENT_KEYS=" + outsider});
  std::this_thread::sleep_for(1500ms);
  EXPECT_TRUE(rogue.running());
  EXPECT_NE(c.broker().log().find("refused a CURVE client"), std::string::npos) << c.broker().log();
  // Added to the directory, then SIGHUP: admitted.
  fs::copy_file(outsider + ".pub", allowed / "outsider.key.pub");
  c.broker().signal(SIGHUP);
  bool admitted = false;
  for (int i = 0; i < 50 && !admitted; ++i) {
    BrokerClient now_known(ctx, o);
    admitted = now_known.ping(500);
  }
  EXPECT_TRUE(admitted) << c.broker().log();
  EXPECT_TRUE(c.broker().running());
}

}  // namespace
}  // namespace gmi
