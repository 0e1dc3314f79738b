// The HTTP gateway (see gateway.hpp and schemas/openapi.yaml), on the event-driven server
// of http_server.hpp: no request holds a thread while it waits. Broker calls go through one
// AsyncBrokerClient (replies come back as callbacks); spec-store reads, which block on
// Redis, run on a small pool of their own; everything else runs on the server's threads.
#include "gmi/gateway.hpp"

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdlib>
#include <deque>
#include <functional>
#include <limits>
#include <mutex>
#include <optional>
#include <sstream>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>

#include "async_broker_client.hpp"
#include "digest.hpp"
#include "gmi/log.hpp"
#include "gmi/spec.hpp"
#include "gmi/spec_store.hpp"
#include "http_forms.hpp"
#include "http_server.hpp"

namespace gmi {
namespace {

using nlohmann::json;
using Clock = std::chrono::steady_clock;
using http::Head;
using http::Response;

// Multipart framing (boundaries, part headers) on top of the payload limits.
constexpr std::size_t kMultipartSlack = 64u << 10;
// Parts per multipart body: bounds the bookkeeping a body of tiny parts could cost.
constexpr std::size_t kMaxParts = 100000;
// A GET or HEAD may carry a small body, which is read and ignored.
constexpr std::uint64_t kMaxIgnoredBody = 64u << 10;
// The wire protocol's limits (core/service/src/wire.cpp), checked here to answer with a clear 400.
constexpr std::size_t kMaxScorerChars = 32;
constexpr std::size_t kMaxPromptChars = 4096;
constexpr std::size_t kMaxCardChars = 65536;
constexpr int kMaxTop = 1000;
constexpr long long kMaxDeadlineMs = 86400000;  // a day, as the broker allows
// How long a /readyz answer is reused, and how long its ping may take.
constexpr auto kReadyCacheFor = std::chrono::seconds(1);
constexpr int kReadyPingMs = 1000;
// Spec-store reads waiting for the store pool; past this, 503 busy.
constexpr std::size_t kMaxStoreQueue = 256;
// A spec-store read that waited longer than this for the pool is answered 503, not done.
constexpr auto kMaxStoreWait = std::chrono::seconds(5);
// After the store could not be opened, the next try waits this long (reads answer 503).
constexpr auto kStoreRetryAfter = std::chrono::seconds(1);

/// An HTTP failure decided by the gateway itself (bad parameter, wrong content type).
class HttpError : public std::runtime_error {
 public:
  HttpError(int status, std::string code, const std::string& message)
      : std::runtime_error(message), status_(status), code_(std::move(code)) {}
  int status() const { return status_; }
  const std::string& code() const { return code_; }

