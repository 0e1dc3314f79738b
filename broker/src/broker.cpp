// The broker's event loop: one thread owns the frontend (clients) and backend (workers)
// ROUTER sockets and polls them with the persister's wake socket; every decision is the
// scheduler's (scheduler.hpp), which this loop feeds with events and whose commands it
// carries out. See broker.hpp for the guarantees.
#include "gmi/broker.hpp"

#include <algorithm>
#include <chrono>

#include "persister.hpp"
#include "scheduler.hpp"
#include "zap.hpp"
#include "gmi/error.hpp"
#include "gmi/log.hpp"
#include "gmi/redis.hpp"

namespace gmi {

using std::chrono::milliseconds;

struct Broker::Impl final : detail::SchedulerIo {
  BrokerOptions opt;
  RedisLocation redis_location;
  zmq::socket_t frontend;
  zmq::socket_t backend;
  std::unique_ptr<detail::ZapAuthenticator> zap;  // CURVE client allow-list, when configured
  // Every Redis read and write goes through it, on its own thread (persister.hpp).
  std::unique_ptr<detail::Persister> persister;
  detail::SystemClock clock;
  std::unique_ptr<detail::Scheduler> scheduler;

  Impl(zmq::context_t& ctx, BrokerOptions o)
      : opt(std::move(o)), frontend(ctx, zmq::socket_type::router), backend(ctx, zmq::socket_type::router) {
    if (opt.frontend.empty() || opt.backend.empty()) {
      throw InputError("the broker needs at least one frontend and one backend endpoint");
    }
    redis_location = parse_redis_uri(opt.redis_uri);
    // Checks the rest of the options before anything binds.
    scheduler = std::make_unique<detail::Scheduler>(opt, redis_location, *this, clock);
    // The allow-list is in place before either socket binds, so no peer slips in first.
    if (opt.curve && !opt.curve_clients_dir.empty()) {
      zap = std::make_unique<detail::ZapAuthenticator>(ctx, opt.curve_clients_dir);
    }
    for (auto* s : {&frontend, &backend}) {
      s->set(zmq::sockopt::linger, 0);
      s->set(zmq::sockopt::router_mandatory, 1);
      s->set(zmq::sockopt::router_handover, 1);
      s->set(zmq::sockopt::maxmsgsize, opt.max_message_bytes);
      s->set(zmq::sockopt::sndhwm, 100000);
      s->set(zmq::sockopt::rcvhwm, 100000);
      if (opt.curve) wire::make_curve_server(*s, opt.curve_server);
    }
    auto bind_all = [](zmq::socket_t& s, const std::vector<std::string>& eps, const char* what) {
      for (const auto& ep : eps) {
        try {
          s.bind(ep);
        } catch (const zmq::error_t& e) {
          throw IoError(std::string("cannot bind the broker's ") + what + " to " + ep + ": " +
                        e.what());
        }
      }
    };
    bind_all(frontend, opt.frontend, "frontend");
    bind_all(backend, opt.backend, "backend");
    persister = std::make_unique<detail::Persister>(ctx, detail::PersisterOptions{redis_location, opt.store});
  }

  // ---------------------------------------------------------------- the scheduler's commands

  bool send_worker(const std::string& worker, const nlohmann::json& header,
                   const std::vector<std::string_view>& frames) override {
    try {
      if (wire::send_views(backend, worker, header, frames, /*dontwait=*/true)) return true;
      log::warn("cannot send to worker: its queue is full", {{"worker", worker}});
    } catch (const zmq::error_t& e) {
      log::warn("cannot send to worker", {{"worker", worker}, {"error", e.what()}});
    }
    return false;
  }

  void reply(const std::string& client, const nlohmann::json& header) override {
    try {
      wire::send(frontend, client, header, {}, /*dontwait=*/true);
    } catch (const zmq::error_t&) {
      // The client is gone; nothing to do (its job, if any, carries on).
    }
  }

  void persist(detail::PersistRequest request) override { persister->post(std::move(request)); }

  std::string store_not_ready() const override { return persister->not_ready_reason(); }

  // ---------------------------------------------------------------- the loop

  // Up to 1000 messages of one socket per turn, so that neither starves the other.
  template <typename Handler>
  void drain_socket(zmq::socket_t& socket, Handler&& handle) {
    for (int n = 0; n < 1000; ++n) {
      auto raw = wire::recv_raw(socket, /*routed=*/true, /*dontwait=*/true);
      if (!raw) return;
      handle(*raw);
    }
  }

  void run(const std::atomic<bool>& stop) {
    log::info("broker serving", {{"frontend", opt.frontend}, {"backend", opt.backend},
                                 {"redis", redis_location.uri()}});
    detail::Scheduler& s = *scheduler;
    bool draining = false;
    auto drain_deadline = clock.now();
    for (;;) {
      if (stop.load() && !draining) {
        draining = true;
        drain_deadline = clock.now() + milliseconds(opt.drain_timeout_ms);
        const auto held = s.counts();
        s.begin_drain();
        log::info("draining", {{"tasks_in_flight", held.flights}, {"jobs", held.jobs}});
      }
      if (draining && ((s.drained() && persister->backlog() == 0) || clock.now() > drain_deadline)) break;
      zmq::pollitem_t items[] = {{static_cast<void*>(frontend), 0, ZMQ_POLLIN, 0},
                                 {static_cast<void*>(backend), 0, ZMQ_POLLIN, 0},
                                 {static_cast<void*>(persister->wake()), 0, ZMQ_POLLIN, 0}};
      wire::poll(items, 3, s.next_wake());
      if (items[2].revents & ZMQ_POLLIN) {
        for (auto& done : persister->take()) s.on_persisted(std::move(done));
      }
      if (items[1].revents & ZMQ_POLLIN) drain_socket(backend, [&](wire::RawMessage& m) { s.on_worker(m); });
      if (items[0].revents & ZMQ_POLLIN) drain_socket(frontend, [&](wire::RawMessage& m) { s.on_client(m); });
      if (opt.reload_keys != nullptr && opt.reload_keys->exchange(false) && zap) zap->request_reload();
      s.tick();
    }
    const auto left = s.counts();
    log::info("broker stopped", {{"jobs_left_active", left.jobs}, {"tasks_abandoned", left.flights}});
  }
};

Broker::Broker(zmq::context_t& context, BrokerOptions options)
    : impl_(std::make_unique<Impl>(context, std::move(options))) {}
Broker::~Broker() = default;
void Broker::run(const std::atomic<bool>& stop) { impl_->run(stop); }
std::string Broker::not_ready_reason() const {
  std::string why = impl_->scheduler->not_ready();
  return why.empty() ? impl_->persister->not_ready_reason() : why;
}

}  // namespace gmi
