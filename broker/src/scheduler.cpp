// The broker's state machine (see scheduler.hpp): events in, commands out, time from the
// clock it is given. The guarantees it keeps are listed in gmi/broker.hpp.
#include "scheduler.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <deque>
#include <map>
#include <mutex>
#include <optional>
#include <random>
#include <set>
#include <sstream>
#include <unordered_map>

#include "digest.hpp"
#include "gmi/error.hpp"
#include "gmi/log.hpp"
#include "gmi/ops.hpp"
#include "gmi/scoring.hpp"
#include "gmi/spec.hpp"

namespace gmi::detail {
namespace {

using nlohmann::json;
using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

// Stage names a stored route may name (a record from another version could hold others).
bool known_stages(const Route& route) {
  const auto& known = wire::stage_names();
  if (route.empty()) return false;
  for (const auto& s : route) {
    if (std::find(known.begin(), known.end(), s) == known.end()) return false;
  }
  return true;
}

// SHA-256 (hex) of what a submission asks for: its kind, its parameters (nlohmann's objects
// are ordered, so the dump is canonical) and every frame, each preceded by its length.
std::string request_fingerprint(const std::string& kind, const json& params,
                                const std::vector<std::string>& frames) {
  Sha256 h;
  h.field(kind);
  h.field(params.dump(-1, ' ', false, json::error_handler_t::replace));
  for (const auto& f : frames) h.field(f);
  return h.hex();
}

struct Waiter {
  std::string routing;
  std::string req;
  Clock::time_point deadline;
};

struct Job {
  std::string id;
  std::string kind;
  json params;
  std::int64_t created_ms = 0;
  Clock::time_point accepted{};
  Route route;                       // the stages it was accepted for, stored with it
  std::size_t stage = 0;
  json meta = json::object();        // what the stages so far wrote (merged)
  wire::Slots slots;                 // the slots the stages so far wrote, and the input
  int attempts = 0;                  // failed tries at the current stage
  int dispatches = 0;                // makes every task id unique
  std::string last_error;
  // A stage split over shards: each shard's result, until all are in.
  int shards = 1;
  std::vector<std::optional<json>> shard_results;
  double compute_s = 0;
  json stage_seconds = json::object();
  std::vector<Waiter> waiters;
  std::string state = "queued";
  std::size_t bytes = 0;                     // of its slots, as counted in held_bytes
  std::int64_t deadline_ms = 0;              // epoch ms after which it fails; 0: none
  Clock::time_point stage_entered{};  // when it was queued at its current stage
  std::optional<std::multimap<std::int64_t, std::string>::iterator> deadline_entry;
  // Ended but not yet saved (Redis unreachable): the job object to save, and how.
  std::optional<json> unsaved_end;
  bool unsaved_dead_letter = false;
  bool end_posted = false;  // its end is with the persister now

  const std::string& stage_name() const { return route[stage]; }
};

struct Pending {
  std::string job_id;
  int shard = 0;
  bool isolate = false;  // dispatch alone: its last worker died holding it
};

struct Flight {
  std::string job_id;
  int shard = 0;
  std::string worker;
  Clock::time_point deadline;
  bool isolate = false;  // sent alone as a suspect: it stays one on every re-queue
};

struct Worker {
  std::string id;  // routing id
  std::string name;
  std::string stage;
  int shard = 0;
  int shards = 1;
  int credit = 0;                  // in tasks, or in frames of credit_slot
  std::string credit_slot;         // "" : credit counts tasks
  std::optional<std::vector<std::string>> reads;  // the slots its stage reads (none said: all)
  Clock::time_point last_heard{};
  Clock::time_point last_sent{};
  Clock::time_point last_dispatch{};
  std::set<std::string> tasks;
  bool exclusive = false;  // holds a suspect task: gets nothing else until it answers
  // Suspect workers get no task at all, retries above all: one whose compute watchdog fired
  // (its heartbeats say stuck_s), or one that let a task time out (until it answers again).
  bool stuck = false;
  bool timed_out = false;
  std::string session;     // the connection's identity ("ready"); a new one lost its tasks
};

std::string queue_key(const std::string& stage, int shard) {
  return stage + "#" + std::to_string(shard);
}

}  // namespace

struct Scheduler::Impl {
  BrokerOptions opt;
  RedisLocation redis_location;
  SchedulerIo& io;
  const SchedulerClock& clock;
  std::size_t creating = 0;  // creations posted and not yet done (count toward max_pending_jobs)
  std::size_t creating_bytes = 0;  // their payload bytes (count toward max_pending_bytes)
  std::size_t held_bytes = 0;      // the slots of every job held
  bool recovering = false;   // a RecoverRequest is with the persister

  std::unordered_map<std::string, Job> jobs;
  std::map<std::string, std::deque<Pending>> queues;
  std::multimap<Clock::time_point, Pending> delayed;
  std::multimap<std::int64_t, std::string> deadlines;  // epoch ms -> job id
  // When each queue (stage#shard) last had a live worker; absent: not since this broker began.
  std::map<std::string, Clock::time_point> last_served;
  Clock::time_point started{};
  std::unordered_map<std::string, Flight> flights;
  std::unordered_map<std::string, Worker> workers;
  std::set<std::string> unsaved;  // job ids whose end awaits Redis
  std::string metric_job;         // the metric job on its way, if any (one at a time)
  bool metric_creating = false;   // ... and its record is being written
  // The slots each stage reads, as its workers said; a slot no later stage of a job's route
  // reads is dropped from the job once every such stage has said.
  std::map<std::string, std::set<std::string>> stage_reads;
  bool recovered = false;
  Clock::time_point next_recovery{};
  Clock::time_point next_unsaved_retry{};
  bool draining = false;
  Clock::time_point last_housekeeping{};
  std::mt19937 rng{std::random_device{}()};

  mutable std::mutex ready_mutex;
  std::string not_ready = "starting";

  Metrics& metrics = Metrics::instance();

  Impl(const BrokerOptions& o, RedisLocation location, SchedulerIo& io_, const SchedulerClock& clock_)
      : opt(o), redis_location(std::move(location)), io(io_), clock(clock_) {
    if (opt.heartbeat_ms < 10) throw InputError("broker.heartbeat_ms must be >= 10");
    if (opt.liveness < 2) throw InputError("broker.liveness must be >= 2");
    if (opt.max_attempts < 1) throw InputError("broker.max_attempts must be >= 1");
    if (opt.score_shards < 1) throw InputError("score.shards must be >= 1");
    validate_route("routes.query", "query", opt.query_route, opt.interrogator);
    validate_route("routes.upload", "upload", opt.upload_route, opt.interrogator);
    // Counters exist at 0 from the start, so that rate() and alerts see them before the
    // first retry or dead letter.
    for (const auto& stage : wire::stage_names()) {
      for (const char* reason : {"error", "worker_lost", "worker_reconnected", "timeout", "metric_skew"}) {
        metrics.retries_total.Add({{"stage", stage}, {"reason", reason}});
      }
      metrics.dead_letters_total.Add({{"stage", stage}});
    }
    started = clock.now();
    last_housekeeping = started;
  }

