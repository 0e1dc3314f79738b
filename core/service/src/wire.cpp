// The message codec: header validation, multipart send/receive, float32 rows, ids, CURVE.
// The rules here and the JSON Schemas in schemas/ describe the same messages; the test
// tests/unit/schemas_test.cpp runs both over schemas/examples/.
#include "gmi/wire.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <limits>
#include <random>

#include "gmi/error.hpp"

namespace gmi::wire {
namespace {

using nlohmann::json;

[[noreturn]] void bad(const std::string& what) { throw WireError(what); }

enum class Kind { kString, kInt, kNumber, kBool, kObject, kArray };

const char* kind_name(Kind k) {
  switch (k) {
    case Kind::kString: return "a string";
    case Kind::kInt: return "an integer";
    case Kind::kNumber: return "a number";
    case Kind::kBool: return "a boolean";
    case Kind::kObject: return "an object";
    case Kind::kArray: return "an array";
  }
  return "?";
}

bool has_kind(const json& v, Kind k) {
  switch (k) {
    case Kind::kString: return v.is_string();
    case Kind::kInt: return v.is_number_integer();
    case Kind::kNumber: return v.is_number();
    case Kind::kBool: return v.is_boolean();
    case Kind::kObject: return v.is_object();
    case Kind::kArray: return v.is_array();
  }
  return false;
}

struct Field {
  const char* name;
  Kind kind;
  bool required;
  double min = 0, max = 0;  // ints and numbers (max 0 = unbounded); strings: max length
};

std::string number_text(double v) {
  return v == static_cast<double>(static_cast<long long>(v)) ? std::to_string(static_cast<long long>(v))
                                                              : json(v).dump();
}

// Checks presence, type and range; `where` prefixes messages ("tasks[2].").
void check_fields(const json& obj, const std::vector<Field>& fields, const std::string& where) {
  for (const auto& f : fields) {
    auto it = obj.find(f.name);
    if (it == obj.end()) {
      if (f.required) bad("missing field \"" + where + f.name + "\"");
      continue;
    }
    // null is a value of the wrong type, not an absent field: readers would throw on it.
    if (!has_kind(*it, f.kind)) {
      bad("field \"" + where + f.name + "\" must be " + kind_name(f.kind));
    }
    if ((f.kind == Kind::kInt || f.kind == Kind::kNumber) && f.max > 0) {
      double v = it->get<double>();
      if (v < f.min || v > f.max) {
        bad("field \"" + where + f.name + "\" must be in [" + number_text(f.min) + ", " +
            number_text(f.max) + "], got " + it->dump());
      }
    } else if ((f.kind == Kind::kInt || f.kind == Kind::kNumber) && it->get<double>() < f.min) {
      bad("field \"" + where + f.name + "\" must be >= " + number_text(f.min));
    }
    if (f.kind == Kind::kString && f.max > 0 && it->get_ref<const std::string&>().size() > f.max) {
      bad("field \"" + where + f.name + "\" is longer than " + number_text(f.max) + " bytes");
    }
  }
}

void expect_frames(std::size_t got, std::size_t want, const std::string& type) {
  if (got != want) {
    bad("\"" + type + "\" carries " + std::to_string(want) + " binary frame(s), got " +
        std::to_string(got));
  }
}

// Structural checks of a task's or result's "slots" (names, kinds, frame counts); what each
// kind needs is checked per task (Slots::read), so that one bad slot fails its task alone.
// Returns the number of frames the slots announce.
std::size_t check_slots(const json& item, const std::string& where) {
  auto it = item.find("slots");
  if (it == item.end()) return 0;
  std::size_t total = 0;
  for (std::size_t i = 0; i < it->size(); ++i) {
    const std::string at = where + "slots[" + std::to_string(i) + "]";
    if (!(*it)[i].is_object()) bad("field \"" + at + "\" must be an object");
    check_fields((*it)[i], {{"name", Kind::kString, true, 0, 64},
                            {"kind", Kind::kString, true, 0, 32},
                            {"frames", Kind::kInt, true, 0, 1 << 20}},
                 at + ".");
    total += (*it)[i]["frames"].get<std::size_t>();
  }
  return total;
}

void validate_client_to_broker(const json& h, const std::string& type, std::size_t frames) {
  if (type == "submit_query") {
    check_fields(h, {{"req", Kind::kString, false, 0, 128},
                     {"top", Kind::kInt, false, 1, 1000},
                     {"scorer", Kind::kString, false, 0, 32},
                     {"prompt", Kind::kString, false, 0, 4096},
                     {"idempotency_key", Kind::kString, false, 0, 128},
                     {"idempotency_scope", Kind::kString, false, 0, 128},
                     {"deadline_ms", Kind::kInt, false, 1, 86400000}},
                 "");
    expect_frames(frames, 1, type);
  } else if (type == "submit_upload") {
    check_fields(h, {{"req", Kind::kString, false, 0, 128},
                     {"model_id", Kind::kString, true, 0, 256},
                     {"prompts", Kind::kArray, true},
                     {"downloads", Kind::kNumber, false, 0, 0},
                     {"card", Kind::kString, false, 0, 65536},
                     {"idempotency_key", Kind::kString, false, 0, 128},
                     {"idempotency_scope", Kind::kString, false, 0, 128},
                     {"deadline_ms", Kind::kInt, false, 1, 86400000}},
                 "");
    const auto& prompts = h["prompts"];
    for (std::size_t i = 0; i < prompts.size(); ++i) {
      if (!prompts[i].is_string()) bad("field \"prompts[" + std::to_string(i) + "]\" must be a string");
    }
    if (frames == 0) bad("\"submit_upload\" needs at least one image frame");
    if (prompts.size() != frames) {
      bad("\"submit_upload\" has " + std::to_string(prompts.size()) + " prompts but " +
          std::to_string(frames) + " image frames; they must match one to one");
    }
  } else if (type == "get_job") {
    check_fields(h, {{"req", Kind::kString, false, 0, 128},
                     {"job_id", Kind::kString, true, 0, 64},
                     {"wait_ms", Kind::kInt, false, 0, 600000}},
                 "");
    expect_frames(frames, 0, type);
  } else if (type == "ping") {
    check_fields(h, {{"req", Kind::kString, false, 0, 128}}, "");
    expect_frames(frames, 0, type);
  } else {
    bad("unknown message type \"" + type + "\" (expected submit_query, submit_upload, get_job or ping)");
  }
}

void validate_broker_to_client(const json& h, const std::string& type, std::size_t frames) {
  if (type == "accepted") {
    check_fields(h, {{"req", Kind::kString, false}, {"job_id", Kind::kString, true}}, "");
  } else if (type == "job") {
    check_fields(h, {{"req", Kind::kString, false}, {"job", Kind::kObject, true}}, "");
    check_fields(h["job"], {{"job_id", Kind::kString, true},
                            {"kind", Kind::kString, true},
                            {"state", Kind::kString, true}},
                 "job.");
  } else if (type == "error") {
    check_fields(h, {{"req", Kind::kString, false},
                     {"code", Kind::kString, true},
                     {"error", Kind::kString, true}},
                 "");
  } else if (type == "pong") {
    // not_ready: why the broker cannot take jobs now (absent: it can).
    check_fields(h, {{"req", Kind::kString, false}, {"not_ready", Kind::kString, false}}, "");
  } else {
    bad("unknown message type \"" + type + "\" (expected accepted, job, error or pong)");
  }
  expect_frames(frames, 0, type);
}

void check_stage(const json& h, const std::string& where) {
  const auto& stage = h["stage"].get_ref<const std::string&>();
  const auto& names = stage_names();
  if (std::find(names.begin(), names.end(), stage) == names.end()) {
    bad("field \"" + where + "stage\" must be one of " + stage_list() + "; got \"" + stage + "\"");
  }
}

void validate_worker_to_broker(const json& h, const std::string& type, std::size_t frames) {
  if (type == "ready") {
    check_fields(h, {{"stage", Kind::kString, true},
                     {"worker", Kind::kString, true, 0, 256},
                     {"credit", Kind::kInt, true, 1, 4096},
                     {"shard", Kind::kInt, false, 0, 4095},
                     {"shards", Kind::kInt, false, 1, 4096},
                     {"reads", Kind::kArray, false},
                     {"credit_slot", Kind::kString, false, 0, 64},
                     {"session", Kind::kString, false, 0, 64}},
                 "");
    check_stage(h, "");
    if (h.contains("reads")) {
      for (std::size_t i = 0; i < h["reads"].size(); ++i) {
        if (!h["reads"][i].is_string()) bad("field \"reads[" + std::to_string(i) + "]\" must be a string");
      }
    }
    if (h.value("shard", 0) >= h.value("shards", 1)) bad("field \"shard\" must be below \"shards\"");
    expect_frames(frames, 0, type);
  } else if (type == "results") {
    check_fields(h, {{"results", Kind::kArray, true}, {"credit", Kind::kInt, false, 0, 4096}}, "");
    const auto& results = h["results"];
    std::size_t total = 0;
    for (std::size_t i = 0; i < results.size(); ++i) {
      const std::string where = "results[" + std::to_string(i) + "].";
      if (!results[i].is_object()) bad("field \"" + where.substr(0, where.size() - 1) + "\" must be an object");
      check_fields(results[i], {{"task", Kind::kString, true, 0, 256},
                                {"ok", Kind::kBool, true},
                                {"error", Kind::kString, false},
                                {"retryable", Kind::kBool, false},
                                {"compute_s", Kind::kNumber, false, 0, 0},
                                {"meta", Kind::kObject, false},
                                {"slots", Kind::kArray, false}},
                   where);
      if (!results[i]["ok"].get<bool>() && !results[i].contains("error")) {
        bad("field \"" + where + "error\" is required when ok is false");
      }
      total += check_slots(results[i], where);
    }
    expect_frames(frames, total, type);
  } else if (type == "heartbeat" || type == "bye") {
    // stuck_s: the worker's compute watchdog fired (a batch has run this long).
    check_fields(h, {{"stuck_s", Kind::kNumber, false, 0, 0}}, "");
    expect_frames(frames, 0, type);
  } else {
    bad("unknown message type \"" + type + "\" (expected ready, results, heartbeat or bye)");
  }
}

void validate_broker_to_worker(const json& h, const std::string& type, std::size_t frames) {
  if (type == "tasks") {
    check_fields(h, {{"tasks", Kind::kArray, true}}, "");
    const auto& tasks = h["tasks"];
    std::size_t total = 0;
    for (std::size_t i = 0; i < tasks.size(); ++i) {
      const std::string where = "tasks[" + std::to_string(i) + "].";
      if (!tasks[i].is_object()) bad("field \"" + where.substr(0, where.size() - 1) + "\" must be an object");
      check_fields(tasks[i], {{"task", Kind::kString, true, 0, 256},
                              {"job_id", Kind::kString, true, 0, 64},
                              {"kind", Kind::kString, true},
                              {"stage", Kind::kString, true},
                              {"attempt", Kind::kInt, true, 1, 1000},
                              {"params", Kind::kObject, true},
                              {"meta", Kind::kObject, true},
                              {"slots", Kind::kArray, true},
                              {"credit", Kind::kInt, false, 1, 4096}},
                   where);
      check_stage(tasks[i], where);
      total += check_slots(tasks[i], where);
    }
    expect_frames(frames, total, type);
  } else if (type == "heartbeat" || type == "reconnect") {
    expect_frames(frames, 0, type);
  } else {
    bad("unknown message type \"" + type + "\" (expected tasks, heartbeat or reconnect)");
  }
}

}  // namespace

json header(std::string_view type) { return json{{"v", kVersion}, {"type", type}}; }

void validate_header(const json& h, Channel channel, std::size_t frame_count) {
  if (!h.is_object()) bad("the header must be a JSON object");
  auto v = h.find("v");
  if (v == h.end()) bad("missing field \"v\" (the protocol version; this side speaks " + std::to_string(kVersion) + ")");
  if (!v->is_number_integer()) bad("field \"v\" must be an integer");
  if (v->get<long long>() != kVersion) {
    bad("unsupported protocol version " + v->dump() + " (this side speaks " + std::to_string(kVersion) + ")");
  }
  auto t = h.find("type");
  if (t == h.end() || !t->is_string()) bad("missing field \"type\" (a string)");
  const std::string type = t->get<std::string>();
  switch (channel) {
    case Channel::kClientToBroker: validate_client_to_broker(h, type, frame_count); break;
    case Channel::kBrokerToClient: validate_broker_to_client(h, type, frame_count); break;
    case Channel::kWorkerToBroker: validate_worker_to_broker(h, type, frame_count); break;
    case Channel::kBrokerToWorker: validate_broker_to_worker(h, type, frame_count); break;
  }
}

json parse_header(std::string_view bytes, Channel channel, std::size_t frame_count) {
  if (bytes.empty()) bad("empty header frame (expected a JSON object)");
  json h = json::parse(bytes.begin(), bytes.end(), nullptr, /*allow_exceptions=*/false);
  if (h.is_discarded()) bad("the header frame is not valid JSON");
  validate_header(h, channel, frame_count);
  return h;
}

bool send(zmq::socket_t& socket, const std::string& routing, const json& h,
          const std::vector<std::string>& frames, bool dontwait) {
  return send_views(socket, routing, h, std::vector<std::string_view>(frames.begin(), frames.end()), dontwait);
}

bool send_views(zmq::socket_t& socket, const std::string& routing, const json& h,
                const std::vector<std::string_view>& frames, bool dontwait) {
  const auto base = dontwait ? zmq::send_flags::dontwait : zmq::send_flags::none;
  const std::string text = h.dump(-1, ' ', false, json::error_handler_t::replace);
  if (!routing.empty()) {
    if (!socket.send(zmq::buffer(routing), base | zmq::send_flags::sndmore)) return false;
  }
  auto r = socket.send(zmq::buffer(text), frames.empty() ? base : base | zmq::send_flags::sndmore);
  if (!r) return false;
  for (std::size_t i = 0; i < frames.size(); ++i) {
    const bool last = i + 1 == frames.size();
    // Once the first part went out the rest is queued atomically; never drop mid-message.
    socket.send(zmq::buffer(frames[i]), last ? zmq::send_flags::none : zmq::send_flags::sndmore);
  }
  return true;
}

int poll(zmq::pollitem_t* items, std::size_t count, std::chrono::milliseconds timeout) {
  try {
    return zmq::poll(items, count, timeout);
  } catch (const zmq::error_t& e) {
    if (e.num() == EINTR) return 0;
    throw;
  }
}

std::optional<RawMessage> recv_raw(zmq::socket_t& socket, bool routed, bool dontwait) {
  RawMessage raw;
  bool first = true;
  for (;;) {
    zmq::message_t part;
    zmq::recv_result_t r;
    try {
      r = socket.recv(part, first && dontwait ? zmq::recv_flags::dontwait : zmq::recv_flags::none);
    } catch (const zmq::error_t& e) {
      // A signal before the first part: nothing received. Later parts arrive atomically.
      if (e.num() == EINTR && first) return std::nullopt;
      if (e.num() != EINTR) throw;
      continue;
    }
    if (!r) {
      if (first) return std::nullopt;
      continue;  // cannot happen mid-message; be safe
    }
    if (first && routed) {
      raw.routing = part.to_string();
    } else {
      raw.parts.push_back(part.to_string());
    }
    first = false;
    if (!part.more()) break;
  }
  return raw;
}

Message decode(RawMessage& raw, Channel channel) {
  if (raw.parts.empty()) bad("an empty message (no header frame)");
  Message m;
  m.header = parse_header(raw.parts.front(), channel, raw.parts.size() - 1);
  m.frames.assign(std::make_move_iterator(raw.parts.begin() + 1),
                  std::make_move_iterator(raw.parts.end()));
  return m;
}

std::string pack_rows(const RowMatrix& m) {
  std::string out(static_cast<std::size_t>(m.size()) * sizeof(float), '\0');
  if (m.size() > 0) std::memcpy(out.data(), m.data(), out.size());  // x86-64: little-endian
  return out;
}

RowMatrix unpack_rows(std::string_view bytes, std::size_t rows, std::size_t cols) {
  constexpr std::size_t kMaxIndex = static_cast<std::size_t>(std::numeric_limits<Eigen::Index>::max());
  const bool fits = rows <= kMaxIndex && cols <= kMaxIndex &&
                    (cols == 0 || rows <= bytes.size() / sizeof(float) / cols) &&
                    (rows == 0 || cols <= bytes.size() / sizeof(float) / rows);
  if (!fits || bytes.size() != rows * cols * sizeof(float)) {
    bad("a float32 frame of " + std::to_string(bytes.size()) + " bytes cannot hold " +
        std::to_string(rows) + " x " + std::to_string(cols) + " values");
  }
  RowMatrix m(static_cast<Eigen::Index>(rows), static_cast<Eigen::Index>(cols));
  if (!bytes.empty()) std::memcpy(m.data(), bytes.data(), bytes.size());
  return m;
}

bool is_id(std::string_view id) {
  return id.size() == 32 && std::all_of(id.begin(), id.end(), [](char c) {
           return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f');
         });
}

std::string random_id() {
  // Seeded from 256 bits of the OS's entropy, so ids do not collide across threads/processes.
  thread_local std::mt19937_64 rng = [] {
    std::random_device rd;
    std::seed_seq seq{rd(), rd(), rd(), rd(), rd(), rd(), rd(), rd()};
    return std::mt19937_64(seq);
  }();
  static const char* hex = "0123456789abcdef";
  std::string id(32, '0');
  std::uint64_t a = rng(), b = rng();
  for (int i = 0; i < 16; ++i) {
    id[i] = hex[(a >> (4 * i)) & 15];
    id[16 + i] = hex[(b >> (4 * i)) & 15];
  }
  return id;
}

CurveKeys read_curve_key_file(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw IoError("cannot read the CURVE key file " + path + ": " + std::strerror(errno));
  CurveKeys keys;
  std::string word, value;
  while (in >> word >> value) {
    if (word == "public") keys.public_key = value;
    else if (word == "secret") keys.secret_key = value;
    else throw InputError("CURVE key file " + path + ": unknown entry \"" + word + "\"");
  }
  auto check = [&](const std::string& k, const char* what) {
    if (!k.empty() && k.size() != 40) {
      throw InputError("CURVE key file " + path + ": the " + what + " key must be 40 Z85 characters");
    }
  };
  check(keys.public_key, "public");
  check(keys.secret_key, "secret");
  if (keys.public_key.empty()) throw InputError("CURVE key file " + path + " holds no public key");
  return keys;
}

CurveKeys generate_curve_key_files(const std::string& path) {
  char pub[41] = {0}, sec[41] = {0};
  if (zmq_curve_keypair(pub, sec) != 0) {
    throw IoError(std::string("cannot generate a CURVE key pair: ") + zmq_strerror(zmq_errno()) +
                  " (libzmq built without CURVE?)");
  }
  CurveKeys keys{pub, sec};
  {
    // Created 0600 from the start: no window in which another user can open the secret.
    const int fd = ::open(path.c_str(), O_CREAT | O_TRUNC | O_WRONLY | O_CLOEXEC, 0600);
    if (fd < 0) throw IoError("cannot write " + path + ": " + std::strerror(errno));
    const std::string text = "public " + keys.public_key + "\nsecret " + keys.secret_key + "\n";
    const bool ok = ::write(fd, text.data(), text.size()) == static_cast<ssize_t>(text.size());
    ::close(fd);
    if (!ok) throw IoError("cannot write " + path);
  }
  std::ofstream pub_out(path + ".pub", std::ios::trunc);
  if (!pub_out) throw IoError("cannot write " + path + ".pub: " + std::strerror(errno));
  pub_out << "public " << keys.public_key << "\n";
  if (!pub_out.flush()) throw IoError("cannot write " + path + ".pub");
  return keys;
}

void make_curve_server(zmq::socket_t& socket, const CurveKeys& server) {
  if (server.secret_key.empty()) throw InputError("the CURVE server key file holds no secret key");
  socket.set(zmq::sockopt::curve_server, 1);
  socket.set(zmq::sockopt::curve_secretkey, server.secret_key);
}

void make_curve_client(zmq::socket_t& socket, const std::string& server_public,
                       const CurveKeys& client) {
  if (client.secret_key.empty()) throw InputError("the CURVE client key file holds no secret key");
  socket.set(zmq::sockopt::curve_serverkey, server_public);
  socket.set(zmq::sockopt::curve_publickey, client.public_key);
  socket.set(zmq::sockopt::curve_secretkey, client.secret_key);
}

const std::vector<std::string>& stage_names() {
  static const std::vector<std::string> names{"decode", "interrogate", "embed", "score", "spec", "learn"};
  return names;
}

std::string stage_list() {
  std::string out;
  for (const auto& s : stage_names()) out += (out.empty() ? "" : ", ") + s;
  return out;
}

}  // namespace gmi::wire
