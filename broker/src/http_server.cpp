// The gateway's event-driven HTTP/1.1 server (see http_server.hpp).
#include "http_server.hpp"

#include <sys/resource.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <limits>
#include <cctype>
#include <mutex>
#include <thread>
#include <unordered_map>

#include <boost/asio/dispatch.hpp>
#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/strand.hpp>
#include <boost/asio/write.hpp>
#include <boost/beast/core/flat_buffer.hpp>
#include <boost/beast/core/tcp_stream.hpp>
#include <boost/beast/http/error.hpp>
#include <boost/beast/http/parser.hpp>
#include <boost/beast/http/read.hpp>
#include <boost/beast/http/string_body.hpp>
#include <boost/beast/http/write.hpp>
#include <nlohmann/json.hpp>

#include "gmi/error.hpp"
#include "gmi/log.hpp"

namespace gmi::http {
namespace {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace bhttp = boost::beast::http;
using tcp = asio::ip::tcp;
using Clock = std::chrono::steady_clock;
using error_code = boost::system::error_code;

// A connection over the cap gets this long for its headers (it may only ask for a probe).
constexpr auto kOverflowHeaderTimeout = std::chrono::seconds(1);
// Connections over the cap that are still read (for probes); past it they are closed at once.
constexpr std::size_t kOverflowReserve = 64;
// After an answer that leaves a body unread: how long what the client still sends is read
// and dropped before the connection is closed.
constexpr auto kLingerFor = std::chrono::seconds(3);
// Writing one response may take this long (a client that stopped reading is cut off).
constexpr auto kWriteTimeout = std::chrono::seconds(30);
// Past its first body_timeout, a body must have averaged at least this rate: a client that
// sends one byte just inside every per-read deadline is cut off too.
constexpr double kMinBodyBytesPerSecond = 16 * 1024;
// Drained bytes after an answer go here.
constexpr std::size_t kDrainChunk = 16 * 1024;

bool iequals(std::string_view a, std::string_view b) {
  return a.size() == b.size() &&
         std::equal(a.begin(), a.end(), b.begin(), [](char x, char y) {
           return std::tolower(static_cast<unsigned char>(x)) ==
                  std::tolower(static_cast<unsigned char>(y));
         });
}

std::string_view trim(std::string_view s) {
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t')) s.remove_prefix(1);
  while (!s.empty() && (s.back() == ' ' || s.back() == '\t')) s.remove_suffix(1);
  return s;
}

bool is_probe(const std::string& path) {
  return path == "/healthz" || path == "/readyz" || path == "/metrics";
}

// A client that went away (or a stop): nothing to answer.
bool is_disconnect(const error_code& ec) {
  return ec == bhttp::error::end_of_stream || ec == asio::error::eof ||
         ec == asio::error::connection_reset || ec == asio::error::operation_aborted ||
         ec == asio::error::broken_pipe || ec == asio::error::not_connected;
}

// Why a transfer coding is not served ("" when it is plain chunked): only chunked is
// implemented, and RFC 9112 section 6.1 asks for 501 for the others.
std::string unsupported_coding(const Head& head) {
  std::string codings;
  for (const auto& [name, value] : head.fields) {
    if (!iequals(name, "Transfer-Encoding")) continue;
    if (!codings.empty()) codings += ", ";
    codings += std::string(trim(value));
  }
  if (codings.empty() || iequals(codings, "chunked")) return {};
  return "Transfer-Encoding \"" + codings.substr(0, 64) + "\" is not supported (only chunked)";
}

}  // namespace

std::string Head::header(std::string_view name) const {
  for (const auto& [n, v] : fields) {
    if (iequals(n, name)) return v;
  }
  return {};
}

bool Head::has_header(std::string_view name) const {
  return std::any_of(fields.begin(), fields.end(),
                     [&](const auto& f) { return iequals(f.first, name); });
}

Response error_response(int status, const std::string& code, const std::string& message) {
  Response r;
  r.status = status;
  r.body = nlohmann::json{{"error", {{"code", code}, {"message", message}}}}.dump(
      -1, ' ', false, nlohmann::json::error_handler_t::replace);
  return r;
}

class Session;

struct Server::Impl {
  Impl(ServerOptions o, Handler& h) : options(std::move(o)), handler(h) {
    ioc.emplace();
    // On a strand of its own: stop() closes it while an accept may be completing.
    acceptor.emplace(asio::make_strand(*ioc));
  }
  // The io_context goes first, while the rest is still here: destroying it destroys the
  // handlers it still holds, and with them the last sessions, which call forget().
  ~Impl() {
    work.reset();
    backoff.reset();
    acceptor.reset();
    ioc.reset();
  }

