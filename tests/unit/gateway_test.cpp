// The HTTP gateway and the broker client against a fake broker: a ROUTER socket on an
// inproc endpoint that speaks the real protocol (wire::decode / wire::send). The real broker
// is tested end to end elsewhere; here the point is what the gateway makes of each answer.
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <functional>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "gmi/broker_client.hpp"
#include "gmi/gateway.hpp"
#include "gmi/spec_store.hpp"
#include "gmi/wire.hpp"
#include "spec_fixtures.hpp"
#include "test_support.hpp"

// Debian's cpp-httplib is a compiled library built with these options, and they change the
// layout of httplib's classes; every user must define them (see tests/unit/ops_test.cpp).
// Included last: on Linux it pulls in <resolv.h>, whose `_res` macro breaks Eigen's headers
// when they come after it.
// Its feature flags (OpenSSL, zlib, brotli) come from gmi_core's public link to the
// cpp-httplib package: every includer must see the same class layout as the library.
#include <httplib.h>

namespace gmi {
namespace {

using nlohmann::json;
using Reply = std::optional<json>;  ///< nullopt: do not answer

/// A broker frontend on a background thread: records every request and answers with what
/// the responder says (the default accepts submissions and knows the jobs it accepted).
class FakeBroker {
 public:
  using Responder = std::function<Reply(const wire::Message&)>;

  explicit FakeBroker(zmq::context_t& ctx)
      : endpoint_("inproc://fake-broker-" + std::to_string(next_id_++)),
        socket_(ctx, zmq::socket_type::router) {
    socket_.set(zmq::sockopt::linger, 0);
    socket_.bind(endpoint_);
    thread_ = std::thread([this] { run(); });
  }
  ~FakeBroker() {
    stop_ = true;
    thread_.join();
  }

  const std::string& endpoint() const { return endpoint_; }

  void set_responder(Responder r) {
    std::lock_guard<std::mutex> lock(mutex_);
    responder_ = std::move(r);
  }
  /// A job that get_job will find.
  void add_job(const json& job) {
    std::lock_guard<std::mutex> lock(mutex_);
    jobs_[job["job_id"].get<std::string>()] = job;
  }
  std::vector<wire::Message> received(const std::string& type) {
    std::lock_guard<std::mutex> lock(mutex_);
    std::vector<wire::Message> out;
    for (const auto& m : received_) {
      if (m.type() == type) out.push_back(m);
    }
    return out;
  }
  std::size_t total_received() {
    std::lock_guard<std::mutex> lock(mutex_);
    return received_.size();
  }

  // The default answers; public so that a responder can fall back on them.
  Reply standard_reply(const wire::Message& m) {
    const std::string type = m.type();
    if (type == "submit_query" || type == "submit_upload") {
      json r = wire::header("accepted");
      r["job_id"] = wire::random_id();
      jobs_[r["job_id"]] = json{{"job_id", r["job_id"]},
                                {"kind", type == "submit_query" ? "query" : "upload"},
                                {"state", "queued"}};
      return r;
    }
    if (type == "get_job") {
      auto it = jobs_.find(m.header["job_id"].get<std::string>());
      if (it == jobs_.end()) return error_reply("not_found", "no such job");
      json r = wire::header("job");
      r["job"] = it->second;
      return r;
    }
    if (type == "ping") return wire::header("pong");
    return error_reply("bad_request", "unexpected " + type);
  }

  static json error_reply(const std::string& code, const std::string& message) {
    json r = wire::header("error");
    r["code"] = code;
    r["error"] = message;
    return r;
  }

 private:
  void run() {
    while (!stop_) {
      zmq::pollitem_t item{socket_.handle(), 0, ZMQ_POLLIN, 0};
      if (zmq::poll(&item, 1, std::chrono::milliseconds(20)) == 0) continue;
      auto raw = wire::recv_raw(socket_, /*routed=*/true, /*dontwait=*/true);
      if (!raw) continue;
      const std::string routing = raw->routing;
      Reply reply;
      std::string req;
      try {
        wire::Message m = wire::decode(*raw, wire::Channel::kClientToBroker);
        req = m.header.value("req", "");
        std::lock_guard<std::mutex> lock(mutex_);
        received_.push_back(m);
        reply = responder_ ? responder_(m) : standard_reply(m);
      } catch (const wire::WireError& e) {
        reply = error_reply("bad_request", e.what());
      }
      if (!reply) continue;
      if (!req.empty() && !reply->contains("req")) (*reply)["req"] = req;
      wire::send(socket_, routing, *reply);
    }
  }

  static inline std::atomic<int> next_id_{0};
  std::string endpoint_;
  zmq::socket_t socket_;
  std::mutex mutex_;
  Responder responder_;
  std::map<std::string, json> jobs_;
  std::vector<wire::Message> received_;
  std::atomic<bool> stop_{false};
  std::thread thread_;
};

GatewayOptions options_for(const std::string& endpoint) {
  GatewayOptions o;
  o.host = "127.0.0.1";
  o.port = 0;
  o.broker.endpoint = endpoint;
  o.broker.timeout_ms = 3000;
  o.threads = 4;
  return o;
}

std::unique_ptr<httplib::Client> client_for(const Gateway& gw) {
  auto c = std::make_unique<httplib::Client>("127.0.0.1", gw.port());
  c->set_connection_timeout(2, 0);
  c->set_read_timeout(10, 0);
  c->set_keep_alive(true);  // several requests per connection, as browsers and proxies do
  c->set_tcp_nodelay(true);  // else each POST's body waits 40 ms for a delayed ACK
  return c;
}

// The {"error": {"code", "message"}} body of a response ("" when it has none).
std::string error_code(const httplib::Result& res) {
  json body = json::parse(res->body, nullptr, /*allow_exceptions=*/false);
  if (!body.is_object() || !body.contains("error")) return "";
  EXPECT_TRUE(body["error"]["message"].is_string()) << res->body;
  return body["error"]["code"].get<std::string>();
}

std::string error_message(const httplib::Result& res) {
  return json::parse(res->body)["error"]["message"].get<std::string>();
}

bool is_job_id(const std::string& id) {
  return id.size() == 32 && id.find_first_not_of("0123456789abcdef") == std::string::npos;
}

const std::string kImage = std::string("\xFF\xD8\xFF\xE0 not really a jpeg \0 with zeros", 36);

class GatewayTest : public ::testing::Test {
 protected:
  void start(const std::function<void(GatewayOptions&)>& adjust = {}) {
    GatewayOptions o = options_for(broker.endpoint());
    if (adjust) adjust(o);
    gateway = std::make_unique<Gateway>(ctx, o);
    gateway->start();
    http = client_for(*gateway);
  }
  void TearDown() override {
    http.reset();
    if (gateway) gateway->stop();
    gateway.reset();
  }