  void set_not_ready(std::string why) {
    std::lock_guard lock(ready_mutex);
    not_ready = std::move(why);
  }

  // ---------------------------------------------------------------- recovery

  // At start: resume the jobs a previous broker left active. Then, every
  // broker.reconcile_s: adopt any active job this broker does not hold (one whose intake
  // was answered "unavailable" after an unknown outcome, though Redis had applied it).
  void recover() {
    if (recovering || clock.now() < next_recovery) return;
    RecoverRequest r;
    for (const auto& [id, job] : jobs) r.held.push_back(id);
    recovering = true;
    io.persist(std::move(r));
  }

  // The persister's answer; jobs created or ended since the request are told apart by
  // `jobs` (completions come in the order the requests were served).
  void on_recovered(RecoverDone done) {
    recovering = false;
    // A failure is tried again within a second; a success is next checked reconcile_s later.
    next_recovery = clock.now() + (done.ok ? milliseconds(1000LL * opt.reconcile_s) : milliseconds(1000));
    if (!done.ok) {
      set_not_ready(std::string("recovering jobs: ") + done.error);
      log::warn("job recovery failed; retrying", {{"error", done.error}});
      return;
    }
    {
      std::size_t resumed = 0;
      for (auto& stored : done.jobs) {
        if (jobs.count(stored.id) != 0) continue;
        Job& job = insert_job(std::move(stored));
        if (job.kind == "metric") metric_job = job.id;
        if (!known_stages(job.route)) {
          fail(job, "the job's stored route \"" + join_route(job.route) + "\" names a stage this broker does not know",
               false);
          continue;
        }
        enqueue(job);
        ++resumed;
      }
      if (resumed > 0) {
        log::info(recovered ? "adopted active jobs this broker did not hold"
                            : "resumed jobs left active by a previous broker",
                  {{"jobs", resumed}});
        if (recovered) metrics.jobs_total.Add({{"stage", "intake"}, {"outcome", "adopted"}}).Increment(resumed);
      }
      if (!draining) set_not_ready("");  // a failed reconciliation said otherwise
      recovered = true;
    }
  }

  Job& insert_job(StoredJob stored) {
    Job job;
    job.accepted = clock.now();
    job.id = stored.id;
    job.kind = stored.kind;
    job.params = std::move(stored.params);
    job.created_ms = stored.created_ms;
    // A record from before routes were stored runs on the configured route.
    job.route = !stored.route.empty() ? std::move(stored.route)
                                      : (job.kind == "upload" ? opt.upload_route : opt.query_route);
    job.slots = std::move(stored.input);
    job.meta = json::object();
    // A record from before deadlines were stored gets its kind's default.
    job.deadline_ms = job.params.value("deadline_at_ms", std::int64_t{0});
    if (job.deadline_ms <= 0) job.deadline_ms = job.created_ms + 1000LL * default_deadline_s(job.kind);
    auto [it, inserted] = jobs.emplace(job.id, std::move(job));
    if (inserted) {
      it->second.deadline_entry = deadlines.emplace(it->second.deadline_ms, it->first);
      claim_input(it->second);
      recount(it->second);
    }
    return it->second;
  }

  // A large input (its record is in Redis, P:job:ID:input f0..) stays only there: the slot
  // keeps its entry with a claim {key, first, count} and no frames; the worker fetches them.
  void claim_input(Job& job) {
    if (opt.claim_bytes == 0) return;
    wire::Slot* images = job.slots.find(wire::slot::kImages);
    if (images == nullptr || images->frames.empty() || images->info.contains("claim")) return;
    std::size_t bytes = 0;
    for (const auto& f : images->frames) bytes += f.size();
    if (bytes < opt.claim_bytes) return;
    // The images are the input's first slot (the frames are numbered from 0 across slots).
    images->info["claim"] = {{"key", job_input_key(redis_location, job.id)},
                             {"first", 0},
                             {"count", images->frames.size()},
                             {"bytes", bytes}};
    images->frames.clear();
    images->frames.shrink_to_fit();
  }

  // Keeps held_bytes equal to the payload of every held job: its slots' bytes, here or
  // (claimed) in Redis.
  void recount(Job& job) {
    held_bytes -= job.bytes;
    job.bytes = job.slots.byte_count();
    for (const auto& slot : job.slots.all()) {
      if (auto c = slot.info.find("claim"); c != slot.info.end()) job.bytes += c->value("bytes", std::size_t{0});
    }
    held_bytes += job.bytes;
  }

  int default_deadline_s(const std::string& kind) const {
    if (kind == "query") return opt.query_deadline_s;
    if (kind == "metric") return opt.metric_deadline_s;
    return opt.upload_deadline_s;
  }

  // ---------------------------------------------------------------- deadlines

  bool overdue(const Job& job) const { return job.deadline_ms > 0 && clock.epoch_ms() >= job.deadline_ms; }

  bool in_flight(const std::string& job_id) const {
    for (const auto& [task, f] : flights) {
      if (f.job_id == job_id) return true;
    }
    return false;
  }

  // `job` is gone after this call.
  void fail_overdue(Job& job) {
    const double allowed = static_cast<double>(job.deadline_ms - job.created_ms) / 1000.0;
    std::ostringstream text;
    text << "deadline exceeded: the job did not finish within " << allowed << " s of its acceptance (it was at stage "
         << (job.stage < job.route.size() ? job.stage_name() : "end") << ")";
    metrics.jobs_total.Add({{"stage", "job"}, {"outcome", "deadline"}}).Increment();
    fail(job, text.str(), false);
  }

  // Jobs past their deadline that hold no worker fail now. One with a task in flight fails
  // when that task comes back with more to do (advance, retry): a stage that is computing,
  // an upload's spec write above all, is never cut short.
  void expire_deadlines() {
    const std::int64_t now = clock.epoch_ms();
    while (!deadlines.empty() && deadlines.begin()->first <= now) {
      const std::string id = deadlines.begin()->second;
      deadlines.erase(deadlines.begin());
      auto j = jobs.find(id);
      if (j == jobs.end()) continue;
      j->second.deadline_entry.reset();
      if (j->second.unsaved_end) continue;
      if (!in_flight(id)) fail_overdue(j->second);
    }
  }