  void accept();
  void on_accept(error_code ec, tcp::socket socket);
  void forget(std::uint64_t id);

  ServerOptions options;
  Handler& handler;
  std::optional<asio::io_context> ioc;
  std::optional<tcp::acceptor> acceptor;
  // Keeps the threads running while no operation is pending (a stop that waits for
  // long-polls has closed the acceptor, and a waiting request has no read or write open).
  std::optional<asio::executor_work_guard<asio::io_context::executor_type>> work;
  std::optional<asio::steady_timer> backoff;  ///< after a failed accept
  Clock::time_point last_accept_warning{};
  int port = 0;
  std::vector<std::thread> threads;
  std::atomic<bool> stopping{false};
  std::atomic<std::size_t> open{0};

  std::mutex sessions_mutex;
  std::unordered_map<std::uint64_t, std::weak_ptr<Session>> sessions;
  std::uint64_t next_session = 1;
  std::mutex stop_mutex;
  bool stopped = false;
};

/// One connection: reads requests one after another, each answered before the next is read
/// (so a client that half-closes after its request still gets its answer).
class Session : public std::enable_shared_from_this<Session> {
 public:
  Session(tcp::socket socket, Server::Impl* server, bool overflow, std::uint64_t id)
      : stream_(std::move(socket)), server_(server), overflow_(overflow), id_(id) {}

  ~Session() { server_->forget(id_); }

  void start() {
    asio::dispatch(stream_.get_executor(), [self = shared_from_this()] { self->read_head(); });
  }

  /// From Server::stop(): a connection waiting for its next request is closed now; one
  /// with a request in progress closes after answering it.
  void stop() {
    asio::post(stream_.get_executor(), [self = shared_from_this()] {
      if (self->phase_ == Phase::kHead) self->stream_.cancel();
    });
  }

 private:
  enum class Phase { kHead, kBody, kHandler, kWrite, kClosing };

  const ServerOptions& options() const { return server_->options; }

  void read_head() {
    phase_ = Phase::kHead;
    if (server_->stopping) return close();
    parser_.emplace();
    parser_->header_limit(static_cast<std::uint32_t>(options().header_limit));
    // Lengths are checked against the route's limit in on_head(); Beast's own default
    // (1 MB) would refuse larger bodies before the route is known.
    parser_->body_limit(std::numeric_limits<std::uint64_t>::max());
    head_ = Head{};
    stream_.expires_after(overflow_ ? std::chrono::milliseconds(kOverflowHeaderTimeout)
                                    : options().header_timeout);
    bhttp::async_read_header(stream_, buffer_, *parser_,
                             [self = shared_from_this()](error_code ec, std::size_t) {
                               self->on_head(ec);
                             });
  }

