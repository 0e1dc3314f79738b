// The HTTP gateway (see gateway.hpp and schemas/openapi.yaml).
//
// Notes on cpp-httplib 0.11.4 that shape this file:
//   - POST routes use content-reader handlers. They see the request before its body is read,
//     so size limits and the API key are checked first, bodies are counted as they arrive
//     (chunked ones too: httplib applies payload_max_length only to Content-Length), and
//     httplib's own form-urlencoded rule (413 above 8 KiB) never meets a raw image that
//     `curl --data-binary` labelled application/x-www-form-urlencoded.
//   - httplib keeps a connection open whatever the response says, so a request answered
//     without reading its body would leave that body to be parsed as the next request. A
//     refused body is therefore drained (bounded); where it cannot be, the response carries
//     "Connection: close" so that the client drops the connection.
//   - The error handler runs for every status >= 400; it fills in the JSON body only where a
//     handler did not, and turns httplib's "no route" 404 into 405 (or 401) where the path
//     is one of ours.
#include "gmi/gateway.hpp"

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <functional>
#include <limits>
#include <mutex>
#include <optional>
#include <sstream>
#include <string_view>
#include <utility>
#include <vector>

#include "digest.hpp"
#include "gmi/log.hpp"
#include "gmi/spec.hpp"
#include "gmi/spec_store.hpp"

// Last: on Linux httplib.h pulls in <resolv.h>, whose `_res` macro breaks Eigen's headers
// when they come after it.
#include <httplib.h>