  // A query waiting at a stage (or score shard) no live worker has served for
  // no_worker_wait_s fails naming it, or with allow_partial a sharded ranking goes on
  // without that shard.
  void fail_unserved() {
    if (opt.no_worker_wait_s <= 0) return;
    const auto now = clock.now();
    const auto wait = std::chrono::seconds(opt.no_worker_wait_s);
    std::set<std::string> served;
    for (const auto& [id, w] : workers) {
      if (!w.stuck && !w.timed_out) served.insert(queue_key(w.stage, w.shard));
    }
    for (const auto& key : served) last_served[key] = now;
    std::vector<std::pair<Pending, double>> unserved;
    for (auto& [key, queue] : queues) {
      if (queue.empty() || served.count(key) != 0) continue;
      auto ls = last_served.find(key);
      const auto since = ls == last_served.end() ? started : ls->second;
      if (now - since < wait) continue;
      std::deque<Pending> keep;
      for (const auto& p : queue) {
        auto j = jobs.find(p.job_id);
        if (j == jobs.end() || j->second.unsaved_end) continue;
        if (j->second.kind != "query" || now - j->second.stage_entered < wait) {
          keep.push_back(p);
        } else {
          unserved.emplace_back(p, std::chrono::duration<double>(now - std::max(since, j->second.stage_entered)).count());
        }
      }
      queue.swap(keep);
    }
    for (const auto& [p, waited] : unserved) {
      auto j = jobs.find(p.job_id);
      if (j == jobs.end() || j->second.unsaved_end) continue;
      Job& job = j->second;
      const bool sharded = job.shards > 1;
      if (sharded && opt.allow_partial) {
        int missing = 0;
        for (const auto& r : job.shard_results) missing += (r && r->value("missing", false)) ? 1 : 0;
        if (missing + 1 < job.shards) {
          log::warn("ranking without a shard that has no live worker (score.allow_partial)",
                    {{"job_id", job.id}, {"stage", job.stage_name()}, {"shard", p.shard}});
          advance(job, p.shard, json{{"missing", true}}, wire::Slots{});
          continue;
        }
      }
      std::ostringstream text;
      text.precision(3);
      text << "no live worker serves ";
      if (sharded) {
        text << job.stage_name() << " shard " << p.shard << " of " << job.shards;
      } else {
        text << "stage " << job.stage_name();
      }
      text << " (waited " << waited << " s, broker.no_worker_wait_s)";
      metrics.jobs_total.Add({{"stage", job.stage_name()}, {"outcome", "unserved"}}).Increment();
      fail(job, text.str(), false);
    }
  }

  // ---------------------------------------------------------------- queues

  int shards_of(const std::string& stage) const { return stage == "score" ? opt.score_shards : 1; }

  void enqueue(Job& job) {
    job.shards = shards_of(job.stage_name());
    job.shard_results.assign(static_cast<std::size_t>(job.shards), std::nullopt);
    job.attempts = 0;
    job.stage_entered = clock.now();
    post_event(job, "stage");
    for (int s = 0; s < job.shards; ++s) {
      queues[queue_key(job.stage_name(), s)].push_back(Pending{job.id, s, false});
    }
  }

  void dispatch() {
    if (draining) return;
    for (auto& [key, queue] : queues) {
      while (!queue.empty()) {
        drop_ended(queue);
        if (queue.empty()) break;
        Worker* w = pick_worker(key, queue.front());
        if (w == nullptr) break;
        if (send_tasks(*w, queue) == 0) break;
      }
    }
  }

  // Pops queue entries whose job ended meanwhile, or is past its deadline (failing it when
  // no task of it is in flight).
  void drop_ended(std::deque<Pending>& queue) {
    while (!queue.empty()) {
      auto it = jobs.find(queue.front().job_id);
      if (it != jobs.end() && !it->second.unsaved_end &&
          it->second.shard_results.size() > static_cast<std::size_t>(queue.front().shard)) {
        if (!overdue(it->second)) return;
        queue.pop_front();
        if (!in_flight(it->first)) fail_overdue(it->second);
        continue;
      }
      queue.pop_front();
    }
  }

  int cost_of(const Job& job, const Worker& w) const { return wire::task_cost(job.slots, w.credit_slot); }

  Worker* pick_worker(const std::string& key, const Pending& head) {
    const Job& job = jobs.at(head.job_id);
    Worker* best = nullptr;
    for (auto& [id, w] : workers) {
      if (w.credit <= 0 || w.stuck || w.timed_out || queue_key(w.stage, w.shard) != key) continue;
      if (w.tasks.empty()) w.exclusive = false;
      // A suspect goes to an idle worker and is the only task it holds, so that if it
      // kills the worker it takes nothing else down with it.
      if (w.exclusive || (head.isolate && !w.tasks.empty())) continue;
      if (wire::credit_charge(cost_of(job, w), w.credit, w.tasks.empty()) == 0) continue;
      if (best == nullptr || w.last_dispatch < best->last_dispatch) best = &w;
    }
    return best;
  }

  // Sends `w` the tasks from the front of `queue` that its credit covers; returns how many.
  std::size_t send_tasks(Worker& w, std::deque<Pending>& queue) {
    json tasks = json::array();
    std::vector<std::string_view> frames;  // views of the jobs' slots, copied once by ZeroMQ
    std::vector<std::string> ids;
    int charged = 0;
    while (!queue.empty()) {
      drop_ended(queue);
      if (queue.empty()) break;
      Pending p = queue.front();
      if (p.isolate && !ids.empty()) break;  // a suspect goes alone
      Job& job = jobs.at(p.job_id);
      const int charge = wire::credit_charge(cost_of(job, w), w.credit - charged, w.tasks.empty() && ids.empty());
      if (charge == 0) break;
      queue.pop_front();
      charged += charge;
      job.state = "running";
      const std::string task = job.id + ":" + std::to_string(job.stage) + ":" +
                               std::to_string(p.shard) + ":" + std::to_string(++job.dispatches);
      json described = job.slots.describe_views(w.reads ? &*w.reads : nullptr, frames);
      tasks.push_back({{"task", task},
                       {"job_id", job.id},
                       {"kind", job.kind},
                       {"stage", job.stage_name()},
                       {"attempt", job.attempts + 1},
                       {"credit", charge},
                       {"params", job.params},
                       {"meta", job.meta},
                       {"slots", std::move(described)}});
      flights[task] = Flight{job.id, p.shard, w.id,
                             clock.now() + std::chrono::seconds(opt.task_timeout_s), p.isolate};
      w.tasks.insert(task);
      ids.push_back(task);
      if (p.isolate) {
        w.exclusive = true;
        break;
      }
    }
    if (ids.empty()) return 0;
    json h = wire::header("tasks");
    h["tasks"] = std::move(tasks);
    w.credit -= charged;
    w.last_dispatch = clock.now();
    metrics.batch_size.Add({{"stage", w.stage}}, Metrics::size_buckets())
        .Observe(static_cast<double>(charged));
    if (send_worker(w.id, h, frames)) return ids.size();
    // These tasks never reached the worker: back to the front of the queue, no attempt
    // spent. Tasks it received earlier are another matter (worker_lost counts those).
    for (auto it = ids.rbegin(); it != ids.rend(); ++it) {
      auto f = flights.find(*it);
      if (f == flights.end()) continue;
      queue.push_front(Pending{f->second.job_id, f->second.shard, f->second.isolate});
      flights.erase(f);
      w.tasks.erase(*it);
    }
    worker_lost(w.id, "unreachable");
    return ids.size();
  }

