// The worker runtime: a socket thread (this one, in run()) and a compute thread. The compute
// thread wakes the socket thread through an inproc PAIR when a batch is done, so heartbeats
// flow while a long batch computes.
#include "gmi/workers/runtime.hpp"

#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <condition_variable>
#include <deque>
#include <mutex>
#include <new>
#include <optional>
#include <sstream>
#include <thread>

#include <hiredis/hiredis.h>

#include "gmi/error.hpp"
#include "gmi/log.hpp"
#include "gmi/redis.hpp"
#include "gmi/ops.hpp"
#include "gmi/workers/batching.hpp"

namespace gmi::workers {
namespace {

using nlohmann::json;
using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

std::string default_name(const std::string& stage) {
  char host[256] = {0};
  ::gethostname(host, sizeof host - 1);
  static std::atomic<int> counter{0};
  return stage + "/" + host + "/" + std::to_string(::getpid()) + "/" + std::to_string(++counter);
}

}  // namespace

struct StageWorker::Impl {
  zmq::context_t& context;
  WorkerOptions opt;
  Stage& stage;
  BatchPolicy policy;
  std::string wake_endpoint = "inproc://gmi-worker-wake-" + wire::random_id();

  std::optional<zmq::socket_t> socket;
  zmq::socket_t wake_rx;

  // Shared with the compute thread.
  std::mutex mutex;
  std::condition_variable cv;
  std::optional<std::vector<StageTask>> batch_in;
  std::optional<std::pair<std::vector<StageTask>, std::vector<StageResult>>> batch_out;
  double batch_seconds = 0;
  bool quit = false;
  std::thread compute;
  std::optional<RedisConnection> claims;  // the compute thread's, for claimed inputs

  // Socket-thread state.
  std::deque<StageTask> pending;
  Clock::time_point first_pending{};
  int computing = 0;  // units (tasks, or images) in the batch being computed
  std::size_t computing_tasks = 0;
  // When the batch being computed began (steady clock, ms); 0 while idle. Read by the ops
  // server's threads (not_alive_reason).
  std::atomic<std::int64_t> batch_started_ms{0};
  bool stuck_logged = false;
  int granted = 0;    // credit the broker still holds for us
  std::string session;  // this connection's identity, in every "ready"
  std::string reconnect_on;  // GMI_FAULT_RECONNECT_ON (tests only)
  Clock::time_point last_heard = Clock::now();
  Clock::time_point last_sent = Clock::now();
  bool stopping = false;

  prometheus::Histogram& compute_seconds;
  prometheus::Histogram& batch_sizes;

  Impl(zmq::context_t& ctx, WorkerOptions o, Stage& s)
      : context(ctx),
        opt(std::move(o)),
        stage(s),
        policy(s.batch_policy()),
        wake_rx(ctx, zmq::socket_type::pair),
        compute_seconds(prometheus::BuildHistogram()
                            .Name("gmi_worker_compute_seconds")
                            .Help("Time a worker spent computing one batch")
                            .Register(Metrics::instance().registry())
                            .Add({{"stage", s.name()}}, Metrics::latency_buckets())),
        batch_sizes(prometheus::BuildHistogram()
                        .Name("gmi_worker_batch_size")
                        .Help("Work units per batch a worker computed (tasks; images for embed)")
                        .Register(Metrics::instance().registry())
                        .Add({{"stage", s.name()}}, Metrics::size_buckets())) {
    if (policy.max_batch < 1) throw InputError(stage.name() + ".max_batch must be >= 1");
    if (opt.name.empty()) opt.name = default_name(stage.name());
    // Fault injection for the tests: the first task carrying this marker makes the worker
    // drop what it holds and reconnect by itself, as a network blip would.
    if (const char* m = std::getenv("GMI_FAULT_RECONNECT_ON"); m != nullptr && *m != '\0') reconnect_on = m;
    wake_rx.bind(wake_endpoint);
    compute = std::thread([this] { compute_loop(); });
  }

  ~Impl() {
    {
      std::lock_guard lock(mutex);
      quit = true;
    }
    cv.notify_all();
    if (compute.joinable()) compute.join();
  }