  zmq::context_t ctx;
  FakeBroker broker{ctx};
  std::unique_ptr<Gateway> gateway;
  std::unique_ptr<httplib::Client> http;
};

TEST_F(GatewayTest, AcceptsRawQuery) {
  start();
  auto res = http->Post("/v1/queries?top=5&scorer=weighted&prompt=a%20red%20cat", kImage,
                        "image/jpeg");
  ASSERT_TRUE(res);
  ASSERT_EQ(res->status, 202) << res->body;
  const json body = json::parse(res->body);
  const std::string id = body["job_id"];
  EXPECT_TRUE(is_job_id(id)) << id;
  EXPECT_EQ(body["status_url"], "/v1/queries/" + id);
  EXPECT_EQ(res->get_header_value("Location"), "/v1/queries/" + id);

  const auto got = broker.received("submit_query");
  ASSERT_EQ(got.size(), 1u);
  EXPECT_EQ(got[0].header["top"], 5);
  EXPECT_EQ(got[0].header["scorer"], "weighted");
  EXPECT_EQ(got[0].header["prompt"], "a red cat");
  ASSERT_EQ(got[0].frames.size(), 1u);
  EXPECT_EQ(got[0].frames[0], kImage);

  // The status URL answers with the broker's job object, verbatim.
  auto job = http->Get(body["status_url"].get<std::string>().c_str());
  ASSERT_TRUE(job);
  ASSERT_EQ(job->status, 200) << job->body;
  EXPECT_EQ(json::parse(job->body)["job_id"], id);
  EXPECT_EQ(json::parse(job->body)["state"], "queued");
}

TEST_F(GatewayTest, RawQueryDefaultsAndFormEncodedLabel) {
  start();
  // `curl --data-binary @img.jpg` labels the body application/x-www-form-urlencoded; an
  // image over httplib's 8 KiB form limit must still go through.
  std::string big(20000, 'x');
  auto res = http->Post("/v1/queries", big, "application/x-www-form-urlencoded");
  ASSERT_TRUE(res);
  ASSERT_EQ(res->status, 202) << res->body;
  const auto got = broker.received("submit_query");
  ASSERT_EQ(got.size(), 1u);
  EXPECT_EQ(got[0].header["top"], 10);
  EXPECT_FALSE(got[0].header.contains("scorer"));
  EXPECT_FALSE(got[0].header.contains("prompt"));
  EXPECT_EQ(got[0].frames[0], big);
}

TEST_F(GatewayTest, AcceptsMultipartQuery) {
  start();
  httplib::MultipartFormDataItems items{{"image", kImage, "photo.jpg", "image/jpeg"},
                                        {"top", "3", "", ""}};
  auto res = http->Post("/v1/queries", items);
  ASSERT_TRUE(res);
  ASSERT_EQ(res->status, 202) << res->body;
  EXPECT_TRUE(is_job_id(json::parse(res->body)["job_id"]));
  const auto got = broker.received("submit_query");
  ASSERT_EQ(got.size(), 1u);
  EXPECT_EQ(got[0].header["top"], 3);
  EXPECT_EQ(got[0].frames[0], kImage);

  // A multipart body without an "image" part.
  httplib::MultipartFormDataItems no_image{{"picture", kImage, "photo.jpg", "image/jpeg"}};
  res = http->Post("/v1/queries", no_image);
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 400);
  EXPECT_NE(error_message(res).find("\"image\""), std::string::npos) << res->body;
}

TEST_F(GatewayTest, RejectsEmptyBodyBadParametersAndBadJobIds) {
  start();
  auto res = http->Post("/v1/queries", "", "image/jpeg");
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 400);
  EXPECT_EQ(error_code(res), "bad_request");

  for (const char* path : {"/v1/queries?top=0", "/v1/queries?top=1001", "/v1/queries?top=ten"}) {
    res = http->Post(path, kImage, "image/jpeg");
    ASSERT_TRUE(res) << path;
    EXPECT_EQ(res->status, 400) << path;
    EXPECT_NE(error_message(res).find("top"), std::string::npos) << res->body;
  }

  for (const char* path : {"/v1/queries/xyz", "/v1/jobs/0123456789ABCDEF0123456789ABCDEF",
                           "/v1/jobs/0123456789abcdef0123456789abcdef0",
                           "/v1/queries/0123456789abcdef0123456789abcdef?wait_ms=-1",
                           "/v1/queries/0123456789abcdef0123456789abcdef?wait_ms=soon"}) {
    res = http->Get(path);
    ASSERT_TRUE(res) << path;
    EXPECT_EQ(res->status, 400) << path;
    EXPECT_EQ(error_code(res), "bad_request") << path;
  }
  // None of these reached the broker.
  EXPECT_EQ(broker.total_received(), 0u);

  res = http->Post("/v1/queries", kImage, "multipart/mixed; boundary=x");
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 415);
  EXPECT_EQ(error_code(res), "unsupported_media_type");
}

TEST_F(GatewayTest, OversizedBodyIs413AndTheConnectionStaysUsable) {
  start([](GatewayOptions& o) {
    o.max_query_bytes = 1000;
    o.max_upload_bytes = 100000;
  });
  auto res = http->Post("/v1/queries", std::string(5000, 'x'), "image/jpeg");
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 413);
  EXPECT_EQ(error_code(res), "too_large");

  // Far over every limit: httplib itself refuses it, still with the JSON shape.
  res = http->Post("/v1/queries", std::string(400000, 'x'), "image/jpeg");
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 413);
  EXPECT_EQ(error_code(res), "too_large");

  httplib::MultipartFormDataItems items{{"image", std::string(1500, 'y'), "a.jpg", "image/jpeg"}};
  res = http->Post("/v1/queries", items);
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 413);

  // The refused bodies were drained: the next request on the connection is read correctly.
  res = http->Post("/v1/queries", std::string(900, 'z'), "image/jpeg");
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 202) << res->body;
  EXPECT_EQ(broker.received("submit_query").size(), 1u);
}

