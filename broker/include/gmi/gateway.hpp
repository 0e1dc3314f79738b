#pragma once
/// The HTTP gateway for web frontends (schemas/openapi.yaml): turns HTTP requests into
/// broker jobs and reads models from the spec store. Stateless: run as many as needed.
///
///   POST /v1/queries?top=K[&scorer=S][&prompt=P]   body: image bytes, or multipart/form-data
///                                                  with a part named "image" -> 202 {"job_id"}
///   GET  /v1/queries/{id}[?wait_ms=N]              -> 200 job (result when finished)
///   POST /v1/models/{id}/uploads                   multipart: "manifest" (JSONL lines
///                                                  {"image": NAME, "prompt": P}) + one part
///                                                  per image named by its file name -> 202
///   GET  /v1/jobs/{id}[?wait_ms=N]                 -> 200 job
///   GET  /v1/models                                -> 200 {"models": [metadata...]}
///   GET  /v1/models/{id}                           -> 200 metadata, 404 unknown id
///   plus /metrics, /healthz, /readyz (OpsServer).
/// Errors: 400 bad input, 401 missing/wrong API key, 404 unknown id, 413 body too large,
/// 415 unsupported content type, 503 broker busy/unreachable (Retry-After). Body:
/// {"error": {"code": "...", "message": "..."}}.
/// Event-driven (Boost.Beast, see broker/src/http_server.hpp): a few threads serve every
/// connection, and a request waiting for its headers, its body or the broker (a long-poll)
/// holds none of them. Thread-safety: start()/stop() from one thread.
#include <memory>
#include <string>

#include <zmq.hpp>

#include "gmi/broker_client.hpp"
#include "gmi/ops.hpp"

namespace gmi {

struct GatewayOptions {
  std::string host = "0.0.0.0";
  int port = 8080;                 ///< 0: a free port (see Gateway::port())
  BrokerClientOptions broker;      ///< the broker frontend
  std::string spec_store_uri;      ///< for GET /v1/models (redis://... or dir:...)
  std::string api_key;             ///< empty: no key required; else header X-API-Key or
                                   ///< "Authorization: Bearer KEY" must match
  std::size_t max_query_bytes = 32u << 20;
  std::size_t max_upload_bytes = 256u << 20;
  int threads = 2;                 ///< event-loop threads (each serves many connections)
  int max_wait_ms = 30000;         ///< cap on ?wait_ms
  int max_connections = 1000;      ///< past it: probes only, 503 busy for the rest
  int header_timeout_ms = 10000;   ///< request line and headers must arrive within this
  int body_timeout_ms = 30000;     ///< longest gap between two reads of a body
};

class Gateway {
 public:
  /// Binds at once; IoError when the port is taken.
  Gateway(zmq::context_t& context, GatewayOptions options);
  ~Gateway();
  Gateway(const Gateway&) = delete;
  Gateway& operator=(const Gateway&) = delete;

  int port() const;
  /// Serves on background threads until stop().
  void start();
  /// Stops accepting, lets in-flight requests finish, joins.
  void stop();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace gmi