  void compute_loop() {
    zmq::socket_t wake_tx(context, zmq::socket_type::pair);
    wake_tx.set(zmq::sockopt::linger, 0);
    wake_tx.connect(wake_endpoint);
    for (;;) {
      std::vector<StageTask> tasks;
      {
        std::unique_lock lock(mutex);
        cv.wait(lock, [&] { return quit || batch_in.has_value(); });
        if (quit) return;
        tasks = std::move(*batch_in);
        batch_in.reset();
      }
      const auto start = Clock::now();
      std::vector<StageResult> results = process_with_claims(tasks);
      const double seconds = std::chrono::duration<double>(Clock::now() - start).count();
      {
        std::lock_guard lock(mutex);
        batch_out.emplace(std::move(tasks), std::move(results));
        batch_seconds = seconds;
      }
      wake_tx.send(zmq::str_buffer("done"), zmq::send_flags::none);
    }
  }

  // Fetches the frames of claimed slots (a large input the broker left in Redis), one frame
  // per command so that no more than one is held twice; then runs the stage on the tasks
  // whose claims were met. A claim that cannot be met is that task's failure: retryable
  // while Redis is away, not when the input is gone (expired, or its job ended).
  std::vector<StageResult> process_with_claims(std::vector<StageTask>& tasks) {
    std::vector<std::optional<StageResult>> failed(tasks.size());
    for (std::size_t i = 0; i < tasks.size(); ++i) {
      std::vector<std::string> names;
      for (const auto& s : tasks[i].slots.all()) {
        if (s.info.contains("claim")) names.push_back(s.name);
      }
      for (const auto& name : names) {
        wire::Slot* slot = tasks[i].slots.find(name);
        const json claim = slot->info["claim"];
        try {
          if (!claims) claims.emplace(parse_redis_uri(opt.redis_uri.empty() ? "redis://127.0.0.1:6379" : opt.redis_uri),
                                      2000, 30000);
          const std::string key = claim.at("key").get<std::string>();
          const std::size_t first = claim.at("first").get<std::size_t>(), count = claim.at("count").get<std::size_t>();
          std::vector<std::string> frames;
          for (std::size_t k = 0; k < count && !failed[i]; ++k) {
            const std::string field = "f" + std::to_string(first + k);
            RedisReply r = claims->command({"HGET", key, field});
            if (r->type != REDIS_REPLY_STRING) {
              failed[i] = StageResult::failure(stage.name() + ": the job's input is no longer in Redis (" + key + " " +
                                                   field + "): it expired, or the job ended",
                                               false);
            } else {
              frames.emplace_back(r->str, r->len);
            }
          }
          if (failed[i]) break;
          slot->frames = std::move(frames);
          slot->info.erase("claim");
        } catch (const IoError& e) {
          failed[i] = StageResult::failure(stage.name() + ": cannot fetch the job's input from Redis: " + e.what(), true);
          break;
        } catch (const json::exception& e) {
          failed[i] = StageResult::failure(stage.name() + ": a malformed claim: " + e.what(), false);
          break;
        }
      }
    }
    std::vector<StageTask> ready;
    std::vector<std::size_t> where;
    for (std::size_t i = 0; i < tasks.size(); ++i) {
      if (failed[i]) continue;
      ready.push_back(std::move(tasks[i]));
      where.push_back(i);
    }
    std::vector<StageResult> done = ready.empty() ? std::vector<StageResult>{} : process_batch(stage, ready);
    std::vector<StageResult> results(tasks.size());
    for (std::size_t k = 0; k < where.size(); ++k) {
      tasks[where[k]] = std::move(ready[k]);
      results[where[k]] = std::move(done[k]);
    }
    for (std::size_t i = 0; i < tasks.size(); ++i) {
      if (failed[i]) results[i] = std::move(*failed[i]);
    }
    return results;
  }

  void connect() {
    socket.reset();
    socket.emplace(context, zmq::socket_type::dealer);
    socket->set(zmq::sockopt::linger, 0);
    socket->set(zmq::sockopt::routing_id, opt.name);
    socket->set(zmq::sockopt::sndhwm, 10000);
    socket->set(zmq::sockopt::rcvhwm, 10000);
    socket->set(zmq::sockopt::reconnect_ivl, 100);
    socket->set(zmq::sockopt::reconnect_ivl_max, 2000);
    if (!opt.curve_server_public.empty()) {
      wire::make_curve_client(*socket, opt.curve_server_public, opt.curve_client);
    }
    socket->connect(opt.broker);
    pending.clear();  // tasks from a broker that forgot us are re-dispatched by it
    // A new session: the broker re-queues, at once, whatever it still thinks the previous
    // connection holds, and takes this one's credit as the whole of it.
    session = wire::random_id();
    granted = 0;
    last_heard = Clock::now();
    grant(policy.max_batch - computing);
  }