// Sends raw bytes on a new connection; returns what came back within `wait_ms`.
std::string raw_exchange(int port, const std::string& bytes, int wait_ms = 2000) {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(static_cast<std::uint16_t>(port));
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0) {
    ::close(fd);
    return "<no connection>";
  }
  timeval tv{wait_ms / 1000, (wait_ms % 1000) * 1000};
  ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  ::send(fd, bytes.data(), bytes.size(), MSG_NOSIGNAL);
  std::string out;
  char buf[4096];
  for (;;) {
    const ssize_t n = ::recv(fd, buf, sizeof buf, 0);
    if (n <= 0) break;
    out.append(buf, static_cast<std::size_t>(n));
    if (out.find("\r\n\r\n") != std::string::npos && out.find("}") != std::string::npos) break;
  }
  ::close(fd);
  return out;
}

// RFC 9112 framing: a request whose body length is ambiguous is refused before any of it
// is read (two different Content-Length values were accepted with 202: a request
// smuggling vector; a negative length and an unknown coding hung the connection).
TEST_F(GatewayTest, AmbiguousFramingIsRefusedBeforeTheBodyIsRead) {
  start();
  const std::string head = "POST /v1/queries HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n";
  struct Case {
    std::string headers;
    std::string status;
    std::string code;
  };
  for (const Case& k : {Case{"Content-Length: 5\r\nContent-Length: 40\r\n", "400", "bad_request"},
                        Case{"Content-Length: -5\r\n", "400", "bad_request"},
                        Case{"Content-Length: 5x\r\n", "400", "bad_request"},
                        Case{"Transfer-Encoding: gzip\r\n", "501", "not_implemented"},
                        Case{"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n", "400", "bad_request"}}) {
    const std::string reply = raw_exchange(gateway->port(), head + k.headers + "\r\nhello");
    EXPECT_EQ(reply.substr(0, 12), "HTTP/1.1 " + k.status) << k.headers << "\n" << reply;
    EXPECT_NE(reply.find("\"code\":\"" + k.code + "\""), std::string::npos) << reply;
    EXPECT_NE(reply.find("Connection: close"), std::string::npos) << reply;
  }
  EXPECT_TRUE(broker.received("submit_query").empty());  // nothing was submitted
  // The same Content-Length twice is one length.
  const std::string same = raw_exchange(gateway->port(), head + "Content-Length: 5\r\nContent-Length: 5\r\n\r\nhello");
  EXPECT_EQ(same.substr(0, 12), "HTTP/1.1 202") << same;
}

TEST_F(GatewayTest, ChunkedBodiesAreCountedAgainstTheLimit) {
  start([](GatewayOptions& o) { o.max_query_bytes = 1000; });
  // Chunked bodies carry no Content-Length; the gateway counts what arrives.
  const auto chunked = [](std::string data) {
    return [data = std::move(data)](std::size_t offset, httplib::DataSink& sink) {
      if (offset < data.size()) {
        sink.write(data.data() + offset, std::min<std::size_t>(300, data.size() - offset));
      } else {
        sink.done();
      }
      return true;
    };
  };
  auto res = http->Post("/v1/queries", chunked(std::string(900, 'c')), "image/png");
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 202) << res->body;
  const auto got = broker.received("submit_query");
  ASSERT_EQ(got.size(), 1u);
  EXPECT_EQ(got[0].frames[0], std::string(900, 'c'));

  res = http->Post("/v1/queries", chunked(std::string(5000, 'c')), "image/png");
  if (res) {
    EXPECT_EQ(res->status, 413);
    EXPECT_EQ(error_code(res), "too_large");
    // The rest of that body is still on the connection: the gateway asks the client to close.
    EXPECT_EQ(res->get_header_value("Connection"), "close");
  } else {
    // Under load the gateway's answer and close can beat the client's last chunks; the
    // client then sees the refusal as a failed write. Either way nothing was submitted.
    EXPECT_TRUE(res.error() == httplib::Error::Write || res.error() == httplib::Error::Read)
        << httplib::to_string(res.error());
  }
  EXPECT_EQ(broker.received("submit_query").size(), 1u);
}

// --- The event-driven server: deadlines, the connection cap, RFC 9112 closes ---------------

