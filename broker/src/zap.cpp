#include "zap.hpp"

#include <zmq.h>

#include <system_error>

#include "gmi/error.hpp"
#include "gmi/log.hpp"
#include "gmi/wire.hpp"

namespace gmi::detail {

namespace fs = std::filesystem;

ZapAuthenticator::ZapAuthenticator(zmq::context_t& context, fs::path dir)
    : dir_(std::move(dir)), socket_(context, zmq::socket_type::rep) {
  keys_ = read_keys();
  if (keys_.empty()) {
    throw InputError("curve.clients_dir " + dir_.string() +
                     " holds no client key file (write them with `gmi keygen`)");
  }
  socket_.set(zmq::sockopt::linger, 0);
  socket_.bind("inproc://zeromq.zap.01");
  log::info("CURVE clients are authenticated against an allow-list",
            {{"dir", dir_.string()}, {"keys", keys_.size()}});
  thread_ = std::thread([this] { loop(); });
}

ZapAuthenticator::~ZapAuthenticator() {
  stop_ = true;
  if (thread_.joinable()) thread_.join();
}

std::size_t ZapAuthenticator::allowed() const {
  std::lock_guard lock(mutex_);
  return keys_.size();
}

std::set<std::string> ZapAuthenticator::read_keys() const {
  std::set<std::string> keys;
  std::error_code ec;
  fs::directory_iterator it(dir_, ec);
  if (ec) throw IoError("cannot read curve.clients_dir " + dir_.string() + ": " + ec.message());
  for (; it != fs::directory_iterator(); it.increment(ec)) {
    if (ec) break;
    std::error_code file_ec;
    if (!it->is_regular_file(file_ec)) continue;
    try {
      const wire::CurveKeys k = wire::read_curve_key_file(it->path().string());
      if (k.public_key.size() == 40) keys.insert(k.public_key);
    } catch (const Error& e) {
      log::warn("skipping a file of curve.clients_dir that is not a key file",
                {{"file", it->path().string()}, {"error", e.what()}});
    }
  }
  return keys;
}

void ZapAuthenticator::loop() {
  while (!stop_) {
    if (reload_.exchange(false)) {
      try {
        auto keys = read_keys();
        std::lock_guard lock(mutex_);
        keys_ = std::move(keys);
        log::info("CURVE client allow-list re-read", {{"dir", dir_.string()}, {"keys", keys_.size()}});
      } catch (const Error& e) {
        log::error("cannot re-read the CURVE client allow-list; keeping the old one", {{"error", e.what()}});
      }
    }
    zmq::pollitem_t item{static_cast<void*>(socket_), 0, ZMQ_POLLIN, 0};
    try {
      if (zmq::poll(&item, 1, std::chrono::milliseconds(200)) <= 0) continue;
      std::vector<zmq::message_t> request;
      for (;;) {
        zmq::message_t part;
        if (!socket_.recv(part, zmq::recv_flags::none)) break;
        const bool more = part.more();
        request.push_back(std::move(part));
        if (!more) break;
      }
      answer(request);
    } catch (const zmq::error_t& e) {
      if (e.num() == ETERM) return;
      log::warn("ZAP handler error", {{"error", e.what()}});
    }
  }
}

// Request: version "1.0", request id, domain, address, identity, mechanism, credentials...
// Reply:   version, request id, status code, status text, user id, metadata.
void ZapAuthenticator::answer(const std::vector<zmq::message_t>& request) {
  auto text = [&](std::size_t i) { return i < request.size() ? request[i].to_string() : std::string(); };
  std::string status = "400", why = "refused", user;
  if (request.size() < 6 || text(0) != "1.0") {
    status = "500";
    why = "malformed ZAP request";
  } else if (text(5) != "CURVE" || request.size() < 7 || request[6].size() != 32) {
    why = "only CURVE clients are served";
  } else {
    char z85[41] = {0};
    zmq_z85_encode(z85, static_cast<const std::uint8_t*>(request[6].data()), 32);
    bool known = false;
    {
      std::lock_guard lock(mutex_);
      known = keys_.count(z85) != 0;
    }
    if (known) {
      status = "200";
      why = "OK";
      user = z85;
    } else {
      log::warn("refused a CURVE client whose key is not in curve.clients_dir",
                {{"key", std::string(z85)}, {"address", text(3)}});
    }
  }
  const std::string version = "1.0";
  socket_.send(zmq::buffer(version), zmq::send_flags::sndmore);
  socket_.send(zmq::buffer(request.size() > 1 ? text(1) : std::string()), zmq::send_flags::sndmore);
  socket_.send(zmq::buffer(status), zmq::send_flags::sndmore);
  socket_.send(zmq::buffer(why), zmq::send_flags::sndmore);
  socket_.send(zmq::buffer(user), zmq::send_flags::sndmore);
  socket_.send(zmq::message_t(), zmq::send_flags::none);
}

}  // namespace gmi::detail