 private:
  int status_;
  std::string code_;
};

Response json_response(int status, const json& body) {
  Response r;
  r.status = status;
  r.body = body.dump(-1, ' ', false, json::error_handler_t::replace);
  return r;
}

Response text_response(int status, std::string text, std::string type = "text/plain") {
  Response r;
  r.status = status;
  r.content_type = std::move(type);
  r.body = std::move(text);
  return r;
}

// The answer an exception stands for (the one place that maps errors onto statuses).
Response response_for(const std::exception_ptr& error, const Head* head) {
  const auto with_retry = [](Response r, const char* seconds) {
    r.headers.emplace_back("Retry-After", seconds);
    return r;
  };
  try {
    std::rethrow_exception(error);
  } catch (const HttpError& e) {
    return http::error_response(e.status(), e.code(), e.what());
  } catch (const BrokerRefusal& e) {
    const std::string& code = e.code();
    if (code == "bad_request") return http::error_response(400, code, e.what());
    if (code == "too_large") return http::error_response(413, code, e.what());
    if (code == "not_found") return http::error_response(404, code, e.what());
    if (code == "conflict") return http::error_response(422, code, e.what());
    if (code == "busy") return with_retry(http::error_response(503, code, e.what()), "1");
    if (code == "unavailable") return with_retry(http::error_response(503, code, e.what()), "2");
    log::error("unknown refusal code from the broker", {{"code", code}, {"error", e.what()}});
    return http::error_response(502, "bad_gateway", e.what());
  } catch (const http::FormError& e) {
    return http::error_response(400, "bad_request", e.what());
  } catch (const NotFoundError& e) {
    return http::error_response(404, "not_found", e.what());
  } catch (const InputError& e) {
    return http::error_response(400, "bad_request", e.what());
  } catch (const IoError& e) {
    return with_retry(http::error_response(503, "unavailable", e.what()), "2");
  } catch (const std::exception& e) {
    log::error("request failed", {{"method", head ? head->method : ""},
                                  {"path", head ? head->path : ""},
                                  {"error", e.what()}});
  } catch (...) {
    log::error("request failed", {{"method", head ? head->method : ""},
                                  {"path", head ? head->path : ""}});
  }
  return http::error_response(500, "internal", "internal error");
}

// 502 for a broker reply of the wrong type (or without its payload).
Response unexpected_reply(const std::string& endpoint, const char* request, const json& reply,
                          const char* expected) {
  return http::error_response(502, "bad_gateway",
                              "the broker at " + endpoint + " answered " + request + " with \"" +
                                  reply.value("type", "") + "\" instead of \"" + expected + "\"");
}

// A client's Idempotency-Key header: the same key names the same job (a retried POST whose
// answer was lost does not make a second one).
std::string idempotency_key(const Head& head) {
  std::string key = head.header("Idempotency-Key");
  if (key.size() > 128) {
    throw HttpError(400, "bad_request", "Idempotency-Key is longer than 128 characters");
  }
  return key;
}

/// A route: its label for metrics and logs, and the methods it answers.
struct RouteInfo {
  std::string label;
  std::string allow;  ///< for 405's Allow header
  bool api = false;   ///< under /v1/: needs the API key when one is set
};

// Maps a concrete path onto its route template; nullopt for paths that are not ours.
std::optional<RouteInfo> route_of(const std::string& path) {
  std::vector<std::string_view> seg;
  std::string_view rest(path);
  if (rest.empty() || rest.front() != '/') return std::nullopt;
  rest.remove_prefix(1);
  for (;;) {
    const auto slash = rest.find('/');
    seg.push_back(rest.substr(0, slash));
    if (slash == std::string_view::npos) break;
    rest.remove_prefix(slash + 1);
  }
  for (const auto& s : seg) {
    if (s.empty()) return std::nullopt;
  }
  if (seg.size() == 1 && (seg[0] == "metrics" || seg[0] == "healthz" || seg[0] == "readyz")) {
    return RouteInfo{path, "GET, HEAD", false};
  }
  if (seg.empty() || seg[0] != "v1") return std::nullopt;
  if (seg.size() == 2 && seg[1] == "queries") return RouteInfo{"/v1/queries", "POST", true};
  if (seg.size() == 3 && seg[1] == "queries") {
    return RouteInfo{"/v1/queries/{id}", "GET, HEAD", true};
  }
  if (seg.size() == 3 && seg[1] == "jobs") return RouteInfo{"/v1/jobs/{id}", "GET, HEAD", true};
  if (seg.size() == 2 && seg[1] == "models") return RouteInfo{"/v1/models", "GET, HEAD", true};
  if (seg.size() == 3 && seg[1] == "models") {
    return RouteInfo{"/v1/models/{id}", "GET, HEAD", true};
  }
  if (seg.size() == 4 && seg[1] == "models" && seg[3] == "uploads") {
    return RouteInfo{"/v1/models/{id}/uploads", "POST", true};
  }
  return std::nullopt;
}


// Constant-time in the key's length whatever `given` is, so that timing tells nothing about
// how much of a guess was right.
bool same_key(const std::string& key, const std::string& given) {
  unsigned char diff = key.size() == given.size() ? 0 : 1;
  for (std::size_t i = 0; i < key.size(); ++i) {
    const unsigned char g = given.empty() ? 0 : static_cast<unsigned char>(given[i % given.size()]);
    diff |= static_cast<unsigned char>(key[i]) ^ g;
  }
  return diff == 0;
}

// A whole decimal integer in [min, max]; HttpError 400 naming `what` otherwise.
long long parse_int(const std::string& text, const char* what, long long min, long long max) {
  char* end = nullptr;
  errno = 0;
  const long long v = text.empty() ? 0 : std::strtoll(text.c_str(), &end, 10);
  if (text.empty() || *end != '\0' || errno == ERANGE || v < min || v > max) {
    throw HttpError(400, "bad_request",
                    std::string(what) + " must be an integer in [" + std::to_string(min) + ", " +
                        std::to_string(max) + "], got \"" + text + "\"");
  }
  return v;
}


// The path's segment `i` (0-based, after the leading '/'), percent-decoded.
std::string path_segment(const std::string& path, std::size_t i) {
  std::size_t start = 1;
  for (std::size_t k = 0; k < i; ++k) start = path.find('/', start) + 1;
  const std::size_t end = path.find('/', start);
  return http::percent_decode(std::string_view(path).substr(start, end - start), false);
}

/// The query string's parameters (the first value of a repeated one wins).
class Params {
 public:
  explicit Params(const std::string& query) : pairs_(http::parse_query(query)) {}
  std::optional<std::string> get(std::string_view name) const {
    for (const auto& [k, v] : pairs_) {
      if (k == name) return v;
    }
    return std::nullopt;
  }