/// One raw TCP connection to the gateway, for what an HTTP client library would not send.
class RawConn {
 public:
  explicit RawConn(int port) {
    fd_ = ::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_port = htons(static_cast<std::uint16_t>(port));
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    connected_ = ::connect(fd_, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0;
  }
  ~RawConn() { ::close(fd_); }
  RawConn(const RawConn&) = delete;
  RawConn& operator=(const RawConn&) = delete;

  bool connected() const { return connected_; }
  bool send(const std::string& bytes) {
    return ::send(fd_, bytes.data(), bytes.size(), MSG_NOSIGNAL) == static_cast<ssize_t>(bytes.size());
  }
  void shutdown_write() { ::shutdown(fd_, SHUT_WR); }

  /// Everything the server sends until it closes the connection, or until `wait_ms` pass
  /// (then `closed()` is false).
  std::string read_to_close(int wait_ms) {
    std::string out;
    const auto until = std::chrono::steady_clock::now() + std::chrono::milliseconds(wait_ms);
    closed_ = false;
    for (;;) {
      const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
          until - std::chrono::steady_clock::now());
      if (left.count() <= 0) return out;
      timeval tv{static_cast<time_t>(left.count() / 1000),
                 static_cast<suseconds_t>((left.count() % 1000) * 1000)};
      ::setsockopt(fd_, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
      char buf[65536];
      const ssize_t n = ::recv(fd_, buf, sizeof buf, 0);
      if (n > 0) {
        out.append(buf, static_cast<std::size_t>(n));
        continue;
      }
      if (n == 0 || (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)) {
        closed_ = true;  // an orderly close or a reset
        return out;
      }
    }
  }
  bool closed() const { return closed_; }

  /// One whole response (status line, headers, Content-Length body); "" on timeout.
  std::string read_response(int wait_ms) {
    const auto until = std::chrono::steady_clock::now() + std::chrono::milliseconds(wait_ms);
    while (std::chrono::steady_clock::now() < until) {
      const auto end = pending_.find("\r\n\r\n");
      if (end != std::string::npos) {
        std::size_t length = 0;
        std::string lower = pending_.substr(0, end);
        std::transform(lower.begin(), lower.end(), lower.begin(), ::tolower);
        if (auto at = lower.find("content-length:"); at != std::string::npos) {
          length = std::stoul(lower.substr(at + 15));
        }
        if (pending_.size() >= end + 4 + length) {
          std::string out = pending_.substr(0, end + 4 + length);
          pending_.erase(0, out.size());
          return out;
        }
      }
      timeval tv{0, 50000};
      ::setsockopt(fd_, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
      char buf[65536];
      const ssize_t n = ::recv(fd_, buf, sizeof buf, 0);
      if (n > 0) pending_.append(buf, static_cast<std::size_t>(n));
      if (n == 0) break;
    }
    return {};
  }

 private:
  int fd_ = -1;
  bool connected_ = false;
  bool closed_ = false;
  std::string pending_;
};

std::string status_line(const std::string& response) {
  return response.substr(0, response.find("\r\n"));
}

const std::string kRawQuery = "POST /v1/queries HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n";

// Item 11 as found: 8 long-polls, or clients trickling header bytes, blocked every
// submission and the liveness probe. With one event-loop thread, 50 long-polls waiting on
// the broker and 200 clients trickling headers, the probe, the metrics and a submission
// are still answered.
TEST_F(GatewayTest, LongPollsAndTricklingClientsHoldNoThreadAndStarveNothing) {
  start([](GatewayOptions& o) { o.threads = 1; });
  broker.set_responder([&](const wire::Message& m) -> Reply {
    if (m.type() == "get_job") return std::nullopt;  // a job that never ends: the wait runs on
    return broker.standard_reply(m);
  });
  std::vector<std::unique_ptr<RawConn>> polls, tricklers;
  for (int i = 0; i < 50; ++i) {
    polls.push_back(std::make_unique<RawConn>(gateway->port()));
    ASSERT_TRUE(polls.back()->send("GET /v1/jobs/" + wire::random_id() +
                                   "?wait_ms=30000 HTTP/1.1\r\nHost: x\r\n\r\n"));
  }
  for (int i = 0; i < 200; ++i) {
    tricklers.push_back(std::make_unique<RawConn>(gateway->port()));
    ASSERT_TRUE(tricklers.back()->send("POST /v1/queries HTTP/1.1\r\nHo"));
  }
  std::atomic<bool> done{false};
  std::thread trickle([&] {
    while (!done) {
      for (auto& t : tricklers) t->send("x");
      std::this_thread::sleep_for(std::chrono::milliseconds(200));
    }
  });
  // Every long-poll reached the broker, and each still waits for its answer.
  for (int i = 0; i < 250 && broker.received("get_job").size() < 50; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  EXPECT_EQ(broker.received("get_job").size(), 50u);
  // All 250 connections are open on the gateway (its gauge counts them).
  const auto open_connections = [&] {
    auto m = http->Get("/metrics");
    if (!m) return -1.0;
    const std::string name = "\ngmi_http_connections ";
    const auto at = m->body.find(name);
    return at == std::string::npos ? -1.0 : std::stod(m->body.substr(at + name.size()));
  };
  double open = 0;
  for (int i = 0; i < 250 && (open = open_connections()) < 251; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  EXPECT_GE(open, 251.0);  // the 250 and this client

  auto res = http->Get("/healthz");
  ASSERT_TRUE(res) << httplib::to_string(res.error());
  EXPECT_EQ(res->status, 200);
  res = http->Post("/v1/queries", kImage, "image/jpeg");
  ASSERT_TRUE(res) << httplib::to_string(res.error());
  EXPECT_EQ(res->status, 202) << res->body;
  done = true;
  trickle.join();
}

// A stopping gateway does not hold its long-polls until they run out: each is answered
// 503 with Retry-After (the client polls again, through another replica).
TEST_F(GatewayTest, StoppingAnswersLongPollsAtOnce) {
  start();
  broker.set_responder([&](const wire::Message& m) -> Reply {
    if (m.type() == "get_job") return std::nullopt;
    return broker.standard_reply(m);
  });
  RawConn poll(gateway->port());
  ASSERT_TRUE(poll.send("GET /v1/jobs/" + wire::random_id() + "?wait_ms=30000 HTTP/1.1\r\nHost: x\r\n\r\n"));
  for (int i = 0; i < 250 && broker.received("get_job").empty(); ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  ASSERT_EQ(broker.received("get_job").size(), 1u);
  http.reset();
  std::thread stopper([&] { gateway->stop(); });
  const std::string answer = poll.read_response(20000);
  stopper.join();
  EXPECT_EQ(status_line(answer), "HTTP/1.1 503 Service Unavailable") << answer;
  EXPECT_NE(answer.find("shutting down"), std::string::npos) << answer;
  EXPECT_NE(answer.find("Retry-After: 2"), std::string::npos) << answer;
}

TEST_F(GatewayTest, ATricklingOrIdleClientIsCutOffAtTheHeaderDeadline) {
  start([](GatewayOptions& o) { o.header_timeout_ms = 300; });
  RawConn idle(gateway->port());
  RawConn trickler(gateway->port());
  ASSERT_TRUE(trickler.send("GET /healthz HTTP/1.1\r\n"));
  const auto t0 = std::chrono::steady_clock::now();
  // One byte every 100 ms would keep a per-read timeout happy for ever.
  while (std::chrono::steady_clock::now() - t0 < std::chrono::seconds(3) && trickler.send("X")) {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  EXPECT_EQ(trickler.read_to_close(3000), "");  // no answer can go: the socket was closed
  EXPECT_TRUE(trickler.closed());
  idle.read_to_close(3000);
  EXPECT_TRUE(idle.closed());
  auto res = http->Get("/metrics");
  ASSERT_TRUE(res);
  EXPECT_NE(res->body.find("code=\"408\",route=\"unmatched\""), std::string::npos) << res->body;
}

TEST_F(GatewayTest, ABodyThatStopsComingIsCutOffAtTheBodyDeadline) {
  start([](GatewayOptions& o) { o.body_timeout_ms = 300; });
  RawConn c(gateway->port());
  ASSERT_TRUE(c.send(kRawQuery + "Content-Length: 100\r\n\r\n0123456789"));
  c.read_to_close(3000);
  EXPECT_TRUE(c.closed());

  // One byte inside every per-read deadline is cut off too: past the first deadline a body
  // must average 16 KiB/s.
  RawConn slow(gateway->port());
  ASSERT_TRUE(slow.send(kRawQuery + "Content-Length: 100\r\n\r\n"));
  const auto t0 = std::chrono::steady_clock::now();
  bool cut_off = false;  // the gateway closed while the client was still sending
  while (std::chrono::steady_clock::now() - t0 < std::chrono::seconds(5)) {
    if (!slow.send("x")) {
      cut_off = true;
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  EXPECT_TRUE(cut_off);
  EXPECT_TRUE(broker.received("submit_query").empty());
}

TEST_F(GatewayTest, AWrongKeyIsRefusedBeforeTheBodyIsReadAndTheRightOneGets100Continue) {
  start([](GatewayOptions& o) { o.api_key = "s3cret-key"; });
  // 50 MB announced, none sent: the 401 cannot wait for the body.
  RawConn wrong(gateway->port());
  ASSERT_TRUE(wrong.send(kRawQuery + "X-API-Key: nope\r\nContent-Length: 50000000\r\n\r\n"));
  const std::string refused = wrong.read_response(3000);
  EXPECT_EQ(status_line(refused), "HTTP/1.1 401 Unauthorized") << refused;
  EXPECT_NE(refused.find("Connection: close"), std::string::npos) << refused;
  EXPECT_NE(refused.find("\"code\":\"unauthorized\""), std::string::npos) << refused;

  RawConn right(gateway->port());
  ASSERT_TRUE(right.send(kRawQuery + "X-API-Key: s3cret-key\r\nExpect: 100-continue\r\nContent-Length: " +
                         std::to_string(kImage.size()) + "\r\n\r\n"));
  EXPECT_EQ(status_line(right.read_response(3000)), "HTTP/1.1 100 Continue");
  ASSERT_TRUE(right.send(kImage));
  const std::string accepted = right.read_response(3000);
  EXPECT_EQ(status_line(accepted), "HTTP/1.1 202 Accepted") << accepted;
  ASSERT_EQ(broker.received("submit_query").size(), 1u);
  EXPECT_EQ(broker.received("submit_query")[0].frames[0], kImage);
}

TEST_F(GatewayTest, PastTheConnectionCapOnlyProbesAreServed) {
  start([](GatewayOptions& o) { o.max_connections = 3; });
  std::vector<std::unique_ptr<RawConn>> held;
  for (int i = 0; i < 3; ++i) held.push_back(std::make_unique<RawConn>(gateway->port()));
  // The cap counts accepted connections: wait until a fourth is over it.
  std::string busy;
  for (int i = 0; i < 100 && status_line(busy) != "HTTP/1.1 503 Service Unavailable"; ++i) {
    RawConn c(gateway->port());
    c.send("GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n");
    busy = c.read_response(2000);
  }
  EXPECT_EQ(status_line(busy), "HTTP/1.1 503 Service Unavailable") << busy;
  EXPECT_NE(busy.find("\"code\":\"busy\""), std::string::npos) << busy;
  EXPECT_NE(busy.find("Retry-After: 1"), std::string::npos) << busy;
  for (const char* probe : {"/healthz", "/readyz", "/metrics"}) {
    RawConn c(gateway->port());
    c.send(std::string("GET ") + probe + " HTTP/1.1\r\nHost: x\r\n\r\n");
    EXPECT_EQ(status_line(c.read_response(3000)), "HTTP/1.1 200 OK") << probe;
  }
  held.clear();  // below the cap again: everything is served
  std::string ok;
  for (int i = 0; i < 100 && status_line(ok) != "HTTP/1.1 202 Accepted"; ++i) {
    RawConn c(gateway->port());
    c.send(kRawQuery + "Content-Length: " + std::to_string(kImage.size()) + "\r\n\r\n" + kImage);
    ok = c.read_response(2000);
  }
  EXPECT_EQ(status_line(ok), "HTTP/1.1 202 Accepted") << ok;
}

// Item 12: after a 413 on a chunked body the connection is closed and nothing more of it is
// parsed (a request hidden after the body never runs); a client that half-closes after its
// request still gets its answer; a junk request line gets the Error body.
TEST_F(GatewayTest, A413OnAChunkedBodyClosesTheConnectionAndParsesNothingAfterIt) {
  start([](GatewayOptions& o) { o.max_query_bytes = 1000; });
  RawConn c(gateway->port());
  const std::string hidden = kRawQuery + "Content-Length: 5\r\n\r\nhello";
  ASSERT_TRUE(c.send(kRawQuery + "Transfer-Encoding: chunked\r\n\r\n7d0\r\n" + std::string(2000, 'c') +
                     "\r\n0\r\n\r\n" + hidden));
  const std::string all = c.read_to_close(5000);
  EXPECT_TRUE(c.closed());
  EXPECT_EQ(status_line(all), "HTTP/1.1 413 Payload Too Large") << all;
  EXPECT_NE(all.find("Connection: close"), std::string::npos) << all;
  EXPECT_EQ(all.find("HTTP/1.1", 1), std::string::npos) << "a second answer: " << all;
  EXPECT_TRUE(broker.received("submit_query").empty());
}

TEST_F(GatewayTest, AClientThatHalfClosesAfterItsRequestGetsTheAnswer) {
  start();
  RawConn c(gateway->port());
  ASSERT_TRUE(c.send(kRawQuery + "Content-Length: " + std::to_string(kImage.size()) + "\r\n\r\n" + kImage));
  c.shutdown_write();
  const std::string all = c.read_to_close(5000);
  EXPECT_EQ(status_line(all), "HTTP/1.1 202 Accepted") << all;
  EXPECT_TRUE(c.closed());
  EXPECT_EQ(broker.received("submit_query").size(), 1u);
}

TEST_F(GatewayTest, AJunkRequestLineGetsTheErrorBody) {
  start();
  for (const std::string junk : {"HELLO\r\n\r\n", "GET\r\n\r\n", "GET /healthz HTTP/9.9\r\n\r\n",
                                 "\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"}) {
    RawConn c(gateway->port());
    ASSERT_TRUE(c.send(junk));
    const std::string all = c.read_to_close(3000);
    EXPECT_EQ(status_line(all), "HTTP/1.1 400 Bad Request") << all;
    EXPECT_NE(all.find("{\"error\":{\"code\":\"bad_request\",\"message\":\"malformed HTTP request"),
              std::string::npos)
        << all;
    EXPECT_TRUE(c.closed());
  }
}

TEST_F(GatewayTest, ApiKeyIsRequiredWhenSet) {
  start([](GatewayOptions& o) { o.api_key = "s3cret-key"; });
  const std::string id = wire::random_id();
  broker.add_job({{"job_id", id}, {"kind", "query"}, {"state", "running"}});
  const std::string path = "/v1/jobs/" + id;

  auto res = http->Get(path.c_str());
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 401);
  EXPECT_EQ(error_code(res), "unauthorized");

  res = http->Get(path.c_str(), {{"X-API-Key", "s3cret-kez"}});
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 401);
  res = http->Get(path.c_str(), {{"X-API-Key", "s3cret"}});
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 401);

  res = http->Get(path.c_str(), {{"X-API-Key", "s3cret-key"}});
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 200) << res->body;
  EXPECT_EQ(json::parse(res->body)["state"], "running");

  res = http->Get(path.c_str(), {{"Authorization", "Bearer s3cret-key"}});
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 200) << res->body;
  res = http->Get(path.c_str(), {{"Authorization", "Bearer wrong"}});
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 401);

  // A POST without the key is refused before the broker sees it, and its body is drained.
  res = http->Post("/v1/queries", kImage, "image/jpeg");
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 401);
  EXPECT_TRUE(broker.received("submit_query").empty());
  res = http->Post("/v1/queries", {{"X-API-Key", "s3cret-key"}}, kImage, "image/jpeg");
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 202) << res->body;

