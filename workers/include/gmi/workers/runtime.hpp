#pragma once
/// Runs one Stage against the broker: asks for work (credit), batches tasks (max batch,
/// max wait), computes on its own thread while the socket thread keeps heartbeats going,
/// sends one result per task, reconnects when the broker goes silent, and on stop finishes
/// what it holds, says "bye" and returns.
/// Thread-safety: run() owns the socket; construct, run and destroy from one thread.
#include <atomic>
#include <memory>
#include <string>
#include <vector>

#include <zmq.hpp>

#include "gmi/wire.hpp"
#include "gmi/workers/stage.hpp"

namespace gmi::workers {

struct WorkerOptions {
  std::string broker = "tcp://127.0.0.1:5556";  ///< the broker's backend
  std::string name;                             ///< for logs; default stage/host/pid
  int heartbeat_ms = 500;
  int liveness = 6;
  /// The compute watchdog: a batch computing longer than this makes the worker suspect. Its
  /// heartbeats say so (the broker sends it nothing more), not_alive_reason() says so (its
  /// /healthz fails, so that Kubernetes restarts it), and asked to stop it exits at once
  /// (status 1) instead of waiting on the stuck batch. 0: no watchdog.
  int compute_deadline_s = 300;
  /// Where claimed inputs are fetched from (a slot whose entry holds a "claim" and no
  /// frames: the broker left a large input in Redis). Empty: redis://127.0.0.1:6379.
  std::string redis_uri;
  /// CURVE: the broker's public key and this worker's keys (empty: plain).
  std::string curve_server_public;
  wire::CurveKeys curve_client;
};

/// The stage's results for `tasks`, one per task. A failure belongs to one task: when
/// process() throws for a batch, each task is run again alone, and what it throws alone is
/// its result (InputError and std::bad_alloc: failed, not retryable; anything else:
/// retryable). Never throws.
std::vector<StageResult> process_batch(Stage& stage, std::vector<StageTask>& tasks);

class StageWorker {
 public:
  StageWorker(zmq::context_t& context, WorkerOptions options, std::unique_ptr<Stage> stage);
  ~StageWorker();

  /// Serves until `stop` is true, then drains and returns.
  void run(const std::atomic<bool>& stop);

  std::string not_ready_reason() const;
  /// "" while alive; else why not (compute stuck past compute_deadline_s). Any thread.
  std::string not_alive_reason() const;
  Stage& stage() { return *stage_; }

 private:
  struct Impl;
  std::unique_ptr<Stage> stage_;
  std::unique_ptr<Impl> impl_;
};

}  // namespace gmi::workers