  bool send_worker(const std::string& id, const json& h, const std::vector<std::string_view>& frames = {}) {
    if (!io.send_worker(id, h, frames)) return false;
    auto it = workers.find(id);
    if (it != workers.end()) it->second.last_sent = clock.now();
    return true;
  }

  // ---------------------------------------------------------------- workers

  void on_worker(wire::RawMessage& raw) {
    const std::string id = raw.routing;
    wire::Message msg;
    try {
      msg = wire::decode(raw, wire::Channel::kWorkerToBroker);
    } catch (const std::exception& e) {  // WireError, or a validator gap
      log::warn("bad message from a worker", {{"worker", id}, {"error", e.what()}});
      return;  // a worker speaking nonsense gets no tasks; its heartbeat will lapse
    }
    try {
      handle_worker_message(id, msg);
    } catch (const nlohmann::json::exception& e) {
      log::error("unexpected worker message content", {{"worker", id}, {"error", e.what()}});
    }
  }

  void handle_worker_message(const std::string& id, wire::Message& msg) {
    const std::string type = msg.type();
    auto it = workers.find(id);
    if (type == "ready") {
      on_ready(id, msg.header);
      return;
    }
    if (it == workers.end()) {
      if (type != "bye") send_worker(id, wire::header("reconnect"));
      return;
    }
    Worker& w = it->second;
    w.last_heard = clock.now();
    if (type == "heartbeat") {
      const bool stuck = msg.header.contains("stuck_s");
      if (stuck != w.stuck) {
        if (stuck) {
          log::warn("a worker's compute is stuck; it gets no more tasks",
                    {{"worker", w.name}, {"stage", w.stage}, {"stuck_s", msg.header["stuck_s"]}});
        } else {
          log::info("a stuck worker is computing again", {{"worker", w.name}, {"stage", w.stage}});
        }
      }
      w.stuck = stuck;
    } else if (type == "results") {
      w.timed_out = false;  // it answers again
      on_results(w, msg);
    } else if (type == "bye") {
      worker_lost(id, "left");
    }
  }

  void on_ready(const std::string& id, const json& h) {
    const std::string stage = h["stage"].get<std::string>();
    const int shard = h.value("shard", 0), shards = h.value("shards", 1);
    if (shards != shards_of(stage)) {
      log::warn("worker's shard count differs from the broker's; ignored",
                {{"worker", h["worker"]}, {"stage", stage}, {"worker_shards", shards},
                 {"broker_shards", shards_of(stage)}});
      return;
    }
    auto [it, inserted] = workers.try_emplace(id);
    Worker& w = it->second;
    if (inserted) {
      w.id = id;
      w.name = h["worker"].get<std::string>();
      w.stage = stage;
      w.shard = shard;
      w.shards = shards;
      w.last_sent = clock.now();
      log::info("worker joined", {{"worker", w.name}, {"stage", stage}, {"shard", shard}});
    }
    w.credit_slot = h.value("credit_slot", "");
    if (h.contains("reads")) {
      w.reads = h["reads"].get<std::vector<std::string>>();
      stage_reads[stage].insert(w.reads->begin(), w.reads->end());
    } else {
      w.reads.reset();
    }
    const std::string session = h.value("session", "");
    if (!inserted && session != w.session) {
      // The same worker on a new connection: what the old one held is gone with it. Back to
      // the front of its queue at once (no attempt spent), and its credit starts afresh.
      requeue_held(w, "reconnected");
      w.credit = 0;
    }
    w.session = session;
    w.credit += h["credit"].get<int>();
    w.last_heard = clock.now();
  }

  // The tasks `w` holds go back to the front of their queue, as they were (a suspect stays
  // one), without spending an attempt.
  void requeue_held(Worker& w, const char* why) {
    if (w.tasks.empty()) return;
    for (auto it = w.tasks.rbegin(); it != w.tasks.rend(); ++it) {
      auto f = flights.find(*it);
      if (f == flights.end()) continue;
      queues[queue_key(w.stage, f->second.shard)].push_front(
          Pending{f->second.job_id, f->second.shard, f->second.isolate});
      flights.erase(f);
    }
    log::info("re-queued the tasks of a worker's previous connection",
              {{"worker", w.name}, {"tasks", w.tasks.size()}, {"why", why}});
    metrics.retries_total.Add({{"stage", w.stage}, {"reason", "worker_reconnected"}}).Increment(
        static_cast<double>(w.tasks.size()));
    w.tasks.clear();
    w.exclusive = false;
  }

  void on_results(Worker& w, wire::Message& msg) {
    const json& results = msg.header["results"];
    std::size_t frame = 0;
    for (const auto& r : results) {
      const std::string task = r["task"].get<std::string>();
      const json entries = r.value("slots", json::array());
      const std::size_t nframes = wire::Slots::frames_in(entries);
      std::optional<wire::Slots> slots;
      std::string slot_error;
      try {
        slots = wire::Slots::read(entries, msg.frames, frame);
      } catch (const wire::SlotError& e) {
        slot_error = e.what();
      }
      frame += nframes;
      w.tasks.erase(task);
      auto f = flights.find(task);
      if (f == flights.end() || f->second.worker != w.id) continue;  // stale: re-dispatched
      Flight flight = f->second;
      flights.erase(f);
      auto j = jobs.find(flight.job_id);
      if (j == jobs.end()) continue;
      Job& job = j->second;
      const double compute = r.value("compute_s", 0.0);
      metrics.stage_seconds.Add({{"stage", w.stage}}, Metrics::latency_buckets()).Observe(compute);
      if (r["ok"].get<bool>() && !slot_error.empty()) {
        // A worker that writes a malformed slot has a bug another try will not fix.
        metrics.jobs_total.Add({{"stage", w.stage}, {"outcome", "error"}}).Increment();
        log::error("a worker returned a bad slot", {{"worker", w.name}, {"error", slot_error}});
        fail(job, w.stage + " returned a bad result: " + slot_error, false);
      } else if (r["ok"].get<bool>()) {
        metrics.jobs_total.Add({{"stage", w.stage}, {"outcome", "ok"}}).Increment();
        job.compute_s += compute;
        job.stage_seconds[w.stage] = job.stage_seconds.value(w.stage, 0.0) + compute;
        advance(job, flight.shard, r.value("meta", json::object()), std::move(*slots));
      } else if (r.value("retryable", false)) {
        metrics.jobs_total.Add({{"stage", w.stage}, {"outcome", "retry"}}).Increment();
        retry(job, flight.shard, r["error"].get<std::string>(), "error", false);
      } else {
        metrics.jobs_total.Add({{"stage", w.stage}, {"outcome", "error"}}).Increment();
        fail(job, r["error"].get<std::string>(), false);
      }
    }
    w.credit += msg.header.value("credit", 0);
  }