  // Unknown /v1 routes do not tell a keyless caller what exists.
  res = http->Get("/v1/queries");
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 401);

  // The operator endpoints never need the key.
  for (const char* ops : {"/healthz", "/readyz", "/metrics"}) {
    res = http->Get(ops);
    ASSERT_TRUE(res) << ops;
    EXPECT_EQ(res->status, 200) << ops;
  }
}

TEST_F(GatewayTest, UnknownJobIs404) {
  start();
  auto res = http->Get(("/v1/queries/" + wire::random_id()).c_str());
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 404);
  EXPECT_EQ(error_code(res), "not_found");
  EXPECT_EQ(broker.received("get_job").size(), 1u);
}

TEST_F(GatewayTest, WaitMsIsPassedOnAndCapped) {
  start([](GatewayOptions& o) { o.max_wait_ms = 100; });
  const std::string id = wire::random_id();
  broker.add_job({{"job_id", id}, {"kind", "query"}, {"state", "finished"},
                  {"result", {{"results", json::array()}}}});
  auto res = http->Get(("/v1/queries/" + id + "?wait_ms=50").c_str());
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 200);
  EXPECT_EQ(json::parse(res->body)["result"], json({{"results", json::array()}}));
  res = http->Get(("/v1/jobs/" + id + "?wait_ms=60000").c_str());
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 200);
  const auto got = broker.received("get_job");
  ASSERT_EQ(got.size(), 2u);
  EXPECT_EQ(got[0].header["wait_ms"], 50);
  EXPECT_EQ(got[1].header["wait_ms"], 100);
}

