#pragma once
// A client of the broker's frontend for the event-driven gateway: many requests in flight
// at once on one DEALER socket, none of them holding a thread while it waits.
//
// BrokerClient (core/service) is one blocking request at a time, so a gateway built on it
// needs one thread per waiting HTTP request, and a long-poll (up to gateway.max_wait_ms)
// holds its thread for the whole wait. Here one thread owns the socket; callers hand it a
// request and a callback from any thread; the broker echoes each request's "req" in its
// reply, which is how replies find their callbacks; a request that gets no reply within
// its deadline is answered with an IoError by the same thread. Late replies (after their
// deadline) are dropped.
//
// Sends never block the thread: the socket is ZMQ_IMMEDIATE (nothing is queued for a broker
// that is not connected), and a request that cannot be sent yet waits, in order, until it
// can or its deadline passes ("cannot send to the broker ... within N ms").
//
// Thread-safety: submit() may be called from any thread; stop() (and the destructor) once no
// thread submits any more. Callbacks run on the client's thread, one at a time, and must not block: post the work
// elsewhere (the gateway posts to the HTTP connection's strand).
#include <chrono>
#include <cstdint>
#include <exception>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>
#include <zmq.hpp>

#include "gmi/broker_client.hpp"

namespace gmi {

class AsyncBrokerClient {
 public:
  /// The reply header (type accepted/job/pong) or why there is none: BrokerRefusal for an
  /// "error" reply, IoError for no reply in time or a broken socket.
  using Callback = std::function<void(std::exception_ptr error, nlohmann::json reply)>;

  /// A request's binary frames: views into buffers that `owner` keeps alive until the
  /// request has been sent (or has failed), so that a large upload is not copied on its way.
  struct Frames {
    std::vector<std::string_view> views;
    std::shared_ptr<const void> owner;
  };

  /// Connects (InputError for a bad endpoint or CURVE key) and starts the thread.
  AsyncBrokerClient(zmq::context_t& context, BrokerClientOptions options);
  ~AsyncBrokerClient();  ///< stop()
  AsyncBrokerClient(const AsyncBrokerClient&) = delete;
  AsyncBrokerClient& operator=(const AsyncBrokerClient&) = delete;

  /// Sends `header` (a "req" is added) with `frames`; `callback` runs exactly once: with the
  /// reply, or with an error when the broker refuses, when `timeout` passes without a
  /// reply, or when the client stops first. InputError (thrown here, no callback) for a
  /// header the wire codec refuses.
  /// `interruptible`: a wait that interrupt_waits() may cut short (a long-poll).
  void submit(nlohmann::json header, Frames frames, std::chrono::milliseconds timeout,
              Callback callback, bool interruptible = false);

  /// Answers every interruptible request still open with IoError(`why`) now, and every
  /// interruptible one submitted later at once (a gateway that stops does not hold its
  /// long-polls until they run out).
  void interrupt_waits(const std::string& why);

  /// Answers every request still open with IoError("... stopping") and joins the thread.
  void stop();

  const BrokerClientOptions& options() const { return options_; }
  /// Requests sent or waiting to be sent, not yet answered (for tests and metrics).
  std::size_t in_flight() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
  BrokerClientOptions options_;
};

}  // namespace gmi