 private:
  std::vector<std::pair<std::string, std::string>> pairs_;
};

/// One parsed upload manifest line.
struct ManifestLine {
  int line = 0;
  std::string image;
  std::string prompt;
};

std::vector<ManifestLine> parse_manifest(const std::string& text) {
  std::vector<ManifestLine> out;
  std::istringstream in(text);
  std::string row;
  int line = 0;
  while (std::getline(in, row)) {
    ++line;
    if (row.find_first_not_of(" \t\r") == std::string::npos) continue;
    const auto bad = [&](const std::string& why) {
      return HttpError(400, "bad_request", "manifest line " + std::to_string(line) + ": " + why);
    };
    json j = json::parse(row, nullptr, /*allow_exceptions=*/false);
    if (j.is_discarded()) throw bad("not valid JSON");
    if (!j.is_object()) throw bad("not a JSON object");
    auto image = j.find("image");
    if (image == j.end() || !image->is_string() || image->get<std::string>().empty()) {
      throw bad("missing or non-string \"image\"");
    }
    auto prompt = j.find("prompt");
    if (prompt == j.end() || !prompt->is_string() || prompt->get<std::string>().empty()) {
      throw bad("missing or empty \"prompt\" (an upload needs one per image)");
    }
    out.push_back(ManifestLine{line, image->get<std::string>(), prompt->get<std::string>()});
  }
  if (out.empty()) throw HttpError(400, "bad_request", "the manifest lists no images");
  return out;
}


/// Runs blocking jobs (spec-store reads) off the server's threads, with a bounded queue.
class BlockingPool {
 public:
  explicit BlockingPool(int threads) {
    for (int i = 0; i < threads; ++i) threads_.emplace_back([this] { run(); });
  }
  ~BlockingPool() { stop(); }

  /// True once stop() began: jobs still queued should answer without doing their work.
  bool stopping() {
    std::lock_guard<std::mutex> lock(mutex_);
    return stopping_;
  }

  /// False when the queue is full (the caller answers busy).
  bool post(std::function<void()> job) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (stopping_ || jobs_.size() >= kMaxStoreQueue) return false;
    jobs_.push_back(std::move(job));
    cv_.notify_one();
    return true;
  }

  /// Runs what is queued, then joins.
  void stop() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stopping_ = true;
    }
    cv_.notify_all();
    for (auto& t : threads_) {
      if (t.joinable()) t.join();
    }
  }

 private:
  void run() {
    for (;;) {
      std::function<void()> job;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        cv_.wait(lock, [this] { return stopping_ || !jobs_.empty(); });
        if (jobs_.empty()) return;
        job = std::move(jobs_.front());
        jobs_.pop_front();
      }
      job();
    }
  }

  std::mutex mutex_;
  std::condition_variable cv_;
  std::deque<std::function<void()>> jobs_;
  bool stopping_ = false;
  std::vector<std::thread> threads_;
};

prometheus::Gauge& connections_gauge() {
  static prometheus::Gauge& gauge =
      prometheus::BuildGauge()
          .Name("gmi_http_connections")
          .Help("HTTP connections open on the gateway (gateway.max_connections caps them).")
          .Register(Metrics::instance().registry())
          .Add({});
  return gauge;
}

}  // namespace

struct Gateway::Impl : http::Handler {
  Impl(zmq::context_t& context, GatewayOptions options);

  std::optional<Response> on_head(const Head& head, std::uint64_t& body_limit) override;
  void on_request(std::shared_ptr<http::Request> request, http::Responder respond) override;
  void on_answered(const Head* head, const Response& response,
                   Clock::duration took) override;

  bool authorized(const Head& head) const;
  void ready(http::Responder respond);
  void post_query(const std::shared_ptr<http::Request>& request, const http::Responder& respond);
  void post_upload(const std::shared_ptr<http::Request>& request, const http::Responder& respond);
  void get_job(const http::Request& request, const http::Responder& respond);
  void get_models(const http::Responder& respond);
  void get_model(const http::Request& request, const http::Responder& respond);
  /// Runs fn on the store pool and answers with what it returns (or the error it throws).
  void on_store(const http::Responder& respond, std::function<Response()> fn);
  /// Sends a submission; answers 202 with the job's URL under `url_prefix`.
  void submit(json header, AsyncBrokerClient::Frames frames, std::string url_prefix,
              const http::Responder& respond);

