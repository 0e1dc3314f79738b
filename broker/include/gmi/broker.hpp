#pragma once
/// The broker: takes jobs from clients, routes each through its stages, balances the work
/// over the workers that ask for it, and keeps every accepted job in Redis until it ends.
///
/// Routes are data (routes.query, routes.upload; gmi/routes.hpp), checked at start:
///   query:  decode -> embed -> interrogate -> score   (result: the ranked models)
///           decode -> interrogate -> embed -> score   (with the captioner)
///   upload: decode -> embed -> spec                    (result: the stored spec's metadata)
/// Each job is stored with its route and resumed on it. Stages exchange named slots
/// (gmi/slots.hpp): the broker keeps the slots a job accumulates and sends each worker the
/// ones its stage reads (its "ready" says which); a worker's credit counts tasks, or the
/// frames of one slot (embed: images), and a task larger than a whole batch goes alone.
///
/// Guarantees (see schemas/README.md for the protocol):
///   - "accepted" is sent only after the job and its input are in Redis; at start the broker
///     resumes every job left active, from its first stage (stages are deterministic);
///   - a worker silent for liveness x heartbeat is dead: its tasks are re-queued, one per
///     dispatch so a poison input cannot take its batch-mates with it;
///   - retryable failures are retried with exponential backoff up to max_attempts, then the
///     job fails as a dead letter with its last error; non-retryable failures (bad input)
///     fail the job at once with the reason;
///   - results are written keyed by job id (idempotent), with a TTL;
///   - at max_pending_jobs new jobs are refused with "busy" instead of queueing without bound;
///   - every job has a deadline; a query at a stage no live worker serves fails naming it
///     after no_worker_wait_s, so that nothing waits for a worker that may never come.
/// Thread-safety: run() owns the sockets; not_ready_reason() may be called from any thread.
#include <atomic>
#include <memory>
#include <string>
#include <vector>

#include <zmq.hpp>

#include "gmi/job_store.hpp"
#include "gmi/routes.hpp"
#include "gmi/wire.hpp"

namespace gmi {

struct BrokerOptions {
  std::vector<std::string> frontend;  ///< endpoints to bind for clients
  std::vector<std::string> backend;   ///< endpoints to bind for workers
  std::string redis_uri = "redis://127.0.0.1:6379";
  JobStoreOptions store;
  int heartbeat_ms = 500;
  int liveness = 6;
  int max_attempts = 4;
  int backoff_ms = 100;
  int backoff_max_ms = 5000;
  std::size_t max_pending_jobs = 10000;
  /// Bytes of payload (inputs, pixels, embeddings) the unfinished jobs may hold in all; a
  /// submission that would go over is refused with "busy", as at max_pending_jobs.
  std::size_t max_pending_bytes = std::size_t{4} << 30;
  /// A claim check for large inputs: a job whose input is at least this many bytes keeps it
  /// only in Redis (where intake stored it), and the first stage's worker fetches it from
  /// there, so that the broker relays those bytes once (client to Redis), not twice, and
  /// holds none of them while the job waits. 0: never.
  std::size_t claim_bytes = std::size_t{1} << 20;
  int task_timeout_s = 300;
  /// Seconds between reconciliations of Redis's active set with the jobs this broker holds.
  int reconcile_s = 30;
  /// A job not finished this long after its acceptance fails "deadline exceeded" (a request
  /// may set its own, deadline_ms). A task in flight is never cut short: its result decides.
  int query_deadline_s = 120;
  int upload_deadline_s = 3600;
  int metric_deadline_s = 21600;
  /// A query waiting this long at a stage, or a score shard, that has no live worker fails
  /// naming it (0: wait for its deadline). With allow_partial, a sharded ranking goes on
  /// without the unserved shards and names them (missing_shards) instead.
  int no_worker_wait_s = 30;
  bool allow_partial = false;
  std::int64_t max_message_bytes = 256ll << 20;
  int score_shards = 1;
  Route query_route{"decode", "embed", "interrogate", "score"};  ///< routes.query, for new jobs
  Route upload_route{"decode", "embed", "spec"};                 ///< routes.upload, for new jobs
  std::string interrogator = "neighbour";  ///< interrogate.interrogator: fixes where interrogate may sit
  int drain_timeout_ms = 30000;
  bool curve = false;
  wire::CurveKeys curve_server;
  /// With CURVE: a directory of client key files; only those keys may connect to either
  /// socket (a ZAP handler). Empty: anyone holding the server's public key may.
  std::string curve_clients_dir;
  /// Set (by a SIGHUP handler) to have the allow-list re-read; the broker clears it.
  std::atomic<bool>* reload_keys = nullptr;
};

class Broker {
 public:
  /// Validates the options and binds the sockets (InputError/IoError naming the problem).
  Broker(zmq::context_t& context, BrokerOptions options);
  ~Broker();
  Broker(const Broker&) = delete;
  Broker& operator=(const Broker&) = delete;

  /// Serves until `stop` becomes true, then drains: new jobs are refused, tasks in flight
  /// are awaited (up to drain_timeout_ms) and their outcomes saved. Jobs still unfinished
  /// stay active in Redis for the next broker.
  void run(const std::atomic<bool>& stop);

  /// "" when ready; else why not (Redis unreachable, recovering jobs).
  std::string not_ready_reason() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace gmi