  void worker_lost(const std::string& id, const std::string& why) {
    auto it = workers.find(id);
    if (it == workers.end()) return;
    Worker w = std::move(it->second);
    workers.erase(it);
    if (why != "left") log::warn("worker lost", {{"worker", w.name}, {"stage", w.stage}, {"why", why}});
    for (const auto& task : w.tasks) {
      auto f = flights.find(task);
      if (f == flights.end()) continue;
      Flight flight = f->second;
      flights.erase(f);
      auto j = jobs.find(flight.job_id);
      if (j == jobs.end()) continue;
      if (why == "left") {
        queues[queue_key(w.stage, flight.shard)].push_front(Pending{flight.job_id, flight.shard, false});
      } else {
        retry(j->second, flight.shard, "worker " + w.name + " (" + w.stage + ") " + why +
                                           " while holding this job", "worker_lost", true);
      }
    }
  }

  void check_liveness() {
    const auto now = clock.now();
    const auto dead_after = milliseconds(static_cast<long long>(opt.heartbeat_ms) * opt.liveness);
    std::vector<std::string> dead;
    for (auto& [id, w] : workers) {
      if (now - w.last_heard > dead_after) dead.push_back(id);
    }
    for (const auto& id : dead) worker_lost(id, "stopped answering heartbeats");
    // A heartbeat that cannot be delivered means ZeroMQ saw the connection go (a killed
    // worker's socket closes at once): no need to wait out the liveness interval.
    std::vector<std::string> gone;
    for (auto& [id, w] : workers) {
      if (now - w.last_sent >= milliseconds(opt.heartbeat_ms) &&
          !send_worker(id, wire::header("heartbeat"))) {
        gone.push_back(id);
      }
    }
    for (const auto& id : gone) worker_lost(id, "disconnected");
    // Tasks whose worker is alive but has not answered in task_timeout_s.
    std::vector<std::string> late;
    for (const auto& [task, f] : flights) {
      if (now > f.deadline) late.push_back(task);
    }
    for (const auto& task : late) {
      Flight f = flights[task];
      flights.erase(task);
      if (auto w = workers.find(f.worker); w != workers.end()) {
        w->second.tasks.erase(task);
        // Alive but silent about its work: most likely hung. It must not look idle and
        // attract the retry (sent alone, to an idle worker) of the very task it sits on.
        if (!w->second.timed_out) {
          log::warn("a worker let a task time out; it gets no more tasks until it answers",
                    {{"worker", w->second.name}, {"stage", w->second.stage}, {"task", task}});
        }
        w->second.timed_out = true;
      }
      if (auto j = jobs.find(f.job_id); j != jobs.end()) {
        retry(j->second, f.shard, "no result within " + std::to_string(opt.task_timeout_s) + " s",
              "timeout", true);
      }
    }
  }

  // ---------------------------------------------------------------- job progress

  void advance(Job& job, int shard, json meta, wire::Slots slots) {
    if (job.shards > 1) {
      job.shard_results[static_cast<std::size_t>(shard)] = std::move(meta);
      for (const auto& r : job.shard_results) {
        if (r) continue;
        // Wait for the other shards; past the deadline, only for those already computing.
        if (overdue(job) && !in_flight(job.id)) fail_overdue(job);
        return;
      }
      // Scores of different metric versions are not comparable: while a new version is
      // being swapped in, shards may briefly disagree; rank again on every shard.
      std::set<std::string> versions;
      for (const auto& r : job.shard_results) {
        if (!r->value("missing", false)) versions.insert(r->value("metric", json()).dump());
      }
      if (versions.size() > 1) {
        std::string seen;
        for (const auto& v : versions) seen += (seen.empty() ? "" : ", ") + v;
        rerun_all_shards(job, "score shards ranked with different metric versions (" + seen + ")");
        return;
      }
      meta = merge_shards(job);
    }
    if (job.stage + 1 < job.route.size() && overdue(job)) return fail_overdue(job);
    job.stage += 1;
    for (auto& [k, v] : meta.items()) job.meta[k] = std::move(v);
    job.slots.merge(std::move(slots));
    if (job.stage == job.route.size()) {
      finish(job);
      return;
    }
    prune_slots(job);
    recount(job);
    enqueue(job);
  }

  // Drops the slots no remaining stage of the job's route reads (an upload's image bytes and
  // pixels once embedded), when every remaining stage's workers have said what they read.
  void prune_slots(Job& job) {
    std::set<std::string> needed;
    for (std::size_t s = job.stage; s < job.route.size(); ++s) {
      auto it = stage_reads.find(job.route[s]);
      if (it == stage_reads.end()) return;  // not known yet: keep everything
      needed.insert(it->second.begin(), it->second.end());
    }
    std::vector<std::string> drop;
    for (const auto& slot : job.slots.all()) {
      if (needed.count(slot.name) == 0) drop.push_back(slot.name);
    }
    for (const auto& name : drop) job.slots.erase(name);
  }

  // Each shard ranked its own models; scores are comparable, so the merge is exact.
  // Shards ranked without (allow_partial) are named in missing_shards.
  json merge_shards(Job& job) {
    json merged;
    json missing = json::array();
    std::vector<json> all;
    std::size_t models = 0;
    for (std::size_t s = 0; s < job.shard_results.size(); ++s) {
      const json& r = *job.shard_results[s];
      if (r.value("missing", false)) {
        missing.push_back(s);
        continue;
      }
      if (merged.is_null()) merged = r;
      for (const auto& m : r["results"]) all.push_back(m);
      models += r.value("models", 0);
    }
    if (!missing.empty()) merged["missing_shards"] = missing;
    bool asc = merged.value("ascending", true);
    std::stable_sort(all.begin(), all.end(), [asc](const json& a, const json& b) {
      double sa = a["score"].get<double>(), sb = b["score"].get<double>();
      if (sa != sb) return asc ? sa < sb : sa > sb;
      return a["model"].get<std::string>() < b["model"].get<std::string>();
    });
    const std::size_t top = static_cast<std::size_t>(job.params.value("top", 10));
    if (all.size() > top) all.resize(top);
    for (std::size_t i = 0; i < all.size(); ++i) all[i]["rank"] = i + 1;
    merged["results"] = all;
    merged["models"] = models;
    return merged;
  }

  // Every shard of the job's stage again, after a backoff; one attempt.
  void rerun_all_shards(Job& job, const std::string& why) {
    job.shard_results.assign(static_cast<std::size_t>(job.shards), std::nullopt);
    if (!retry(job, 0, why, "metric_skew", false)) return;  // it failed: `job` is gone
    auto at = clock.now();
    for (const auto& [when, p] : delayed)
      if (p.job_id == job.id && p.shard == 0) at = when;  // the other shards go with shard 0
    for (int s = 1; s < job.shards; ++s) delayed.emplace(at, Pending{job.id, s, false});
  }