  void on_head(error_code ec) {
    started_ = Clock::now();
    if (ec == beast::error::timeout) {
      // An idle kept-alive connection just closes; one that started a request is counted
      // as a 408 (the stream closed the socket when its deadline passed: no answer can go).
      if (!parser_->got_some()) return close();
      return timed_out("the request headers did not arrive within " +
                       std::to_string(current_header_timeout().count()) + " ms");
    }
    if (is_disconnect(ec)) return close();
    if (ec == bhttp::error::header_limit) {
      return fail(431, "too_large",
                  "the request line and headers are larger than " +
                      std::to_string(options().header_limit) + " bytes");
    }
    if (ec == bhttp::error::bad_content_length) {
      return fail(400, "bad_request",
                  "Content-Length is not one non-negative decimal number (or conflicts with "
                  "another Content-Length or a Transfer-Encoding)");
    }
    if (ec == bhttp::error::bad_transfer_encoding) {
      return fail(400, "bad_request",
                  "Transfer-Encoding is repeated or comes with a Content-Length");
    }
    if (ec) return fail(400, "bad_request", "malformed HTTP request: " + ec.message());

    const auto& msg = parser_->get();
    head_.method = std::string(msg.method_string());
    head_.target = std::string(msg.target());
    const auto q = head_.target.find('?');
    head_.path = head_.target.substr(0, q);
    if (q != std::string::npos) head_.query = head_.target.substr(q + 1);
    for (const auto& f : msg) head_.fields.emplace_back(std::string(f.name_string()), std::string(f.value()));
    if (auto n = parser_->content_length()) head_.content_length = *n;
    head_.chunked = parser_->chunked();
    keep_alive_ = msg.keep_alive();
    has_head_ = true;

    if (const std::string why = unsupported_coding(head_); !why.empty()) {
      return fail(501, "not_implemented", why);
    }
    if (head_.target.empty() || head_.target.front() != '/') {
      return fail(400, "bad_request", "the request target must be a path beginning with '/'");
    }
    if (overflow_ && !is_probe(head_.path)) {
      Response r = error_response(503, "busy",
                                  "this gateway has " + std::to_string(options().max_connections) +
                                      " connections open; retry");
      r.headers.emplace_back("Retry-After", "1");
      r.close = true;
      return write(std::move(r));
    }

    std::uint64_t limit = 0;
    std::optional<Response> early;
    try {
      early = server_->handler.on_head(head_, limit);
    } catch (const std::exception& e) {
      log::error("HTTP head handler threw", {{"path", head_.path}, {"error", e.what()}});
      early = error_response(500, "internal", "internal error");
    }
    if (early) {
      // Its body, if any, is never read: the connection cannot carry another request.
      if (head_.has_body()) early->close = true;
      return write(std::move(*early));
    }
    if (head_.content_length && *head_.content_length > limit) {
      return fail(413, "too_large",
                  "the request body is larger than " + std::to_string(limit) + " bytes");
    }
    limit_ = limit;
    parser_->body_limit(limit);
    // Chunked bodies: parse every chunk the buffer holds in one step, not one per completion.
    parser_->eager(true);
    body_started_ = Clock::now();
    body_bytes_ = 0;
    phase_ = Phase::kBody;
    if (head_.has_body() && iequals(trim(head_.header("Expect")), "100-continue")) {
      // The client waits for this before it sends the body (curl does for large ones).
      static const std::string kContinue = "HTTP/1.1 100 Continue\r\n\r\n";
      stream_.expires_after(kWriteTimeout);
      asio::async_write(stream_, asio::buffer(kContinue),
                        [self = shared_from_this()](error_code ec, std::size_t) {
                          if (ec) return self->close();
                          self->read_body();
                        });
      return;
    }
    read_body();
  }

  std::chrono::milliseconds current_header_timeout() const {
    return overflow_ ? std::chrono::milliseconds(kOverflowHeaderTimeout) : options().header_timeout;
  }

  void read_body() {
    if (parser_->is_done()) return on_body();
    // A deadline per read, not for the whole body: a large upload on a slow link is fine
    // as long as it keeps coming.
    stream_.expires_after(options().body_timeout);
    bhttp::async_read_some(stream_, buffer_, *parser_,
                           [self = shared_from_this()](error_code ec, std::size_t n) {
                             self->body_bytes_ += n;
                             self->on_body_read(ec);
                           });
  }

