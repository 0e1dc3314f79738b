// The broker's scheduler alone: events in, commands out, time from a clock the test moves.
// No socket, no Redis: the persister's completions are written by the test.
#include "scheduler.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <set>

namespace gmi::detail {
namespace {

using nlohmann::json;
using std::chrono::milliseconds;

class ManualClock final : public SchedulerClock {
 public:
  std::chrono::steady_clock::time_point now() const override { return now_; }
  std::int64_t epoch_ms() const override { return epoch_; }
  void advance(milliseconds by) {
    now_ += by;
    epoch_ += by.count();
  }

 private:
  std::chrono::steady_clock::time_point now_{std::chrono::hours(1000)};
  std::int64_t epoch_ = 1'800'000'000'000;
};

struct Sent {
  std::string worker;
  json header;
  std::size_t frames = 0;
};

class RecordingIo final : public SchedulerIo {
 public:
  bool send_worker(const std::string& worker, const json& header,
                   const std::vector<std::string_view>& frames) override {
    if (unreachable.count(worker) != 0) return false;
    sent.push_back(Sent{worker, header, frames.size()});
    return true;
  }
  void reply(const std::string& client, const json& header) override { replies.emplace_back(client, header); }
  void persist(PersistRequest request) override { persisted.push_back(std::move(request)); }
  std::string store_not_ready() const override { return store; }

  template <typename T>
  std::vector<T> take() {
    std::vector<T> out;
    std::vector<PersistRequest> keep;
    for (auto& r : persisted) {
      if (auto* t = std::get_if<T>(&r)) {
        out.push_back(std::move(*t));
      } else {
        keep.push_back(std::move(r));
      }
    }
    persisted.swap(keep);
    return out;
  }

  std::vector<Sent> sent;
  std::vector<std::pair<std::string, json>> replies;
  std::vector<PersistRequest> persisted;
  std::set<std::string> unreachable;
  std::string store;
};

class SchedulerTest : public ::testing::Test {
 protected:
  void start(BrokerOptions o = {}) {
    opt = std::move(o);
    sched = std::make_unique<Scheduler>(opt, parse_redis_uri("redis://127.0.0.1:6379"), io, clock);
    sched->tick();
    auto recover = io.take<RecoverRequest>();
    ASSERT_EQ(recover.size(), 1u);
    RecoverDone done;
    done.ok = true;
    sched->on_persisted(done);
    ASSERT_EQ(sched->not_ready(), "");
  }

  static wire::RawMessage raw(const std::string& routing, const json& h, std::vector<std::string> frames = {}) {
    wire::RawMessage m;
    m.routing = routing;
    m.parts.push_back(h.dump());
    for (auto& f : frames) m.parts.push_back(std::move(f));
    return m;
  }

  // A query submitted by `client`; the persister's CreateRequest is left for the test.
  void submit_query(const std::string& client, json extra = json::object()) {
    json h = wire::header("submit_query");
    h["req"] = "r-" + client;
    for (auto& [k, v] : extra.items()) h[k] = v;
    auto m = raw(client, h, {"image bytes"});
    sched->on_client(m);
  }

  // Answers every CreateRequest posted with `outcome`; returns the created jobs' ids.
  std::vector<std::string> create_all(CreateOutcome outcome = CreateOutcome::kCreated) {
    std::vector<std::string> ids;
    for (auto& r : io.take<CreateRequest>()) {
      CreateDone done;
      ids.push_back(r.job.id);
      done.request = std::move(r);
      done.outcome = outcome;
      done.error = outcome == CreateOutcome::kUnavailable ? "redis: reply timeout" : "";
      sched->on_persisted(std::move(done));
    }
    return ids;
  }

  std::string accept_query(const std::string& client = "client", json extra = json::object()) {
    submit_query(client, std::move(extra));
    auto ids = create_all();
    EXPECT_EQ(ids.size(), 1u);
    return ids.empty() ? "" : ids.front();
  }

  void ready(const std::string& id, const std::string& stage, int credit, const std::string& session = "s1",
             int shard = 0, int shards = 1) {
    json h = wire::header("ready");
    h["stage"] = stage;
    h["worker"] = "name-" + id;
    h["credit"] = credit;
    h["session"] = session;
    h["shard"] = shard;
    h["shards"] = shards;
    auto m = raw(id, h);
    sched->on_worker(m);
  }

  void heartbeat(const std::string& id, std::optional<double> stuck_s = std::nullopt) {
    json h = wire::header("heartbeat");
    if (stuck_s) h["stuck_s"] = *stuck_s;
    auto m = raw(id, h);
    sched->on_worker(m);
  }

  // The tasks sent to `worker` since the last call (each a {"task", "job_id", ...} object).
  std::vector<json> tasks_sent(const std::string& worker) {
    std::vector<json> out;
    std::vector<Sent> keep;
    for (auto& s : io.sent) {
      if (s.worker == worker && s.header["type"] == "tasks") {
        for (const auto& t : s.header["tasks"]) out.push_back(t);
      } else {
        keep.push_back(std::move(s));
      }
    }
    io.sent.swap(keep);
    return out;
  }