  // Never blocks: with no broker attached a message is dropped (the broker re-dispatches
  // whatever it does not hear back about).
  void send(const json& h, const std::vector<std::string>& frames = {}) {
    try {
      if (!wire::send(*socket, "", h, frames, /*dontwait=*/true)) {
        log::warn("no broker to send to; message dropped", {{"type", h.value("type", "")}});
      }
    } catch (const zmq::error_t& e) {
      log::warn("send to the broker failed", {{"error", e.what()}});
    }
    last_sent = Clock::now();
  }

  void grant(int credit) {
    if (stopping || credit <= 0) return;
    json h = wire::header("ready");
    h["stage"] = stage.name();
    h["worker"] = opt.name;
    h["credit"] = credit;
    h["session"] = session;
    h["shard"] = stage.shard();
    h["shards"] = stage.shards();
    const auto reads = stage.reads();
    if (!reads.empty()) h["reads"] = reads;
    if (!policy.credit_slot.empty()) h["credit_slot"] = policy.credit_slot;
    send(h);
    granted += credit;
  }

  void on_message() {
    for (;;) {
      auto raw = wire::recv_raw(*socket, /*routed=*/false, /*dontwait=*/true);
      if (!raw) return;
      last_heard = Clock::now();
      wire::Message msg;
      try {
        msg = wire::decode(*raw, wire::Channel::kBrokerToWorker);
      } catch (const wire::WireError& e) {
        log::warn("bad message from the broker", {{"error", e.what()}});
        continue;
      }
      try {
        handle(msg);
      } catch (const nlohmann::json::exception& e) {
        log::error("unexpected message content from the broker", {{"error", e.what()}});
      }
    }
  }

  void handle(wire::Message& msg) {
    const std::string type = msg.type();
    if (type == "reconnect") {
      log::info("the broker does not know this worker; registering again");
      pending.clear();
      granted = 0;
      grant(policy.max_batch - computing);
    } else if (type == "tasks") {
      if (!reconnect_on.empty()) {
        for (const auto& f : msg.frames) {
          if (f.find(reconnect_on) == std::string::npos) continue;
          log::warn("fault injection: reconnecting, dropping the tasks held (GMI_FAULT_RECONNECT_ON)");
          reconnect_on.clear();  // once
          connect();
          return;
        }
      }
      std::size_t frame = 0;
      json rejected = json::array();
      int rejected_credit = 0;
      for (const auto& t : msg.header["tasks"]) {
        StageTask task;
        task.id = t["task"].get<std::string>();
        task.job_id = t["job_id"].get<std::string>();
        task.kind = t["kind"].get<std::string>();
        task.attempt = t["attempt"].get<int>();
        task.credit = t.value("credit", 1);
        task.params = t["params"];
        task.meta = t["meta"];
        const std::size_t n = wire::Slots::frames_in(t["slots"]);
        granted -= task.credit;
        try {
          task.slots = wire::Slots::read(t["slots"], msg.frames, frame);
        } catch (const wire::SlotError& e) {
          // A bad slot fails its task alone, at once; the stage never sees it.
          log::warn("task with a bad slot", {{"task", task.id}, {"error", e.what()}});
          rejected.push_back({{"task", task.id}, {"ok", false}, {"retryable", false},
                              {"error", stage.name() + ": " + e.what()}});
          rejected_credit += task.credit;
          frame += n;
          continue;
        }
        frame += n;
        if (pending.empty()) first_pending = Clock::now();
        pending.push_back(std::move(task));
      }
      if (!rejected.empty()) {
        json h = wire::header("results");
        h["results"] = std::move(rejected);
        const int credit = stopping ? 0 : rejected_credit;
        h["credit"] = credit;
        send(h);
        granted += credit;
      }
    }
  }

  int pending_units() const {
    int units = 0;
    for (const auto& t : pending) units += std::max(t.credit, 1);
    return units;
  }