  /// Calls fn(store) under the store mutex, opening the store on first use and again after
  /// an I/O failure. Blocks: runs on the store pool only.
  template <typename Fn>
  auto with_store(Fn&& fn) {
    std::lock_guard<std::mutex> lock(store_mutex);
    if (options.spec_store_uri.empty()) {
      throw HttpError(503, "unavailable", "this gateway has no spec store configured");
    }
    if (!store) {
      // One failed open does not make every queued read wait out its own connect timeout.
      if (Clock::now() - store_failed_at < kStoreRetryAfter) {
        throw IoError("the spec store " + options.spec_store_uri + " is unreachable: " + store_error);
      }
      try {
        store = open_spec_store(options.spec_store_uri);
      } catch (const IoError& e) {
        store_failed_at = Clock::now();
        store_error = e.what();
        throw;
      }
    }
    try {
      return fn(*store);
    } catch (const IoError&) {
      store.reset();
      throw;
    }
  }

  GatewayOptions options;
  // Idempotency keys are scoped to the credential that sent them (none: one scope).
  std::string key_scope;

  std::mutex store_mutex;
  std::unique_ptr<SpecStore> store;
  Clock::time_point store_failed_at{};  ///< last failed open (see kStoreRetryAfter)
  std::string store_error;
  std::optional<std::uint64_t> models_generation;  ///< of models_cache
  json models_cache;

  std::mutex ready_mutex;
  Clock::time_point ready_checked{};
  bool ready_known = false;
  bool ready_pinging = false;
  std::string ready_reason;
  std::vector<http::Responder> ready_waiters;

  // Destroyed in reverse order: what holds responders (the broker client, the store pool)
  // goes before the server, whose sessions they hold. Gateway::stop() stops them in the
  // other order (the server first: no new request).
  std::unique_ptr<http::Server> server;
  std::unique_ptr<AsyncBrokerClient> broker;
  std::unique_ptr<BlockingPool> store_pool;
};

Gateway::Impl::Impl(zmq::context_t& context, GatewayOptions opts) : options(std::move(opts)) {
  if (!options.api_key.empty()) key_scope = "key:" + detail::sha256_hex(options.api_key).substr(0, 16);
  if (options.threads < 1) {
    throw InputError("gateway threads must be at least 1, got " + std::to_string(options.threads));
  }
  if (options.max_wait_ms < 0) {
    throw InputError("gateway max_wait_ms must be >= 0, got " +
                     std::to_string(options.max_wait_ms));
  }
  if (options.max_query_bytes == 0 || options.max_upload_bytes == 0) {
    throw InputError("gateway body limits must be positive");
  }
  if (options.max_connections < 1 || options.header_timeout_ms < 1 || options.body_timeout_ms < 1) {
    throw InputError("gateway max_connections, header_timeout_ms and body_timeout_ms must be positive");
  }
  // A bad broker endpoint or CURVE key is a configuration error: said at start-up, not as a
  // 500 on the first request.
  broker = std::make_unique<AsyncBrokerClient>(context, options.broker);
  if (!options.spec_store_uri.empty()) {
    try {
      store = open_spec_store(options.spec_store_uri);
    } catch (const IoError& e) {
      // Redis may come up after the gateway; GET /v1/models opens the store on demand.
      log::warn("spec store not reachable yet", {{"store", options.spec_store_uri},
                                                  {"error", e.what()}});
    }
  }
  store_pool = std::make_unique<BlockingPool>(2);

  http::ServerOptions so;
  so.host = options.host;
  so.port = options.port;
  so.threads = options.threads;
  so.max_connections = static_cast<std::size_t>(options.max_connections);
  so.header_timeout = std::chrono::milliseconds(options.header_timeout_ms);
  so.body_timeout = std::chrono::milliseconds(options.body_timeout_ms);
  try {
    server = std::make_unique<http::Server>(so, *this);
  } catch (const IoError& e) {
    throw IoError("cannot listen on " + options.host + ":" + std::to_string(options.port) +
                  " for the HTTP gateway (port taken?): " + e.what());
  }
  connections_gauge();  // exported at 0 from the start
}

bool Gateway::Impl::authorized(const Head& head) const {
  if (options.api_key.empty()) return true;
  bool ok = false;
  if (head.has_header("X-API-Key")) ok |= same_key(options.api_key, head.header("X-API-Key"));
  if (head.has_header("Authorization")) {
    // "Bearer KEY", the scheme name in any case (RFC 7235).
    const std::string auth = head.header("Authorization");
    constexpr std::string_view kBearer = "bearer ";
    const auto lower_eq = [](char want, char got) {
      return want == std::tolower(static_cast<unsigned char>(got));
    };
    if (auth.size() > kBearer.size() &&
        std::equal(kBearer.begin(), kBearer.end(), auth.begin(), lower_eq)) {
      std::string token = auth.substr(kBearer.size());
      token.erase(0, token.find_first_not_of(' '));
      ok |= same_key(options.api_key, token);
    }
  }
  return ok;
}

