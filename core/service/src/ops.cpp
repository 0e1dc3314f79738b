// Metrics registry and the ops HTTP server (see ops.hpp).
#include "gmi/ops.hpp"

#include <sys/socket.h>

#include <atomic>
#include <chrono>
#include <exception>

#include <httplib.h>
#include <prometheus/text_serializer.h>

#include "gmi/error.hpp"

namespace gmi {
namespace {

// The registry must exist before Metrics' reference members are bound, and the header
// declares registry_ after them; so the registry is built here first and shared.
const std::shared_ptr<prometheus::Registry>& process_registry() {
  static const auto registry = std::make_shared<prometheus::Registry>();
  return registry;
}

prometheus::Family<prometheus::Counter>& counter(const char* name, const char* help) {
  return prometheus::BuildCounter().Name(name).Help(help).Register(*process_registry());
}
prometheus::Family<prometheus::Gauge>& gauge(const char* name, const char* help) {
  return prometheus::BuildGauge().Name(name).Help(help).Register(*process_registry());
}
prometheus::Family<prometheus::Histogram>& histogram(const char* name, const char* help) {
  return prometheus::BuildHistogram().Name(name).Help(help).Register(*process_registry());
}

// Ops endpoints answer small GETs; the gateway, which shares this server, raises the payload
// limit to its own upload limit.
constexpr std::size_t kOpsPayloadMaxBytes = 1 << 20;
constexpr int kOpsTimeoutSeconds = 5;
constexpr std::size_t kOpsThreads = 4;

// httplib's default socket options set SO_REUSEPORT, which lets a second process bind a port
// already in use and silently share its connections. SO_REUSEADDR alone still allows a quick
// restart over TIME_WAIT connections, and makes "port taken" an error again.
void reuse_addr_only(socket_t sock) {
  int yes = 1;
  ::setsockopt(sock, SOL_SOCKET, SO_REUSEADDR, &yes, sizeof yes);
}

}  // namespace

Metrics::Metrics()
    : jobs_total(counter("gmi_jobs_total", "Jobs and tasks finished, by stage and outcome.")),
      stage_seconds(histogram("gmi_stage_seconds", "Time one stage spent on one task.")),
      batch_size(histogram("gmi_batch_size", "Items per batch a worker processed.")),
      queue_depth(gauge("gmi_queue_depth", "Tasks waiting for a worker, by stage.")),
      retries_total(counter("gmi_retries_total", "Tasks retried, by stage and reason.")),
      dead_letters_total(
          counter("gmi_dead_letters_total", "Jobs given up on after their last attempt.")),
      job_seconds(histogram("gmi_job_seconds", "Time from job intake to its result.")),
      http_requests_total(
          counter("gmi_http_requests_total", "HTTP requests served, by route and status code.")),
      workers(gauge("gmi_workers", "Live workers known to the broker, by stage.")),
      workers_suspect(gauge("gmi_workers_suspect",
                            "Workers sent no tasks: compute stuck, or a task timed out, by stage.")),
      pending_bytes(gauge("gmi_pending_bytes",
                          "Payload bytes the broker's unfinished jobs hold (broker.max_pending_bytes).")),
      specs_loaded(gauge("gmi_specs_loaded", "Specs held in memory by score workers.")),
      segments(gauge("gmi_segments", "Sealed (immutable) segments a score worker holds its shard in.")),
      segment_models(gauge("gmi_segment_models",
                           "Models in a score worker's segments, by state: live (sealed), tail "
                           "(the mutable tail), dead (tombstones awaiting compaction).")),
      index_bytes(gauge("gmi_index_bytes", "Bytes of a score worker's packed specs (all segments).")),
      compactions_total(counter("gmi_compactions_total",
                                "Segment compactions, by outcome (installed, superseded, failed).")),
      compaction_seconds(histogram("gmi_compaction_seconds", "Time one segment compaction took.")),
      snapshot_writes_total(counter("gmi_snapshot_writes_total",
                                    "Writes of a score worker's shard snapshot to score.snapshot_dir, by outcome "
                                    "(written, failed).")),
      snapshot_mapped_bytes(gauge("gmi_snapshot_mapped_bytes",
                                  "Bytes of a score worker's points memory-mapped from its snapshot files "
                                  "(held by the page cache, not the process).")),
      registry_(process_registry()) {}

Metrics& Metrics::instance() {
  // Leaked on purpose: worker threads may still update metrics while static destructors run.
  static Metrics* metrics = new Metrics();
  return *metrics;
}

prometheus::Histogram::BucketBoundaries Metrics::latency_buckets() {
  return {1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05,
          0.1,  0.25,   0.5,  1,    2.5,    5,    10,   30,    60};
}

prometheus::Histogram::BucketBoundaries Metrics::size_buckets() {
  prometheus::Histogram::BucketBoundaries b;
  for (double v = 1; v <= 1024; v *= 2) b.push_back(v);
  return b;
}

std::string Metrics::serialize() const {
  return prometheus::TextSerializer().Serialize(registry_->Collect());
}

OpsServer::OpsServer(OpsServerOptions options)
    : options_(std::move(options)), server_(std::make_unique<httplib::Server>()) {
  if (options_.port < 0 || options_.port > 65535) {
    throw InputError("ops server port " + std::to_string(options_.port) +
                     " is out of range [0, 65535]");
  }
  server_->set_socket_options(reuse_addr_only);
  // A slow or stuck scraper must not hold a server thread for long.
  server_->set_read_timeout(kOpsTimeoutSeconds, 0);
  server_->set_write_timeout(kOpsTimeoutSeconds, 0);
  server_->set_keep_alive_timeout(kOpsTimeoutSeconds);
  server_->set_payload_max_length(kOpsPayloadMaxBytes);
  // The default pool has max(8, cores - 1) threads, far more than scrapes and probes need;
  // the gateway sets its own (gateway.threads) before start().
  server_->new_task_queue = [] { return new httplib::ThreadPool(kOpsThreads); };

  server_->Get("/metrics", [](const httplib::Request&, httplib::Response& res) {
    res.set_content(Metrics::instance().serialize(), "text/plain; version=0.0.4");
  });
  // Both probes: 200 with `ok_text` when the check says "", else 503 with its reason.
  const auto probe = [](const std::function<std::string()>& check, const char* what, const char* ok_text) {
    return [check, what, ok_text](const httplib::Request&, httplib::Response& res) {
      std::string reason;
      try {
        if (check) reason = check();
      } catch (const std::exception& e) {
        reason = std::string(what) + " check failed: " + e.what();
      } catch (...) {
        reason = std::string(what) + " check failed";
      }
      if (reason.empty()) {
        res.set_content(ok_text, "text/plain");
      } else {
        res.status = 503;
        res.set_content(reason + "\n", "text/plain");
      }
    };
  };
  server_->Get("/healthz", probe(options_.not_alive_reason, "liveness", "ok\n"));
  server_->Get("/readyz", probe(options_.not_ready_reason, "readiness", "ready\n"));

  // Without TCP_NODELAY keep-alive responses wait ~40 ms on delayed ACKs (Nagle).
  server_->set_tcp_nodelay(true);
  bool bound = false;
  if (options_.port == 0) {
    int p = server_->bind_to_any_port(options_.host);
    bound = p > 0;
    if (bound) port_ = p;
  } else {
    bound = server_->bind_to_port(options_.host, options_.port);
    if (bound) port_ = options_.port;
  }
  if (!bound) {
    throw IoError("cannot listen on " + options_.host + ":" + std::to_string(options_.port) +
                  " for the ops server");
  }
}

OpsServer::~OpsServer() {
  try {
    stop();
  } catch (...) {
    // stop() throws only when it cannot start a thread to release the port; leaking the
    // socket beats terminate() in a destructor.
  }
}

void OpsServer::start() {
  if (!server_) throw IoError("the ops server was stopped and cannot be started again");
  if (thread_.joinable()) return;
  auto done = std::make_shared<std::atomic<bool>>(false);
  thread_ = std::thread([this, done] {
    server_->listen_after_bind();
    done->store(true);
  });
  // httplib's stop() does nothing until the listen loop has marked itself running, so a
  // stop() straight after start() would leave the thread serving forever and hang the join.
  // Waiting here (well under a millisecond) closes that window; `done` covers a listen loop
  // that fails at once.
  while (!server_->is_running() && !done->load()) {
    std::this_thread::sleep_for(std::chrono::microseconds(50));
  }
}

void OpsServer::stop() {
  if (!server_) return;  // already stopped
  // httplib's Server destructor does not close a bound listening socket; only stop() of a
  // running server does. Running it briefly is the one way to release the port (and the fd)
  // of a server that was bound but never started.
  if (!thread_.joinable()) start();
  server_->stop();
  thread_.join();
  // The listen loop has shut its thread pool down, so no handler still runs; dropping the
  // server marks this one as finished (stop() is final) and frees its routes.
  server_.reset();
}

}  // namespace gmi
