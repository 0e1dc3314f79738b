// The broker's persister against a real redis-server, through a TCP proxy that can lose a
// transaction's reply (Redis applied it; the client never hears) or the transaction's EXEC
// itself (Redis never applied it). Both look the same to the client — a reply timeout — and
// the persister must tell them apart by reading back before it answers.
#include "persister.hpp"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <string>
#include <thread>
#include <vector>

#include "gmi/redis.hpp"
#include "gmi/wire.hpp"
#include "test_support.hpp"

namespace gmi::detail {
namespace {

using testing::RedisServer;

// Relays 127.0.0.1:port() to Redis. Armed, the first connection that sends an EXEC either
// forwards it and then swallows every reply after it (kLoseReply), or sends only what came
// before it and swallows the EXEC and what follows (kLoseExec). Later connections relay as is.
class LossyProxy {
 public:
  enum class Mode { kRelay, kLoseReply, kLoseExec };

  explicit LossyProxy(int redis_port) : redis_port_(redis_port) {
    listen_fd_ = ::socket(AF_INET, SOCK_STREAM, 0);
    int one = 1;
    ::setsockopt(listen_fd_, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    a.sin_port = 0;
    if (::bind(listen_fd_, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0 || ::listen(listen_fd_, 16) != 0) {
      throw std::runtime_error("proxy: cannot listen");
    }
    socklen_t len = sizeof a;
    ::getsockname(listen_fd_, reinterpret_cast<sockaddr*>(&a), &len);
    port_ = ntohs(a.sin_port);
    thread_ = std::thread([this] { loop(); });
  }
  ~LossyProxy() {
    quit_ = true;
    thread_.join();
    for (auto& c : conns_) {
      ::close(c.client);
      ::close(c.server);
    }
    ::close(listen_fd_);
  }
  int port() const { return port_; }
  void arm(Mode mode) { mode_ = mode; }
  bool fired() const { return fired_; }

 private:
  struct Conn {
    int client, server;
    bool lose_replies = false;  // kLoseReply fired on it
    bool lose_requests = false;  // kLoseExec fired on it
  };

  int connect_redis() const {
    int fd = ::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    a.sin_port = htons(static_cast<std::uint16_t>(redis_port_));
    if (::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0) {
      ::close(fd);
      return -1;
    }
    return fd;
  }

  static bool send_all(int fd, const char* p, std::size_t n) {
    while (n > 0) {
      const ssize_t w = ::send(fd, p, n, MSG_NOSIGNAL);
      if (w <= 0) return false;
      p += w;
      n -= static_cast<std::size_t>(w);
    }
    return true;
  }

  void loop() {
    static const std::string kExec = "*1\r\n$4\r\nEXEC\r\n";
    std::vector<char> buf(1 << 16);
    while (!quit_) {
      std::vector<pollfd> fds{{listen_fd_, POLLIN, 0}};
      for (const auto& c : conns_) {
        fds.push_back({c.client, POLLIN, 0});
        fds.push_back({c.server, POLLIN, 0});
      }
      if (::poll(fds.data(), fds.size(), 50) <= 0) continue;
      if (fds[0].revents & POLLIN) {
        const int client = ::accept(listen_fd_, nullptr, nullptr);
        const int server = client >= 0 ? connect_redis() : -1;
        if (server >= 0) {
          conns_.push_back({client, server});
        } else if (client >= 0) {
          ::close(client);
        }
        continue;  // the connection list changed: poll again
      }
      for (std::size_t i = 0; i < conns_.size(); ++i) {
        Conn& c = conns_[i];
        bool closed = false;
        if (fds[1 + 2 * i].revents & (POLLIN | POLLHUP | POLLERR)) {
          const ssize_t n = ::recv(c.client, buf.data(), buf.size(), 0);
          if (n <= 0) {
            closed = true;
          } else if (!c.lose_requests) {
            std::string chunk(buf.data(), static_cast<std::size_t>(n));
            const auto exec = chunk.find(kExec);
            const Mode mode = mode_;
            if (exec != std::string::npos && mode == Mode::kLoseReply) {
              mode_ = Mode::kRelay;
              fired_ = true;
              c.lose_replies = true;
              send_all(c.server, chunk.data(), chunk.size());
            } else if (exec != std::string::npos && mode == Mode::kLoseExec) {
              mode_ = Mode::kRelay;
              fired_ = true;
              c.lose_requests = true;
              send_all(c.server, chunk.data(), exec);
            } else {
              send_all(c.server, chunk.data(), chunk.size());
            }
          }
        }
        if (!closed && (fds[2 + 2 * i].revents & (POLLIN | POLLHUP | POLLERR))) {
          const ssize_t n = ::recv(c.server, buf.data(), buf.size(), 0);
          if (n <= 0) {
            closed = true;
          } else if (!c.lose_replies) {
            send_all(c.client, buf.data(), static_cast<std::size_t>(n));
          }
        }
        if (closed) {
          ::close(c.client);
          ::close(c.server);
          conns_.erase(conns_.begin() + static_cast<std::ptrdiff_t>(i));
          break;  // indices into fds moved: poll again
        }
      }
    }
  }

  int redis_port_;
  int listen_fd_ = -1;
  int port_ = 0;
  std::atomic<bool> quit_{false};
  std::atomic<Mode> mode_{Mode::kRelay};
  std::atomic<bool> fired_{false};
  std::vector<Conn> conns_;
  std::thread thread_;
};

StoredJob a_query() {
  StoredJob job;
  job.id = wire::random_id();
  job.kind = "query";
  job.params = {{"top", 4}};
  job.route = {"decode", "embed", "interrogate", "score"};
  job.created_ms = now_ms();
  job.input.put(wire::Slot{wire::slot::kImages, wire::SlotKind::kImageBytes, nlohmann::json::object(), {"png"}});
  return job;
}

// Posts one creation and waits for its completion.
CreateDone create(Persister& persister, StoredJob job) {
  persister.post(CreateRequest{std::move(job), {}, "client", "req"});
  const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  while (std::chrono::steady_clock::now() < until) {
    zmq::pollitem_t item{static_cast<void*>(persister.wake()), 0, ZMQ_POLLIN, 0};
    zmq::poll(&item, 1, std::chrono::milliseconds(100));
    for (auto& done : persister.take()) {
      if (auto* c = std::get_if<CreateDone>(&done)) return std::move(*c);
    }
  }
  ADD_FAILURE() << "no completion within 30 s";
  return {};
}

bool recorded(const RedisServer& server, const std::string& id) {
  RedisConnection redis(parse_redis_uri(server.uri()));
  const std::string key = job_input_key(redis.location(), id);
  auto r = redis.command({"EXISTS", key});
  return RedisConnection::as_integer(r.get(), "EXISTS") == 1;
}

class PersisterTest : public ::testing::Test {
 protected:
  RedisServer server;
  zmq::context_t context;
};

TEST_F(PersisterTest, ATransactionAppliedWhoseReplyWasLostIsReadBackAndAccepted) {
  if (!server.started()) GTEST_SKIP() << "redis-server not available";
  LossyProxy proxy(server.port());
  Persister persister(context, PersisterOptions{parse_redis_uri("redis://127.0.0.1:" + std::to_string(proxy.port())), {}});
  ASSERT_EQ(create(persister, a_query()).outcome, CreateOutcome::kCreated);  // connected, relaying
  proxy.arm(LossyProxy::Mode::kLoseReply);
  const StoredJob job = a_query();
  const CreateDone done = create(persister, job);
  ASSERT_TRUE(proxy.fired()) << "the creation sent no EXEC through the proxy";
  EXPECT_TRUE(recorded(server, job.id)) << "the proxy should have let Redis apply it";
  EXPECT_EQ(done.outcome, CreateOutcome::kCreated)
      << "an applied transaction whose reply was lost was answered: " << done.error;
}

TEST_F(PersisterTest, ATransactionNeverAppliedIsAnsweredUnavailableNotAccepted) {
  if (!server.started()) GTEST_SKIP() << "redis-server not available";
  LossyProxy proxy(server.port());
  Persister persister(context, PersisterOptions{parse_redis_uri("redis://127.0.0.1:" + std::to_string(proxy.port())), {}});
  ASSERT_EQ(create(persister, a_query()).outcome, CreateOutcome::kCreated);
  proxy.arm(LossyProxy::Mode::kLoseExec);
  const StoredJob job = a_query();
  const CreateDone done = create(persister, job);
  ASSERT_TRUE(proxy.fired()) << "the creation sent no EXEC through the proxy";
  EXPECT_FALSE(recorded(server, job.id));
  EXPECT_EQ(done.outcome, CreateOutcome::kUnavailable) << "a job Redis never recorded was accepted";
  EXPECT_NE(done.error.find("failed"), std::string::npos) << done.error;
  // The persister goes on: the next creation is recorded.
  EXPECT_EQ(create(persister, a_query()).outcome, CreateOutcome::kCreated);
}

}  // namespace
}  // namespace gmi::detail