std::optional<Response> Gateway::Impl::on_head(const Head& head, std::uint64_t& body_limit) {
  body_limit = kMaxIgnoredBody;
  const auto route = route_of(head.path);
  const bool api_path = head.path == "/v1" || head.path.rfind("/v1/", 0) == 0;
  if (!route) {
    // Under /v1/, a caller without the key is not told which routes exist.
    if (api_path && !authorized(head)) {
      return http::error_response(401, "unauthorized", "missing or wrong API key (X-API-Key or Bearer)");
    }
    return http::error_response(404, "not_found", "no route for " + head.method + " " + head.path);
  }
  // The key is checked before anything else, and before any body is read.
  if (route->api && !authorized(head)) {
    return http::error_response(401, "unauthorized", "missing or wrong API key (X-API-Key or Bearer)");
  }
  const bool get = head.method == "GET" || head.method == "HEAD";
  const bool allowed = route->allow == "POST" ? head.method == "POST" : get;
  if (!allowed) {
    Response r = http::error_response(405, "method_not_allowed",
                                      head.method + " is not allowed on " + route->label +
                                          " (allowed: " + route->allow + ")");
    r.headers.emplace_back("Allow", route->allow);
    return r;
  }
  // Probes and metrics are answered here, on the connection's thread, with no queue to wait in.
  if (route->label == "/healthz") return text_response(200, "ok\n");
  if (route->label == "/metrics") {
    connections_gauge().Set(static_cast<double>(server->connections()));
    return text_response(200, Metrics::instance().serialize(), "text/plain; version=0.0.4");
  }
  try {
    if (route->label == "/v1/queries" && head.method == "POST") {
      const std::string type = head.header("Content-Type");
      const bool multipart = http::multipart_boundary(type).has_value();
      if (!multipart && http::is_multipart(type)) {
        throw HttpError(415, "unsupported_media_type",
                        "send the image as the raw body or as multipart/form-data, not " + type);
      }
      body_limit = options.max_query_bytes + (multipart ? kMultipartSlack : 0);
    } else if (route->label == "/v1/models/{id}/uploads") {
      validate_model_id(path_segment(head.path, 2));
      if (!http::multipart_boundary(head.header("Content-Type"))) {
        throw HttpError(415, "unsupported_media_type",
                        "an upload must be multipart/form-data (a \"manifest\" part and one part "
                        "per image)");
      }
      body_limit = options.max_upload_bytes + kMultipartSlack;
    }
  } catch (...) {
    return response_for(std::current_exception(), &head);
  }
  return std::nullopt;
}

void Gateway::Impl::on_request(std::shared_ptr<http::Request> request, http::Responder respond) {
  const Head& head = request->head;
  try {
    const auto route = route_of(head.path);  // on_head let only our routes through
    const std::string& label = route->label;
    if (label == "/readyz") return ready(std::move(respond));
    if (label == "/v1/queries") return post_query(request, respond);
    if (label == "/v1/models/{id}/uploads") return post_upload(request, respond);
    if (label == "/v1/queries/{id}" || label == "/v1/jobs/{id}") return get_job(*request, respond);
    if (label == "/v1/models") return get_models(respond);
    if (label == "/v1/models/{id}") return get_model(*request, respond);
    respond(http::error_response(404, "not_found", "no route for " + head.method + " " + head.path));
  } catch (...) {
    respond(response_for(std::current_exception(), &head));
  }
}

void Gateway::Impl::on_answered(const Head* head, const Response& res, Clock::duration took) {
  const auto route = head ? route_of(head->path) : std::nullopt;
  const std::string label = route ? route->label : "unmatched";
  Metrics::instance()
      .http_requests_total.Add({{"route", label}, {"code", std::to_string(res.status)}})
      .Increment();
  const bool server_error = res.status >= 500;
  const auto level = server_error ? log::Level::kWarn : log::Level::kDebug;
  if (!log::enabled(level)) return;
  json fields{{"method", head ? head->method : ""},
              {"path", head ? head->path : ""},
              {"status", res.status},
              {"duration_ms", std::chrono::duration<double, std::milli>(took).count()}};
  if (server_error && res.content_type == "application/json") {
    json body = json::parse(res.body, nullptr, /*allow_exceptions=*/false);
    if (body.is_object() && body.contains("error")) fields["error"] = body["error"];
  }
  log::write(level, "http request", fields);
}