  // False when the job failed instead (its last attempt, or its deadline): `job` is gone.
  bool retry(Job& job, int shard, const std::string& why, const std::string& reason, bool isolate) {
    if (overdue(job)) {
      job.last_error = why;
      fail_overdue(job);
      return false;
    }
    job.attempts += 1;
    job.last_error = why;
    metrics.retries_total.Add({{"stage", job.stage_name()}, {"reason", reason}}).Increment();
    if (job.attempts >= opt.max_attempts) {
      metrics.dead_letters_total.Add({{"stage", job.stage_name()}}).Increment();
      fail(job, "gave up after " + std::to_string(job.attempts) + " attempts at stage " +
                    job.stage_name() + ": " + why, true);
      return false;
    }
    post_event(job, "retry");
    double delay = std::min<double>(opt.backoff_max_ms, opt.backoff_ms * std::pow(2.0, job.attempts - 1));
    delay *= std::uniform_real_distribution<double>(0.5, 1.0)(rng);
    log::info("retrying", {{"job_id", job.id}, {"stage", job.stage_name()}, {"attempt", job.attempts + 1},
                           {"delay_ms", static_cast<int>(delay)}, {"error", why}});
    delayed.emplace(clock.now() + milliseconds(static_cast<long long>(delay)),
                    Pending{job.id, shard, isolate});
    return true;
  }

  json job_object(const Job& job) const {
    json j{{"job_id", job.id},
           {"kind", job.kind},
           {"state", job.state},
           {"created_ms", job.created_ms},
           {"attempts", job.attempts}};
    j["route"] = job.route;
    if (job.state != "finished" && job.state != "failed") {
      j["stage"] = job.stage < job.route.size() ? job.stage_name() : "";
    }
    if (job.kind == "upload") j["model_id"] = job.params.value("model_id", "");
    return j;
  }

  json timings(const Job& job) const {
    return json{{"total_s", std::chrono::duration<double>(clock.now() - job.accepted).count()},
                {"compute_s", job.compute_s},
                {"stages", job.stage_seconds}};
  }

  void finish(Job& job) {
    job.state = "finished";
    json j = job_object(job);
    j["finished_ms"] = clock.epoch_ms();
    if (job.kind == "query") {
      j["result"] = {{"results", job.meta.value("results", json::array())},
                     {"scorer", job.meta.value("scorer", "")},
                     {"models", job.meta.value("models", 0)}};
      j["result"]["metric"] = job.meta.value("metric", json());
      if (job.meta.contains("interrogator")) j["result"]["interrogator"] = job.meta["interrogator"];
      if (job.meta.contains("captions")) j["result"]["captions"] = job.meta["captions"];
      if (job.meta.contains("missing_shards")) j["result"]["missing_shards"] = job.meta["missing_shards"];
    } else if (job.kind == "metric") {
      j["result"] = {{"metric", job.meta.value("metric", json())}, {"learnt", job.meta.value("learnt", false)}};
      if (job.meta.contains("note")) j["result"]["note"] = job.meta["note"];
    } else {
      j["result"] = {{"model", job.params.value("model_id", "")},
                     {"spec", job.meta.value("spec", json::object())},
                     {"skipped", job.meta.value("skipped", json::array())}};
      if (job.meta.contains("metric_due")) start_metric_job(job.meta["metric_due"]);
    }
    j["timings"] = timings(job);
    end_job(job, std::move(j), false);
  }

  // A metric job, unless one is already on its way: the hub grew enough since the last
  // metric (the spec stage said so). Made like any job (recorded in Redis, resumed after a
  // restart); when Redis cannot record it now, the next due upload makes it.
  void start_metric_job(const json& due) {
    if (metric_creating || (!metric_job.empty() && jobs.count(metric_job) != 0)) return;
    StoredJob job;
    job.id = wire::random_id();
    job.created_ms = clock.epoch_ms();
    job.kind = "metric";
    job.params = {{"models", due.value("models", 0)}, {"stamp_version", due.value("stamp_version", 0)},
                  {"reason", due.value("stamp_version", 0) == 0
                                 ? "the hub has " + std::to_string(due.value("models", 0)) + " models and no metric"
                                 : "the hub grew from " + std::to_string(due.value("stamp_models", 0)) + " to " +
                                       std::to_string(due.value("models", 0)) + " models"}};
    job.route = {"learn"};
    metric_job = job.id;
    metric_creating = true;
    ++creating;
    io.persist(CreateRequest{std::move(job), {}, "", ""});
  }

  // ---------------------------------------------------------------- persistence

  void on_persisted(PersistDone& done) {
    if (auto* c = std::get_if<CreateDone>(&done)) {
      on_created(std::move(*c));
    } else if (auto* e = std::get_if<EndDone>(&done)) {
      on_ended(*e);
    } else if (auto* r = std::get_if<ReadDone>(&done)) {
      on_read(*r);
    } else if (auto* rc = std::get_if<RecoverDone>(&done)) {
      on_recovered(std::move(*rc));
    }
  }

  void on_created(CreateDone done) {
    --creating;
    creating_bytes -= std::min(creating_bytes, done.request.job.input.byte_count());
    const std::string& routing = done.request.routing;
    const std::string& req = done.request.req;
    const bool metric = done.request.job.kind == "metric";
    if (metric) metric_creating = false;
    switch (done.outcome) {
      case CreateOutcome::kCreated: {
        metrics.jobs_total.Add({{"stage", "intake"}, {"outcome", "accepted"}}).Increment();
        if (metric) log::info("metric job made", {{"job_id", done.request.job.id}, {"reason", done.request.job.params["reason"]}});
        Job& j = insert_job(std::move(done.request.job));
        enqueue(j);
        if (!routing.empty()) reply_accepted(routing, req, j.id);
        break;
      }
      case CreateOutcome::kExisting:
        reply_accepted(routing, req, done.job_id);
        break;
      case CreateOutcome::kConflict:
        metrics.jobs_total.Add({{"stage", "intake"}, {"outcome", "rejected"}}).Increment();
        reply_error(routing, req, "conflict", done.error);
        break;
      case CreateOutcome::kUnavailable:
        metrics.jobs_total.Add({{"stage", "intake"}, {"outcome", "unavailable"}}).Increment();
        if (metric) {
          metric_job.clear();
          log::warn("cannot record a metric job; the next due upload retries", {{"error", done.error}});
        } else {
          reply_error(routing, req, "unavailable", done.error);
        }
        break;
    }
  }

  void on_ended(const EndDone& done) {
    auto it = jobs.find(done.id);
    if (it == jobs.end()) return;
    Job& job = it->second;
    job.end_posted = false;
    if (!done.saved) {
      log::warn("cannot save a job's end yet", {{"job_id", job.id}, {"error", done.error}});
      unsaved.insert(job.id);
      return;
    }
    if (done.repeat) {
      log::info("a job's end was already saved (a repeat after an unknown outcome)", {{"job_id", job.id}});
    }
    unsaved.erase(job.id);
    const std::string outcome =
        job.unsaved_dead_letter ? "dead_letter" : job.unsaved_end->value("state", "failed");
    metrics.job_seconds.Add({{"kind", job.kind}, {"outcome", outcome}}, Metrics::latency_buckets())
        .Observe(std::chrono::duration<double>(clock.now() - job.accepted).count());
    metrics.jobs_total.Add({{"stage", "job"}, {"outcome", outcome}}).Increment();
    for (const auto& w : job.waiters) reply_job(w.routing, w.req, *job.unsaved_end);
    if (job.deadline_entry) deadlines.erase(*job.deadline_entry);
    held_bytes -= job.bytes;
    jobs.erase(it);
  }

