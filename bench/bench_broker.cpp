// The ceiling of one broker: jobs/s through the whole query route (decode, embed,
// interrogate, score) when every stage is trivial (answers at once), so that what is
// measured is the broker itself — intake, four dispatches per job, the job's record and its
// end in a real Redis — plus ZeroMQ. Everything runs in this process over inproc sockets:
// one broker, one worker per stage (max_batch 64), and --clients client threads that each
// keep --window jobs outstanding (submit, then get_job with a wait until it ends).
//
// --stall-ms pauses Redis (CLIENT PAUSE ALL) once, at the middle of the measurement, and
// reports what the broker did meanwhile: jobs finished during the pause (every one needs
// Redis to end, so none), tasks re-queued because the broker declared their worker lost
// (a broker that blocks on Redis misses heartbeats; should be 0) and the longest gap
// between two completions.
//
// Needs a running redis-server; scripts/bench_broker.sh starts a throw-away one.
//
//   bench_broker --redis redis://127.0.0.1:6390/9 --clients 4 --window 64 --duration 10
#include <CLI/CLI.hpp>
#include <hiredis/hiredis.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <map>
#include <mutex>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>
#include <zmq.hpp>

#include "gmi/broker.hpp"
#include "gmi/error.hpp"
#include "gmi/log.hpp"
#include "gmi/ops.hpp"
#include "gmi/redis.hpp"
#include "gmi/wire.hpp"
#include "gmi/workers/runtime.hpp"
#include "gmi/workers/stage.hpp"

namespace {

using Clock = std::chrono::steady_clock;
using nlohmann::json;
using namespace gmi;

// Answers every task at once; score answers an empty ranking.
class TrivialStage : public workers::Stage {
 public:
  explicit TrivialStage(std::string name) : name_(std::move(name)) {}
  std::string name() const override { return name_; }
  workers::BatchPolicy batch_policy() const override { return {64, 0, ""}; }
  std::vector<std::string> reads() const override { return {"none"}; }  // no payload needed
  std::vector<workers::StageResult> process(std::vector<workers::StageTask>& batch) override {
    std::vector<workers::StageResult> out(batch.size());
    if (name_ == "score") {
      for (auto& r : out) r.meta = {{"results", json::array()}, {"models", 0}, {"scorer", "trivial"}};
    }
    return out;
  }

 private:
  std::string name_;
};

struct ClientStats {
  std::vector<double> latency_ms;
  std::vector<double> done_at_s;  // completion times since the start of measurement
  long failed = 0, refused = 0;
};

double percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v[static_cast<std::size_t>(p * static_cast<double>(v.size() - 1))];
}

void client_loop(zmq::context_t& ctx, const std::string& endpoint, int window, const std::string& image,
                 const std::atomic<bool>& stop, Clock::time_point t0, ClientStats& stats) {
  zmq::socket_t s(ctx, zmq::socket_type::dealer);
  s.set(zmq::sockopt::linger, 0);
  s.connect(endpoint);
  std::map<std::string, Clock::time_point> started;  // req -> submission time
  long next = 0;
  auto submit = [&] {
    const std::string req = "q" + std::to_string(next++);
    json h = wire::header("submit_query");
    h["req"] = req;
    h["top"] = 1;
    wire::send(s, "", h, std::vector<std::string>{image});
    started[req] = Clock::now();
  };
  for (int i = 0; i < window; ++i) submit();
  while (!stop.load() || !started.empty()) {
    zmq::pollitem_t item{static_cast<void*>(s), 0, ZMQ_POLLIN, 0};
    wire::poll(&item, 1, std::chrono::milliseconds(100));
    if (!(item.revents & ZMQ_POLLIN)) continue;
    auto raw = wire::recv_raw(s, false, true);
    if (!raw) continue;
    wire::Message m = wire::decode(*raw, wire::Channel::kBrokerToClient);
    const std::string req = m.header.value("req", "");
    auto it = started.find(req);
    if (it == started.end()) continue;
    if (m.type() == "accepted") {
      json g = wire::header("get_job");
      g["req"] = req;
      g["job_id"] = m.header["job_id"];
      g["wait_ms"] = 30000;
      wire::send(s, "", g);
      continue;
    }
    if (m.type() == "job") {
      const std::string state = m.header["job"].value("state", "");
      if (state != "finished" && state != "failed") {
        json g = wire::header("get_job");
        g["req"] = req;
        g["job_id"] = m.header["job"]["job_id"];
        g["wait_ms"] = 30000;
        wire::send(s, "", g);
        continue;
      }
      if (state == "failed") ++stats.failed;
      const auto now = Clock::now();
      stats.latency_ms.push_back(std::chrono::duration<double, std::milli>(now - it->second).count());
      stats.done_at_s.push_back(std::chrono::duration<double>(now - t0).count());
    } else {
      ++stats.refused;  // busy, unavailable
    }
    started.erase(it);
    if (!stop.load()) submit();
  }
}