void Gateway::Impl::ready(http::Responder respond) {
  const auto answer = [](const std::string& reason) {
    return reason.empty() ? text_response(200, "ready\n") : text_response(503, reason + "\n");
  };
  {
    std::lock_guard<std::mutex> lock(ready_mutex);
    if (ready_known && Clock::now() - ready_checked < kReadyCacheFor) {
      respond(answer(ready_reason));
      return;
    }
    ready_waiters.push_back(std::move(respond));
    if (ready_pinging) return;  // the ping in flight answers this one too
    ready_pinging = true;
  }
  const std::string endpoint = options.broker.endpoint;
  broker->submit(
      wire::header("ping"), {}, std::chrono::milliseconds(std::min(kReadyPingMs, options.broker.timeout_ms)),
      [this, endpoint, answer](std::exception_ptr error, json reply) {
        std::string reason;
        if (error) {
          try {
            std::rethrow_exception(error);
          } catch (const BrokerRefusal& e) {
            reason = "the broker at " + endpoint + " refuses work: " + e.what();
          } catch (const std::exception&) {
            reason = "the broker at " + endpoint + " does not answer";
          }
        } else if (reply.value("type", "") != "pong") {
          reason = "the broker at " + endpoint + " answered a ping with \"" +
                   reply.value("type", "") + "\"";
        } else if (const std::string why = reply.value("not_ready", std::string()); !why.empty()) {
          reason = "the broker at " + endpoint + " is not ready: " + why;
        }
        std::vector<http::Responder> waiters;
        {
          std::lock_guard<std::mutex> lock(ready_mutex);
          ready_known = true;
          ready_checked = Clock::now();
          ready_reason = reason;
          ready_pinging = false;
          waiters.swap(ready_waiters);
        }
        for (auto& w : waiters) w(answer(reason));
      });
}

void Gateway::Impl::submit(json header, AsyncBrokerClient::Frames frames, std::string url_prefix,
                           const http::Responder& respond) {
  const std::string endpoint = options.broker.endpoint;
  broker->submit(std::move(header), std::move(frames),
                 std::chrono::milliseconds(options.broker.timeout_ms),
                 [respond, url_prefix = std::move(url_prefix), endpoint](std::exception_ptr error,
                                                                        json reply) {
                   if (error) return respond(response_for(error, nullptr));
                   if (reply.value("type", "") != "accepted" || !reply.contains("job_id")) {
                     return respond(unexpected_reply(endpoint, "a submission", reply, "accepted"));
                   }
                   const std::string id = reply["job_id"].get<std::string>();
                   const std::string url = url_prefix + id;
                   Response r = json_response(202, json{{"job_id", id}, {"status_url", url}});
                   r.headers.emplace_back("Location", url);
                   respond(std::move(r));
                 });
}

void Gateway::Impl::post_query(const std::shared_ptr<http::Request>& request,
                               const http::Responder& respond) {
  const Head& head = request->head;
  const auto boundary = http::multipart_boundary(head.header("Content-Type"));
  std::vector<http::FormPart> parts;
  if (boundary) parts = http::parse_multipart(request->body, *boundary, kMaxParts);
  const auto find_part = [&](std::string_view name) -> const http::FormPart* {
    for (const auto& p : parts) {
      if (p.name == name) return &p;
    }
    return nullptr;
  };

  // Parameters: the query string, or (for HTML forms) fields of a multipart body.
  const Params query(head.query);
  const auto param = [&](const char* name) -> std::optional<std::string> {
    if (auto v = query.get(name)) return v;
    if (const auto* p = find_part(name); p && p->filename.empty()) return std::string(p->content);
    return std::nullopt;
  };
  QueryRequest q;
  q.idempotency_key = idempotency_key(head);
  q.idempotency_scope = key_scope;
  if (auto top = param("top")) q.top = static_cast<int>(parse_int(*top, "top", 1, kMaxTop));
  if (auto scorer = param("scorer")) q.scorer = *scorer;
  if (auto prompt = param("prompt")) q.prompt = *prompt;
  if (auto d = param("deadline_ms")) q.deadline_ms = parse_int(*d, "deadline_ms", 1, kMaxDeadlineMs);
  if (q.scorer.size() > kMaxScorerChars) {
    throw HttpError(400, "bad_request",
                    "scorer is longer than " + std::to_string(kMaxScorerChars) + " characters");
  }
  if (q.prompt.size() > kMaxPromptChars) {
    throw HttpError(400, "bad_request",
                    "prompt is longer than " + std::to_string(kMaxPromptChars) + " characters");
  }

  std::string_view image = request->body;
  if (boundary) {
    const auto* part = find_part("image");
    if (!part) throw HttpError(400, "bad_request", "the multipart body has no part named \"image\"");
    if (part->content.size() > options.max_query_bytes) {
      throw HttpError(413, "too_large",
                      "the image is larger than " + std::to_string(options.max_query_bytes) +
                          " bytes");
    }
    image = part->content;
  }
  if (image.empty()) {
    throw HttpError(400, "bad_request", "the image is empty: send its bytes as the request body");
  }
  // The image goes to the broker as a view into the request's body, which the frames keep.
  submit(submit_query_header(q), AsyncBrokerClient::Frames{{image}, request}, "/v1/queries/",
         respond);
}