namespace gmi {
namespace {

using nlohmann::json;
using Clock = std::chrono::steady_clock;

// Multipart framing (boundaries, part headers) on top of the payload limits.
constexpr std::size_t kMultipartSlack = 64u << 10;
// Parts per multipart body: bounds the bookkeeping a body of tiny parts could cost.
constexpr std::size_t kMaxParts = 100000;
// The wire protocol's limits (core/service/src/wire.cpp), checked here to answer with a clear 400.
constexpr std::size_t kMaxScorerChars = 32;
constexpr std::size_t kMaxPromptChars = 4096;
constexpr std::size_t kMaxCardChars = 65536;
constexpr int kMaxTop = 1000;
constexpr long long kMaxDeadlineMs = 86400000;  // a day, as the broker allows
// How long a /readyz answer is reused, and how long its ping may take.
constexpr auto kReadyCacheFor = std::chrono::seconds(1);
constexpr int kReadyPingMs = 1000;

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


// A client's Idempotency-Key header: the same key names the same job (a retried POST whose
// answer was lost does not make a second one).
std::string idempotency_key(const httplib::Request& req) {
  std::string key = req.get_header_value("Idempotency-Key");
  if (key.size() > 128) {
    throw HttpError(400, "bad_request", "Idempotency-Key is longer than 128 characters");
  }
  return key;
}

// Why a request's framing is unacceptable ("" when it is fine): several Content-Length
// values that differ, one that is not a decimal number, a transfer coding other than
// chunked, or both a Transfer-Encoding and a Content-Length.
std::string framing_error(const httplib::Request& req) {
  const std::size_t lengths = req.get_header_value_count("Content-Length");
  std::string first;
  for (std::size_t i = 0; i < lengths; ++i) {
    const std::string v = req.get_header_value("Content-Length", i);
    if (v.empty() || v.size() > 19 ||
        !std::all_of(v.begin(), v.end(), [](char c) { return c >= '0' && c <= '9'; })) {
      return "Content-Length \"" + v.substr(0, 32) + "\" is not a non-negative decimal number";
    }
    if (i == 0) first = v;
    else if (v != first) return "the request has Content-Length " + first + " and " + v + ": which is it?";
  }
  const std::size_t codings = req.get_header_value_count("Transfer-Encoding");
  for (std::size_t i = 0; i < codings; ++i) {
    std::string v = req.get_header_value("Transfer-Encoding", i);
    std::transform(v.begin(), v.end(), v.begin(), [](unsigned char c) { return std::tolower(c); });
    if (v != "chunked") {
      return "Transfer-Encoding \"" + v.substr(0, 32) + "\" is not supported (only chunked)";
    }
  }
  if (codings > 0 && lengths > 0) return "the request has both Transfer-Encoding and Content-Length";
  return {};
}

void set_json(httplib::Response& res, int status, const json& body) {
  res.status = status;
  res.set_content(body.dump(-1, ' ', false, json::error_handler_t::replace), "application/json");
}

void set_error(httplib::Response& res, int status, const std::string& code,
               const std::string& message) {
  set_json(res, status, json{{"error", {{"code", code}, {"message", message}}}});
}

const char* code_for_status(int status) {
  switch (status) {
    case 400: return "bad_request";
    case 401: return "unauthorized";
    case 404: return "not_found";
    case 405: return "method_not_allowed";
    case 408: return "timeout";
    case 413: return "too_large";
    case 414: return "uri_too_long";
    case 415: return "unsupported_media_type";
    case 416: return "range_not_satisfiable";
    case 501: return "not_implemented";
    case 422: return "conflict";
    case 503: return "unavailable";
    default: return status >= 500 ? "internal" : "bad_request";
  }
}

const char* message_for_status(int status) {
  switch (status) {
    case 400: return "malformed HTTP request";
    case 404: return "no such route";
    case 413: return "the request body is larger than this gateway accepts";
    case 414: return "the request URI is too long";
    default: return status >= 500 ? "internal error" : "the request was refused";
  }
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

bool is_api_path(const std::string& path) { return path == "/v1" || path.rfind("/v1/", 0) == 0; }

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

std::optional<std::size_t> content_length(const httplib::Request& req) {
  if (!req.has_header("Content-Length")) return std::nullopt;
  const std::string text = req.get_header_value("Content-Length");
  char* end = nullptr;
  errno = 0;
  const unsigned long long v = std::strtoull(text.c_str(), &end, 10);
  if (text.empty() || *end != '\0' || errno == ERANGE) return std::nullopt;  // httplib refuses it
  return static_cast<std::size_t>(v);
}

/// One part of a multipart/form-data body.
struct Part {
  std::string name;
  std::string filename;
  std::string content;
};

/// A request body as read: raw bytes, or the parts of a multipart/form-data body.
struct Body {
  std::string raw;
  std::vector<Part> parts;

  const Part* find(const std::string& name) const {
    for (const auto& p : parts) {
      if (p.name == name) return &p;
    }
    return nullptr;
  }
};

// Reads and discards the rest of a refused request's body, up to `cap` bytes, so that the
// connection stays usable; where it cannot, asks the client to close the connection.
void drain(const httplib::Request& req, httplib::Response& res,
           const httplib::ContentReader& reader, std::size_t cap) {
  std::size_t seen = 0;
  auto discard = [&](const char*, std::size_t n) {
    seen += n;
    return seen <= cap;
  };
  const bool ok = req.is_multipart_form_data()
                      ? reader([](const httplib::MultipartFormData&) { return true; }, discard)
                      : reader(discard);
  // 413 here: httplib found the Content-Length over its own limit and skipped the body.
  if (!ok && res.status != 413) res.set_header("Connection", "close");
}

// Reads the body with a limit of `limit` bytes; HttpError 413 above it, 400 when malformed.
Body read_body(const httplib::Request& req, httplib::Response& res,
               const httplib::ContentReader& reader, std::size_t limit, std::size_t drain_cap) {
  const auto too_large = [&] {
    return HttpError(413, "too_large",
                     "the request body is larger than " + std::to_string(limit) + " bytes");
  };
  if (auto len = content_length(req); len && *len > limit) {
    drain(req, res, reader, drain_cap);
    throw too_large();
  }
  Body body;
  std::size_t total = 0;
  bool over = false, too_many = false;
  bool ok = false;
  if (req.is_multipart_form_data()) {
    ok = reader(
        [&](const httplib::MultipartFormData& file) {
          if (body.parts.size() >= kMaxParts) {
            too_many = true;
            return false;
          }
          body.parts.push_back(Part{file.name, file.filename, {}});
          return true;
        },
        [&](const char* data, std::size_t n) {
          total += n;
          if (total > limit) {
            over = true;
            return false;
          }
          body.parts.back().content.append(data, n);
          return true;
        });
  } else {
    ok = reader([&](const char* data, std::size_t n) {
      total += n;
      if (total > limit) {
        over = true;
        return false;
      }
      body.raw.append(data, n);
      return true;
    });
  }
  if (!ok) {
    // httplib skipped (and so drained) a Content-Length body over its own limit; in every
    // other case the rest of the body is still on the connection.
    const bool drained_by_httplib = res.status == 413 && !over;
    if (!drained_by_httplib) res.set_header("Connection", "close");
    if (over || res.status == 413) throw too_large();
    if (too_many) {
      throw HttpError(400, "bad_request",
                      "the multipart body has more than " + std::to_string(kMaxParts) + " parts");
    }
    throw HttpError(400, "bad_request",
                    req.is_multipart_form_data()
                        ? "the multipart/form-data body is malformed or incomplete"
                        : "the request body is incomplete");
  }
  return body;
}

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

// Start time of the request this thread is serving (httplib runs a request, from routing
// to its log callback, on one thread).
struct RequestClock {
  const httplib::Request* request = nullptr;
  Clock::time_point start;
};
thread_local RequestClock tl_clock;

}  // namespace

struct Gateway::Impl {
  Impl(zmq::context_t& context, GatewayOptions options);

