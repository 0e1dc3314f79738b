// Many broker requests in flight on one DEALER socket (see async_broker_client.hpp).
#include "async_broker_client.hpp"

#include <sys/eventfd.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <deque>
#include <map>
#include <mutex>
#include <optional>
#include <unordered_map>
#include <utility>

#include "gmi/log.hpp"
#include "gmi/wire.hpp"

namespace gmi {
namespace {

using nlohmann::json;
using Clock = std::chrono::steady_clock;

// The longest the loop sleeps without looking at its deadlines and its stop flag.
constexpr auto kMaxPoll = std::chrono::milliseconds(500);

}  // namespace

struct AsyncBrokerClient::Impl {
  struct Request {
    std::string req;
    json header;
    Frames frames;
    std::chrono::milliseconds timeout{0};
    Clock::time_point deadline;
    Callback callback;
    bool interruptible = false;
  };

  Impl(zmq::context_t& context, const BrokerClientOptions& options);
  ~Impl();

  void run();
  void send_ready(std::deque<Request>& unsent);
  void receive();
  void expire(std::deque<Request>& unsent, Clock::time_point now);
  void interrupt_all(std::deque<Request>& unsent, const std::string& why);
  void wake();
  /// Runs a request's callback, once; a throwing callback is logged, never propagated.
  static void finish(Request& r, std::exception_ptr error, json reply = {});

  const BrokerClientOptions& options;
  zmq::socket_t socket;
  int event_fd = -1;

  std::mutex mutex;
  std::deque<Request> incoming;  ///< handed over by submit(), taken by the loop
  bool stopping = false;
  std::string interrupt_why;  ///< non-empty: interrupt the open waits (then cleared)
  std::string interrupted;    ///< non-empty: waits submitted from now on fail at once
  std::atomic<std::size_t> open{0};
  std::atomic<std::uint64_t> next_req{1};

  // The loop's own state (its thread only): sent requests waiting for their reply, by
  // "req", and the same ordered by deadline.
  struct Waiting {
    Request request;
    std::multimap<Clock::time_point, std::string>::iterator by_deadline;
  };
  std::unordered_map<std::string, Waiting> waiting;
  std::multimap<Clock::time_point, std::string> deadlines;