TEST_F(GatewayTest, BrokerRefusalsMapToStatuses) {
  start();
  std::string code = "busy";
  broker.set_responder([&](const wire::Message& m) -> Reply {
    if (m.type() == "ping") return wire::header("pong");
    return FakeBroker::error_reply(code, "the broker says " + code);
  });
  auto res = http->Post("/v1/queries", kImage, "image/jpeg");
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 503);
  EXPECT_EQ(res->get_header_value("Retry-After"), "1");
  EXPECT_EQ(error_code(res), "busy");
  EXPECT_NE(error_message(res).find("the broker says busy"), std::string::npos);

  const std::vector<std::pair<std::string, int>> cases{
      {"unavailable", 503}, {"too_large", 413}, {"bad_request", 400}, {"not_found", 404}};
  for (const auto& [c, status] : cases) {
    code = c;
    res = http->Post("/v1/queries", kImage, "image/jpeg");
    ASSERT_TRUE(res) << c;
    EXPECT_EQ(res->status, status) << c;
    EXPECT_EQ(error_code(res), c);
    if (c == "unavailable") {
      EXPECT_EQ(res->get_header_value("Retry-After"), "2");
    }
  }
}

TEST(Gateway, UnreachableBrokerIs503) {
  zmq::context_t ctx;
  GatewayOptions o = options_for("inproc://nobody-is-listening-here");
  o.broker.timeout_ms = 300;
  Gateway gw(ctx, o);
  gw.start();
  auto http = client_for(gw);
  const auto t0 = std::chrono::steady_clock::now();
  auto res = http->Post("/v1/queries", kImage, "image/jpeg");
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 503);
  EXPECT_EQ(error_code(res), "unavailable");
  EXPECT_NE(error_message(res).find("no reply from the broker"), std::string::npos);
  EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::seconds(3));

  res = http->Get("/readyz");
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 503);
  res = http->Get("/healthz");
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 200);
  // Close the keep-alive connection first: httplib's stop() waits for idle ones to time out.
  http.reset();
  gw.stop();
}

TEST_F(GatewayTest, ReadyWhenTheBrokerAnswers) {
  start();
  auto res = http->Get("/readyz");
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 200) << res->body;
  EXPECT_GE(broker.received("ping").size(), 1u);
}