  /// A BrokerClient borrowed from the pool for one request (zmq sockets stay with one
  /// thread at a time; the pool's mutex hands them over safely).
  class Lease {
   public:
    Lease(Impl& impl, std::unique_ptr<BrokerClient> client)
        : impl_(impl), client_(std::move(client)) {}
    ~Lease() {
      std::lock_guard<std::mutex> lock(impl_.pool_mutex);
      impl_.pool.push_back(std::move(client_));
    }
    Lease(const Lease&) = delete;
    Lease& operator=(const Lease&) = delete;
    BrokerClient* operator->() { return client_.get(); }

   private:
    Impl& impl_;
    std::unique_ptr<BrokerClient> client_;
  };

  Lease lease() {
    {
      std::lock_guard<std::mutex> lock(pool_mutex);
      if (!pool.empty()) {
        auto client = std::move(pool.back());
        pool.pop_back();
        return Lease(*this, std::move(client));
      }
    }
    return Lease(*this, std::make_unique<BrokerClient>(context, options.broker));
  }

  bool authorized(const httplib::Request& req) const;
  std::string not_ready_reason();
  void register_routes();
  void on_error(const httplib::Request& req, httplib::Response& res);
  void on_logged(const httplib::Request& req, const httplib::Response& res);
  /// Runs a handler, turning every exception into the JSON error it stands for.
  void guarded(const httplib::Request& req, httplib::Response& res,
               const std::function<void()>& handler);

  std::size_t body_drain_cap() const;
  void require_key(const httplib::Request& req, httplib::Response& res,
                   const httplib::ContentReader& reader, std::size_t drain_cap);
  void post_query(const httplib::Request& req, httplib::Response& res,
                  const httplib::ContentReader& reader);
  void post_upload(const httplib::Request& req, httplib::Response& res,
                   const httplib::ContentReader& reader);
  void get_job(const httplib::Request& req, httplib::Response& res);
  void get_models(httplib::Response& res);
  void get_model(const httplib::Request& req, httplib::Response& res);