  // Number of "tasks" messages sent to `worker` (batches), without taking them.
  std::size_t batches_to(const std::string& worker) const {
    return static_cast<std::size_t>(std::count_if(io.sent.begin(), io.sent.end(), [&](const Sent& s) {
      return s.worker == worker && s.header["type"] == "tasks";
    }));
  }

  void answer(const std::string& worker, const std::vector<json>& results, int credit) {
    json h = wire::header("results");
    h["results"] = results;
    h["credit"] = credit;
    auto m = raw(worker, h);
    sched->on_worker(m);
  }

  static json ok(const json& task, json meta = json::object()) {
    return json{{"task", task["task"]}, {"ok", true}, {"meta", std::move(meta)}};
  }
  static json failed(const json& task, const std::string& error, bool retryable) {
    return json{{"task", task["task"]}, {"ok", false}, {"error", error}, {"retryable", retryable}};
  }

  // Saves every end posted; returns them by job id.
  std::map<std::string, json> save_ends() {
    std::map<std::string, json> ends;
    for (auto& e : io.take<EndRequest>()) {
      ends[e.id] = e.end;
      EndDone done;
      done.id = e.id;
      done.saved = true;
      sched->on_persisted(done);
    }
    return ends;
  }

  // Moves the clock in steps (each followed by tick), with heartbeats from `alive`.
  void pass(milliseconds total, const std::vector<std::string>& alive = {}, milliseconds step = milliseconds(50)) {
    for (milliseconds t{0}; t < total; t += step) {
      clock.advance(step);
      for (const auto& w : alive) heartbeat(w);
      sched->tick();
    }
  }

  // Workers for the query route's first three stages, each answering ok at once, then the
  // job waits at score. Returns nothing; the tasks are answered here.
  void run_to_score(const std::vector<std::string>& job_ids) {
    for (const char* stage : {"decode", "embed", "interrogate"}) {
      const std::string w = std::string("w-") + stage;
      if (!known_.count(w)) {
        ready(w, stage, 64);
        known_.insert(w);
      }
      sched->tick();
      auto tasks = tasks_sent(w);
      ASSERT_EQ(tasks.size(), job_ids.size()) << stage;
      std::vector<json> results;
      for (const auto& t : tasks) results.push_back(ok(t));
      answer(w, results, static_cast<int>(tasks.size()));
    }
  }

  std::vector<json> replies_to(const std::string& client) {
    std::vector<json> out;
    for (const auto& [c, h] : io.replies) {
      if (c == client) out.push_back(h);
    }
    return out;
  }

