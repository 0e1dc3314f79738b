#pragma once
// The broker's state machine, without sockets, Redis or a clock of its own: the jobs it
// holds, the queues per stage (and score shard), the tasks in flight, the workers and their
// credit, retries with backoff, deadlines, the fan-out of a sharded stage and the merge of
// its results, and the clients waiting on a job (long-polls).
//
// It takes events — a message from a client or a worker, a completion of the persister,
// the passing of time (tick) — and emits commands through SchedulerIo: send this to a
// worker, answer that client, ask the persister for this. Time is read only from the
// SchedulerClock it is given, so that a test can drive heartbeats, task timeouts, backoffs
// and deadlines by moving a clock by hand.
//
// Thread-safety: every call but not_ready() is for one thread (the broker's loop).
#include <chrono>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "gmi/broker.hpp"
#include "gmi/redis.hpp"
#include "gmi/wire.hpp"
#include "persister.hpp"

namespace gmi::detail {

/// Where the scheduler reads the time: a steady clock for intervals and an epoch clock for
/// the times it stores (creation, end, deadlines).
class SchedulerClock {
 public:
  virtual ~SchedulerClock() = default;
  virtual std::chrono::steady_clock::time_point now() const = 0;
  virtual std::int64_t epoch_ms() const = 0;
};

/// The machine's clocks.
class SystemClock final : public SchedulerClock {
 public:
  std::chrono::steady_clock::time_point now() const override { return std::chrono::steady_clock::now(); }
  std::int64_t epoch_ms() const override { return now_ms(); }
};

/// The commands the scheduler emits.
class SchedulerIo {
 public:
  virtual ~SchedulerIo() = default;
  /// Delivers a header and frames to the worker with routing id `worker` (the views are valid
  /// for the call only). False when it cannot be delivered now: the scheduler then treats
  /// the worker as gone, and the tasks in that message as never sent.
  virtual bool send_worker(const std::string& worker, const nlohmann::json& header,
                           const std::vector<std::string_view>& frames) = 0;
  /// Answers a client, best effort (a client that went away loses its answer, not its job).
  virtual void reply(const std::string& client, const nlohmann::json& header) = 0;
  /// Hands a request to the persister; its completion comes back through on_persisted().
  virtual void persist(PersistRequest request) = 0;
  /// "" while the job store is reachable; else why not (answers to "ping" carry it).
  virtual std::string store_not_ready() const = 0;
};

class Scheduler {
 public:
  /// Checks the options (InputError naming the problem).
  Scheduler(const BrokerOptions& options, RedisLocation location, SchedulerIo& io, const SchedulerClock& clock);
  ~Scheduler();
  Scheduler(const Scheduler&) = delete;
  Scheduler& operator=(const Scheduler&) = delete;

  /// A message from a client (frontend): submit_query, submit_upload, get_job, ping.
  /// Anything malformed is answered with an error; nothing throws.
  void on_client(wire::RawMessage& raw);
  /// A message from a worker (backend): ready, heartbeat, results, bye.
  void on_worker(wire::RawMessage& raw);
  /// A completion of a request the scheduler posted.
  void on_persisted(PersistDone done);
  /// Time has passed: releases retries whose backoff ended, re-posts unsaved ends, asks for
  /// a reconciliation when one is due, dispatches, and (every heartbeat / 4) checks workers'
  /// liveness, task timeouts, deadlines, unserved queues and long-polls.
  void tick();
  /// How long the loop may wait for an event before tick() has work to do.
  std::chrono::milliseconds next_wake() const;

  /// From now on new jobs are refused and nothing more is dispatched.
  void begin_drain();
  /// No task in flight and no end waiting for Redis.
  bool drained() const;
  /// "" when ready; else why not ("starting", "recovering jobs: ...", "draining").
  /// Any thread.
  std::string not_ready() const;

  /// What the scheduler holds, for logs and tests.
  struct Counts {
    std::size_t jobs = 0;      ///< held (queued, running, or ended and not yet saved)
    std::size_t queued = 0;    ///< entries in the stage queues
    std::size_t delayed = 0;   ///< retries waiting out their backoff
    std::size_t flights = 0;   ///< tasks sent and not answered
    std::size_t workers = 0;
    std::size_t held_bytes = 0;
  };
  Counts counts() const;
  /// A held job's object as a client would read it (with its end once ended); none: not held.
  std::optional<nlohmann::json> job(const std::string& id) const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace gmi::detail