  void maybe_start_batch() {
    if (computing > 0 || pending.empty()) return;
    const bool full = pending_units() >= policy.max_batch;
    const bool waited = Clock::now() - first_pending >= milliseconds(policy.max_wait_ms);
    // Nothing more can come when the broker holds no credit for us.
    if (!full && !waited && !stopping && granted > 0) return;
    std::vector<int> charges;
    for (const auto& t : pending) charges.push_back(t.credit);
    const std::size_t take = tasks_for_batch(charges, policy.max_batch);
    std::vector<StageTask> tasks;
    int units = 0;
    for (std::size_t i = 0; i < take; ++i) {
      units += std::max(pending.front().credit, 1);
      tasks.push_back(std::move(pending.front()));
      pending.pop_front();
    }
    if (!pending.empty()) first_pending = Clock::now();
    computing = units;
    computing_tasks = tasks.size();
    batch_started_ms = steady_ms();
    {
      std::lock_guard lock(mutex);
      batch_in = std::move(tasks);
    }
    cv.notify_one();
  }

  void on_batch_done() {
    zmq::message_t token;
    while (wake_rx.recv(token, zmq::recv_flags::dontwait)) {
    }
    std::optional<std::pair<std::vector<StageTask>, std::vector<StageResult>>> done;
    double seconds = 0;
    {
      std::lock_guard lock(mutex);
      done.swap(batch_out);
      seconds = batch_seconds;
    }
    if (!done) return;
    auto& [tasks, results] = *done;
    compute_seconds.Observe(seconds);
    batch_sizes.Observe(static_cast<double>(computing));
    const double per_task = tasks.empty() ? 0 : seconds / static_cast<double>(tasks.size());
    json list = json::array();
    std::vector<std::string> frames;
    for (std::size_t i = 0; i < tasks.size(); ++i) {
      StageResult& r = results[i];
      json item{{"task", tasks[i].id}, {"ok", r.ok}, {"compute_s", per_task}};
      if (r.ok) {
        item["meta"] = std::move(r.meta);
        item["slots"] = r.slots.describe();
        r.slots.move_frames(frames);
      } else {
        item["error"] = r.error;
        item["retryable"] = r.retryable;
      }
      list.push_back(std::move(item));
    }
    int charged = 0;
    for (const auto& t : tasks) charged += t.credit;
    computing = 0;
    batch_started_ms = 0;
    if (stuck_logged) {
      log::warn("the stuck batch finished after all; the worker is healthy again",
                {{"stage", stage.name()}, {"seconds", seconds}});
      stuck_logged = false;
    }
    json h = wire::header("results");
    h["results"] = std::move(list);
    const int credit = stopping ? 0 : charged;
    h["credit"] = credit;
    send(h, frames);
    if (credit > 0) granted += credit;
  }

  static std::int64_t steady_ms() {
    return std::chrono::duration_cast<milliseconds>(Clock::now().time_since_epoch()).count();
  }

  // How long the batch being computed has run, when that is past the watchdog's deadline;
  // else 0.
  double stuck_seconds() const {
    const std::int64_t started = batch_started_ms.load();
    if (opt.compute_deadline_s <= 0 || started == 0) return 0;
    const double s = static_cast<double>(steady_ms() - started) / 1000.0;
    return s > opt.compute_deadline_s ? s : 0;
  }