  BrokerOptions opt;
  ManualClock clock;
  RecordingIo io;
  std::unique_ptr<Scheduler> sched;
  std::set<std::string> known_;
};

// ---------------------------------------------------------------- intake and ends

TEST_F(SchedulerTest, AJobIsAcceptedOnlyOnceRecordedAndRunsItsRouteToASavedEnd) {
  start();
  submit_query("c1");
  EXPECT_TRUE(replies_to("c1").empty()) << "answered before Redis recorded the job";
  const auto ids = create_all();
  ASSERT_EQ(ids.size(), 1u);
  ASSERT_EQ(replies_to("c1").size(), 1u);
  EXPECT_EQ(replies_to("c1")[0]["type"], "accepted");
  EXPECT_EQ(replies_to("c1")[0]["req"], "r-c1");
  EXPECT_EQ(replies_to("c1")[0]["job_id"], ids[0]);
  run_to_score(ids);
  ready("s0", "score", 8);
  sched->tick();
  auto tasks = tasks_sent("s0");
  ASSERT_EQ(tasks.size(), 1u);
  answer("s0", {ok(tasks[0], {{"results", json::array({{{"model", "m1"}, {"score", 0.1}, {"rank", 1}}})},
                              {"scorer", "weighted"}, {"models", 1}})}, 1);
  EXPECT_EQ(sched->counts().jobs, 1u) << "forgotten before its end was saved";
  auto ends = save_ends();
  ASSERT_EQ(ends.count(ids[0]), 1u);
  EXPECT_EQ(ends[ids[0]]["state"], "finished");
  EXPECT_EQ(ends[ids[0]]["result"]["results"][0]["model"], "m1");
  EXPECT_EQ(sched->counts().jobs, 0u);
  EXPECT_EQ(sched->counts().held_bytes, 0u);
}

TEST_F(SchedulerTest, MalformedClientMessagesGetBadRequestWithTheirCorrelationId) {
  start();
  json h = wire::header("submit_query");
  h["req"] = "abc";
  h["top"] = "ten";
  auto m = raw("c", h, {"img"});
  sched->on_client(m);
  json u = wire::header("submit_upload");
  u["req"] = "def";
  u["model_id"] = "../etc";
  u["prompts"] = {"p"};
  auto m2 = raw("c", u, {"img"});
  sched->on_client(m2);
  auto m3 = raw("c", json{{"v", 1}, {"type", "ping"}, {"req", "ghi"}});
  sched->on_client(m3);
  auto r = replies_to("c");
  ASSERT_EQ(r.size(), 3u);
  for (std::size_t i = 0; i < 3; ++i) {
    EXPECT_EQ(r[i]["type"], "error");
    EXPECT_EQ(r[i]["code"], "bad_request");
  }
  EXPECT_EQ(r[0]["req"], "abc");
  EXPECT_EQ(r[1]["req"], "def");
  EXPECT_EQ(r[2]["req"], "ghi");
  EXPECT_TRUE(io.persisted.empty());
}

TEST_F(SchedulerTest, AtMaxPendingJobsOrBytesASubmissionIsBusy) {
  BrokerOptions o;
  o.max_pending_jobs = 2;
  o.max_pending_bytes = 30;
  start(o);
  accept_query("a");
  submit_query("b");  // being created: counts too
  submit_query("c");
  auto r = replies_to("c");
  ASSERT_EQ(r.size(), 1u);
  EXPECT_EQ(r[0]["code"], "busy");
  EXPECT_NE(r[0]["error"].get<std::string>().find("max_pending_jobs"), std::string::npos);
  create_all();
  // 11 bytes per query: a third would hold 33 > 30 even with a free job slot.
  BrokerOptions o2 = o;
  o2.max_pending_jobs = 10;
  RecordingIo io2;
  ManualClock clock2;
  Scheduler s2(o2, parse_redis_uri("redis://127.0.0.1:6379"), io2, clock2);
  for (const char* c : {"x", "y", "z"}) {
    json h = wire::header("submit_query");
    auto m = raw(c, h, {"image bytes"});
    s2.on_client(m);
  }
  ASSERT_EQ(io2.replies.size(), 1u);
  EXPECT_EQ(io2.replies[0].first, "z");
  EXPECT_EQ(io2.replies[0].second["code"], "busy");
  EXPECT_NE(io2.replies[0].second["error"].get<std::string>().find("max_pending_bytes"), std::string::npos);
}

// ---------------------------------------------------------------- item 3: unknown outcomes

TEST_F(SchedulerTest, AnUnknownOutcomeIsAnsweredUnavailableAndTheJobRedisHoldsIsAdoptedAndRunsOnce) {
  BrokerOptions o;
  o.reconcile_s = 30;
  o.no_worker_wait_s = 0;  // the held job waits at decode without a worker meanwhile
  start(o);
  submit_query("c", {{"idempotency_key", "k1"}});
  auto creates = io.take<CreateRequest>();
  ASSERT_EQ(creates.size(), 1u);
  StoredJob stored = creates[0].job;  // what Redis applied, though the reply timed out
  EXPECT_EQ(creates[0].idem.key, "k1");
  {
    CreateDone done;
    done.request = std::move(creates[0]);
    done.outcome = CreateOutcome::kUnavailable;
    done.error = "redis: reply timeout (the outcome is unknown)";
    sched->on_persisted(std::move(done));
  }
  ASSERT_EQ(replies_to("c").size(), 1u);
  EXPECT_EQ(replies_to("c")[0]["code"], "unavailable");
  EXPECT_EQ(sched->counts().jobs, 0u);

  // Before reconcile_s nothing is asked; at it, the scheduler lists what it holds.
  const std::string held = accept_query("other");
  pass(milliseconds(29'000));
  EXPECT_TRUE(io.take<RecoverRequest>().empty());
  pass(milliseconds(1'100));
  auto rec = io.take<RecoverRequest>();
  ASSERT_EQ(rec.size(), 1u);
  EXPECT_EQ(rec[0].held, std::vector<std::string>{held});
  RecoverDone found;
  found.ok = true;
  found.jobs.push_back(stored);
  sched->on_persisted(std::move(found));
  EXPECT_EQ(sched->counts().jobs, 2u);
  EXPECT_EQ(sched->job(stored.id).value()["state"], "queued");

  // The client's retry with the same key names the adopted job, and a long-poll on it gets
  // its end; it ran once.
  submit_query("c", {{"idempotency_key", "k1"}});
  auto retry = io.take<CreateRequest>();
  ASSERT_EQ(retry.size(), 1u);
  CreateDone existing;
  existing.request = std::move(retry[0]);
  existing.outcome = CreateOutcome::kExisting;
  existing.job_id = stored.id;
  sched->on_persisted(std::move(existing));
  EXPECT_EQ(replies_to("c").back()["job_id"], stored.id);
  json poll = wire::header("get_job");
  poll["job_id"] = stored.id;
  poll["wait_ms"] = 60000;
  poll["req"] = "poll";
  auto pm = raw("c", poll);
  sched->on_client(pm);
  run_to_score({held, stored.id});
  ready("s0", "score", 8);
  sched->tick();
  auto tasks = tasks_sent("s0");
  ASSERT_EQ(tasks.size(), 2u);
  std::set<std::string> jobs_run;
  for (const auto& t : tasks) jobs_run.insert(t["job_id"].get<std::string>());
  EXPECT_EQ(jobs_run.size(), 2u) << "a job ran twice";
  answer("s0", {ok(tasks[0]), ok(tasks[1])}, 2);
  auto ends = save_ends();
  EXPECT_EQ(ends.size(), 2u);
  const auto r = replies_to("c").back();
  EXPECT_EQ(r["req"], "poll");
  EXPECT_EQ(r["job"]["state"], "finished");
}

TEST_F(SchedulerTest, AFailedReconciliationSaysNotReadyAndIsRetriedWithinASecond) {
  sched = std::make_unique<Scheduler>(opt, parse_redis_uri("redis://127.0.0.1:6379"), io, clock);
  EXPECT_EQ(sched->not_ready(), "starting");
  sched->tick();
  ASSERT_EQ(io.take<RecoverRequest>().size(), 1u);
  RecoverDone bad;
  bad.error = "connection refused";
  sched->on_persisted(bad);
  EXPECT_NE(sched->not_ready().find("connection refused"), std::string::npos);
  pass(milliseconds(900));
  EXPECT_TRUE(io.take<RecoverRequest>().empty());
  pass(milliseconds(200));
  ASSERT_EQ(io.take<RecoverRequest>().size(), 1u);
  RecoverDone good;
  good.ok = true;
  sched->on_persisted(good);
  EXPECT_EQ(sched->not_ready(), "");
}

TEST_F(SchedulerTest, AnEndRedisCannotSaveAnswersFromMemoryAndIsPostedAgain) {
  start();
  const std::string id = accept_query();
  ready("d", "decode", 4);
  sched->tick();
  auto t = tasks_sent("d");
  ASSERT_EQ(t.size(), 1u);
  answer("d", {failed(t[0], "not an image", false)}, 1);
  auto ends = io.take<EndRequest>();
  ASSERT_EQ(ends.size(), 1u);
  EndDone refused;
  refused.id = id;
  refused.error = "OOM command not allowed";
  sched->on_persisted(refused);
  EXPECT_FALSE(sched->drained()) << "an end waits for Redis";
  json g = wire::header("get_job");
  g["job_id"] = id;
  auto m = raw("c2", g);
  sched->on_client(m);
  ASSERT_EQ(replies_to("c2").size(), 1u);
  EXPECT_EQ(replies_to("c2")[0]["job"]["state"], "failed");
  EXPECT_EQ(replies_to("c2")[0]["job"]["error"], "not an image");
  pass(milliseconds(300));
  auto again = io.take<EndRequest>();
  ASSERT_EQ(again.size(), 1u);
  EXPECT_EQ(again[0].id, id);
  EndDone saved;
  saved.id = id;
  saved.saved = true;
  sched->on_persisted(saved);
  EXPECT_TRUE(sched->drained());
  EXPECT_EQ(sched->counts().jobs, 0u);
}

// ---------------------------------------------------------------- item 6: reconnecting workers

TEST_F(SchedulerTest, AWorkerOnANewConnectionGetsItsTasksBackAtOnceWithoutAnAttemptAndItsCreditIsSet) {
  start();
  accept_query("a");
  accept_query("b");
  ready("d", "decode", 4, "first");
  sched->tick();
  auto before = tasks_sent("d");
  ASSERT_EQ(before.size(), 2u);  // 2 of its 4 credits left unspent
  // The same worker comes back on a new connection (it lost what it held), with 4 credits.
  ready("d", "decode", 4, "second");
  for (int i = 0; i < 4; ++i) accept_query("c" + std::to_string(i));
  sched->tick();
  auto after = tasks_sent("d");
  ASSERT_EQ(after.size(), 4u) << "its credit was added to, not set afresh";
  EXPECT_EQ((std::set<std::string>{after[0]["job_id"].get<std::string>(), after[1]["job_id"].get<std::string>()}),
            (std::set<std::string>{before[0]["job_id"].get<std::string>(), before[1]["job_id"].get<std::string>()}))
      << "the re-queued tasks go first";
  for (const auto& t : after) EXPECT_EQ(t["attempt"], 1) << "a reconnection spent an attempt";
  EXPECT_EQ(sched->counts().delayed, 0u) << "re-queued after a backoff instead of at once";
  EXPECT_EQ(sched->counts().flights, 4u);
  // A result of the old connection's task is stale and changes nothing.
  answer("d", {ok(before[0])}, 0);
  EXPECT_EQ(sched->counts().flights, 4u);
  EXPECT_EQ(sched->job(before[0]["job_id"].get<std::string>()).value()["stage"], "decode");
}

TEST_F(SchedulerTest, AnUnknownWorkerIsToldToReconnectAndAShardCountThatDiffersIsIgnored) {
  BrokerOptions o;
  o.score_shards = 2;
  start(o);
  heartbeat("ghost");
  ASSERT_EQ(io.sent.size(), 1u);
  EXPECT_EQ(io.sent[0].header["type"], "reconnect");
  ready("s", "score", 4, "s1", 0, 3);
  EXPECT_EQ(sched->counts().workers, 0u);
  ready("s", "score", 4, "s1", 1, 2);
  EXPECT_EQ(sched->counts().workers, 1u);
}

// ---------------------------------------------------------------- item 7: failures per task

TEST_F(SchedulerTest, AFailureBelongsToItsTaskAloneAndBadInputIsNeverRetried) {
  start();
  const std::string a = accept_query("a"), b = accept_query("b");
  ready("d", "decode", 8);
  sched->tick();
  auto tasks = tasks_sent("d");
  ASSERT_EQ(tasks.size(), 2u) << "one batch of both";
  const json& ta = tasks[0]["job_id"] == a ? tasks[0] : tasks[1];
  const json& tb = tasks[0]["job_id"] == a ? tasks[1] : tasks[0];
  answer("d", {failed(ta, "not an image: unknown format", false), ok(tb)}, 2);
  auto ends = save_ends();
  ASSERT_EQ(ends.size(), 1u);
  EXPECT_EQ(ends[a]["state"], "failed");
  EXPECT_EQ(ends[a]["error"], "not an image: unknown format");
  EXPECT_EQ(ends[a]["failed_stage"], "decode");
  EXPECT_EQ(ends[a]["dead_letter"], false);
  EXPECT_EQ(ends[a]["attempts"], 0);
  EXPECT_EQ(sched->job(b).value()["stage"], "embed");
  EXPECT_EQ(sched->counts().delayed, 0u);
}

TEST_F(SchedulerTest, TheBatchMatesOfAWorkerThatDiedAreRetriedOneByOneEachAlone) {
  BrokerOptions o;
  o.heartbeat_ms = 100;
  o.liveness = 3;
  start(o);
  for (int i = 0; i < 3; ++i) accept_query("c" + std::to_string(i));
  ready("w1", "decode", 8);
  sched->tick();
  ASSERT_EQ(tasks_sent("w1").size(), 3u);
  ready("w2", "decode", 8);
  // w1 falls silent; w2 keeps beating. After liveness x heartbeat, w1 is dead.
  pass(milliseconds(400), {"w2"});
  EXPECT_EQ(sched->counts().workers, 1u);
  // The retries wait out their backoff, then go one per dispatch, each alone to an idle
  // worker: w2 holds at most one of them at any time.
  pass(milliseconds(300), {"w2"});
  std::size_t seen = 0;
  for (int round = 0; round < 3; ++round) {
    auto t = tasks_sent("w2");
    ASSERT_EQ(t.size(), 1u) << "round " << round << ": a suspect was batched with another task";
    EXPECT_EQ(t[0]["attempt"], 2);
    ++seen;
    pass(milliseconds(100), {"w2"});
    EXPECT_TRUE(tasks_sent("w2").empty()) << "sent more while the suspect is out";
    answer("w2", {ok(t[0])}, 1);
    sched->tick();
  }
  EXPECT_EQ(seen, 3u);
}

TEST_F(SchedulerTest, IsolationSurvivesTheRequeueOfASendThatFailed) {
  BrokerOptions o;
  o.heartbeat_ms = 100;
  o.liveness = 3;
  start(o);
  const std::string suspect = accept_query("a");
  ready("w1", "decode", 8);
  sched->tick();
  ASSERT_EQ(tasks_sent("w1").size(), 1u);
  pass(milliseconds(700));  // w1 dies holding it: a suspect now, and its backoff ends
  EXPECT_EQ(sched->counts().delayed, 0u);
  accept_query("b");  // an ordinary job queued behind the suspect
  // w2 cannot be reached: the suspect sent to it goes back as a suspect, no attempt spent.
  io.unreachable.insert("w2");
  ready("w2", "decode", 8);
  sched->tick();
  EXPECT_EQ(sched->counts().workers, 0u) << "an unreachable worker was kept";
  EXPECT_EQ(sched->counts().queued, 2u);
  ready("w3", "decode", 8);
  sched->tick();
  auto t = tasks_sent("w3");
  ASSERT_EQ(t.size(), 1u) << "isolation was lost on the re-queue after a failed send";
  EXPECT_EQ(t[0]["job_id"], suspect);
  EXPECT_EQ(t[0]["attempt"], 2);
}

TEST_F(SchedulerTest, RetryableFailuresBackOffThenDeadLetterWithTheLastError) {
  BrokerOptions o;
  o.max_attempts = 3;
  o.backoff_ms = 100;
  o.backoff_max_ms = 1000;
  start(o);
  const std::string id = accept_query();
  ready("d", "decode", 4);
  for (int attempt = 1; attempt <= 3; ++attempt) {
    sched->tick();
    auto t = tasks_sent("d");
    ASSERT_EQ(t.size(), 1u) << "attempt " << attempt;
    EXPECT_EQ(t[0]["attempt"], attempt);
    answer("d", {failed(t[0], "cuda: out of memory " + std::to_string(attempt), true)}, 1);
    if (attempt < 3) {
      // The backoff is jittered within [0.5, 1] x backoff_ms x 2^(attempt-1).
      const auto min_delay = milliseconds(50 << (attempt - 1));
      clock.advance(min_delay - milliseconds(1));
      heartbeat("d");
      sched->tick();
      EXPECT_TRUE(tasks_sent("d").empty()) << "retried before its backoff";
      clock.advance(min_delay + milliseconds(2));
      heartbeat("d");
    }
  }
  auto ends = save_ends();
  ASSERT_EQ(ends.count(id), 1u);
  EXPECT_EQ(ends[id]["dead_letter"], true);
  EXPECT_NE(ends[id]["error"].get<std::string>().find("gave up after 3 attempts at stage decode"), std::string::npos);
  EXPECT_NE(ends[id]["error"].get<std::string>().find("out of memory 3"), std::string::npos);
}

// ---------------------------------------------------------------- item 8: suspects

TEST_F(SchedulerTest, AWorkerWhoseComputeIsStuckGetsNoTaskUntilItRecovers) {
  BrokerOptions o;
  o.heartbeat_ms = 100;
  start(o);
  ready("stuck", "decode", 8);
  heartbeat("stuck", 42.0);
  accept_query("a");
  sched->tick();
  EXPECT_TRUE(tasks_sent("stuck").empty()) << "a stuck worker got a task";
  ready("fine", "decode", 8);
  sched->tick();
  EXPECT_EQ(tasks_sent("fine").size(), 1u);
  heartbeat("stuck");  // computing again: it is the least recently used worker now
  accept_query("c");
  pass(milliseconds(10), {"fine"});
  EXPECT_EQ(tasks_sent("stuck").size(), 1u) << "a worker that recovered was still skipped";
  EXPECT_TRUE(tasks_sent("fine").empty());
}

TEST_F(SchedulerTest, AWorkerThatLetsATaskTimeOutGetsNotEvenItsRetryUntilItAnswers) {
  BrokerOptions o;
  o.heartbeat_ms = 100;
  o.task_timeout_s = 1;
  o.backoff_ms = 10;
  o.backoff_max_ms = 10;
  start(o);
  const std::string id = accept_query();
  ready("hung", "decode", 8);
  sched->tick();
  auto t = tasks_sent("hung");
  ASSERT_EQ(t.size(), 1u);
  pass(milliseconds(1200), {"hung"});  // alive, silent about its work
  EXPECT_EQ(sched->counts().flights, 0u) << "the task did not time out";
  EXPECT_TRUE(tasks_sent("hung").empty()) << "the hung worker attracted the retry of its own task";
  ready("other", "decode", 8);
  pass(milliseconds(100), {"hung", "other"});
  auto r = tasks_sent("other");
  ASSERT_EQ(r.size(), 1u);
  EXPECT_EQ(r[0]["job_id"], id);
  EXPECT_EQ(r[0]["attempt"], 2);
  // Its late answer is stale, but it is answering again: it may get work.
  answer("hung", {ok(t[0])}, 1);
  EXPECT_EQ(sched->job(id).value()["stage"], "decode") << "a stale result advanced the job";
  accept_query("next");
  pass(milliseconds(50), {"hung", "other"});
  EXPECT_EQ(tasks_sent("hung").size() + tasks_sent("other").size(), 1u);
}

// ---------------------------------------------------------------- item 9: deadlines, unserved shards

TEST_F(SchedulerTest, AQueuedJobPastItsDeadlineFailsSayingSoAtItsStage) {
  start();
  const std::string id = accept_query("c", {{"deadline_ms", 2000}});
  pass(milliseconds(1900));
  EXPECT_TRUE(io.take<EndRequest>().empty());
  pass(milliseconds(200));
  auto ends = save_ends();
  ASSERT_EQ(ends.count(id), 1u);
  const std::string error = ends[id]["error"];
  EXPECT_NE(error.find("deadline exceeded"), std::string::npos) << error;
  EXPECT_NE(error.find("within 2 s"), std::string::npos) << error;
  EXPECT_NE(error.find("at stage decode"), std::string::npos) << error;
}

TEST_F(SchedulerTest, ATaskInFlightIsNeverCutShortByItsDeadlineButTheNextStageIsNotStarted) {
  BrokerOptions o;
  o.heartbeat_ms = 100;
  start(o);
  const std::string late = accept_query("late", {{"deadline_ms", 1000}});
  ready("d", "decode", 8);
  sched->tick();
  auto t = tasks_sent("d");
  ASSERT_EQ(t.size(), 1u);
  pass(milliseconds(1500), {"d"});
  EXPECT_TRUE(io.take<EndRequest>().empty()) << "a job computing was failed";
  answer("d", {ok(t[0])}, 1);
  auto ends = save_ends();
  ASSERT_EQ(ends.count(late), 1u);
  EXPECT_NE(ends[late]["error"].get<std::string>().find("deadline exceeded"), std::string::npos);
}

TEST_F(SchedulerTest, AResultAtTheLastStageAfterTheDeadlineStillFinishes) {
  BrokerOptions o;
  o.heartbeat_ms = 100;
  start(o);
  const std::string id = accept_query("c", {{"deadline_ms", 1000}});
  run_to_score({id});
  ready("s0", "score", 8);
  sched->tick();
  auto t = tasks_sent("s0");
  ASSERT_EQ(t.size(), 1u);
  pass(milliseconds(1500), {"s0", "w-decode", "w-embed", "w-interrogate"});
  answer("s0", {ok(t[0], {{"results", json::array()}, {"models", 0}})}, 1);
  auto ends = save_ends();
  EXPECT_EQ(ends[id]["state"], "finished");
}

class ShardedTest : public SchedulerTest {
 protected:
  void start_sharded(bool allow_partial) {
    BrokerOptions o;
    o.heartbeat_ms = 100;
    o.score_shards = 2;
    o.no_worker_wait_s = 2;
    o.allow_partial = allow_partial;
    start(o);
  }
  static json ranking(std::vector<std::pair<std::string, double>> models, json metric = 1) {
    json r = json::array();
    for (const auto& [m, s] : models) r.push_back({{"model", m}, {"score", s}});
    return json{{"results", r}, {"models", models.size()}, {"scorer", "weighted"}, {"metric", metric}};
  }
  // A query that reaches score where only shard 0 has a worker, which answers `ranked`.
  // Returns its id; `alive` then names every worker, shard 0's included.
  std::string only_shard_0_answers(const json& ranked) {
    const std::string id = accept_query();
    run_to_score({id});
    ready("s0", "score", 8, "a", 0, 2);
    sched->tick();
    auto t0 = tasks_sent("s0");
    EXPECT_EQ(t0.size(), 1u);
    if (!t0.empty()) answer("s0", {ok(t0[0], ranked)}, 1);
    alive.push_back("s0");
    return id;
  }
  std::vector<std::string> alive{"w-decode", "w-embed", "w-interrogate"};
};

TEST_F(ShardedTest, EachShardRanksItsModelsAndTheMergeIsOneRankingCutAtTop) {
  start_sharded(false);
  const std::string id = accept_query("c", {{"top", 3}});
  run_to_score({id});
  ready("s0", "score", 8, "a", 0, 2);
  ready("s1", "score", 8, "b", 1, 2);
  sched->tick();
  auto t0 = tasks_sent("s0"), t1 = tasks_sent("s1");
  ASSERT_EQ(t0.size(), 1u);
  ASSERT_EQ(t1.size(), 1u);
  answer("s0", {ok(t0[0], ranking({{"a", 0.5}, {"b", 0.1}}))}, 1);
  EXPECT_TRUE(io.take<EndRequest>().empty()) << "ended before every shard answered";
  answer("s1", {ok(t1[0], ranking({{"c", 0.3}, {"d", 0.05}}))}, 1);
  auto ends = save_ends();
  const json& results = ends[id]["result"]["results"];
  ASSERT_EQ(results.size(), 3u);
  EXPECT_EQ(results[0]["model"], "d");
  EXPECT_EQ(results[1]["model"], "b");
  EXPECT_EQ(results[2]["model"], "c");
  EXPECT_EQ(results[2]["rank"], 3);
  EXPECT_EQ(ends[id]["result"]["models"], 4);
  EXPECT_FALSE(ends[id]["result"].contains("missing_shards"));
}

TEST_F(ShardedTest, ShardsThatRankedWithDifferentMetricVersionsAreRankedAgainNotMerged) {
  start_sharded(false);
  const std::string id = accept_query();
  run_to_score({id});
  ready("s0", "score", 8, "a", 0, 2);
  ready("s1", "score", 8, "b", 1, 2);
  sched->tick();
  auto t0 = tasks_sent("s0"), t1 = tasks_sent("s1");
  answer("s0", {ok(t0[0], ranking({{"a", 0.5}}, 1))}, 1);
  answer("s1", {ok(t1[0], ranking({{"c", 0.3}}, 2))}, 1);
  EXPECT_TRUE(io.take<EndRequest>().empty());
  pass(milliseconds(400), {"s0", "s1"});
  t0 = tasks_sent("s0");
  t1 = tasks_sent("s1");
  ASSERT_EQ(t0.size(), 1u) << "shard 0 not ranked again";
  ASSERT_EQ(t1.size(), 1u) << "shard 1 not ranked again";
  answer("s0", {ok(t0[0], ranking({{"a", 0.5}}, 2))}, 1);
  answer("s1", {ok(t1[0], ranking({{"c", 0.3}}, 2))}, 1);
  auto ends = save_ends();
  EXPECT_EQ(ends[id]["state"], "finished");
  EXPECT_EQ(ends[id]["result"]["results"].size(), 2u);
}

TEST_F(ShardedTest, AQueryWhoseShardHasNoLiveWorkerFailsNamingItAfterTheWait) {
  start_sharded(false);
  const std::string id = only_shard_0_answers(ranking({{"a", 0.5}}));
  pass(milliseconds(1800), alive);
  EXPECT_TRUE(io.take<EndRequest>().empty()) << "failed before no_worker_wait_s";
  pass(milliseconds(400), alive);
  auto ends = save_ends();
  ASSERT_EQ(ends.count(id), 1u);
  const std::string error = ends[id]["error"];
  EXPECT_NE(error.find("no live worker serves score shard 1 of 2"), std::string::npos) << error;
  EXPECT_NE(error.find("broker.no_worker_wait_s"), std::string::npos) << error;
}

TEST_F(ShardedTest, WithAllowPartialTheRankingGoesOnWithoutTheShardAndNamesIt) {
  start_sharded(true);
  const std::string id = only_shard_0_answers(ranking({{"a", 0.5}, {"b", 0.7}}));
  pass(milliseconds(2200), alive);
  auto ends = save_ends();
  ASSERT_EQ(ends.count(id), 1u);
  EXPECT_EQ(ends[id]["state"], "finished");
  EXPECT_EQ(ends[id]["result"]["missing_shards"], json::array({1}));
  EXPECT_EQ(ends[id]["result"]["results"].size(), 2u);
}

TEST_F(SchedulerTest, AStageWithoutAnyWorkerFailsAQueryButNeverAnUpload) {
  BrokerOptions o;
  o.no_worker_wait_s = 1;
  start(o);
  const std::string q = accept_query();
  json u = wire::header("submit_upload");
  u["model_id"] = "m1";
  u["prompts"] = {"a cat"};
  auto m = raw("up", u, {"img"});
  sched->on_client(m);
  ASSERT_EQ(create_all().size(), 1u);
  pass(milliseconds(1200));
  auto ends = save_ends();
  ASSERT_EQ(ends.size(), 1u) << "only the query fails";
  EXPECT_NE(ends[q]["error"].get<std::string>().find("no live worker serves stage decode"), std::string::npos);
  EXPECT_EQ(sched->counts().jobs, 1u);
}

// ---------------------------------------------------------------- long-polls and draining

TEST_F(SchedulerTest, ALongPollIsAnsweredAtItsEndOrWhenItsWaitRunsOut) {
  BrokerOptions o;
  o.heartbeat_ms = 100;
  start(o);
  const std::string id = accept_query();
  json g = wire::header("get_job");
  g["job_id"] = id;
  g["wait_ms"] = 500;
  g["req"] = "p1";
  auto m = raw("poller", g);
  sched->on_client(m);
  pass(milliseconds(400));
  EXPECT_TRUE(replies_to("poller").empty());
  pass(milliseconds(200));
  ASSERT_EQ(replies_to("poller").size(), 1u);
  EXPECT_EQ(replies_to("poller")[0]["req"], "p1");
  EXPECT_EQ(replies_to("poller")[0]["job"]["state"], "queued");
  // A job the scheduler does not hold is read from the store.
  json g2 = wire::header("get_job");
  g2["job_id"] = "0123456789abcdef0123456789abcdef";
  auto m2 = raw("reader", g2);
  sched->on_client(m2);
  auto reads = io.take<ReadRequest>();
  ASSERT_EQ(reads.size(), 1u);
  ReadDone nothing;
  nothing.request = reads[0];
  sched->on_persisted(nothing);
  ASSERT_EQ(replies_to("reader").size(), 1u);
  EXPECT_EQ(replies_to("reader")[0]["code"], "not_found");
}

TEST_F(SchedulerTest, DrainingRefusesNewJobsDispatchesNothingAndAwaitsTheTasksInFlight) {
  start();
  accept_query("a");
  ready("d", "decode", 1);
  sched->tick();
  auto t = tasks_sent("d");
  ASSERT_EQ(t.size(), 1u);
  accept_query("b");
  sched->begin_drain();
  EXPECT_EQ(sched->not_ready(), "draining");
  submit_query("c");
  ASSERT_EQ(replies_to("c").size(), 1u);
  EXPECT_EQ(replies_to("c")[0]["code"], "unavailable");
  EXPECT_FALSE(sched->drained());
  answer("d", {ok(t[0])}, 1);
  sched->tick();
  EXPECT_TRUE(tasks_sent("d").empty()) << "dispatched while draining";
  EXPECT_TRUE(sched->drained());
}

TEST_F(SchedulerTest, PingSaysWhyTheBrokerIsNotReady) {
  start();
  auto ping = [&] {
    json p = wire::header("ping");
    p["req"] = "x";
    auto m = raw("probe", p);
    sched->on_client(m);
    return replies_to("probe").back();
  };
  EXPECT_FALSE(ping().contains("not_ready"));
  io.store = "redis: connection refused";
  EXPECT_EQ(ping()["not_ready"], "redis: connection refused");
  io.store.clear();
  sched->begin_drain();
  EXPECT_EQ(ping()["not_ready"], "draining");
}

}  // namespace
}  // namespace gmi::detail
