#pragma once
/// gmi's one message codec for ZeroMQ (see schemas/README.md for the protocol).
///
/// A message is one multipart ZeroMQ message: [routing id (ROUTER side only)], a header
/// frame (a UTF-8 JSON object with "v" and "type"), then binary frames (image bytes,
/// float32 arrays) that the header refers to by count, or (tasks, results) through named
/// slots (gmi/slots.hpp). Binary data never travels inside
/// JSON. Every header is validated on receipt; a bad one becomes a WireError naming the
/// problem, which the receiver answers with an "error" message and survives.
/// Thread-safety: functions are reentrant; a zmq socket must stay with one thread.
#include <chrono>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>
#include <zmq.hpp>

#include "gmi/error.hpp"
#include "gmi/linalg.hpp"

namespace gmi::wire {

/// 2: tasks and results carry named slots (gmi/slots.hpp) instead of positional frames.
inline constexpr int kVersion = 2;

/// A malformed, unknown or wrong-version message. Not retryable.
class WireError : public InputError {
 public:
  using InputError::InputError;
};

/// Who may send a message type: clients to the broker's frontend, the broker back to
/// clients, workers to the broker's backend, the broker to workers.
enum class Channel { kClientToBroker, kBrokerToClient, kWorkerToBroker, kBrokerToWorker };

/// A received (or to-be-sent) message, routing frame excluded.
struct Message {
  nlohmann::json header;
  std::vector<std::string> frames;

  std::string type() const { return header.value("type", ""); }
};

/// Parses and validates a header for `channel`: JSON object, "v" == kVersion, a known
/// "type", required fields of the right JSON types and ranges, and the number of binary
/// frames the type needs. Throws WireError naming the problem.
nlohmann::json parse_header(std::string_view bytes, Channel channel, std::size_t frame_count);

/// Validates a header built in memory (same rules as parse_header; used before sending
/// and by tests). Throws WireError.
void validate_header(const nlohmann::json& header, Channel channel, std::size_t frame_count);

/// Every stage a worker may serve: decode, interrogate, embed, score, spec (the query and
/// upload routes) and learn (metric jobs, made by the broker).
const std::vector<std::string>& stage_names();
/// The same, comma-separated, for messages.
std::string stage_list();

/// A new header {"v": kVersion, "type": type}.
nlohmann::json header(std::string_view type);

/// Sends [routing (when non-empty)] + header + frames. Returns false when the socket
/// would block (only with dontwait = true). Throws zmq::error_t on socket errors.
bool send(zmq::socket_t& socket, const std::string& routing, const nlohmann::json& header,
          const std::vector<std::string>& frames = {}, bool dontwait = false);
/// The same with views of the frames (ZeroMQ copies each into its message once).
bool send_views(zmq::socket_t& socket, const std::string& routing, const nlohmann::json& header,
                const std::vector<std::string_view>& frames, bool dontwait = false);

/// Raw parts of one multipart message; `routed` = the first frame is a ROUTER identity.
struct RawMessage {
  std::string routing;
  std::vector<std::string> parts;  ///< header bytes then binary frames
};
/// Receives one whole multipart message; nullopt when nothing is waiting (dontwait) or
/// the receive timed out.
std::optional<RawMessage> recv_raw(zmq::socket_t& socket, bool routed, bool dontwait = false);

/// zmq::poll that treats a signal (EINTR) as "nothing ready": SIGTERM must reach the
/// loop's stop check, not end the process with an exception.
int poll(zmq::pollitem_t* items, std::size_t count, std::chrono::milliseconds timeout);

/// recv_raw + parse_header. Throws WireError for a bad header (the raw routing id is in
/// `routing_out` so the caller can still answer).
Message decode(RawMessage& raw, Channel channel);

/// float32 rows, little-endian, row-major: the binary form of embeddings on the wire.
std::string pack_rows(const RowMatrix& m);
/// Inverse of pack_rows; WireError unless bytes.size() == rows * cols * 4.
RowMatrix unpack_rows(std::string_view bytes, std::size_t rows, std::size_t cols);

/// A random 128-bit identifier as 32 lower-case hex digits (job ids, task ids).
std::string random_id();
/// Whether `id` has random_id()'s shape (32 lower-case hex digits).
bool is_id(std::string_view id);

/// CURVE settings for one socket, read from key files (see `gmi keygen`).
struct CurveKeys {
  std::string public_key;  ///< Z85, 40 characters
  std::string secret_key;  ///< Z85, 40 characters
};
/// A key file holds "public <Z85>\nsecret <Z85>\n" (secret optional: a .pub file).
/// IoError if unreadable, InputError if malformed.
CurveKeys read_curve_key_file(const std::string& path);
/// Writes PATH (public + secret, mode 0600) and PATH.pub (public only). Returns the keys.
CurveKeys generate_curve_key_files(const std::string& path);
/// Makes `socket` a CURVE server with `server` keys (call before bind).
void make_curve_server(zmq::socket_t& socket, const CurveKeys& server);
/// Makes `socket` a CURVE client of `server_public` with `client` keys (call before connect).
void make_curve_client(zmq::socket_t& socket, const std::string& server_public,
                       const CurveKeys& client);

}  // namespace gmi::wire
