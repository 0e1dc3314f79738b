#pragma once
/// One Redis connection (hiredis, synchronous), shared by the spec store and the job store.
///
/// URIs: "redis://[USER@]HOST[:PORT][/DB][?prefix=P]". The password is never taken from the
/// URI (it would show in argv): it comes from GMI_REDIS_PASSWORD or the file named by
/// GMI_REDIS_PASSWORD_FILE. A dead connection is dropped and the next command reconnects,
/// so every failure is an IoError the caller may retry.
/// Thread-safety: NOT thread-safe; one connection per thread.
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "gmi/error.hpp"

struct redisContext;
struct redisReply;

namespace gmi {

struct RedisLocation {
  std::string host;
  int port = 6379;
  int db = 0;
  std::string user;  ///< empty: the default user
  std::string prefix = "gmi";

  std::string endpoint() const;
  /// The URI again, without any secret.
  std::string uri() const;
};

/// Throws InputError naming the problem (including a password in the URI).
RedisLocation parse_redis_uri(const std::string& uri);

/// GMI_REDIS_PASSWORD if set and non-empty, else the contents of GMI_REDIS_PASSWORD_FILE
/// (trailing newlines trimmed), else empty (no AUTH).
std::string redis_password();

/// Redis failures say whether the command took effect, as redis-plus-plus's do:
/// RedisNotApplied  the server refused it (an error reply: OOM, WRONGTYPE, a script error)
///                  or it never left this process (no connection): nothing happened;
/// RedisOutcomeUnknown  it was sent and no reply came (timeout, connection lost): it may
///                  have been applied. Read back before answering anyone.
class RedisNotApplied : public IoError {
 public:
  using IoError::IoError;
};
class RedisOutcomeUnknown : public IoError {
 public:
  using IoError::IoError;
};
/// Not applied because no connection could be made (the server is away).
class RedisUnreachable : public RedisNotApplied {
 public:
  using RedisNotApplied::RedisNotApplied;
};

/// A reply, owned. Error replies are only returned by RedisConnection::raw() and raw_pipeline();
/// every other call throws IoError on them.
struct RedisReplyDeleter {
  void operator()(redisReply* r) const;
};
using RedisReply = std::unique_ptr<redisReply, RedisReplyDeleter>;

class RedisConnection {
 public:
  using Args = std::vector<std::string_view>;

  /// Connects at once (so a wrong host or password fails here). connect_timeout_ms bounds
  /// the TCP connect; io_timeout_ms bounds each reply.
  explicit RedisConnection(RedisLocation loc, int connect_timeout_ms = 5000,
                           int io_timeout_ms = 10000);
  ~RedisConnection();
  RedisConnection(const RedisConnection&) = delete;
  RedisConnection& operator=(const RedisConnection&) = delete;

  const RedisLocation& location() const { return loc_; }
  /// The key prefix plus ':' plus `suffix`.
  std::string key(std::string_view suffix) const;

  /// One command; throws IoError on a connection failure or an error reply.
  RedisReply command(const Args& args);
  /// All commands sent, then all replies read; throws on the first error reply.
  std::vector<RedisReply> pipeline(const std::vector<Args>& commands);
  /// command() and pipeline() that hand error replies back instead of throwing them (a
  /// cluster client reads MOVED and ASK from them); connection failures still throw.
  RedisReply raw(const Args& args);
  std::vector<RedisReply> raw_pipeline(const std::vector<Args>& commands);
  /// Throws the RedisNotApplied that command() throws for the error reply `r` to `doing`.
  [[noreturn]] void throw_reply_error(const redisReply* r, const std::string& doing) const;
  /// MULTI + commands + EXEC in one round trip. Returns EXEC's element replies; throws
  /// IoError if the transaction aborted or any command in it failed.
  std::vector<const redisReply*> transaction(const std::vector<Args>& commands,
                                             std::vector<RedisReply>& keep_alive);

  // Reply helpers; throw IoError naming `what` when the reply has another type.
  static std::optional<std::string> as_optional_string(const redisReply* r, const std::string& what);
  static long long as_integer(const redisReply* r, const std::string& what);
  static std::vector<std::string> as_string_array(const redisReply* r, const std::string& what);

  /// True when the last command found the server unreachable (for readiness probes).
  bool connected() const;
  /// Drops the connection; the next command reconnects.
  void reset();

 private:
  void connect();
  void ensure_connected();
  RedisReply raw_command(const Args& args, const std::string& doing);
  [[noreturn]] void connection_failed(const std::string& doing);

  RedisLocation loc_;
  std::string password_;
  int connect_timeout_ms_;
  int io_timeout_ms_;
  redisContext* ctx_ = nullptr;
};

}  // namespace gmi
