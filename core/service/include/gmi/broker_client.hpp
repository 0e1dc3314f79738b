#pragma once
/// A client of the broker's frontend (see schemas/README.md): submit query and upload jobs,
/// read a job's state, optionally waiting for it to end. Used by the HTTP gateway, the CLI
/// (`gmi query`, `gmi upload`, `gmi job`), the load benchmark and the tests.
/// Thread-safety: NOT thread-safe (one ZeroMQ DEALER socket); use one client per thread.
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>
#include <zmq.hpp>

#include "gmi/error.hpp"
#include "gmi/wire.hpp"

namespace gmi {

/// The broker answered with an "error" message. code(): "bad_request" (malformed or
/// invalid request), "too_large", "not_found" (unknown job id), "busy" (backpressure:
/// retry later), "unavailable" (the broker cannot reach Redis or is shutting down).
class BrokerRefusal : public Error {
 public:
  BrokerRefusal(std::string code, const std::string& message)
      : Error(message), code_(std::move(code)) {}
  const std::string& code() const { return code_; }
  /// True for busy/unavailable: the same request may succeed later.
  bool retryable() const { return code_ == "busy" || code_ == "unavailable"; }

 private:
  std::string code_;
};

struct BrokerClientOptions {
  std::string endpoint = "tcp://127.0.0.1:5555";
  int timeout_ms = 10000;  ///< per request, on top of any wait_ms
  /// CURVE: the broker's public key and this client's keys (both empty: plain TCP).
  std::string curve_server_public;
  wire::CurveKeys curve_client;
  int submit_attempts = 3;  ///< tries per submission, all with the same idempotency key
};

struct QueryRequest {
  std::string image;   ///< encoded image bytes (JPEG, PNG)
  int top = 10;
  std::string scorer;  ///< empty: the score workers' default
  std::string prompt;  ///< optional pseudo-prompt instead of the interrogator's
  /// The same key within redis.result_ttl_s names the same job (retries never duplicate
  /// it). Empty: the client makes one per submit_query() call. Keys are scoped to the kind
  /// of request and to `idempotency_scope`; reusing one for a different request is refused
  /// (BrokerRefusal "conflict").
  std::string idempotency_key;
  /// Whose keys these are (the gateway names the API key it checked); empty: no credential.
  std::string idempotency_scope;
  /// Milliseconds after acceptance by which the job must end ("deadline exceeded" if not);
  /// 0: the broker's default (broker.query_deadline_s).
  std::int64_t deadline_ms = 0;
};

struct UploadRequest {
  std::string model_id;
  std::vector<std::string> images;   ///< encoded image bytes
  std::vector<std::string> prompts;  ///< one per image
  double downloads = 0;
  std::string card;
  std::string idempotency_key;    ///< as in QueryRequest
  std::string idempotency_scope;  ///< as in QueryRequest
  std::int64_t deadline_ms = 0;   ///< as in QueryRequest (default broker.upload_deadline_s)
};

/// The header of the submit_query / submit_upload message for `request` (its image bytes go
/// in frames, not in the header), with its idempotency key (a fresh one when the request
/// has none) and scope. Every client of the frontend builds its submissions here.
nlohmann::json submit_query_header(const QueryRequest& request);
nlohmann::json submit_upload_header(const UploadRequest& request);

/// A DEALER socket connected to the broker's frontend as `options` say (CURVE when a server
/// key is set; linger 0). `immediate`: queue nothing for a broker that is not connected.
/// InputError for a bad endpoint or key.
zmq::socket_t connect_to_broker(zmq::context_t& context, const BrokerClientOptions& options,
                                bool immediate);

class BrokerClient {
 public:
  BrokerClient(zmq::context_t& context, BrokerClientOptions options);

  /// Returns the job id. Throws BrokerRefusal when refused, IoError when every try timed
  /// out. A timed-out submission is sent again (up to submit_attempts times in all) with
  /// the same idempotency key, so a lost reply never makes a second job.
  std::string submit_query(const QueryRequest& request);
  std::string submit_upload(const UploadRequest& request);

  /// The job object ({"job_id","kind","state",...,"result"|"error"}). With wait_ms > 0 the
  /// broker answers as soon as the job ends or when wait_ms passes. BrokerRefusal with
  /// code "not_found" for an unknown (or expired) id.
  nlohmann::json get_job(const std::string& job_id, int wait_ms = 0);

  /// Round trip to the broker; false on timeout.
  bool ping(int timeout_ms);
  /// Whether the broker can take jobs: nullopt when it does not answer, "" when it can,
  /// else why not (its Redis is unreachable, it is recovering or draining).
  std::optional<std::string> readiness(int timeout_ms);

  /// One request/response exchange; returns the reply header (type accepted/job/pong).
  nlohmann::json request(nlohmann::json header, const std::vector<std::string>& frames,
                         int timeout_ms);

 private:
  void open_socket();
  std::string submit(const nlohmann::json& header, const std::vector<std::string>& frames);
  zmq::context_t& context_;
  BrokerClientOptions options_;
  std::optional<zmq::socket_t> socket_;
  std::uint64_t next_req_ = 1;
};

}  // namespace gmi