TEST_F(GatewayTest, UploadSendsImagesAndPromptsInManifestOrder) {
  start();
  const std::string a = std::string("A-image\0bytes", 13), b = "B-image", c = "C-image";
  const std::string manifest =
      "{\"image\": \"b.png\", \"prompt\": \"a bee\"}\n"
      "\n"
      "{\"image\": \"a.png\", \"prompt\": \"an ant\"}\n"
      "{\"image\": \"c.png\", \"prompt\": \"a cat\", \"extra\": 1}\n";
  httplib::MultipartFormDataItems items{
      {"manifest", manifest, "manifest.jsonl", "application/x-ndjson"},
      {"a.png", a, "", "image/png"},         // found by part name
      {"images", b, "b.png", "image/png"},   // found by file name
      {"c.png", c, "c.png", "image/png"},
      {"downloads", "42.5", "", ""},
      {"card", "A card.", "", ""}};
  auto res = http->Post("/v1/models/my-model_1.0/uploads", items);
  ASSERT_TRUE(res);
  ASSERT_EQ(res->status, 202) << res->body;
  const json body = json::parse(res->body);
  EXPECT_TRUE(is_job_id(body["job_id"]));
  EXPECT_EQ(body["status_url"], "/v1/jobs/" + body["job_id"].get<std::string>());

  const auto got = broker.received("submit_upload");
  ASSERT_EQ(got.size(), 1u);
  EXPECT_EQ(got[0].header["model_id"], "my-model_1.0");
  EXPECT_EQ(got[0].header["prompts"], json({"a bee", "an ant", "a cat"}));
  EXPECT_EQ(got[0].header["downloads"], 42.5);
  EXPECT_EQ(got[0].header["card"], "A card.");
  ASSERT_EQ(got[0].frames.size(), 3u);
  EXPECT_EQ(got[0].frames[0], b);
  EXPECT_EQ(got[0].frames[1], a);
  EXPECT_EQ(got[0].frames[2], c);
}

TEST_F(GatewayTest, UploadProblemsAre400Or415) {
  start();
  const std::string manifest =
      "{\"image\": \"a.png\", \"prompt\": \"an ant\"}\n"
      "{\"image\": \"missing.png\", \"prompt\": \"a moth\"}\n";
  httplib::MultipartFormDataItems items{{"manifest", manifest, "", ""},
                                        {"a.png", "A", "a.png", "image/png"}};
  auto res = http->Post("/v1/models/m/uploads", items);
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 400);
  EXPECT_NE(error_message(res).find("missing.png"), std::string::npos) << res->body;

  // No manifest; a manifest line without a prompt; bad JSON; a part nobody named.
  httplib::MultipartFormDataItems no_manifest{{"a.png", "A", "a.png", "image/png"}};
  res = http->Post("/v1/models/m/uploads", no_manifest);
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 400);
  EXPECT_NE(error_message(res).find("manifest"), std::string::npos);
  for (const std::string& bad : {std::string("{\"image\": \"a.png\"}\n"), std::string("not json\n"),
                                std::string("\n\n")}) {
    httplib::MultipartFormDataItems its{{"manifest", bad, "", ""}, {"a.png", "A", "", ""}};
    res = http->Post("/v1/models/m/uploads", its);
    ASSERT_TRUE(res);
    EXPECT_EQ(res->status, 400) << bad;
  }
  httplib::MultipartFormDataItems stray{
      {"manifest", "{\"image\": \"a.png\", \"prompt\": \"p\"}\n", "", ""},
      {"a.png", "A", "", ""},
      {"b.png", "B", "", ""}};
  res = http->Post("/v1/models/m/uploads", stray);
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 400);
  EXPECT_NE(error_message(res).find("b.png"), std::string::npos);

  // An invalid model id, a body that is not multipart.
  res = http->Post("/v1/models/.hidden/uploads", items);
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 400);
  res = http->Post("/v1/models/m/uploads", "{}", "application/json");
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 415);
  EXPECT_TRUE(broker.received("submit_upload").empty());
}

TEST_F(GatewayTest, OversizedUploadIs413) {
  start([](GatewayOptions& o) { o.max_upload_bytes = 2000; });
  httplib::MultipartFormDataItems items{
      {"manifest", "{\"image\": \"a.png\", \"prompt\": \"p\"}\n", "", ""},
      {"a.png", std::string(200000, 'a'), "a.png", "image/png"}};
  auto res = http->Post("/v1/models/m/uploads", items);
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 413);
  EXPECT_EQ(error_code(res), "too_large");
}

TEST_F(GatewayTest, ListsModelsFromTheSpecStore) {
  testing::TempDir dir;
  const std::string uri = "dir:" + dir.path().string();
  auto store = open_spec_store(uri);
  store->put(testing::make_random_spec("model-b", 1));
  store->put(testing::make_random_spec("model-a", 2));
  start([&](GatewayOptions& o) { o.spec_store_uri = uri; });

  auto res = http->Get("/v1/models");
  ASSERT_TRUE(res);
  ASSERT_EQ(res->status, 200) << res->body;
  json models = json::parse(res->body)["models"];
  ASSERT_EQ(models.size(), 2u);
  EXPECT_EQ(models[0]["model_id"], "model-a");
  EXPECT_EQ(models[1]["model_id"], "model-b");
  EXPECT_EQ(models[0], spec_metadata(testing::make_random_spec("model-a", 2)));

  res = http->Get("/v1/models/model-b");
  ASSERT_TRUE(res);
  ASSERT_EQ(res->status, 200);
  EXPECT_EQ(json::parse(res->body)["model_id"], "model-b");
  res = http->Get("/v1/models/model-z");
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 404);
  EXPECT_EQ(error_code(res), "not_found");
  res = http->Get("/v1/models/.bad");
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 400);

  // A new spec shows up in the listing.
  store->put(testing::make_random_spec("model-c", 3));
  res = http->Get("/v1/models");
  ASSERT_TRUE(res);
  EXPECT_EQ(json::parse(res->body)["models"].size(), 3u);
}

TEST_F(GatewayTest, NoSpecStoreIs503) {
  start();
  auto res = http->Get("/v1/models");
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 503);
  EXPECT_EQ(error_code(res), "unavailable");
}

