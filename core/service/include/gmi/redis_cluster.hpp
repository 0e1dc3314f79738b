#pragma once
/// Keyed Redis commands routed to one server or across a Redis Cluster.
///
/// hiredis 0.14 has no cluster support, so the routing is ours: the key's hash slot
/// (CRC16/XMODEM of the key, or of its hash tag, the text between the first '{' and the
/// next '}' when that is not empty, modulo 16384), a slot map read with CLUSTER SLOTS,
/// one connection per node, and the redirections a node answers with:
///   MOVED slot host:port   the slot lives elsewhere now: the map is read again, the
///                          command goes there (nothing was applied);
///   ASK slot host:port     the slot is being migrated and this key has left: the command
///                          goes once to that node, preceded by ASKING (the map stays);
///   TRYAGAIN, CLUSTERDOWN  a multi-key command during a migration, or the cluster failing
///                          over: retried after a short pause.
/// A node that cannot be reached makes the client read the map again from another node (a
/// replica promoted by a failover takes over its slots) and retry, for about three seconds.
/// A command whose reply was lost (RedisOutcomeUnknown) is never retried here.
///
/// URIs: "redis-cluster://[USER@]HOST:PORT[,HOST:PORT...][?prefix=P&partitions=K]": the
/// nodes to ask for the slot map first (any subset of the cluster). The password comes
/// from GMI_REDIS_PASSWORD / GMI_REDIS_PASSWORD_FILE, as for one server.
/// Thread-safety: NOT thread-safe; one router per thread.
#include <array>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "gmi/redis.hpp"

namespace gmi {

/// The cluster hash slot of `key` (0 ... 16383), as Redis Cluster computes it.
std::uint16_t redis_key_slot(std::string_view key);
/// CRC16/XMODEM (polynomial 0x1021, initial 0), the checksum behind the slots.
std::uint16_t crc16_xmodem(std::string_view bytes);

struct RedisClusterLocation {
  std::vector<RedisLocation> seeds;  ///< host and port of each; user shared
  std::string user;
  std::string prefix = "gmi";
  int partitions = 16;  ///< spec store partitions, one hash tag each (spec_store.hpp)
  /// The URI again, without any secret.
  std::string uri() const;
};
/// Throws InputError naming the problem (a password in the URI, a database number, a
/// prefix with braces, which would take over the keys' hash tags).
RedisClusterLocation parse_redis_cluster_uri(const std::string& uri);

/// Where keyed commands go.
class RedisRouter {
 public:
  using Args = RedisConnection::Args;
  struct Keyed {
    std::string_view key;  ///< the key that routes the command (its slot)
    Args args;
  };
  virtual ~RedisRouter() = default;
  /// One command, routed by `key`; throws IoError (RedisNotApplied, RedisOutcomeUnknown,
  /// RedisUnreachable) like RedisConnection::command.
  virtual RedisReply command(std::string_view key, const Args& args) = 0;
  /// Several commands, each routed by its key, pipelined per node; replies in order. For
  /// reads and commands that may safely run twice. Throws on the first error reply.
  virtual std::vector<RedisReply> pipeline(const std::vector<Keyed>& commands) = 0;
  /// The node `key` lives on, for messages ("127.0.0.1:7001").
  virtual std::string where(std::string_view key) const = 0;
  /// True when the last command reached a server (readiness).
  virtual bool connected() const = 0;
};

/// Every key on one server.
class SingleRedis final : public RedisRouter {
 public:
  explicit SingleRedis(RedisLocation loc) : connection_(std::move(loc)) {}
  RedisReply command(std::string_view, const Args& args) override { return connection_.command(args); }
  std::vector<RedisReply> pipeline(const std::vector<Keyed>& commands) override;
  std::string where(std::string_view) const override { return connection_.location().endpoint(); }
  bool connected() const override { return connection_.connected(); }
  RedisConnection& connection() { return connection_; }

 private:
  RedisConnection connection_;
};

/// Keys spread over a Redis Cluster by their slots (see the file's comment).
class RedisCluster final : public RedisRouter {
 public:
  /// Reads the slot map at once (so a cluster that cannot be reached fails here).
  explicit RedisCluster(RedisClusterLocation loc, int connect_timeout_ms = 5000, int io_timeout_ms = 10000);
  RedisReply command(std::string_view key, const Args& args) override;
  std::vector<RedisReply> pipeline(const std::vector<Keyed>& commands) override;
  std::string where(std::string_view key) const override;
  bool connected() const override { return connected_; }

  const RedisClusterLocation& location() const { return loc_; }
  /// Reads the slot map again from the first node that answers CLUSTER SLOTS.
  void refresh();
  /// Redirections followed so far (MOVED and ASK; TRYAGAIN and CLUSTERDOWN retries).
  struct Redirects {
    std::uint64_t moved = 0, ask = 0, retried = 0;
  };
  const Redirects& redirects() const { return redirects_; }
  /// The masters in the current map (host:port), in slot order.
  std::vector<std::string> masters() const;

 private:
  struct Node {
    RedisLocation location;
    std::unique_ptr<RedisConnection> connection;  // made on first use
  };
  int node_index(const std::string& endpoint);
  RedisConnection& connect(int node);
  int node_for_slot(std::uint16_t slot);
  /// Sends one command to `node` (after ASKING when `asking`), the reply as it came.
  RedisReply send(int node, const Args& args, bool asking);

  RedisClusterLocation loc_;
  int connect_timeout_ms_, io_timeout_ms_;
  std::vector<Node> nodes_;
  std::array<int, 16384> slots_{};  // node index per slot, -1 when unknown
  bool connected_ = false;
  Redirects redirects_;
};

}  // namespace gmi
