#pragma once
// The gateway's HTTP/1.1 server: event-driven (Boost.Beast on Boost.Asio), so that a
// connection waiting for anything (its headers, its body, a broker reply, a long-poll)
// holds no thread. A few threads run every connection.
//
// Why Beast: it is packaged in Debian (header-only, libboost-dev), its parser is strict
// (RFC 9112 framing: differing Content-Length values, a length that is not a number, a
// transfer coding with a length, all refused), it leaves every read and write to the caller,
// which is what deadlines per phase need, and it parses nothing it is not asked to.
//
// What the server enforces before the handler sees a request:
//   - a deadline for the request line and headers (header_timeout; the same bound covers a
//     kept-alive connection waiting for its next request), one between two reads of a body
//     (body_timeout), and past the first body_timeout a floor on the body's average rate
//     (16 KiB/s), so that a client trickling bytes is cut off. The socket is closed at the
//     deadline (no answer can be written to it); the request is counted as a 408;
//   - RFC 9112 framing: 400 for bad or conflicting lengths, 501 for a transfer coding other
//     than chunked, 431 for headers over header_limit bytes; each closes the connection;
//   - the body limit the handler chose for the route after seeing the headers (413, close);
//   - a connection cap: past max_connections, a connection is served only /healthz,
//     /readyz and /metrics (with a 1 s header deadline) and 503 "busy" for the rest, so that
//     no crowd of clients can starve the probes; past the cap plus a reserve, it is closed.
// A connection that is answered without its body being read (401, 413, 415, framing) is
// closed the way RFC 9112 section 9.6 asks: the answer is written, the sending side shut,
// and what the client still sends is read and dropped, unparsed, for a short while, so
// that the client sees the answer rather than a reset.
//
// Beast and Asio stay inside http_server.cpp: the handler sees only the plain types below.
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace gmi::http {

/// A request's line and headers, as read.
struct Head {
  std::string method;  ///< "GET", "POST", ... (HEAD is passed as HEAD)
  std::string target;  ///< as sent: path and query
  std::string path;    ///< the target up to '?'
  std::string query;   ///< after '?', undecoded ("" when none)
  /// Header fields in order, names as sent (compare them case-insensitively: see header()).
  std::vector<std::pair<std::string, std::string>> fields;
  std::optional<std::uint64_t> content_length;
  bool chunked = false;

  /// The first value of a field (case-insensitive name); "" when absent.
  std::string header(std::string_view name) const;
  bool has_header(std::string_view name) const;
  /// True when a body follows the headers (a length above 0, or chunked).
  bool has_body() const { return chunked || content_length.value_or(0) > 0; }
};

/// A whole request: its head and body.
struct Request {
  Head head;
  std::string body;
};

struct Response {
  int status = 200;
  std::string content_type = "application/json";
  std::string body;
  std::vector<std::pair<std::string, std::string>> headers;  ///< extra fields
  bool close = false;  ///< close the connection after this response
};

/// Calls the handler back with the request's response: from any thread, exactly once
/// (later calls are ignored). It holds the connection open until it is called or dropped,
/// and must not outlive the Server: whatever holds responders is stopped before it goes.
using Responder = std::function<void(Response)>;

class Handler {
 public:
  virtual ~Handler() = default;
  /// Called on the connection's strand once the headers are read. Return a response to
  /// answer without reading the body (a wrong key, a body too large for the route); else
  /// set `body_limit` (bytes) and the body is read within it. Must not block.
  virtual std::optional<Response> on_head(const Head& head, std::uint64_t& body_limit) = 0;
  /// The whole request. Must not block: answer through `respond`, now or later.
  virtual void on_request(std::shared_ptr<Request> request, Responder respond) = 0;
  /// Every answer, for metrics and logs (`head` is null when the request line itself could
  /// not be parsed). May run on any server thread.
  virtual void on_answered(const Head* head, const Response& response,
                           std::chrono::steady_clock::duration took) = 0;
};

struct ServerOptions {
  std::string host = "0.0.0.0";
  int port = 0;                    ///< 0: a free port
  int threads = 2;                 ///< event-loop threads
  std::size_t max_connections = 1000;
  std::chrono::milliseconds header_timeout{10000};
  std::chrono::milliseconds body_timeout{30000};
  std::size_t header_limit = 16384;  ///< request line and header fields, bytes
  /// How long stop() lets requests in progress finish before it cuts them off.
  std::chrono::milliseconds drain_timeout{5000};
};

/// The JSON error body every gmi HTTP error carries: {"error": {"code", "message"}}.
Response error_response(int status, const std::string& code, const std::string& message);

class Server {
 public:
  /// Binds at once; IoError when the address cannot be bound (port taken).
  Server(ServerOptions options, Handler& handler);
  ~Server();  ///< stop()
  Server(const Server&) = delete;
  Server& operator=(const Server&) = delete;

  int port() const;
  /// Starts the event-loop threads.
  void start();
  /// Stops accepting, closes idle connections, calls `draining` (which may hurry the
  /// requests in progress: the gateway answers its long-polls), lets requests in progress
  /// finish (up to drain_timeout), then stops the threads. Idempotent.
  void stop(const std::function<void()>& draining = {});
  /// Connections open now (for metrics and tests).
  std::size_t connections() const;

  struct Impl;  ///< defined in http_server.cpp

 private:
  std::unique_ptr<Impl> impl_;
};

}  // namespace gmi::http