  /// Calls fn(store) under the store mutex, opening the store on first use and again after
  /// an I/O failure.
  template <typename Fn>
  auto with_store(Fn&& fn) {
    std::lock_guard<std::mutex> lock(store_mutex);
    if (options.spec_store_uri.empty()) {
      throw HttpError(503, "unavailable", "this gateway has no spec store configured");
    }
    if (!store) store = open_spec_store(options.spec_store_uri);
    try {
      return fn(*store);
    } catch (const IoError&) {
      store.reset();
      throw;
    }
  }

  zmq::context_t& context;
  GatewayOptions options;
  // Idempotency keys are scoped to the credential that sent them (none: one scope).
  std::string key_scope;

  std::mutex pool_mutex;
  std::vector<std::unique_ptr<BrokerClient>> pool;

  std::mutex store_mutex;
  std::unique_ptr<SpecStore> store;
  std::optional<std::uint64_t> models_generation;  ///< of models_cache
  json models_cache;

  std::mutex ready_mutex;
  Clock::time_point ready_checked{};
  bool ready_known = false;
  std::string ready_reason;

  // Last: destroyed first, so that no handler runs while the members above go away.
  std::unique_ptr<OpsServer> ops;
};

Gateway::Impl::Impl(zmq::context_t& ctx, GatewayOptions opts)
    : context(ctx), options(std::move(opts)) {
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
  // A bad broker endpoint or CURVE key is a configuration error: say so at start-up, not
  // as a 500 on the first request.
  pool.push_back(std::make_unique<BrokerClient>(context, options.broker));
  if (!options.spec_store_uri.empty()) {
    try {
      store = open_spec_store(options.spec_store_uri);
    } catch (const IoError& e) {
      // Redis may come up after the gateway; GET /v1/models opens the store on demand.
      log::warn("spec store not reachable yet", {{"store", options.spec_store_uri},
                                                  {"error", e.what()}});
    }
  }

  OpsServerOptions ops_options;
  ops_options.host = options.host;
  ops_options.port = options.port;
  ops_options.not_ready_reason = [this] { return not_ready_reason(); };
  try {
    ops = std::make_unique<OpsServer>(std::move(ops_options));
  } catch (const IoError&) {
    throw IoError("cannot listen on " + options.host + ":" + std::to_string(options.port) +
                  " for the HTTP gateway (port taken?)");
  }
  register_routes();
}

bool Gateway::Impl::authorized(const httplib::Request& req) const {
  if (options.api_key.empty()) return true;
  bool ok = false;
  if (req.has_header("X-API-Key")) {
    ok |= same_key(options.api_key, req.get_header_value("X-API-Key"));
  }
  if (req.has_header("Authorization")) {
    // "Bearer KEY", the scheme name in any case (RFC 7235).
    const std::string auth = req.get_header_value("Authorization");
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

std::string Gateway::Impl::not_ready_reason() {
  std::lock_guard<std::mutex> lock(ready_mutex);
  const auto now = Clock::now();
  if (ready_known && now - ready_checked < kReadyCacheFor) return ready_reason;
  std::string reason;
  try {
    auto client = lease();
    const auto broker = client->readiness(std::min(kReadyPingMs, options.broker.timeout_ms));
    if (!broker) {
      reason = "the broker at " + options.broker.endpoint + " does not answer";
    } else if (!broker->empty()) {
      reason = "the broker at " + options.broker.endpoint + " is not ready: " + *broker;
    }
  } catch (const BrokerRefusal& e) {
    reason = "the broker at " + options.broker.endpoint + " refuses work: " + e.what();
  } catch (const std::exception& e) {
    reason = std::string("cannot reach the broker: ") + e.what();
  }
  ready_known = true;
  ready_checked = Clock::now();
  ready_reason = reason;
  return reason;
}

void Gateway::Impl::guarded(const httplib::Request& req, httplib::Response& res,
                            const std::function<void()>& handler) {
  try {
    handler();
  } catch (const HttpError& e) {
    set_error(res, e.status(), e.code(), e.what());
  } catch (const BrokerRefusal& e) {
    const std::string& code = e.code();
    if (code == "bad_request") {
      set_error(res, 400, code, e.what());
    } else if (code == "too_large") {
      set_error(res, 413, code, e.what());
    } else if (code == "not_found") {
      set_error(res, 404, code, e.what());
    } else if (code == "conflict") {
      set_error(res, 422, code, e.what());
    } else if (code == "busy") {
      set_error(res, 503, code, e.what());
      res.set_header("Retry-After", "1");
    } else if (code == "unavailable") {
      set_error(res, 503, code, e.what());
      res.set_header("Retry-After", "2");
    } else {
      log::error("unknown refusal code from the broker", {{"code", code}, {"error", e.what()}});
      set_error(res, 502, "bad_gateway", e.what());
    }
  } catch (const NotFoundError& e) {
    set_error(res, 404, "not_found", e.what());
  } catch (const InputError& e) {
    set_error(res, 400, "bad_request", e.what());
  } catch (const IoError& e) {
    set_error(res, 503, "unavailable", e.what());
    res.set_header("Retry-After", "2");
  } catch (const std::exception& e) {
    log::error("request failed", {{"method", req.method}, {"path", req.path}, {"error", e.what()}});
    set_error(res, 500, "internal", "internal error");
  } catch (...) {
    log::error("request failed", {{"method", req.method}, {"path", req.path}});
    set_error(res, 500, "internal", "internal error");
  }
}

void Gateway::Impl::register_routes() {
  httplib::Server& http = ops->http();
  const std::size_t payload_max =
      std::max(options.max_query_bytes, options.max_upload_bytes) + kMultipartSlack;
  http.set_payload_max_length(payload_max);
  const auto threads = static_cast<std::size_t>(options.threads);
  http.new_task_queue = [threads] { return new httplib::ThreadPool(threads); };

  http.set_pre_routing_handler([this](const httplib::Request& req, httplib::Response& res) {
    tl_clock = RequestClock{&req, Clock::now()};
    // Message framing (RFC 9112 section 6), before any body is read: a request whose length
    // is ambiguous is refused, and its connection closed, since whatever follows it on the
    // connection cannot be told apart from its body (request smuggling).
    if (const std::string framing = framing_error(req); !framing.empty()) {
      const bool unknown_coding = framing.rfind("Transfer-Encoding", 0) == 0;
      set_error(res, unknown_coding ? 501 : 400, unknown_coding ? "not_implemented" : "bad_request", framing);
      res.set_header("Connection", "close");
      return httplib::Server::HandlerResponse::Handled;
    }
    // Requests with bodies are checked by their handlers (after draining the body) or by the
    // error handler (after httplib has read it); see the top of this file.
    const bool has_body = req.method == "POST" || req.method == "PUT" || req.method == "PATCH" ||
                          req.method == "DELETE";
    if (!has_body && is_api_path(req.path) && !authorized(req)) {
      set_error(res, 401, "unauthorized", "missing or wrong API key (X-API-Key or Bearer)");
      return httplib::Server::HandlerResponse::Handled;
    }
    return httplib::Server::HandlerResponse::Unhandled;
  });
  http.set_error_handler(httplib::Server::HandlerWithResponse(
      [this](const httplib::Request& req, httplib::Response& res) {
        on_error(req, res);
        return httplib::Server::HandlerResponse::Handled;
      }));
  http.set_exception_handler(
      [](const httplib::Request& req, httplib::Response& res, std::exception_ptr) {
        log::error("unhandled exception in an HTTP handler", {{"path", req.path}});
        set_error(res, 500, "internal", "internal error");
      });
  http.set_logger([this](const httplib::Request& req, const httplib::Response& res) {
    on_logged(req, res);
  });

  http.Post(R"(/v1/queries)", [this](const httplib::Request& req, httplib::Response& res,
                                     const httplib::ContentReader& reader) {
    guarded(req, res, [&] { post_query(req, res, reader); });
  });
  http.Post(R"(/v1/models/([^/]+)/uploads)",
            [this](const httplib::Request& req, httplib::Response& res,
                   const httplib::ContentReader& reader) {
              guarded(req, res, [&] { post_upload(req, res, reader); });
            });
  const auto job = [this](const httplib::Request& req, httplib::Response& res) {
    guarded(req, res, [&] { get_job(req, res); });
  };
  http.Get(R"(/v1/queries/([^/]+))", job);
  http.Get(R"(/v1/jobs/([^/]+))", job);
  http.Get(R"(/v1/models)", [this](const httplib::Request& req, httplib::Response& res) {
    guarded(req, res, [&] { get_models(res); });
  });
  http.Get(R"(/v1/models/([^/]+))", [this](const httplib::Request& req, httplib::Response& res) {
    guarded(req, res, [&] { get_model(req, res); });
  });
}

void Gateway::Impl::on_error(const httplib::Request& req, httplib::Response& res) {
  if (!res.body.empty()) return;  // a handler (or /readyz) already said why
  if (res.status == 404) {
    // httplib's "no handler": for one of our paths that is a wrong method (or no key).
    if (auto route = route_of(req.path)) {
      if (route->api && !authorized(req)) {
        set_error(res, 401, "unauthorized", "missing or wrong API key (X-API-Key or Bearer)");
        return;
      }
      res.set_header("Allow", route->allow);
      set_error(res, 405, "method_not_allowed",
                req.method + " is not allowed on " + route->label + " (allowed: " +
                    route->allow + ")");
      return;
    }
    set_error(res, 404, "not_found", "no route for " + req.method + " " + req.path);
    return;
  }
  set_error(res, res.status, code_for_status(res.status), message_for_status(res.status));
}

void Gateway::Impl::on_logged(const httplib::Request& req, const httplib::Response& res) {
  const auto now = Clock::now();
  const auto start = tl_clock.request == &req ? tl_clock.start : now;
  tl_clock = RequestClock{};
  const auto route = route_of(req.path);
  const std::string label = route ? route->label : "unmatched";
  Metrics::instance()
      .http_requests_total.Add({{"route", label}, {"code", std::to_string(res.status)}})
      .Increment();
  const bool server_error = res.status >= 500;
  const auto level = server_error ? log::Level::kWarn : log::Level::kDebug;
  if (!log::enabled(level)) return;
  json fields{{"method", req.method},
              {"path", req.path},
              {"status", res.status},
              {"duration_ms",
               std::chrono::duration<double, std::milli>(now - start).count()}};
  if (server_error && !res.body.empty()) {
    json body = json::parse(res.body, nullptr, /*allow_exceptions=*/false);
    if (body.is_object() && body.contains("error")) fields["error"] = body["error"];
  }
  log::write(level, "http request", fields);
}

std::size_t Gateway::Impl::body_drain_cap() const {
  return std::max(options.max_query_bytes, options.max_upload_bytes) + kMultipartSlack;
}

// A refused body is still read (up to `drain_cap`), or it would be parsed as the next request.
void Gateway::Impl::require_key(const httplib::Request& req, httplib::Response& res,
                                const httplib::ContentReader& reader, std::size_t drain_cap) {
  if (!authorized(req)) {
    drain(req, res, reader, drain_cap);
    throw HttpError(401, "unauthorized", "missing or wrong API key (X-API-Key or Bearer)");
  }
}

void Gateway::Impl::post_query(const httplib::Request& req, httplib::Response& res,
                               const httplib::ContentReader& reader) {
  const std::size_t drain_cap = body_drain_cap();
  require_key(req, res, reader, drain_cap);
  const std::string type = req.get_header_value("Content-Type");
  const bool multipart = req.is_multipart_form_data();
  if (!multipart && type.rfind("multipart/", 0) == 0) {
    drain(req, res, reader, drain_cap);
    throw HttpError(415, "unsupported_media_type",
                    "send the image as the raw body or as multipart/form-data, not " + type);
  }
  Body body = read_body(req, res, reader,
                        options.max_query_bytes + (multipart ? kMultipartSlack : 0), drain_cap);

  // Parameters: the query string, or (for HTML forms) fields of a multipart body.
  const auto param = [&](const char* name) -> std::optional<std::string> {
    if (req.has_param(name)) return req.get_param_value(name);
    if (const Part* p = body.find(name); multipart && p && p->filename.empty()) return p->content;
    return std::nullopt;
  };
  QueryRequest q;
  q.idempotency_key = idempotency_key(req);
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

  if (multipart) {
    const Part* image = body.find("image");
    if (!image) {
      throw HttpError(400, "bad_request", "the multipart body has no part named \"image\"");
    }
    if (image->content.size() > options.max_query_bytes) {
      throw HttpError(413, "too_large",
                      "the image is larger than " + std::to_string(options.max_query_bytes) +
                          " bytes");
    }
    q.image = image->content;
  } else {
    q.image = std::move(body.raw);
  }
  if (q.image.empty()) {
    throw HttpError(400, "bad_request", "the image is empty: send its bytes as the request body");
  }

  const std::string job_id = lease()->submit_query(q);
  const std::string url = "/v1/queries/" + job_id;
  res.set_header("Location", url);
  set_json(res, 202, json{{"job_id", job_id}, {"status_url", url}});
}

void Gateway::Impl::post_upload(const httplib::Request& req, httplib::Response& res,
                                const httplib::ContentReader& reader) {
  const std::size_t drain_cap = body_drain_cap();
  require_key(req, res, reader, drain_cap);
  UploadRequest up;
  up.model_id = req.matches[1].str();
  up.idempotency_key = idempotency_key(req);
  up.idempotency_scope = key_scope;
  try {
    validate_model_id(up.model_id);
  } catch (const InputError&) {
    drain(req, res, reader, drain_cap);
    throw;
  }
  if (!req.is_multipart_form_data()) {
    drain(req, res, reader, drain_cap);
    throw HttpError(415, "unsupported_media_type",
                    "an upload must be multipart/form-data (a \"manifest\" part and one part per "
                    "image)");
  }
  Body body = read_body(req, res, reader, options.max_upload_bytes + kMultipartSlack, drain_cap);

  const Part* manifest = body.find("manifest");
  if (!manifest) throw HttpError(400, "bad_request", "the upload has no part named \"manifest\"");
  const auto lines = parse_manifest(manifest->content);

  if (const Part* d = body.find("downloads")) {
    char* end = nullptr;
    const double v = std::strtod(d->content.c_str(), &end);
    if (d->content.empty() || *end != '\0' || !std::isfinite(v) || v < 0) {
      throw HttpError(400, "bad_request",
                      "downloads must be a non-negative number, got \"" + d->content + "\"");
    }
    up.downloads = v;
  }
  if (const Part* c = body.find("card")) {
    if (c->content.size() > kMaxCardChars) {
      throw HttpError(400, "bad_request",
                      "card is longer than " + std::to_string(kMaxCardChars) + " characters");
    }
    up.card = c->content;
  }

  // Image parts are found by part name or by file name (curl -F 'x=@a.jpg' names the part x
  // and the file a.jpg). Fields are not images.
  const auto is_field = [](const Part& p) {
    return p.name == "manifest" || p.name == "downloads" || p.name == "card";
  };
  std::vector<bool> used(body.parts.size(), false);
  std::vector<std::size_t> image_of(body.parts.size(), 0);  // a used part's index in up.images
  for (const auto& entry : lines) {
    std::optional<std::size_t> found;
    for (std::size_t i = 0; i < body.parts.size() && !found; ++i) {
      if (!is_field(body.parts[i]) && body.parts[i].name == entry.image) found = i;
    }
    for (std::size_t i = 0; i < body.parts.size() && !found; ++i) {
      if (!is_field(body.parts[i]) && body.parts[i].filename == entry.image) found = i;
    }
    if (!found) {
      throw HttpError(400, "bad_request",
                      "manifest line " + std::to_string(entry.line) + " names image \"" +
                          entry.image + "\" but no part of the upload is named so");
    }
    if (used[*found]) {
      up.images.push_back(up.images[image_of[*found]]);  // named twice: the one copy needed
    } else {
      if (body.parts[*found].content.empty()) {
        throw HttpError(400, "bad_request", "the image part \"" + entry.image + "\" is empty");
      }
      used[*found] = true;
      image_of[*found] = up.images.size();
      up.images.push_back(std::move(body.parts[*found].content));  // moved, not copied
    }
    up.prompts.push_back(entry.prompt);
  }
  for (std::size_t i = 0; i < body.parts.size(); ++i) {
    const Part& p = body.parts[i];
    if (!used[i] && !is_field(p)) {
      // Most likely a typo in the manifest or in a part name: refuse rather than ignore.
      throw HttpError(400, "bad_request",
                      "the part \"" + (p.filename.empty() ? p.name : p.filename) +
                          "\" is not named by the manifest");
    }
  }
  body.parts.clear();  // the images now live in `up`; do not hold them twice longer than needed
  if (req.has_param("deadline_ms")) {
    up.deadline_ms = parse_int(req.get_param_value("deadline_ms"), "deadline_ms", 1, kMaxDeadlineMs);
  }

  const std::string job_id = lease()->submit_upload(up);
  const std::string url = "/v1/jobs/" + job_id;
  res.set_header("Location", url);
  set_json(res, 202, json{{"job_id", job_id}, {"status_url", url}});
}

void Gateway::Impl::get_job(const httplib::Request& req, httplib::Response& res) {
  const std::string id = req.matches[1].str();
  if (!wire::is_id(id)) {
    throw HttpError(400, "bad_request",
                    "job ids are 32 lower-case hexadecimal characters, got \"" + id + "\"");
  }
  int wait_ms = 0;
  if (req.has_param("wait_ms")) {
    const long long v = parse_int(req.get_param_value("wait_ms"), "wait_ms", 0,
                                  std::numeric_limits<int>::max());
    wait_ms = static_cast<int>(std::min<long long>(v, options.max_wait_ms));
  }
  json job = lease()->get_job(id, wait_ms);
  set_json(res, 200, job);
}

void Gateway::Impl::get_models(httplib::Response& res) {
  json out = with_store([this](SpecStore& s) {
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
  });
  set_json(res, 200, out);
}

void Gateway::Impl::get_model(const httplib::Request& req, httplib::Response& res) {
  const std::string id = req.matches[1].str();
  validate_model_id(id);
  auto meta = with_store([&](SpecStore& s) -> std::optional<json> {
    if (auto spec = s.get(id)) return spec_metadata(*spec);
    return std::nullopt;
  });
  if (!meta) throw HttpError(404, "not_found", "no model \"" + id + "\" in the spec store");
  set_json(res, 200, *meta);
}

Gateway::Gateway(zmq::context_t& context, GatewayOptions options)
    : impl_(std::make_unique<Impl>(context, std::move(options))) {}

Gateway::~Gateway() {
  try {
    stop();
  } catch (...) {
    // Nothing useful to do in a destructor; OpsServer's own destructor tries again.
  }
}

int Gateway::port() const { return impl_->ops->port(); }

void Gateway::start() {
  impl_->ops->start();
  log::info("gateway listening", {{"host", impl_->options.host},
                                  {"port", impl_->ops->port()},
                                  {"broker", impl_->options.broker.endpoint},
                                  {"api_key", !impl_->options.api_key.empty()}});
}

void Gateway::stop() { impl_->ops->stop(); }

}  // namespace gmi