  void on_body_read(error_code ec) {
    if (ec == bhttp::error::body_limit) {
      return fail(413, "too_large",
                  "the request body is larger than " + std::to_string(limit_) + " bytes");
    }
    if (ec == beast::error::timeout) {
      return timed_out("no part of the request body arrived for " +
                       std::to_string(options().body_timeout.count()) + " ms");
    }
    if (ec == bhttp::error::partial_message || ec == bhttp::error::end_of_stream ||
        ec == asio::error::eof) {
      return fail(400, "bad_request", "the request body is incomplete (the client stopped sending)");
    }
    if (is_disconnect(ec)) return close();
    if (ec) return fail(400, "bad_request", "malformed request body: " + ec.message());
    const double elapsed = std::chrono::duration<double>(Clock::now() - body_started_).count();
    const double grace = std::chrono::duration<double>(options().body_timeout).count();
    if (!parser_->is_done() && elapsed > grace &&
        static_cast<double>(body_bytes_) < kMinBodyBytesPerSecond * (elapsed - grace)) {
      return timed_out("the request body arrives slower than " +
                       std::to_string(static_cast<int>(kMinBodyBytesPerSecond)) +
                       " bytes/s (" + std::to_string(body_bytes_) + " bytes in " +
                       std::to_string(static_cast<int>(elapsed)) + " s)");
    }
    read_body();
  }

  void on_body() {
    phase_ = Phase::kHandler;
    stream_.expires_never();  // a long-poll may wait as long as the handler allows
    auto request = std::make_shared<Request>();
    request->head = head_;
    request->body = std::move(parser_->get().body());
    parser_.reset();
    auto once = std::make_shared<std::atomic<bool>>(false);
    // The responder keeps the session alive: while the handler waits (a long-poll), it is
    // what holds the connection.
    Responder respond = [self = shared_from_this(), once](Response r) {
      if (once->exchange(true)) return;
      asio::post(self->stream_.get_executor(),
                 [self, r = std::move(r)]() mutable { self->write(std::move(r)); });
    };
    try {
      server_->handler.on_request(std::move(request), respond);
    } catch (const std::exception& e) {
      log::error("HTTP handler threw", {{"path", head_.path}, {"error", e.what()}});
      respond(error_response(500, "internal", "internal error"));
    }
  }

  void timed_out(const std::string& message) {
    try {
      server_->handler.on_answered(has_head_ ? &head_ : nullptr,
                                   error_response(408, "timeout", message), Clock::now() - started_);
    } catch (const std::exception& e) {
      log::warn("HTTP answer hook threw", {{"error", e.what()}});
    }
    close();
  }

  // An answer decided here; the connection is closed after it (the rest of the stream
  // cannot be trusted to start a new request).
  void fail(int status, const std::string& code, const std::string& message) {
    Response r = error_response(status, code, message);
    r.close = true;
    write(std::move(r));
  }

  void write(Response r) {
    phase_ = Phase::kWrite;
    const bool close_after = r.close || !keep_alive_ || server_->stopping || overflow_;
    try {
      server_->handler.on_answered(has_head_ ? &head_ : nullptr, r, Clock::now() - started_);
    } catch (const std::exception& e) {
      log::warn("HTTP answer hook threw", {{"error", e.what()}});
    }
    auto res = std::make_shared<bhttp::response<bhttp::string_body>>(
        static_cast<bhttp::status>(r.status), 11);
    res->set(bhttp::field::server, "gmi");
    if (!r.content_type.empty()) res->set(bhttp::field::content_type, r.content_type);
    for (auto& [name, value] : r.headers) res->set(name, value);
    res->keep_alive(!close_after);
    const std::size_t size = r.body.size();
    if (head_.method == "HEAD") {
      res->content_length(size);  // the length a GET would have, and no body
    } else {
      res->body() = std::move(r.body);
      res->prepare_payload();
    }
    stream_.expires_after(kWriteTimeout);
    bhttp::async_write(stream_, *res,
                       [self = shared_from_this(), res, close_after](error_code ec, std::size_t) {
                         if (ec) return self->close();
                         if (close_after) return self->linger();
                         self->has_head_ = false;
                         self->read_head();
                       });
  }

