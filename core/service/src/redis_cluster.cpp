// Keyed Redis commands on one server or across a Redis Cluster (see redis_cluster.hpp).
#include "gmi/redis_cluster.hpp"

#include <hiredis/hiredis.h>

#include <algorithm>
#include <charconv>
#include <chrono>
#include <cstring>
#include <thread>

#include "gmi/error.hpp"

namespace gmi {
namespace {

constexpr std::size_t kSlots = 16384;
// Attempts of one command through redirections and unreachable nodes, and the pause before
// attempt a (kPauseMs x a): about three seconds in all, what a failover of a master to its
// replica takes with a short cluster-node-timeout.
constexpr int kAttempts = 16;
constexpr int kPauseMs = 25;

bool starts_with(std::string_view text, std::string_view head) { return text.substr(0, head.size()) == head; }

std::string describe(const RedisConnection::Args& args) {
  return args.empty() ? std::string() : std::string(args.front());
}

void pause(int attempt) { std::this_thread::sleep_for(std::chrono::milliseconds(kPauseMs * (attempt + 1))); }

// "MOVED 3999 127.0.0.1:6381" -> "127.0.0.1:6381".
std::string redirect_target(std::string_view text) {
  const auto last = text.rfind(' ');
  return last == std::string_view::npos ? std::string() : std::string(text.substr(last + 1));
}

[[noreturn]] void bad_cluster_uri(const std::string& uri, const std::string& why) {
  throw InputError("invalid Redis Cluster URI \"" + uri + "\": " + why +
                   " (expected redis-cluster://[USER@]HOST:PORT[,HOST:PORT...][?prefix=P&partitions=K])");
}

}  // namespace

std::uint16_t crc16_xmodem(std::string_view bytes) {
  std::uint16_t crc = 0;
  for (const char c : bytes) {
    crc = static_cast<std::uint16_t>(crc ^ (static_cast<std::uint16_t>(static_cast<unsigned char>(c)) << 8));
    for (int bit = 0; bit < 8; ++bit)
      crc = static_cast<std::uint16_t>((crc & 0x8000) ? (crc << 1) ^ 0x1021 : crc << 1);
  }
  return crc;
}

std::uint16_t redis_key_slot(std::string_view key) {
  // The hash tag: between the first '{' and the first '}' after it, when not empty.
  if (const auto open = key.find('{'); open != std::string_view::npos) {
    const auto close = key.find('}', open + 1);
    if (close != std::string_view::npos && close > open + 1) key = key.substr(open + 1, close - open - 1);
  }
  return static_cast<std::uint16_t>(crc16_xmodem(key) % kSlots);
}

RedisClusterLocation parse_redis_cluster_uri(const std::string& uri) {
  constexpr std::string_view kScheme = "redis-cluster://";
  if (!starts_with(uri, kScheme)) bad_cluster_uri(uri, "it must start with redis-cluster://");
  std::string rest = uri.substr(kScheme.size()), query;
  if (const auto q = rest.find('?'); q != std::string::npos) {
    query = rest.substr(q + 1);
    rest.resize(q);
  }
  RedisClusterLocation loc;
  // The user (and a refusal of any password) by the single-server parser's rules.
  std::string hosts = rest;
  if (const auto at = rest.rfind('@'); at != std::string::npos) {
    hosts = rest.substr(at + 1);
    const RedisLocation probe = parse_redis_uri("redis://" + rest.substr(0, at + 1) + "localhost");
    loc.user = probe.user;
  }
  if (hosts.find('/') != std::string::npos) bad_cluster_uri(uri, "a Redis Cluster has database 0 only: no /DB");
  std::size_t start = 0;
  while (start <= hosts.size()) {
    std::size_t end = hosts.find(',', start);
    if (end == std::string::npos) end = hosts.size();
    const std::string one = hosts.substr(start, end - start);
    if (one.empty()) bad_cluster_uri(uri, "an empty node in the list");
    try {
      RedisLocation node = parse_redis_uri("redis://" + one);
      node.user = loc.user;
      loc.seeds.push_back(std::move(node));
    } catch (const InputError& e) {
      bad_cluster_uri(uri, "node \"" + one + "\": " + e.what());
    }
    start = end + 1;
  }
  for (const char* key : {"password=", "pass=", "auth="})
    if (("&" + query).find(std::string("&") + key) != std::string::npos)
      (void)parse_redis_uri("redis://localhost?" + query);  // throws the password message
  start = 0;
  while (start < query.size()) {
    std::size_t end = query.find('&', start);
    if (end == std::string::npos) end = query.size();
    const std::string param = query.substr(start, end - start);
    start = end + 1;
    if (param.empty()) continue;
    const auto eq = param.find('=');
    const std::string key = param.substr(0, eq), value = eq == std::string::npos ? "" : param.substr(eq + 1);
    if (key == "prefix") {
      if (value.find_first_of("{}") != std::string::npos)
        bad_cluster_uri(uri, "a cluster prefix must not hold '{' or '}' (the keys' hash tags are the store's)");
      loc.prefix = parse_redis_uri("redis://localhost?prefix=" + value).prefix;
    } else if (key == "partitions") {
      int k = 0;
      const auto [p, err] = std::from_chars(value.data(), value.data() + value.size(), k);
      if (err != std::errc() || p != value.data() + value.size() || k < 1 || k > 4096)
        bad_cluster_uri(uri, "partitions must be 1-4096");
      loc.partitions = k;
    } else {
      bad_cluster_uri(uri, "unknown parameter \"" + key + "\"");
    }
  }
  return loc;
}

std::string RedisClusterLocation::uri() const {
  std::string s = "redis-cluster://";
  if (!user.empty()) s += user + "@";
  for (std::size_t i = 0; i < seeds.size(); ++i) s += (i ? "," : "") + seeds[i].endpoint();
  s += "?prefix=" + prefix + "&partitions=" + std::to_string(partitions);
  return s;
}

std::vector<RedisReply> SingleRedis::pipeline(const std::vector<Keyed>& commands) {
  std::vector<Args> plain;
  plain.reserve(commands.size());
  for (const auto& c : commands) plain.push_back(c.args);
  return connection_.pipeline(plain);
}

RedisCluster::RedisCluster(RedisClusterLocation loc, int connect_timeout_ms, int io_timeout_ms)
    : loc_(std::move(loc)), connect_timeout_ms_(connect_timeout_ms), io_timeout_ms_(io_timeout_ms) {
  if (loc_.seeds.empty()) throw InputError("a Redis Cluster URI names no node");
  slots_.fill(-1);
  for (const auto& seed : loc_.seeds) node_index(seed.endpoint());
  refresh();
}

int RedisCluster::node_index(const std::string& endpoint) {
  for (std::size_t i = 0; i < nodes_.size(); ++i)
    if (nodes_[i].location.endpoint() == endpoint) return static_cast<int>(i);
  RedisLocation location;
  const auto colon = endpoint.rfind(':');
  location.host = endpoint.substr(0, colon);
  if (location.host.size() >= 2 && location.host.front() == '[') location.host = location.host.substr(1, location.host.size() - 2);
  location.port = colon == std::string::npos ? 6379 : std::atoi(endpoint.c_str() + colon + 1);
  location.user = loc_.user;
  location.prefix = loc_.prefix;
  nodes_.push_back(Node{location, nullptr});
  return static_cast<int>(nodes_.size() - 1);
}

RedisConnection& RedisCluster::connect(int node) {
  Node& n = nodes_[static_cast<std::size_t>(node)];
  if (!n.connection) n.connection = std::make_unique<RedisConnection>(n.location, connect_timeout_ms_, io_timeout_ms_);
  return *n.connection;
}

void RedisCluster::refresh() {
  std::string last = "no node to ask";
  // Every node known, the seeds first (nodes_ starts with them), until one answers.
  for (std::size_t i = 0; i < nodes_.size(); ++i) {
    RedisReply r;
    try {
      r = connect(static_cast<int>(i)).raw({"CLUSTER", "SLOTS"});
    } catch (const IoError& e) {
      last = e.what();
      continue;
    }
    const std::string asked = nodes_[i].location.endpoint();
    if (r->type == REDIS_REPLY_ERROR) {
      const std::string text(r->str, r->len);
      if (text.find("cluster support disabled") != std::string::npos)
        throw RedisNotApplied("redis at " + asked + " is not a cluster node (" + text +
                              "): use a redis:// URI for a single server");
      last = "redis at " + asked + ": CLUSTER SLOTS: " + text;
      continue;
    }
    if (r->type != REDIS_REPLY_ARRAY) {
      last = "redis at " + asked + ": unexpected reply to CLUSTER SLOTS";
      continue;
    }
    std::array<int, kSlots> map{};
    map.fill(-1);
    for (std::size_t e = 0; e < r->elements; ++e) {
      const redisReply* range = r->element[e];
      if (range->type != REDIS_REPLY_ARRAY || range->elements < 3) continue;
      const redisReply* master = range->element[2];
      if (master->type != REDIS_REPLY_ARRAY || master->elements < 2) continue;
      std::string host(master->element[0]->str ? master->element[0]->str : "", master->element[0]->len);
      if (host.empty() || host == "?") host = nodes_[i].location.host;  // "the node you asked"
      if (host.find(':') != std::string::npos) host = "[" + host + "]";
      const int node = node_index(host + ":" + std::to_string(master->element[1]->integer));
      const long long lo = range->element[0]->integer, hi = range->element[1]->integer;
      for (long long s = std::max(0LL, lo); s <= std::min<long long>(hi, kSlots - 1); ++s)
        map[static_cast<std::size_t>(s)] = node;
    }
    slots_ = map;
    connected_ = true;
    return;
  }
  connected_ = false;
  throw RedisUnreachable("no node of the Redis Cluster " + loc_.uri() + " answers: " + last);
}

int RedisCluster::node_for_slot(std::uint16_t slot) {
  if (slots_[slot] < 0) refresh();
  if (slots_[slot] < 0)
    throw RedisNotApplied("redis cluster " + loc_.uri() + ": no master serves slot " + std::to_string(slot) +
                          " (the cluster is not fully set up)");
  return slots_[slot];
}

RedisReply RedisCluster::send(int node, const Args& args, bool asking) {
  RedisConnection& c = connect(node);
  if (!asking) return c.raw(args);
  std::vector<RedisReply> both = c.raw_pipeline({{"ASKING"}, args});
  return std::move(both.back());
}

RedisReply RedisCluster::command(std::string_view key, const Args& args) {
  const std::uint16_t slot = redis_key_slot(key);
  int ask_node = -1;
  std::string last;
  bool unreachable = false;
  for (int attempt = 0; attempt < kAttempts; ++attempt) {
    int node = ask_node;
    RedisReply r;
    try {
      if (node < 0) node = node_for_slot(slot);
      r = send(node, args, ask_node >= 0);
      connected_ = true;
    } catch (const RedisUnreachable& e) {
      // The node is away (perhaps failing over): read the map again from another one.
      connected_ = false;
      unreachable = true;
      last = e.what();
      ask_node = -1;
      pause(attempt);
      try {
        refresh();
      } catch (const IoError& again) {
        last = again.what();
      }
      continue;
    }
    ask_node = -1;
    if (r->type != REDIS_REPLY_ERROR) return r;
    const std::string_view text(r->str, r->len);
    last = std::string(text);
    unreachable = false;
    if (starts_with(text, "MOVED ")) {
      ++redirects_.moved;
      slots_[slot] = node_index(redirect_target(text));
      try {
        refresh();  // a slot that moved rarely moved alone
      } catch (const IoError&) {
      }
      slots_[slot] = node_index(redirect_target(text));  // the node that answered knows best
      continue;
    }
    if (starts_with(text, "ASK ")) {
      ++redirects_.ask;
      ask_node = node_index(redirect_target(text));
      continue;
    }
    if (starts_with(text, "TRYAGAIN") || starts_with(text, "CLUSTERDOWN")) {
      ++redirects_.retried;
      pause(attempt);
      continue;
    }
    connect(node).throw_reply_error(r.get(), describe(args));
  }
  const std::string what = "redis cluster " + loc_.uri() + ": " + describe(args) + " (slot " + std::to_string(slot) +
                           ") failed after " + std::to_string(kAttempts) + " attempts: " + last;
  if (unreachable) throw RedisUnreachable(what);
  throw RedisNotApplied(what);
}

std::vector<RedisReply> RedisCluster::pipeline(const std::vector<Keyed>& commands) {
  std::vector<RedisReply> out(commands.size());
  // One pipeline per node of the map; whatever comes back redirected (or finds its node
  // away) goes again on its own through command(), which follows the redirection.
  std::vector<std::vector<std::size_t>> by_node;
  std::vector<std::size_t> alone;
  for (std::size_t i = 0; i < commands.size(); ++i) {
    int node = -1;
    try {
      node = node_for_slot(redis_key_slot(commands[i].key));
    } catch (const IoError&) {
      alone.push_back(i);
      continue;
    }
    if (by_node.size() <= static_cast<std::size_t>(node)) by_node.resize(static_cast<std::size_t>(node) + 1);
    by_node[static_cast<std::size_t>(node)].push_back(i);
  }
  for (std::size_t node = 0; node < by_node.size(); ++node) {
    const std::vector<std::size_t>& mine = by_node[node];
    if (mine.empty()) continue;
    std::vector<Args> args;
    args.reserve(mine.size());
    for (const std::size_t i : mine) args.push_back(commands[i].args);
    std::vector<RedisReply> replies;
    try {
      replies = connect(static_cast<int>(node)).raw_pipeline(args);
      connected_ = true;
    } catch (const RedisUnreachable&) {
      alone.insert(alone.end(), mine.begin(), mine.end());
      continue;
    }
    for (std::size_t j = 0; j < mine.size(); ++j) {
      const redisReply* r = replies[j].get();
      if (r->type == REDIS_REPLY_ERROR) {
        const std::string_view text(r->str, r->len);
        if (starts_with(text, "MOVED ") || starts_with(text, "ASK ") || starts_with(text, "TRYAGAIN") ||
            starts_with(text, "CLUSTERDOWN")) {
          alone.push_back(mine[j]);
          continue;
        }
        connect(static_cast<int>(node)).throw_reply_error(r, describe(commands[mine[j]].args));
      }
      out[mine[j]] = std::move(replies[j]);
    }
  }
  for (const std::size_t i : alone) out[i] = command(commands[i].key, commands[i].args);
  return out;
}

std::string RedisCluster::where(std::string_view key) const {
  const int node = slots_[redis_key_slot(key)];
  return node < 0 ? "(slot " + std::to_string(redis_key_slot(key)) + ", not mapped)"
                  : nodes_[static_cast<std::size_t>(node)].location.endpoint();
}

std::vector<std::string> RedisCluster::masters() const {
  std::vector<std::string> out;
  for (const int node : slots_) {
    if (node < 0) continue;
    const std::string e = nodes_[static_cast<std::size_t>(node)].location.endpoint();
    if (std::find(out.begin(), out.end(), e) == out.end()) out.push_back(e);
  }
  return out;
}

}  // namespace gmi