void Gateway::Impl::post_upload(const std::shared_ptr<http::Request>& request,
                                const http::Responder& respond) {
  const Head& head = request->head;
  UploadRequest up;
  up.model_id = path_segment(head.path, 2);
  validate_model_id(up.model_id);
  up.idempotency_key = idempotency_key(head);
  up.idempotency_scope = key_scope;
  const auto boundary = http::multipart_boundary(head.header("Content-Type"));
  const auto parts = http::parse_multipart(request->body, *boundary, kMaxParts);  // on_head checked it
  const auto find_part = [&](std::string_view name) -> const http::FormPart* {
    for (const auto& p : parts) {
      if (p.name == name) return &p;
    }
    return nullptr;
  };

  const auto* manifest = find_part("manifest");
  if (!manifest) throw HttpError(400, "bad_request", "the upload has no part named \"manifest\"");
  const auto lines = parse_manifest(std::string(manifest->content));

  if (const auto* d = find_part("downloads")) {
    const std::string text(d->content);
    char* end = nullptr;
    const double v = std::strtod(text.c_str(), &end);
    if (text.empty() || *end != '\0' || !std::isfinite(v) || v < 0) {
      throw HttpError(400, "bad_request", "downloads must be a non-negative number, got \"" + text + "\"");
    }
    up.downloads = v;
  }
  if (const auto* c = find_part("card")) {
    if (c->content.size() > kMaxCardChars) {
      throw HttpError(400, "bad_request",
                      "card is longer than " + std::to_string(kMaxCardChars) + " characters");
    }
    up.card = std::string(c->content);
  }

  // Image parts are found by part name or by file name (curl -F 'x=@a.jpg' names the part x
  // and the file a.jpg). Fields are not images.
  const auto is_field = [](const http::FormPart& p) {
    return p.name == "manifest" || p.name == "downloads" || p.name == "card";
  };
  std::vector<bool> used(parts.size(), false);
  AsyncBrokerClient::Frames frames;
  for (const auto& entry : lines) {
    std::optional<std::size_t> found;
    for (std::size_t i = 0; i < parts.size() && !found; ++i) {
      if (!is_field(parts[i]) && parts[i].name == entry.image) found = i;
    }
    for (std::size_t i = 0; i < parts.size() && !found; ++i) {
      if (!is_field(parts[i]) && parts[i].filename == entry.image) found = i;
    }
    if (!found) {
      throw HttpError(400, "bad_request",
                      "manifest line " + std::to_string(entry.line) + " names image \"" +
                          entry.image + "\" but no part of the upload is named so");
    }
    if (parts[*found].content.empty()) {
      throw HttpError(400, "bad_request", "the image part \"" + entry.image + "\" is empty");
    }
    used[*found] = true;
    frames.views.push_back(parts[*found].content);  // a view: the body is not copied
    up.prompts.push_back(entry.prompt);
  }
  for (std::size_t i = 0; i < parts.size(); ++i) {
    const auto& p = parts[i];
    if (!used[i] && !is_field(p)) {
      // Most likely a typo in the manifest or in a part name: refuse rather than ignore.
      throw HttpError(400, "bad_request",
                      "the part \"" + (p.filename.empty() ? p.name : p.filename) +
                          "\" is not named by the manifest");
    }
  }
  if (auto d = Params(head.query).get("deadline_ms")) {
    up.deadline_ms = parse_int(*d, "deadline_ms", 1, kMaxDeadlineMs);
  }
  frames.owner = request;
  submit(submit_upload_header(up), std::move(frames), "/v1/jobs/", respond);
}

