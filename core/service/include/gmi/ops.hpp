#pragma once
/// What every gmi process serves to operators over HTTP: /metrics (Prometheus text format),
/// /healthz (200 while alive; 503 with the reason, e.g. a stuck compute) and /readyz (200 when ready() says so, else 503
/// with the reason). The gateway adds its API routes to the same server.
///
/// Metric names follow Prometheus conventions: gmi_ prefix, base units, _total counters,
/// _seconds histograms. One Registry per process (Metrics::registry()).
/// Thread-safety: prometheus-cpp metrics are thread-safe; OpsServer start/stop from one thread.
#include <functional>
#include <memory>
#include <string>
#include <thread>

#include <prometheus/counter.h>
#include <prometheus/family.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>
#include <prometheus/registry.h>

namespace httplib {
class Server;
}

namespace gmi {

/// The process's metric registry and the metric families every process shares.
class Metrics {
 public:
  static Metrics& instance();
  prometheus::Registry& registry() { return *registry_; }

  // Shared families (label names in brackets):
  prometheus::Family<prometheus::Counter>& jobs_total;          ///< gmi_jobs_total{stage,outcome}
  prometheus::Family<prometheus::Histogram>& stage_seconds;     ///< gmi_stage_seconds{stage}
  prometheus::Family<prometheus::Histogram>& batch_size;        ///< gmi_batch_size{stage}
  prometheus::Family<prometheus::Gauge>& queue_depth;           ///< gmi_queue_depth{stage}
  prometheus::Family<prometheus::Counter>& retries_total;       ///< gmi_retries_total{stage,reason}
  prometheus::Family<prometheus::Counter>& dead_letters_total;  ///< gmi_dead_letters_total{stage}
  prometheus::Family<prometheus::Histogram>& job_seconds;       ///< gmi_job_seconds{kind,outcome}
  prometheus::Family<prometheus::Counter>& http_requests_total; ///< gmi_http_requests_total{route,code}
  prometheus::Family<prometheus::Gauge>& workers;               ///< gmi_workers{stage}
  prometheus::Family<prometheus::Gauge>& workers_suspect;       ///< gmi_workers_suspect{stage}
  prometheus::Family<prometheus::Gauge>& pending_bytes;         ///< gmi_pending_bytes
  prometheus::Family<prometheus::Gauge>& specs_loaded;          ///< gmi_specs_loaded{stage}
  prometheus::Family<prometheus::Gauge>& segments;              ///< gmi_segments{stage,shard}
  prometheus::Family<prometheus::Gauge>& segment_models;        ///< gmi_segment_models{stage,shard,state}
  prometheus::Family<prometheus::Gauge>& index_bytes;           ///< gmi_index_bytes{stage,shard}
  prometheus::Family<prometheus::Counter>& compactions_total;   ///< gmi_compactions_total{stage,shard,outcome}
  prometheus::Family<prometheus::Histogram>& compaction_seconds;  ///< gmi_compaction_seconds{stage,shard}
  prometheus::Family<prometheus::Counter>& snapshot_writes_total;  ///< gmi_snapshot_writes_total{stage,shard,outcome}
  prometheus::Family<prometheus::Gauge>& snapshot_mapped_bytes;    ///< gmi_snapshot_mapped_bytes{stage,shard}

  /// Buckets for latency histograms: 100 us .. 60 s, roughly x2.5 apart.
  static prometheus::Histogram::BucketBoundaries latency_buckets();
  /// Buckets for batch sizes: 1, 2, 4, ... 1024.
  static prometheus::Histogram::BucketBoundaries size_buckets();

  /// The registry in Prometheus text exposition format.
  std::string serialize() const;

 private:
  Metrics();
  std::shared_ptr<prometheus::Registry> registry_;
};

struct OpsServerOptions {
  std::string host = "0.0.0.0";
  int port = 0;  ///< 0: pick a free port (see OpsServer::port())
  /// Empty reason = ready. Called on each /readyz request from the server's threads.
  std::function<std::string()> not_ready_reason;
  /// Empty reason = alive (/healthz 200); else /healthz answers 503 with it, so that the
  /// orchestrator restarts the process (a worker whose compute is stuck). None: always alive.
  std::function<std::string()> not_alive_reason;
};

/// An HTTP server (cpp-httplib) on its own threads serving /metrics, /healthz, /readyz.
class OpsServer {
 public:
  /// Binds at once; IoError naming host:port when the port is taken.
  explicit OpsServer(OpsServerOptions options);
  ~OpsServer();  ///< stops and joins
  OpsServer(const OpsServer&) = delete;
  OpsServer& operator=(const OpsServer&) = delete;

  int port() const { return port_; }
  /// For the gateway: register more routes BEFORE start().
  httplib::Server& http() { return *server_; }
  /// Starts serving on a background thread.
  void start();
  void stop();

 private:
  OpsServerOptions options_;
  std::unique_ptr<httplib::Server> server_;
  int port_ = 0;
  std::thread thread_;
};

}  // namespace gmi