TEST_F(GatewayTest, UnknownRoutesAre404AndWrongMethods405) {
  start();
  auto res = http->Get("/nothing/here");
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 404);
  EXPECT_EQ(error_code(res), "not_found");
  res = http->Get("/v1/queries");
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 405);
  EXPECT_EQ(res->get_header_value("Allow"), "POST");
  EXPECT_EQ(error_code(res), "method_not_allowed");
  res = http->Delete(("/v1/jobs/" + wire::random_id()).c_str());
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 405);
  res = http->Post("/v1/models", "{}", "application/json");
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 405);
  EXPECT_EQ(res->get_header_value("Allow"), "GET, HEAD");
}

TEST_F(GatewayTest, MetricsCountRequestsByRouteAndCode) {
  start();
  auto res = http->Get(("/v1/queries/" + wire::random_id()).c_str());
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 404);
  res = http->Get("/metrics");
  ASSERT_TRUE(res);
  ASSERT_EQ(res->status, 200);
  EXPECT_NE(res->body.find("gmi_http_requests_total"), std::string::npos);
  EXPECT_NE(res->body.find("route=\"/v1/queries/{id}\""), std::string::npos) << res->body;
  EXPECT_NE(res->body.find("code=\"404\""), std::string::npos);
}

TEST(Gateway, PortTakenIsAnIoError) {
  zmq::context_t ctx;
  Gateway first(ctx, options_for("inproc://unused"));
  GatewayOptions o = options_for("inproc://unused");
  o.port = first.port();
  EXPECT_THROW(Gateway taken(ctx, o), IoError);
}

// --- BrokerClient --------------------------------------------------------------------------

TEST(BrokerClient, SubmitsAndReadsJobs) {
  zmq::context_t ctx;
  FakeBroker broker(ctx);
  BrokerClient client(ctx, {broker.endpoint(), 2000, "", {}});
  EXPECT_TRUE(client.ping(1000));
  QueryRequest q;
  q.image = kImage;
  q.top = 7;
  const std::string id = client.submit_query(q);
  EXPECT_TRUE(is_job_id(id));
  EXPECT_EQ(client.get_job(id)["state"], "queued");
  try {
    client.get_job(wire::random_id());
    FAIL() << "expected a refusal";
  } catch (const BrokerRefusal& e) {
    EXPECT_EQ(e.code(), "not_found");
    EXPECT_FALSE(e.retryable());
    EXPECT_EQ(std::string(e.what()).rfind("broker: ", 0), 0u) << e.what();
  }
  UploadRequest up;
  up.model_id = "m";
  up.images = {"i1", "i2"};
  up.prompts = {"p1", "p2"};
  up.downloads = 3;
  up.card = "card";
  EXPECT_TRUE(is_job_id(client.submit_upload(up)));
  const auto got = broker.received("submit_upload");
  ASSERT_EQ(got.size(), 1u);
  EXPECT_EQ(got[0].frames, up.images);
  // A request the protocol forbids never leaves the client.
  q.top = 0;
  EXPECT_THROW(client.submit_query(q), InputError);
}

TEST(BrokerClient, DropsStaleRepliesAndRecoversAfterATimeout) {
  zmq::context_t ctx;
  FakeBroker broker(ctx);
  std::atomic<int> calls{0};
  broker.set_responder([&](const wire::Message& m) -> Reply {
    ++calls;
    if (m.type() != "ping") return broker.standard_reply(m);
    // The first ping is answered too late for the client's 200 ms.
    if (calls == 1) std::this_thread::sleep_for(std::chrono::milliseconds(400));
    return wire::header("pong");
  });
  BrokerClient client(ctx, {broker.endpoint(), 2000, "", {}});
  EXPECT_FALSE(client.ping(200));
  // The late pong went to the old socket; the next request gets its own answer.
  QueryRequest q;
  q.image = kImage;
  EXPECT_TRUE(is_job_id(client.submit_query(q)));

  // A reply carrying another request's "req" is dropped, not taken for this one's: a
  // hand-driven broker sends a stale refusal first, then the real answer.
  zmq::context_t ctx2;
  zmq::socket_t router(ctx2, zmq::socket_type::router);
  router.set(zmq::sockopt::linger, 0);
  router.bind("inproc://stale-test");
  std::thread fake([&] {
    zmq::pollitem_t item{router.handle(), 0, ZMQ_POLLIN, 0};
    if (zmq::poll(&item, 1, std::chrono::milliseconds(3000)) == 0) return;
    auto raw = wire::recv_raw(router, true, true);
    const auto m = wire::decode(*raw, wire::Channel::kClientToBroker);
    json stale = FakeBroker::error_reply("busy", "stale");
    stale["req"] = "not-" + m.header["req"].get<std::string>();
    wire::send(router, raw->routing, stale);
    json pong = wire::header("pong");
    pong["req"] = m.header["req"];
    wire::send(router, raw->routing, pong);
  });
  BrokerClient other(ctx2, {"inproc://stale-test", 2000, "", {}});
  EXPECT_TRUE(other.ping(2000));
  fake.join();
}

TEST(BrokerClient, GetJobWaitsOnTopOfTheTimeout) {
  zmq::context_t ctx;
  FakeBroker broker(ctx);
  const std::string id = wire::random_id();
  broker.add_job({{"job_id", id}, {"kind", "query"}, {"state", "finished"}});
  broker.set_responder([&](const wire::Message& m) -> Reply {
    if (m.type() == "get_job") {
      // Answer after the wait, later than timeout_ms alone would allow.
      std::this_thread::sleep_for(std::chrono::milliseconds(m.header.value("wait_ms", 0)));
    }
    return broker.standard_reply(m);
  });
  BrokerClient client(ctx, {broker.endpoint(), 300, "", {}});
  EXPECT_EQ(client.get_job(id, 500)["state"], "finished");
  const auto got = broker.received("get_job");
  ASSERT_EQ(got.size(), 1u);
  EXPECT_EQ(got[0].header["wait_ms"], 500);
}

TEST(BrokerClient, NoBrokerIsAnIoErrorNamingTheEndpoint) {
  zmq::context_t ctx;
  BrokerClient client(ctx, {"inproc://no-broker", 100, "", {}});
  EXPECT_FALSE(client.ping(100));
  try {
    client.get_job(wire::random_id());
    FAIL() << "expected IoError";
  } catch (const IoError& e) {
    EXPECT_NE(std::string(e.what()).find("inproc://no-broker"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("100 ms"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace gmi