  // Shut the sending side, then read and drop what the client still sends (bounded in
  // time), so that it reads our answer instead of a connection reset (RFC 9112 9.6).
  void linger() {
    phase_ = Phase::kClosing;
    error_code ignored;
    stream_.socket().shutdown(tcp::socket::shutdown_send, ignored);
    stream_.expires_after(kLingerFor);
    scratch_ = std::make_unique<std::array<char, kDrainChunk>>();
    drain();
  }

  void drain() {
    stream_.async_read_some(asio::buffer(*scratch_),
                            [self = shared_from_this()](error_code ec, std::size_t) {
                              if (ec) return self->close();
                              self->drain();
                            });
  }

  void close() {
    phase_ = Phase::kClosing;
    error_code ignored;
    stream_.socket().shutdown(tcp::socket::shutdown_both, ignored);
    stream_.close();
  }

  beast::tcp_stream stream_;
  beast::flat_buffer buffer_;
  std::optional<bhttp::request_parser<bhttp::string_body>> parser_;
  Server::Impl* server_;  ///< outlives every session (see ~Impl)
  bool overflow_;
  std::uint64_t id_;
  Phase phase_ = Phase::kHead;
  Head head_;
  bool has_head_ = false;
  bool keep_alive_ = true;
  std::uint64_t limit_ = 0;
  Clock::time_point started_ = Clock::now();
  Clock::time_point body_started_;
  std::uint64_t body_bytes_ = 0;
  std::unique_ptr<std::array<char, kDrainChunk>> scratch_;  ///< only while lingering
};

void Server::Impl::accept() {
  acceptor->async_accept(asio::make_strand(*ioc), [this](error_code ec, tcp::socket socket) {
    on_accept(ec, std::move(socket));
  });
}

void Server::Impl::on_accept(error_code ec, tcp::socket socket) {
  if (stopping || ec == asio::error::operation_aborted) return;
  if (ec) {
    // Out of file descriptors and the like: say so (once a second at most), back off a
    // little on a timer (never on a thread), go on accepting.
    const auto now = Clock::now();
    if (now - last_accept_warning > std::chrono::seconds(1)) {
      last_accept_warning = now;
      log::warn("accepting an HTTP connection failed", {{"error", ec.message()},
                                                         {"connections", open.load()}});
    }
    backoff.emplace(acceptor->get_executor(), std::chrono::milliseconds(50));
    backoff->async_wait([this](error_code) {
      if (!stopping) accept();
    });
    return;
  }
  const std::size_t now_open = open.load();
  if (now_open >= options.max_connections + kOverflowReserve) {
    error_code ignored;
    socket.close(ignored);  // far past the cap: not even a probe is read
    return accept();
  }
  error_code ignored;
  socket.set_option(tcp::no_delay(true), ignored);  // no 40 ms delayed-ACK stalls
  std::shared_ptr<Session> session;
  {
    std::lock_guard<std::mutex> lock(sessions_mutex);
    const std::uint64_t id = next_session++;
    session = std::make_shared<Session>(std::move(socket), this,
                                        now_open >= options.max_connections, id);
    ++open;  // after the session exists: its destructor is what counts it down
    sessions.emplace(id, session);
  }
  session->start();
  accept();
}

void Server::Impl::forget(std::uint64_t id) {
  std::lock_guard<std::mutex> lock(sessions_mutex);
  sessions.erase(id);
  --open;
}

Server::Server(ServerOptions options, Handler& handler)
    : impl_(std::make_unique<Impl>(std::move(options), handler)) {
  auto& o = impl_->options;
  if (o.port < 0 || o.port > 65535) {
    throw InputError("HTTP port " + std::to_string(o.port) + " is out of range [0, 65535]");
  }
  if (o.threads < 1) throw InputError("HTTP threads must be at least 1, got " + std::to_string(o.threads));
  if (o.max_connections < 1) throw InputError("HTTP max_connections must be at least 1");
  error_code ec;
  const auto address = asio::ip::make_address(o.host, ec);
  if (ec) throw InputError("cannot listen on \"" + o.host + "\": not an IP address");
  const tcp::endpoint endpoint(address, static_cast<unsigned short>(o.port));
  auto& acceptor = *impl_->acceptor;
  const auto failed = [&](const char* what) {
    return IoError("cannot listen on " + o.host + ":" + std::to_string(o.port) + " (" + what +
                   ": " + ec.message() + ")");
  };
  acceptor.open(endpoint.protocol(), ec);
  if (ec) throw failed("socket");
  // SO_REUSEADDR (a quick restart over TIME_WAIT), never SO_REUSEPORT: a taken port is an error.
  acceptor.set_option(asio::socket_base::reuse_address(true), ec);
  acceptor.bind(endpoint, ec);
  if (ec) throw failed("bind; port taken?");
  acceptor.listen(asio::socket_base::max_listen_connections, ec);
  if (ec) throw failed("listen");
  impl_->port = acceptor.local_endpoint().port();
  // Descriptors for every connection the cap and its probe reserve allow, plus a margin for
  // the rest of the process: raise the soft limit if that is what stands in the way.
  const rlim_t needed = static_cast<rlim_t>(o.max_connections + kOverflowReserve + 256);
  rlimit lim{};
  if (::getrlimit(RLIMIT_NOFILE, &lim) == 0 && lim.rlim_cur != RLIM_INFINITY && lim.rlim_cur < needed) {
    rlimit raised = lim;
    raised.rlim_cur = lim.rlim_max == RLIM_INFINITY ? needed : std::min(needed, lim.rlim_max);
    ::setrlimit(RLIMIT_NOFILE, &raised);
    if (raised.rlim_cur < needed) {
      log::warn("the file descriptor limit is below what the connection cap needs",
                {{"limit", static_cast<long long>(raised.rlim_cur)},
                 {"needed", static_cast<long long>(needed)},
                 {"max_connections", o.max_connections}});
    }
  }
}

Server::~Server() {
  try {
    stop();
  } catch (...) {
    // Nothing more to do in a destructor.
  }
}

int Server::port() const { return impl_->port; }

std::size_t Server::connections() const { return impl_->open.load(); }

void Server::start() {
  std::lock_guard<std::mutex> lock(impl_->stop_mutex);
  if (impl_->stopped) throw IoError("the HTTP server was stopped and cannot be started again");
  if (!impl_->threads.empty()) return;
  impl_->work.emplace(impl_->ioc->get_executor());
  impl_->accept();
  for (int i = 0; i < impl_->options.threads; ++i) {
    impl_->threads.emplace_back([impl = impl_.get()] {
      for (;;) {
        try {
          impl->ioc->run();
          return;
        } catch (const std::exception& e) {
          // A handler that throws must not take the server down.
          log::error("HTTP event loop caught an exception", {{"error", e.what()}});
        }
      }
    });
  }
}

void Server::stop(const std::function<void()>& draining) {
  std::lock_guard<std::mutex> lock(impl_->stop_mutex);
  if (impl_->stopped) return;
  impl_->stopped = true;
  impl_->stopping = true;
  asio::post(impl_->acceptor->get_executor(), [impl = impl_.get()] {
    error_code ignored;
    impl->acceptor->close(ignored);
  });
  std::vector<std::shared_ptr<Session>> live;
  {
    std::lock_guard<std::mutex> l(impl_->sessions_mutex);
    for (auto& [id, weak] : impl_->sessions) {
      if (auto s = weak.lock()) live.push_back(std::move(s));
    }
  }
  for (auto& s : live) s->stop();
  live.clear();
  if (draining) draining();
  if (!impl_->threads.empty()) {
    const auto until = Clock::now() + impl_->options.drain_timeout;
    while (impl_->open.load() > 0 && Clock::now() < until) {
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
  }
  impl_->work.reset();
  impl_->ioc->stop();
  for (auto& t : impl_->threads) t.join();
  impl_->threads.clear();
  // Sessions still held by pending operations close when the io_context goes (~Impl).
  error_code ignored;
  impl_->acceptor->close(ignored);
}

}  // namespace gmi::http