  void on_read(const ReadDone& done) {
    const auto& r = done.request;
    if (!done.error.empty()) {
      return reply_error(r.routing, r.req, "unavailable", "cannot read the job: " + done.error);
    }
    // Ended meanwhile and still here (its end not saved yet): answer from memory.
    if (auto it = jobs.find(r.id); it != jobs.end() && it->second.unsaved_end) {
      return reply_job(r.routing, r.req, *it->second.unsaved_end);
    }
    if (done.job) return reply_job(r.routing, r.req, *done.job);
    reply_error(r.routing, r.req, "not_found", "no job " + r.id + " (unknown, or its result expired)");
  }

  void fail(Job& job, const std::string& error, bool dead_letter) {
    job.state = "failed";
    json j = job_object(job);
    j["finished_ms"] = clock.epoch_ms();
    j["error"] = error;
    j["failed_stage"] = job.stage < job.route.size() ? job.stage_name() : "";
    j["dead_letter"] = dead_letter;
    j["timings"] = timings(job);
    log::info(dead_letter ? "job dead-lettered" : "job failed",
              {{"job_id", job.id}, {"kind", job.kind}, {"error", error}});
    end_job(job, std::move(j), dead_letter);
  }

  // Hands the end to the persister; once it is saved, the waiters get it and the job is
  // forgotten (on_ended). Until then, and while Redis is away, the job stays here and
  // answers from memory.
  void end_job(Job& job, json j, bool dead_letter) {
    job.unsaved_end = std::move(j);
    job.unsaved_dead_letter = dead_letter;
    post_end(job);
  }

  // A state change for P:job-events (creation and end are written with their records).
  void post_event(const Job& job, const char* event) {
    if (opt.store.events_maxlen <= 0) return;
    io.persist(EventRequest{job.id, event, job.stage < job.route.size() ? job.stage_name() : ""});
  }

  void post_end(Job& job) {
    if (job.end_posted) return;
    job.end_posted = true;
    io.persist(EndRequest{job.id, *job.unsaved_end, job.unsaved_dead_letter});
  }

  void retry_unsaved() {
    if (unsaved.empty() || clock.now() < next_unsaved_retry) return;
    next_unsaved_retry = clock.now() + milliseconds(250);
    for (auto it = unsaved.begin(); it != unsaved.end();) {
      auto j = jobs.find(*it);
      if (j == jobs.end()) {
        it = unsaved.erase(it);
        continue;
      }
      post_end(j->second);  // each on its own: one refused (out of memory) holds back no other
      ++it;
    }
  }

  void release_delayed() {
    const auto now = clock.now();
    while (!delayed.empty() && delayed.begin()->first <= now) {
      Pending p = delayed.begin()->second;
      delayed.erase(delayed.begin());
      auto j = jobs.find(p.job_id);
      if (j == jobs.end() || j->second.unsaved_end) continue;
      queues[queue_key(j->second.stage_name(), p.shard)].push_back(p);
    }
  }

  // ---------------------------------------------------------------- clients

  void reply(const std::string& routing, const json& h) { io.reply(routing, h); }

  void reply_error(const std::string& routing, const std::string& req, const std::string& code,
                   const std::string& message) {
    json h = wire::header("error");
    if (!req.empty()) h["req"] = req;
    h["code"] = code;
    h["error"] = message;
    reply(routing, h);
  }

  void reply_job(const std::string& routing, const std::string& req, const json& job) {
    json h = wire::header("job");
    if (!req.empty()) h["req"] = req;
    h["job"] = job;
    reply(routing, h);
  }

  void on_client(wire::RawMessage& raw) {
    std::string req;
    try {
      // The correlation id, if readable, even when the rest of the message is not.
      json peek = json::parse(raw.parts.empty() ? std::string() : raw.parts.front(), nullptr, false);
      if (peek.is_object() && peek.contains("req") && peek["req"].is_string()) {
        req = peek["req"].get<std::string>();
      }
      wire::Message msg = wire::decode(raw, wire::Channel::kClientToBroker);
      handle_request(raw.routing, req, msg);
    } catch (const InputError& e) {
      metrics.jobs_total.Add({{"stage", "intake"}, {"outcome", "rejected"}}).Increment();
      reply_error(raw.routing, req, "bad_request", e.what());
    } catch (const nlohmann::json::exception& e) {
      // A validator gap must never take the broker down: refuse the message instead.
      log::error("unexpected message content", {{"error", e.what()}});
      reply_error(raw.routing, req, "bad_request", std::string("malformed message: ") + e.what());
    }
  }

  void handle_request(const std::string& routing, const std::string& req, wire::Message& msg) {
    const std::string type = msg.type();
    if (type == "ping") {
      json h = wire::header("pong");
      if (!req.empty()) h["req"] = req;
      std::string why;
      {
        std::lock_guard lock(ready_mutex);
        why = not_ready;
      }
      if (why.empty()) why = io.store_not_ready();
      if (!why.empty()) h["not_ready"] = why;
      reply(routing, std::move(h));
    } else if (type == "get_job") {
      get_job(routing, req, msg.header["job_id"].get<std::string>(), msg.header.value("wait_ms", 0));
    } else {
      submit(routing, req, msg);
    }
  }

