#pragma once
// The broker's persistence, off its dispatch thread: one thread with its own Redis
// connection takes requests (record a job, end a job, read a job, list the active ones,
// append job events) and hands back completions, so that a Redis stall delays only the
// answers that wait on Redis, never heartbeats, dispatch or results.
//
// Requests that arrive together are written together: the creations of one group share one
// round trip for their idempotency checks and upload numbers and one MULTI/EXEC for their
// records; the ends of one group are pipelined. Requests are served in the order they were
// posted, so a job's end is never applied before its creation.
//
// Thread-safety: post(), take() and the wake socket are for the broker's thread; the rest
// runs on the persister's own thread.
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <variant>
#include <vector>

#include <nlohmann/json.hpp>
#include <zmq.hpp>

#include "gmi/job_store.hpp"
#include "gmi/redis.hpp"

namespace gmi::detail {

/// Record a new job (after its idempotency check; uploads get their number here).
struct CreateRequest {
  StoredJob job;
  IdempotencyRecord idem;
  std::string routing, req;  ///< the client to answer (empty: none, e.g. a metric job)
};
enum class CreateOutcome {
  kCreated,      ///< recorded: `request.job` may run
  kExisting,     ///< the key named an earlier job with the same request: `job_id`
  kConflict,     ///< the key named another request: `error`
  kUnavailable,  ///< not recorded (Redis away or refused): `error`
};
struct CreateDone {
  CreateRequest request;
  CreateOutcome outcome = CreateOutcome::kUnavailable;
  std::string job_id;
  std::string error;
};

/// Save a job's end (the job object clients will read).
struct EndRequest {
  std::string id;
  nlohmann::json end;
  bool dead_letter = false;
};
struct EndDone {
  std::string id;
  bool saved = false;
  bool reachable = true;  ///< Redis answered (a refusal, e.g. out of memory, is an answer)
  bool repeat = false;    ///< saved, and it had ended before (after an unknown outcome)
  std::string error;
};

/// Read an ended or recorded job the broker does not hold.
struct ReadRequest {
  std::string id, routing, req;
};
struct ReadDone {
  ReadRequest request;
  std::optional<nlohmann::json> job;  ///< none: unknown or expired (when error is empty)
  std::string error;
};

/// List the active jobs and load those the broker does not hold (`held`, when posted).
struct RecoverRequest {
  std::vector<std::string> held;
};
struct RecoverDone {
  bool ok = false;
  std::vector<StoredJob> jobs;
  std::string error;
};

/// Append to the job-event stream (P:job-events): a state change that is not a creation or
/// an end (those are written with their own records). Best effort, grouped.
struct EventRequest {
  std::string id, event, stage;
};

using PersistRequest = std::variant<CreateRequest, EndRequest, ReadRequest, RecoverRequest, EventRequest>;
using PersistDone = std::variant<CreateDone, EndDone, ReadDone, RecoverDone>;

struct PersisterOptions {
  RedisLocation location;
  JobStoreOptions store;
  std::size_t max_group = 256;  ///< most requests written in one group
};

class Persister {
 public:
  Persister(zmq::context_t& context, PersisterOptions options);
  ~Persister();  ///< finishes what was posted (bounded by Redis's timeouts), then stops
  Persister(const Persister&) = delete;
  Persister& operator=(const Persister&) = delete;

  void post(PersistRequest request);
  /// Readable (ZMQ_POLLIN) when completions wait; take() drains it.
  zmq::socket_t& wake() { return wake_rx_; }
  std::vector<PersistDone> take();
  /// Requests posted and not yet completed.
  std::size_t backlog() const;
  /// "" while the last contact with Redis worked; else why not.
  std::string not_ready_reason() const;

 private:
  void loop();
  void serve(std::vector<PersistRequest>& group, std::vector<PersistDone>& done);
  void create_group(std::vector<CreateRequest>& creates, std::vector<PersistDone>& done);
  void end_group(std::vector<EndRequest>& ends, std::vector<PersistDone>& done);
  void events_group(const std::vector<EventRequest>& events);
  bool connect();
  void check_redis();

  zmq::context_t& context_;
  PersisterOptions options_;
  std::string wake_endpoint_;
  zmq::socket_t wake_rx_;
  std::optional<JobStore> store_;  // the persister thread's alone

  mutable std::mutex mutex_;
  std::condition_variable cv_;
  std::deque<PersistRequest> requests_;
  std::vector<PersistDone> completions_;
  std::size_t in_progress_ = 0;
  bool quit_ = false;
  std::string not_ready_ = "connecting to redis";
  std::thread thread_;
};

}  // namespace gmi::detail
