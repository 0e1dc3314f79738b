// The client side of the broker's frontend protocol (schemas/README.md).
#include "gmi/broker_client.hpp"

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <utility>

namespace gmi {
namespace {

using nlohmann::json;
using Clock = std::chrono::steady_clock;

// The protocol caps get_job's wait (schemas/README.md).
constexpr int kMaxWaitMs = 600000;

std::string expect_job_id(const json& reply, const std::string& endpoint) {
  if (reply.value("type", "") != "accepted") {
    throw IoError("the broker at " + endpoint + " answered a submission with \"" +
                  reply.value("type", "") + "\" instead of \"accepted\"");
  }
  return reply["job_id"].get<std::string>();
}

}  // namespace

BrokerClient::BrokerClient(zmq::context_t& context, BrokerClientOptions options)
    : context_(context), options_(std::move(options)) {
  if (options_.timeout_ms <= 0) {
    throw InputError("broker client timeout must be positive, got " +
                     std::to_string(options_.timeout_ms) + " ms");
  }
  open_socket();
}

zmq::socket_t connect_to_broker(zmq::context_t& context, const BrokerClientOptions& options,
                                bool immediate) {
  zmq::socket_t socket(context, zmq::socket_type::dealer);
  socket.set(zmq::sockopt::linger, 0);
  if (immediate) socket.set(zmq::sockopt::immediate, 1);
  if (!options.curve_server_public.empty()) {
    wire::make_curve_client(socket, options.curve_server_public, options.curve_client);
  }
  try {
    socket.connect(options.endpoint);
  } catch (const zmq::error_t& e) {
    throw InputError("cannot connect to the broker at \"" + options.endpoint + "\": " + e.what());
  }
  return socket;
}

void BrokerClient::open_socket() {
  socket_.reset();  // close the old one first: its queued requests and late replies go with it
  zmq::socket_t socket = connect_to_broker(context_, options_, /*immediate=*/false);
  // A send blocks only while the pipe is full (a broker that stopped reading); bound that
  // wait like the reply wait, so a stuck broker is an IoError and not a hung thread.
  socket.set(zmq::sockopt::sndtimeo, options_.timeout_ms);
  socket_.emplace(std::move(socket));
}

json BrokerClient::request(json header, const std::vector<std::string>& frames, int timeout_ms) {
  if (!socket_) open_socket();
  const std::string req = std::to_string(next_req_++);
  header["req"] = req;
  // Refuse a malformed request here, with the codec's message, rather than as a broker error.
  wire::validate_header(header, wire::Channel::kClientToBroker, frames.size());

  const auto give_up = [&](const std::string& why) -> IoError {
    // A late reply must never be read as the answer to the next request: drop the socket
    // (and with it anything still in flight) and start over with a fresh one.
    socket_.reset();
    try {
      open_socket();  // connect now, so that the next request does not wait for it
    } catch (const std::exception&) {
      // request() opens one again when this failed
    }
    return IoError(why);
  };

  try {
    if (!wire::send(*socket_, "", header, frames)) {
      throw give_up("cannot send to the broker at " + options_.endpoint + " within " +
                    std::to_string(options_.timeout_ms) + " ms");
    }
  } catch (const zmq::error_t& e) {
    throw give_up("cannot send to the broker at " + options_.endpoint + ": " + e.what());
  }

  const auto deadline = Clock::now() + std::chrono::milliseconds(std::max(timeout_ms, 0));
  for (;;) {
    const auto left =
        std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
    if (left.count() <= 0) {
      throw give_up("no reply from the broker at " + options_.endpoint + " within " +
                    std::to_string(timeout_ms) + " ms");
    }
    zmq::pollitem_t item{socket_->handle(), 0, ZMQ_POLLIN, 0};
    try {
      if (wire::poll(&item, 1, left) == 0) continue;  // the deadline check above ends the loop
    } catch (const zmq::error_t& e) {
      if (e.num() == EINTR) continue;
      throw give_up("waiting for the broker at " + options_.endpoint + ": " + e.what());
    }
    std::optional<wire::RawMessage> raw;
    try {
      raw = wire::recv_raw(*socket_, /*routed=*/false, /*dontwait=*/true);
    } catch (const zmq::error_t& e) {
      if (e.num() == EINTR) continue;
      throw give_up("receiving from the broker at " + options_.endpoint + ": " + e.what());
    }
    if (!raw || raw->parts.empty()) continue;

    wire::Message reply;
    try {
      reply = wire::decode(*raw, wire::Channel::kBrokerToClient);
    } catch (const wire::WireError& e) {
      // A malformed reply to an older request is just as stale as a well-formed one.
      json h = json::parse(raw->parts.front(), nullptr, /*allow_exceptions=*/false);
      if (h.is_object() && h.contains("req") && h["req"] != req) continue;
      throw give_up("malformed reply from the broker at " + options_.endpoint + ": " + e.what());
    }
    // Replies without "req" can only answer this request: the socket is fresh after every
    // timeout and carries one request at a time.
    if (reply.header.contains("req") && reply.header["req"] != req) continue;

    if (reply.type() == "error") {
      throw BrokerRefusal(reply.header["code"].get<std::string>(),
                          "broker: " + reply.header["error"].get<std::string>());
    }
    return std::move(reply.header);
  }
}

namespace {

void add_idempotency(json& h, const std::string& key, const std::string& scope) {
  h["idempotency_key"] = key.empty() ? wire::random_id() : key;
  if (!scope.empty()) h["idempotency_scope"] = scope;
}

}  // namespace

json submit_query_header(const QueryRequest& request) {
  json h = wire::header("submit_query");
  h["top"] = request.top;
  if (!request.scorer.empty()) h["scorer"] = request.scorer;
  if (!request.prompt.empty()) h["prompt"] = request.prompt;
  if (request.deadline_ms > 0) h["deadline_ms"] = request.deadline_ms;
  add_idempotency(h, request.idempotency_key, request.idempotency_scope);
  return h;
}

json submit_upload_header(const UploadRequest& request) {
  json h = wire::header("submit_upload");
  h["model_id"] = request.model_id;
  h["prompts"] = request.prompts;
  h["downloads"] = request.downloads;
  if (!request.card.empty()) h["card"] = request.card;
  if (request.deadline_ms > 0) h["deadline_ms"] = request.deadline_ms;
  add_idempotency(h, request.idempotency_key, request.idempotency_scope);
  return h;
}

std::string BrokerClient::submit(const json& h, const std::vector<std::string>& frames) {
  // Every try carries the same idempotency key (fixed in `h`): a lost reply never makes a
  // second job.
  const int attempts = std::max(1, options_.submit_attempts);
  for (int attempt = 1;; ++attempt) {
    try {
      return expect_job_id(request(h, frames, options_.timeout_ms), options_.endpoint);
    } catch (const IoError&) {
      if (attempt >= attempts) throw;
    }
  }
}

std::string BrokerClient::submit_query(const QueryRequest& request) {
  return submit(submit_query_header(request), {request.image});
}

std::string BrokerClient::submit_upload(const UploadRequest& request) {
  return submit(submit_upload_header(request), request.images);
}

json BrokerClient::get_job(const std::string& job_id, int wait_ms) {
  wait_ms = std::clamp(wait_ms, 0, kMaxWaitMs);
  json h = wire::header("get_job");
  h["job_id"] = job_id;
  if (wait_ms > 0) h["wait_ms"] = wait_ms;
  json reply = request(std::move(h), {}, wait_ms + options_.timeout_ms);
  if (reply.value("type", "") != "job") {
    throw IoError("the broker at " + options_.endpoint + " answered get_job with \"" +
                  reply.value("type", "") + "\" instead of \"job\"");
  }
  return std::move(reply["job"]);
}

std::optional<std::string> BrokerClient::readiness(int timeout_ms) {
  try {
    json reply = request(wire::header("ping"), {}, timeout_ms);
    if (reply.value("type", "") != "pong") return std::nullopt;
    return reply.value("not_ready", std::string());
  } catch (const IoError&) {
    return std::nullopt;
  }
}

bool BrokerClient::ping(int timeout_ms) {
  try {
    return request(wire::header("ping"), {}, timeout_ms).value("type", "") == "pong";
  } catch (const IoError&) {
    return false;
  }
}

}  // namespace gmi