  std::thread thread;
};

AsyncBrokerClient::Impl::Impl(zmq::context_t& context, const BrokerClientOptions& opts)
    // Queue nothing for a broker that is not connected: such requests wait in `unsent`,
    // where their deadline is ours to keep, instead of reaching a broker that comes up
    // minutes later.
    : options(opts), socket(connect_to_broker(context, opts, /*immediate=*/true)) {
  event_fd = ::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (event_fd < 0) throw IoError("cannot make an eventfd for the broker client");
  thread = std::thread([this] { run(); });
}

AsyncBrokerClient::Impl::~Impl() {
  {
    std::lock_guard<std::mutex> lock(mutex);
    stopping = true;
  }
  wake();
  if (thread.joinable()) thread.join();
  ::close(event_fd);
}

void AsyncBrokerClient::Impl::wake() {
  const std::uint64_t one = 1;
  // EAGAIN means the counter is already non-zero: the loop will wake anyway.
  [[maybe_unused]] const auto n = ::write(event_fd, &one, sizeof one);
}

void AsyncBrokerClient::Impl::finish(Request& r, std::exception_ptr error, json reply) {
  if (!r.callback) return;
  auto callback = std::move(r.callback);
  r.callback = nullptr;
  r.frames = {};  // release the payload before the callback, which may start the next one
  try {
    callback(std::move(error), std::move(reply));
  } catch (const std::exception& e) {
    log::error("a broker reply callback threw", {{"error", e.what()}});
  } catch (...) {
    log::error("a broker reply callback threw");
  }
}

void AsyncBrokerClient::Impl::send_ready(std::deque<Request>& unsent) {
  while (!unsent.empty()) {
    Request& r = unsent.front();
    bool sent = false;
    try {
      sent = wire::send_views(socket, "", r.header, r.frames.views, /*dontwait=*/true);
    } catch (const zmq::error_t& e) {
      finish(r, std::make_exception_ptr(IoError("cannot send to the broker at " +
                                                options.endpoint + ": " + e.what())));
      unsent.pop_front();
      --open;
      continue;
    }
    if (!sent) return;  // not connected, or its pipe is full: try again when writable
    r.frames = {};      // ZeroMQ holds its own copy now
    const std::string req = r.req;
    auto by_deadline = deadlines.emplace(r.deadline, req);
    waiting.emplace(req, Waiting{std::move(r), by_deadline});
    unsent.pop_front();
  }
}

void AsyncBrokerClient::Impl::receive() {
  for (;;) {
    std::optional<wire::RawMessage> raw;
    try {
      raw = wire::recv_raw(socket, /*routed=*/false, /*dontwait=*/true);
    } catch (const zmq::error_t& e) {
      if (e.num() == EINTR) continue;
      log::warn("receiving from the broker failed", {{"endpoint", options.endpoint},
                                                     {"error", e.what()}});
      return;
    }
    if (!raw) return;
    if (raw->parts.empty()) continue;
    const json peek = json::parse(raw->parts.front(), nullptr, /*allow_exceptions=*/false);
    if (!peek.is_object() || !peek.contains("req") || !peek["req"].is_string()) {
      log::warn("dropped a broker reply without a request id", {{"endpoint", options.endpoint}});
      continue;
    }
    auto it = waiting.find(peek["req"].get<std::string>());
    if (it == waiting.end()) continue;  // late: its request already timed out
    Request request = std::move(it->second.request);
    deadlines.erase(it->second.by_deadline);
    waiting.erase(it);
    --open;
    try {
      wire::Message reply = wire::decode(*raw, wire::Channel::kBrokerToClient);
      if (reply.type() == "error") {
        finish(request, std::make_exception_ptr(BrokerRefusal(
                            reply.header["code"].get<std::string>(),
                            "broker: " + reply.header["error"].get<std::string>())));
      } else {
        finish(request, nullptr, std::move(reply.header));
      }
    } catch (const wire::WireError& e) {
      finish(request, std::make_exception_ptr(IoError("malformed reply from the broker at " +
                                                      options.endpoint + ": " + e.what())));
    }
  }
}

void AsyncBrokerClient::Impl::expire(std::deque<Request>& unsent, Clock::time_point now) {
  while (!deadlines.empty() && deadlines.begin()->first <= now) {
    auto it = waiting.find(deadlines.begin()->second);
    deadlines.erase(deadlines.begin());
    if (it == waiting.end()) continue;
    Request request = std::move(it->second.request);
    waiting.erase(it);
    --open;
    finish(request, std::make_exception_ptr(IoError(
                        "no reply from the broker at " + options.endpoint + " within " +
                        std::to_string(request.timeout.count()) + " ms")));
  }
  // Unsent requests are in submission order, not deadline order: look at each.
  for (auto it = unsent.begin(); it != unsent.end();) {
    if (it->deadline > now) {
      ++it;
      continue;
    }
    finish(*it, std::make_exception_ptr(IoError(
                    "cannot send to the broker at " + options.endpoint + " within " +
                    std::to_string(it->timeout.count()) + " ms (is it running?)")));
    it = unsent.erase(it);
    --open;
  }
}

void AsyncBrokerClient::Impl::interrupt_all(std::deque<Request>& unsent, const std::string& why) {
  for (auto it = waiting.begin(); it != waiting.end();) {
    if (!it->second.request.interruptible) {
      ++it;
      continue;
    }
    Request request = std::move(it->second.request);
    deadlines.erase(it->second.by_deadline);
    it = waiting.erase(it);
    --open;
    finish(request, std::make_exception_ptr(IoError(why)));
  }
  for (auto it = unsent.begin(); it != unsent.end();) {
    if (!it->interruptible) {
      ++it;
      continue;
    }
    finish(*it, std::make_exception_ptr(IoError(why)));
    it = unsent.erase(it);
    --open;
  }
}

void AsyncBrokerClient::Impl::run() {
  std::deque<Request> unsent;
  for (;;) {
    bool stop = false;
    std::string interrupt;
    {
      std::lock_guard<std::mutex> lock(mutex);
      while (!incoming.empty()) {
        unsent.push_back(std::move(incoming.front()));
        incoming.pop_front();
      }
      stop = stopping;
      interrupt.swap(interrupt_why);
    }
    if (stop) break;
    if (!interrupt.empty()) interrupt_all(unsent, interrupt);
    send_ready(unsent);

    auto now = Clock::now();
    auto next = now + kMaxPoll;
    if (!deadlines.empty()) next = std::min(next, deadlines.begin()->first);
    for (const auto& r : unsent) next = std::min(next, r.deadline);
    const auto wait = std::max(std::chrono::milliseconds(0),
                               std::chrono::ceil<std::chrono::milliseconds>(next - now));
    zmq::pollitem_t items[] = {
        {socket.handle(), 0, static_cast<short>(ZMQ_POLLIN | (unsent.empty() ? 0 : ZMQ_POLLOUT)), 0},
        {nullptr, event_fd, ZMQ_POLLIN, 0}};
    try {
      wire::poll(items, 2, wait);
    } catch (const zmq::error_t& e) {
      log::warn("polling the broker socket failed", {{"error", e.what()}});
    }
    if (items[1].revents & ZMQ_POLLIN) {
      std::uint64_t count = 0;
      [[maybe_unused]] const auto n = ::read(event_fd, &count, sizeof count);
    }
    // ZeroMQ's poll reports edges of its own mailbox; reading until EAGAIN is the safe way.
    receive();
    expire(unsent, Clock::now());
  }

  // Stopping: every open request is answered, once.
  const auto stopped = [&] {
    return std::make_exception_ptr(IoError("the broker client is stopping"));
  };
  {
    std::lock_guard<std::mutex> lock(mutex);
    while (!incoming.empty()) {
      unsent.push_back(std::move(incoming.front()));
      incoming.pop_front();
    }
  }
  for (auto& r : unsent) finish(r, stopped());
  for (auto& [req, w] : waiting) finish(w.request, stopped());
  open -= unsent.size() + waiting.size();
  unsent.clear();
  waiting.clear();
  deadlines.clear();
}

AsyncBrokerClient::AsyncBrokerClient(zmq::context_t& context, BrokerClientOptions options)
    : options_(std::move(options)) {
  if (options_.timeout_ms <= 0) {
    throw InputError("broker client timeout must be positive, got " +
                     std::to_string(options_.timeout_ms) + " ms");
  }
  impl_ = std::make_unique<Impl>(context, options_);
}

AsyncBrokerClient::~AsyncBrokerClient() { stop(); }

void AsyncBrokerClient::stop() { impl_.reset(); }

std::size_t AsyncBrokerClient::in_flight() const { return impl_ ? impl_->open.load() : 0; }

void AsyncBrokerClient::interrupt_waits(const std::string& why) {
  if (!impl_) return;
  {
    std::lock_guard<std::mutex> lock(impl_->mutex);
    impl_->interrupt_why = why.empty() ? "interrupted" : why;
    impl_->interrupted = impl_->interrupt_why;
  }
  impl_->wake();
}

void AsyncBrokerClient::submit(json header, Frames frames, std::chrono::milliseconds timeout,
                               Callback callback, bool interruptible) {
  Impl::Request r;
  // Unique for this client's socket, which is all the broker's echo needs.
  r.req = std::to_string(impl_ ? impl_->next_req++ : 0);
  header["req"] = r.req;
  // A malformed request is refused here with the codec's message, not as a broker error.
  wire::validate_header(header, wire::Channel::kClientToBroker, frames.views.size());
  r.header = std::move(header);
  r.frames = std::move(frames);
  r.timeout = timeout;
  r.deadline = Clock::now() + timeout;
  r.callback = std::move(callback);
  r.interruptible = interruptible;
  if (!impl_) {
    Impl::finish(r, std::make_exception_ptr(IoError("the broker client is stopped")));
    return;
  }
  std::string refused;
  {
    std::lock_guard<std::mutex> lock(impl_->mutex);
    if (impl_->stopping) {
      refused = "the broker client is stopping";
    } else if (interruptible && !impl_->interrupted.empty()) {
      refused = impl_->interrupted;  // a wait that starts after interrupt_waits() ends at once
    } else {
      impl_->incoming.push_back(std::move(r));
      ++impl_->open;
    }
  }
  if (!refused.empty()) {
    Impl::finish(r, std::make_exception_ptr(IoError(refused)));  // outside the lock
    return;
  }
  impl_->wake();
}

}  // namespace gmi