void Gateway::Impl::get_job(const http::Request& request, const http::Responder& respond) {
  const std::string id = path_segment(request.head.path, 2);
  if (!wire::is_id(id)) {
    throw HttpError(400, "bad_request",
                    "job ids are 32 lower-case hexadecimal characters, got \"" + id + "\"");
  }
  int wait_ms = 0;
  if (auto w = Params(request.head.query).get("wait_ms")) {
    const long long v = parse_int(*w, "wait_ms", 0, std::numeric_limits<int>::max());
    wait_ms = static_cast<int>(std::min<long long>(v, options.max_wait_ms));
  }
  json h = wire::header("get_job");
  h["job_id"] = id;
  if (wait_ms > 0) h["wait_ms"] = wait_ms;
  const std::string endpoint = options.broker.endpoint;
  // A long-poll is a request in flight on the broker socket: it holds no thread.
  broker->submit(std::move(h), {}, std::chrono::milliseconds(wait_ms + options.broker.timeout_ms),
                 [respond, endpoint](std::exception_ptr error, json reply) {
                   if (error) return respond(response_for(error, nullptr));
                   if (reply.value("type", "") != "job" || !reply.contains("job")) {
                     return respond(unexpected_reply(endpoint, "get_job", reply, "job"));
                   }
                   respond(json_response(200, reply["job"]));
                 },
                 /*interruptible=*/wait_ms > 0);
}

void Gateway::Impl::on_store(const http::Responder& respond, std::function<Response()> fn) {
  const auto queued_at = Clock::now();
  const bool queued = store_pool->post([this, respond, queued_at, fn = std::move(fn)] {
    // A read that waited too long (the store is slow or unreachable), or one still queued
    // when the gateway stops, is answered without being done.
    const bool stale = Clock::now() - queued_at > kMaxStoreWait;
    if (stale || store_pool->stopping()) {
      Response r = http::error_response(503, "unavailable",
                                        stale ? "the spec store is slow to answer; retry"
                                              : "the gateway is shutting down; retry");
      r.headers.emplace_back("Retry-After", "2");
      return respond(std::move(r));
    }
    try {
      respond(fn());
    } catch (...) {
      respond(response_for(std::current_exception(), nullptr));
    }
  });
  if (!queued) {
    Response r = http::error_response(503, "busy", "too many spec-store reads are waiting; retry");
    r.headers.emplace_back("Retry-After", "1");
    respond(std::move(r));
  }
}

void Gateway::Impl::get_models(const http::Responder& respond) {
  on_store(respond, [this] {
    return json_response(200, with_store([this](SpecStore& s) {
      // The listing reads every spec; reuse it until the store's generation changes.
      const std::uint64_t generation = s.generation();
      if (models_generation && *models_generation == generation) return models_cache;
      json models = json::array();
      for (const auto& id : s.list()) {  // list() is sorted
        if (auto spec = s.get(id)) models.push_back(spec_metadata(*spec));
      }
      models_cache = json{{"models", std::move(models)}};
      models_generation = generation;
      return models_cache;
    }));
  });
}

void Gateway::Impl::get_model(const http::Request& request, const http::Responder& respond) {
  std::string id = path_segment(request.head.path, 2);
  validate_model_id(id);
  on_store(respond, [this, id] {
    auto meta = with_store([&](SpecStore& s) -> std::optional<json> {
      if (auto spec = s.get(id)) return spec_metadata(*spec);
      return std::nullopt;
    });
    if (!meta) throw HttpError(404, "not_found", "no model \"" + id + "\" in the spec store");
    return json_response(200, *meta);
  });
}

Gateway::Gateway(zmq::context_t& context, GatewayOptions options)
    : impl_(std::make_unique<Impl>(context, std::move(options))) {}

Gateway::~Gateway() {
  try {
    stop();
  } catch (...) {
    // Nothing useful to do in a destructor.
  }
}

int Gateway::port() const { return impl_->server->port(); }

void Gateway::start() {
  impl_->server->start();
  log::info("gateway listening", {{"host", impl_->options.host},
                                  {"port", impl_->server->port()},
                                  {"broker", impl_->options.broker.endpoint},
                                  {"api_key", !impl_->options.api_key.empty()},
                                  {"max_connections", impl_->options.max_connections}});
}

void Gateway::stop() {
  // No new request first. Long-polls are answered at once (503 with Retry-After: the client
  // polls again, through another replica), submissions in flight get their answers; then the
  // broker client answers what is still open and the store pool finishes its reads.
  impl_->server->stop([this] {
    impl_->broker->interrupt_waits("the gateway is shutting down; poll again");
  });
  impl_->broker->stop();
  impl_->store_pool->stop();
}

}  // namespace gmi