double counter(prometheus::Family<prometheus::Counter>& family, const std::map<std::string, std::string>& labels) {
  return family.Add(labels).Value();
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"bench_broker: jobs/s of one broker with trivial stages, against a real Redis"};
  std::string redis_uri;
  int clients = 4, window = 64, payload = 1024;
  double duration_s = 10, warmup_s = 1;
  int stall_ms = 0;
  bool json_out = false;
  app.add_option("--redis", redis_uri, "a running Redis (its data under the URI's prefix is written)")->required();
  app.add_option("--clients", clients, "client threads")->check(CLI::Range(1, 256))->capture_default_str();
  app.add_option("--window", window, "jobs each client keeps outstanding")->check(CLI::Range(1, 10000))
      ->capture_default_str();
  app.add_option("--payload", payload, "bytes of the query 'image' (the stages never read it)")
      ->check(CLI::Range(1, 1 << 26))->capture_default_str();
  app.add_option("--duration", duration_s, "seconds measured")->check(CLI::PositiveNumber)->capture_default_str();
  app.add_option("--warmup", warmup_s, "seconds before measuring")->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  app.add_option("--stall-ms", stall_ms, "pause Redis this long (CLIENT PAUSE) in the middle of the measurement")
      ->check(CLI::Range(0, 60000))->capture_default_str();
  app.add_flag("--json", json_out, "print one JSON object instead of the table");
  CLI11_PARSE(app, argc, argv);
  log::configure("bench_broker", "warn", "text");

  try {
    zmq::context_t ctx;
    BrokerOptions bo;
    bo.frontend = {"inproc://bench-front"};
    bo.backend = {"inproc://bench-back"};
    bo.redis_uri = redis_uri;
    bo.heartbeat_ms = 100;
    bo.liveness = 10;  // a worker is lost after 1 s without a heartbeat
    bo.max_pending_jobs = 1000000;
    Broker broker(ctx, bo);
    std::atomic<bool> broker_stop{false}, workers_stop{false}, clients_stop{false};
    std::thread broker_thread([&] { broker.run(broker_stop); });
    std::vector<std::unique_ptr<workers::StageWorker>> ws;
    std::vector<std::thread> worker_threads;
    for (const char* stage : {"decode", "embed", "interrogate", "score"}) {
      workers::WorkerOptions wo;
      wo.broker = "inproc://bench-back";
      wo.heartbeat_ms = 100;
      wo.liveness = 10;
      ws.push_back(std::make_unique<workers::StageWorker>(ctx, wo, std::make_unique<TrivialStage>(stage)));
    }
    for (auto& w : ws) worker_threads.emplace_back([&, p = w.get()] { p->run(workers_stop); });
    for (int i = 0; i < 100 && !broker.not_ready_reason().empty(); ++i) std::this_thread::sleep_for(std::chrono::milliseconds(50));
    if (auto why = broker.not_ready_reason(); !why.empty()) throw IoError("the broker is not ready: " + why);

    const std::string image(static_cast<std::size_t>(payload), 'x');
    std::vector<ClientStats> stats(static_cast<std::size_t>(clients));
    const auto t0 = Clock::now() + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(warmup_s));
    std::vector<std::thread> client_threads;
    for (int c = 0; c < clients; ++c) {
      client_threads.emplace_back([&, c] {
        client_loop(ctx, "inproc://bench-front", window, image, clients_stop, t0, stats[static_cast<std::size_t>(c)]);
      });
    }
    auto& m = Metrics::instance();
    std::this_thread::sleep_until(t0);
    double stall_at = -1;
    std::thread staller;
    if (stall_ms > 0) {
      staller = std::thread([&] {
        std::this_thread::sleep_for(std::chrono::duration<double>(duration_s / 2));
        RedisLocation loc = parse_redis_uri(redis_uri);
        redisContext* rc = redisConnect(loc.host.c_str(), loc.port);
        if (rc == nullptr || rc->err) return;
        stall_at = std::chrono::duration<double>(Clock::now() - t0).count();
        freeReplyObject(redisCommand(rc, "CLIENT PAUSE %d ALL", stall_ms));
        redisFree(rc);
      });
    }
    std::this_thread::sleep_for(std::chrono::duration<double>(duration_s));
    clients_stop = true;
    for (auto& t : client_threads) t.join();
    if (staller.joinable()) staller.join();
    int lost = 0;
    for (const char* st : {"decode", "embed", "interrogate", "score"}) {
      lost += static_cast<int>(counter(m.retries_total, {{"stage", st}, {"reason", "worker_lost"}}));
    }
    broker_stop = true;
    broker_thread.join();
    workers_stop = true;
    for (auto& t : worker_threads) t.join();

    std::vector<double> lat, done;
    long failed = 0, refused = 0;
    for (auto& s : stats) {
      for (std::size_t i = 0; i < s.done_at_s.size(); ++i) {
        if (s.done_at_s[i] < 0 || s.done_at_s[i] > duration_s) continue;
        lat.push_back(s.latency_ms[i]);
        done.push_back(s.done_at_s[i]);
      }
      failed += s.failed;
      refused += s.refused;
    }
    std::sort(done.begin(), done.end());
    double gap = 0;
    for (std::size_t i = 1; i < done.size(); ++i) gap = std::max(gap, done[i] - done[i - 1]);
    long during = 0;
    if (stall_at >= 0) {
      for (double t : done) during += (t >= stall_at && t < stall_at + stall_ms / 1000.0) ? 1 : 0;
    }
    const double rate = static_cast<double>(done.size()) / duration_s;
    json out{{"clients", clients},          {"window", window},
             {"duration_s", duration_s},    {"jobs", done.size()},
             {"jobs_per_s", rate},          {"latency_ms_p50", percentile(lat, 0.5)},
             {"latency_ms_p99", percentile(lat, 0.99)}, {"failed", failed},
             {"refused", refused},          {"worker_lost_retries", lost},
             {"longest_gap_s", gap}};
    if (stall_ms > 0) {
      out["stall_ms"] = stall_ms;
      out["jobs_during_stall"] = during;
    }
    if (json_out) {
      std::printf("%s\n", out.dump().c_str());
    } else {
      std::printf("bench_broker: %d clients x %d outstanding, %.0f s, trivial stages, real Redis\n", clients, window,
                  duration_s);
      std::printf("  %-22s %10.0f\n", "jobs/s", rate);
      std::printf("  %-22s %10.2f\n", "latency p50 (ms)", percentile(lat, 0.5));
      std::printf("  %-22s %10.2f\n", "latency p99 (ms)", percentile(lat, 0.99));
      std::printf("  %-22s %10ld\n", "failed / refused", failed + refused);
      std::printf("  %-22s %10d\n", "worker_lost retries", lost);
      std::printf("  %-22s %10.3f\n", "longest gap (s)", gap);
      if (stall_ms > 0) std::printf("  %-22s %10ld (Redis paused %d ms)\n", "jobs during stall", during, stall_ms);
    }
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_broker: %s\n", e.what());
    return 1;
  }
}