  void submit(const std::string& routing, const std::string& req, wire::Message& msg) {
    if (draining) return reply_error(routing, req, "unavailable", "the broker is shutting down");
    if (jobs.size() + creating >= opt.max_pending_jobs) {
      metrics.jobs_total.Add({{"stage", "intake"}, {"outcome", "busy"}}).Increment();
      return reply_error(routing, req, "busy",
                         "the broker holds " + std::to_string(jobs.size() + creating) +
                             " unfinished jobs (broker.max_pending_jobs); retry later");
    }
    std::int64_t bytes = 0;
    for (const auto& f : msg.frames) bytes += static_cast<std::int64_t>(f.size());
    if (bytes > opt.max_message_bytes) {
      return reply_error(routing, req, "too_large", "the request carries " + std::to_string(bytes) +
                                                        " bytes; the limit is " +
                                                        std::to_string(opt.max_message_bytes));
    }
    // Bytes, not only jobs: one upload may weigh as much as thousands of queries.
    const std::size_t held = held_bytes + creating_bytes;
    if (held + static_cast<std::size_t>(bytes) > opt.max_pending_bytes) {
      metrics.jobs_total.Add({{"stage", "intake"}, {"outcome", "busy"}}).Increment();
      return reply_error(routing, req, "busy",
                         "the broker holds " + std::to_string(held) + " bytes of unfinished jobs' payloads and this " +
                             "request carries " + std::to_string(bytes) + " (broker.max_pending_bytes is " +
                             std::to_string(opt.max_pending_bytes) + "); retry later");
    }
    StoredJob job;
    job.id = wire::random_id();
    job.created_ms = clock.epoch_ms();
    const json& h = msg.header;
    if (msg.type() == "submit_query") {
      job.kind = "query";
      job.params = {{"top", h.value("top", 10)}};
      if (h.contains("scorer")) {
        parse_scorer(h["scorer"].get<std::string>());  // InputError -> bad_request
        job.params["scorer"] = h["scorer"];
      }
      if (h.contains("prompt")) job.params["prompt"] = h["prompt"];
      if (msg.frames[0].empty()) throw InputError("the query image is empty (0 bytes)");
      job.route = opt.query_route;
    } else {
      job.kind = "upload";
      const std::string model = h["model_id"].get<std::string>();
      validate_model_id(model);
      job.params = {{"model_id", model}, {"prompts", h["prompts"]}};
      if (h.contains("downloads")) job.params["downloads"] = h["downloads"];
      if (h.contains("card")) job.params["card"] = h["card"];
      job.route = opt.upload_route;
    }
    // A key is scoped to the kind of request and to the client's credential, and remembers
    // what the request was: the same key on another request is a client bug, not a retry.
    IdempotencyRecord idem;
    idem.key = h.value("idempotency_key", "");
    if (!idem.key.empty()) {
      idem.scope = job.kind + "|" + h.value("idempotency_scope", "");
      idem.fingerprint = request_fingerprint(job.kind, job.params, msg.frames);
    }
    // Stored with the job, so that a restarted broker keeps it (not part of the fingerprint:
    // a retry carries the same request, whatever its deadline).
    const std::int64_t allowed_ms = h.contains("deadline_ms") ? h["deadline_ms"].get<std::int64_t>()
                                                              : 1000LL * default_deadline_s(job.kind);
    job.params["deadline_at_ms"] = job.created_ms + allowed_ms;
    job.input.put(wire::Slot{wire::slot::kImages, wire::SlotKind::kImageBytes, json::object(), std::move(msg.frames)});
    // The persister checks the key, numbers an upload and records the job; the client is
    // answered when it has (on_created), and nothing here waits for Redis.
    ++creating;
    creating_bytes += static_cast<std::size_t>(bytes);
    io.persist(CreateRequest{std::move(job), std::move(idem), routing, req});
  }

  void reply_accepted(const std::string& routing, const std::string& req, const std::string& job_id) {
    json a = wire::header("accepted");
    if (!req.empty()) a["req"] = req;
    a["job_id"] = job_id;
    reply(routing, std::move(a));
  }

  void get_job(const std::string& routing, const std::string& req, const std::string& id, int wait_ms) {
    auto it = jobs.find(id);
    if (it != jobs.end()) {
      Job& job = it->second;
      if (job.unsaved_end) return reply_job(routing, req, *job.unsaved_end);
      if (wait_ms > 0) {
        job.waiters.push_back(Waiter{routing, req, clock.now() + milliseconds(wait_ms)});
        return;
      }
      return reply_job(routing, req, job_object(job));
    }
    io.persist(ReadRequest{id, routing, req});  // answered in on_read
  }

  void expire_waiters() {
    const auto now = clock.now();
    for (auto& [id, job] : jobs) {
      auto& ws = job.waiters;
      for (auto it = ws.begin(); it != ws.end();) {
        if (it->deadline <= now) {
          // An end not saved yet is still the answer: the job object would say "failed"
          // (or "finished") without its error or result.
          reply_job(it->routing, it->req, job.unsaved_end ? *job.unsaved_end : job_object(job));
          it = ws.erase(it);
        } else {
          ++it;
        }
      }
    }
  }

  void update_gauges() {
    metrics.pending_bytes.Add({}).Set(static_cast<double>(held_bytes + creating_bytes));
    std::map<std::string, double> depth, count, suspect;
    for (const auto& [key, q] : queues) depth[key.substr(0, key.find('#'))] += static_cast<double>(q.size());
    for (const auto& [id, w] : workers) {
      count[w.stage] += 1;
      if (w.stuck || w.timed_out) suspect[w.stage] += 1;
    }
    for (const auto& s : wire::stage_names()) {
      metrics.queue_depth.Add({{"stage", s}}).Set(depth[s]);
      metrics.workers.Add({{"stage", s}}).Set(count[s]);
      metrics.workers_suspect.Add({{"stage", s}}).Set(suspect[s]);
    }
  }

  std::chrono::milliseconds next_wake() const {
    long long t = std::min(opt.heartbeat_ms / 2, 100);
    if (!delayed.empty()) {
      t = std::min<long long>(t, std::chrono::duration_cast<milliseconds>(delayed.begin()->first - clock.now()).count());
    }
    // Waiters' deadlines are checked at each housekeeping tick (heartbeat / 4): scanning
    // every job here would make each loop O(jobs).
    return milliseconds(std::max<long long>(t, 0));
  }

  void tick() {
    recover();
    release_delayed();
    retry_unsaved();
    dispatch();
    if (clock.now() - last_housekeeping >= milliseconds(std::max(opt.heartbeat_ms / 4, 5))) {
      last_housekeeping = clock.now();
      check_liveness();
      expire_deadlines();
      fail_unserved();
      expire_waiters();
      update_gauges();
      dispatch();
    }
  }
};

Scheduler::Scheduler(const BrokerOptions& options, RedisLocation location, SchedulerIo& io,
                     const SchedulerClock& clock)
    : impl_(std::make_unique<Impl>(options, std::move(location), io, clock)) {}
Scheduler::~Scheduler() = default;

void Scheduler::on_client(wire::RawMessage& raw) { impl_->on_client(raw); }
void Scheduler::on_worker(wire::RawMessage& raw) { impl_->on_worker(raw); }
void Scheduler::on_persisted(PersistDone done) { impl_->on_persisted(done); }
void Scheduler::tick() { impl_->tick(); }
std::chrono::milliseconds Scheduler::next_wake() const { return impl_->next_wake(); }

void Scheduler::begin_drain() {
  if (impl_->draining) return;
  impl_->draining = true;
  impl_->set_not_ready("draining");
}

bool Scheduler::drained() const { return impl_->flights.empty() && impl_->unsaved.empty(); }

std::string Scheduler::not_ready() const {
  std::lock_guard lock(impl_->ready_mutex);
  return impl_->not_ready;
}

Scheduler::Counts Scheduler::counts() const {
  Counts c;
  c.jobs = impl_->jobs.size();
  for (const auto& [key, q] : impl_->queues) c.queued += q.size();
  c.delayed = impl_->delayed.size();
  c.flights = impl_->flights.size();
  c.workers = impl_->workers.size();
  c.held_bytes = impl_->held_bytes;
  return c;
}

std::optional<nlohmann::json> Scheduler::job(const std::string& id) const {
  auto it = impl_->jobs.find(id);
  if (it == impl_->jobs.end()) return std::nullopt;
  return it->second.unsaved_end ? *it->second.unsaved_end : impl_->job_object(it->second);
}

}  // namespace gmi::detail