  void run(const std::atomic<bool>& stop) {
    connect();
    log::info("worker serving", {{"stage", stage.name()}, {"worker", opt.name}, {"broker", opt.broker},
                                 {"max_batch", policy.max_batch}});
    const auto hb = milliseconds(opt.heartbeat_ms);
    for (;;) {
      if (stop.load() && !stopping) {
        stopping = true;
        log::info("draining", {{"pending", pending.size()}, {"computing", computing}});
      }
      if (stopping && pending.empty() && computing == 0) break;
      const double stuck = stuck_seconds();
      if (stuck > 0 && !stuck_logged) {
        stuck_logged = true;
        log::error("compute watchdog: a batch is stuck; this worker takes no more tasks and its /healthz fails",
                   {{"stage", stage.name()}, {"tasks", computing_tasks}, {"seconds", stuck},
                    {"deadline_s", opt.compute_deadline_s}});
      }
      if (stopping && stuck > 0) {
        // The stuck thread cannot be interrupted, and joining it would hang the shutdown.
        // The broker re-queues what this worker held once its connection goes.
        log::error("asked to stop with a stuck batch; exiting without it",
                   {{"stage", stage.name()}, {"seconds", stuck}});
        std::fflush(nullptr);
        std::_Exit(1);
      }
      zmq::pollitem_t items[] = {{static_cast<void*>(*socket), 0, ZMQ_POLLIN, 0},
                                 {static_cast<void*>(wake_rx), 0, ZMQ_POLLIN, 0}};
      long long timeout = opt.heartbeat_ms / 2;
      if (!pending.empty() && computing == 0) {
        auto left = std::chrono::duration_cast<milliseconds>(
                        first_pending + milliseconds(policy.max_wait_ms) - Clock::now())
                        .count();
        timeout = std::max<long long>(0, std::min<long long>(timeout, left));
      }
      wire::poll(items, 2, milliseconds(timeout));
      if (items[1].revents & ZMQ_POLLIN) on_batch_done();
      if (items[0].revents & ZMQ_POLLIN) on_message();
      maybe_start_batch();
      const auto now = Clock::now();
      if (now - last_sent >= hb) {
        json beat = wire::header("heartbeat");
        if (stuck > 0) beat["stuck_s"] = stuck;  // the broker sends a suspect nothing more
        send(beat);
      }
      if (now - last_heard > hb * opt.liveness && !stopping) {
        log::warn("the broker went silent; reconnecting", {{"broker", opt.broker}});
        connect();
      }
    }
    send(wire::header("bye"));
    log::info("worker stopped", {{"stage", stage.name()}});
  }
};

StageWorker::StageWorker(zmq::context_t& context, WorkerOptions options, std::unique_ptr<Stage> stage)
    : stage_(std::move(stage)), impl_(std::make_unique<Impl>(context, std::move(options), *stage_)) {}

namespace {

std::vector<StageResult> process_checked(Stage& stage, std::vector<StageTask>& tasks) {
  std::vector<StageResult> results = stage.process(tasks);
  if (results.size() != tasks.size()) {
    throw Error(stage.name() + " returned " + std::to_string(results.size()) + " results for " +
                std::to_string(tasks.size()) + " tasks");
  }
  return results;
}

// What an exception thrown for one task means: bad input (InputError) and an allocation
// that this input needs but cannot get fail the job now; anything else may pass (retry).
StageResult failure_of(const Stage& stage, const std::exception& e) {
  if (dynamic_cast<const InputError*>(&e) != nullptr) {
    return StageResult::failure(stage.name() + ": " + e.what(), false);
  }
  if (dynamic_cast<const std::bad_alloc*>(&e) != nullptr) {
    return StageResult::failure(stage.name() + ": out of memory on this input (" + e.what() + ")",
                                false);
  }
  log::error("stage failed a task", {{"stage", stage.name()}, {"error", e.what()}});
  return StageResult::failure(stage.name() + ": " + e.what(), true);
}

}  // namespace

std::vector<StageResult> process_batch(Stage& stage, std::vector<StageTask>& tasks) {
  try {
    return process_checked(stage, tasks);
  } catch (const std::exception& e) {
    if (tasks.size() == 1) return {failure_of(stage, e)};
    log::warn("a stage batch failed; running its tasks one by one",
              {{"stage", stage.name()}, {"tasks", tasks.size()}, {"error", e.what()}});
  }
  std::vector<StageResult> results;
  results.reserve(tasks.size());
  for (const auto& task : tasks) {
    std::vector<StageTask> one{task};
    try {
      results.push_back(std::move(process_checked(stage, one).front()));
    } catch (const std::exception& e) {
      results.push_back(failure_of(stage, e));
    }
  }
  return results;
}

StageWorker::~StageWorker() = default;

void StageWorker::run(const std::atomic<bool>& stop) { impl_->run(stop); }

std::string StageWorker::not_ready_reason() const {
  if (std::string why = not_alive_reason(); !why.empty()) return why;
  return stage_->not_ready_reason();
}

std::string StageWorker::not_alive_reason() const {
  const double stuck = impl_->stuck_seconds();
  if (stuck <= 0) return "";
  std::ostringstream text;
  text.precision(3);
  text << impl_->stage.name() << " compute stuck: a batch has run for " << stuck << " s (deadline "
       << impl_->opt.compute_deadline_s << " s, broker.task_timeout_s)";
  return text.str();
}

}  // namespace gmi::workers
