// The Redis connection shared by the spec store and the job store (see redis.hpp).
#include "gmi/redis.hpp"

#include <hiredis/hiredis.h>

#include <algorithm>
#include <charconv>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iterator>

#include "gmi/error.hpp"

namespace gmi {
namespace {


[[noreturn]] void bad_redis_uri(const std::string& uri, const std::string& why) {
  throw InputError("invalid Redis URI \"" + uri + "\": " + why +
                   " (expected redis://[USER@]HOST[:PORT][/DB][?prefix=P])");
}

[[noreturn]] void password_in_uri() {
  throw InputError(
      "a Redis password must not be part of the spec store URI: command lines are visible to "
      "every user of the machine (ps, /proc). Put it in GMI_REDIS_PASSWORD, or in a file named "
      "by GMI_REDIS_PASSWORD_FILE");
}

bool parse_int(std::string_view s, long long lo, long long hi, long long& out) {
  if (s.empty()) return false;
  auto [end, err] = std::from_chars(s.data(), s.data() + s.size(), out);
  return err == std::errc() && end == s.data() + s.size() && out >= lo && out <= hi;
}

bool valid_prefix(const std::string& p) {
  return !p.empty() && p.size() <= 128 && std::all_of(p.begin(), p.end(), [](char c) {
    return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
           std::strchr("._:-/{}", c) != nullptr;
  });
}

}  // namespace

RedisLocation parse_redis_uri(const std::string& uri) {
  if (uri.rfind("redis-cluster://", 0) == 0)
    throw InputError("\"" + uri.substr(0, uri.find('?')) +
                     "\" is a Redis Cluster: only the spec store spreads over one (--store, score.store); "
                     "job state needs one server, redis://HOST[:PORT]");
  if (uri.rfind("redis://", 0) != 0) bad_redis_uri(uri, "it must start with redis://");
  RedisLocation loc;
  std::string rest = uri.substr(std::strlen("redis://"));
  std::string query;
  if (auto q = rest.find('?'); q != std::string::npos) {
    query = rest.substr(q + 1);
    rest.resize(q);
  }
  // Passwords first, so that no later message quotes a URI that holds one.
  if (auto at = rest.rfind('@'); at != std::string::npos) {
    if (rest.substr(0, at).find(':') != std::string::npos) password_in_uri();
  }
  for (const char* key : {"password=", "pass=", "auth="}) {
    if (("&" + query).find(std::string("&") + key) != std::string::npos) password_in_uri();
  }
  std::string path;
  if (auto slash = rest.find('/'); slash != std::string::npos) {
    path = rest.substr(slash + 1);
    rest.resize(slash);
  }
  std::string hostport = rest;
  if (auto at = rest.rfind('@'); at != std::string::npos) {
    std::string userinfo = rest.substr(0, at);
    hostport = rest.substr(at + 1);
    if (userinfo.empty()) bad_redis_uri(uri, "the user name before '@' is empty");
    loc.user = userinfo;
  }
  std::string port_text;
  if (!hostport.empty() && hostport[0] == '[') {
    auto close = hostport.find(']');
    if (close == std::string::npos) bad_redis_uri(uri, "unterminated '[' in the host");
    loc.host = hostport.substr(1, close - 1);
    std::string after = hostport.substr(close + 1);
    if (!after.empty()) {
      if (after[0] != ':') bad_redis_uri(uri, "unexpected text after ']'");
      port_text = after.substr(1);
      if (port_text.empty()) bad_redis_uri(uri, "empty port");
    }
  } else {
    auto colon = hostport.find(':');
    if (colon != std::string::npos) {
      if (hostport.find(':', colon + 1) != std::string::npos) {
        bad_redis_uri(uri, "an IPv6 address must be written in brackets, e.g. [::1]:6379");
      }
      port_text = hostport.substr(colon + 1);
      if (port_text.empty()) bad_redis_uri(uri, "empty port");
    }
    loc.host = hostport.substr(0, colon);
  }
  if (loc.host.empty()) bad_redis_uri(uri, "no host");
  long long value = 0;
  if (!port_text.empty()) {
    if (!parse_int(port_text, 1, 65535, value)) bad_redis_uri(uri, "port must be 1-65535");
    loc.port = static_cast<int>(value);
  }
  if (!path.empty()) {
    if (!parse_int(path, 0, 1 << 20, value)) {
      bad_redis_uri(uri, "the path must be a database number, got \"/" + path + "\"");
    }
    loc.db = static_cast<int>(value);
  }
  std::size_t start = 0;
  while (start < query.size()) {
    std::size_t end = query.find('&', start);
    if (end == std::string::npos) end = query.size();
    std::string param = query.substr(start, end - start);
    start = end + 1;
    if (param.empty()) continue;
    auto eq = param.find('=');
    std::string key = param.substr(0, eq);
    std::string val = eq == std::string::npos ? "" : param.substr(eq + 1);
    if (key != "prefix") bad_redis_uri(uri, "unknown parameter \"" + key + "\"");
    if (!valid_prefix(val)) {
      bad_redis_uri(uri, "prefix must be 1-128 characters of [A-Za-z0-9._:/{}-]");
    }
    loc.prefix = val;
  }
  return loc;
}

std::string redis_password() {
  if (const char* p = std::getenv("GMI_REDIS_PASSWORD"); p != nullptr && *p != '\0') return p;
  const char* file = std::getenv("GMI_REDIS_PASSWORD_FILE");
  if (file == nullptr || *file == '\0') return {};
  std::ifstream in(file, std::ios::binary);
  if (!in) {
    throw IoError(std::string("GMI_REDIS_PASSWORD_FILE names ") + file + ", which cannot be read");
  }
  std::string password((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  while (!password.empty() && (password.back() == '\n' || password.back() == '\r')) {
    password.pop_back();
  }
  if (password.empty()) {
    throw InputError(std::string("the Redis password file ") + file + " is empty");
  }
  return password;
}


std::string RedisLocation::endpoint() const {
  std::string h = host.find(':') != std::string::npos ? "[" + host + "]" : host;
  return h + ":" + std::to_string(port);
}

std::string RedisLocation::uri() const {
  std::string s = "redis://";
  if (!user.empty()) s += user + "@";
  s += endpoint();
  if (db != 0) s += "/" + std::to_string(db);
  if (prefix != "gmi") s += "?prefix=" + prefix;
  return s;
}

void RedisReplyDeleter::operator()(redisReply* r) const { freeReplyObject(r); }

namespace {
bool is_auth_error(std::string_view text) {
  return text.rfind("NOAUTH", 0) == 0 || text.rfind("WRONGPASS", 0) == 0;
}
std::string describe_args(const RedisConnection::Args& args) {
  return args.empty() ? std::string() : std::string(args.front());
}
timeval to_timeval(int ms) { return timeval{ms / 1000, (ms % 1000) * 1000}; }
}  // namespace

RedisConnection::RedisConnection(RedisLocation loc, int connect_timeout_ms, int io_timeout_ms)
    : loc_(std::move(loc)),
      password_(redis_password()),
      connect_timeout_ms_(connect_timeout_ms),
      io_timeout_ms_(io_timeout_ms) {
  if (!loc_.user.empty() && password_.empty()) {
    throw InputError("the Redis URI names user '" + loc_.user +
                     "' but no password is set (GMI_REDIS_PASSWORD or GMI_REDIS_PASSWORD_FILE)");
  }
  connect();
}

RedisConnection::~RedisConnection() { reset(); }

void RedisConnection::reset() {
  if (ctx_ != nullptr) redisFree(ctx_);
  ctx_ = nullptr;
}

bool RedisConnection::connected() const { return ctx_ != nullptr && ctx_->err == 0; }

std::string RedisConnection::key(std::string_view suffix) const {
  std::string k = loc_.prefix;
  k += ':';
  k += suffix;
  return k;
}

void RedisConnection::connection_failed(const std::string& doing) {
  std::string why = ctx_ != nullptr && ctx_->err ? ctx_->errstr : "connection lost";
  reset();
  throw RedisOutcomeUnknown("redis at " + loc_.endpoint() + ": " + doing + " failed: " + why +
                            " (it may or may not have been applied)");
}

void RedisConnection::throw_reply_error(const redisReply* r, const std::string& doing) const {
  std::string text(r->str, r->len);
  if (is_auth_error(text)) {
    throw RedisNotApplied("redis at " + loc_.endpoint() + ": authentication failed (" + text +
                          "); check GMI_REDIS_PASSWORD / GMI_REDIS_PASSWORD_FILE");
  }
  throw RedisNotApplied("redis at " + loc_.endpoint() + ": " + doing + ": " + text);
}

void RedisConnection::connect() {
  reset();
  redisContext* ctx =
      redisConnectWithTimeout(loc_.host.c_str(), loc_.port, to_timeval(connect_timeout_ms_));
  if (ctx == nullptr) throw RedisNotApplied("redis at " + loc_.endpoint() + ": cannot allocate a connection");
  if (ctx->err) {
    std::string why = ctx->errstr;
    redisFree(ctx);
    throw RedisUnreachable("cannot connect to redis at " + loc_.endpoint() + ": " + why);
  }
  redisSetTimeout(ctx, to_timeval(io_timeout_ms_));
  redisEnableKeepAlive(ctx);
  ctx_ = ctx;
  if (!password_.empty()) {
    Args auth = loc_.user.empty() ? Args{"AUTH", password_} : Args{"AUTH", loc_.user, password_};
    RedisReply r = raw_command(auth, "AUTH");
    if (r->type == REDIS_REPLY_ERROR) {
      std::string text(r->str, r->len);
      reset();
      throw RedisNotApplied("redis at " + loc_.endpoint() + ": authentication failed" +
                    (loc_.user.empty() ? "" : " for user '" + loc_.user + "'") + " (" + text + ")");
    }
  }
  const std::string db = std::to_string(loc_.db);
  const std::string doing = loc_.db != 0 ? "SELECT " + db : "PING";
  RedisReply r = raw_command(loc_.db != 0 ? Args{"SELECT", db} : Args{"PING"}, doing);
  if (r->type == REDIS_REPLY_ERROR) {
    RedisReply keep = std::move(r);
    std::string text(keep->str, keep->len);
    reset();
    if (is_auth_error(text)) {
      throw RedisNotApplied("redis at " + loc_.endpoint() + ": authentication failed (" + text +
                    "); check GMI_REDIS_PASSWORD / GMI_REDIS_PASSWORD_FILE");
    }
    throw RedisNotApplied("redis at " + loc_.endpoint() + ": " + doing + ": " + text);
  }
}

void RedisConnection::ensure_connected() {
  if (ctx_ != nullptr && !ctx_->err) return;
  try {
    connect();
  } catch (const RedisOutcomeUnknown& e) {
    // Lost while connecting (AUTH, SELECT, PING): the caller's command was never sent.
    throw RedisUnreachable(e.what());
  }
}

RedisReply RedisConnection::raw_command(const Args& args, const std::string& doing) {
  std::vector<const char*> argv;
  std::vector<std::size_t> lens;
  for (auto a : args) {
    argv.push_back(a.data());
    lens.push_back(a.size());
  }
  auto* r = static_cast<redisReply*>(
      redisCommandArgv(ctx_, static_cast<int>(args.size()), argv.data(), lens.data()));
  if (r == nullptr) connection_failed(doing);
  return RedisReply(r);
}

RedisReply RedisConnection::command(const Args& args) {
  ensure_connected();
  RedisReply r = raw_command(args, describe_args(args));
  if (r->type == REDIS_REPLY_ERROR) throw_reply_error(r.get(), describe_args(args));
  return r;
}

RedisReply RedisConnection::raw(const Args& args) {
  ensure_connected();
  return raw_command(args, describe_args(args));
}

std::vector<RedisReply> RedisConnection::pipeline(const std::vector<Args>& commands) {
  std::vector<RedisReply> replies = raw_pipeline(commands);
  for (std::size_t i = 0; i < replies.size(); ++i) {
    if (replies[i]->type == REDIS_REPLY_ERROR) {
      throw_reply_error(replies[i].get(), describe_args(commands[i]));
    }
  }
  return replies;
}

std::vector<RedisReply> RedisConnection::raw_pipeline(const std::vector<Args>& commands) {
  ensure_connected();
  // hiredis formats every command into one output buffer before sending: a pipeline of
  // large values (a job's images) would sit there whole, a copy of all of it. Past
  // kFlushBytes the buffer goes out, so the copy is bounded by one command.
  constexpr std::size_t kFlushBytes = 8u << 20;
  std::size_t buffered = 0;
  bool sent_some = false;
  for (const auto& args : commands) {
    std::vector<const char*> argv;
    std::vector<std::size_t> lens;
    for (auto a : args) {
      argv.push_back(a.data());
      lens.push_back(a.size());
      buffered += a.size();
    }
    if (redisAppendCommandArgv(ctx_, static_cast<int>(args.size()), argv.data(), lens.data()) !=
        REDIS_OK) {
      if (sent_some) connection_failed("queueing " + describe_args(args));
      // Only buffered so far: nothing reached the server.
      reset();
      throw RedisNotApplied("redis at " + loc_.endpoint() + ": cannot queue " + describe_args(args));
    }
    if (buffered >= kFlushBytes) {
      int done = 0;
      while (done == 0) {
        if (redisBufferWrite(ctx_, &done) != REDIS_OK) connection_failed("sending " + describe_args(args));
      }
      sent_some = true;
      buffered = 0;
    }
  }
  std::vector<RedisReply> replies;
  for (const auto& args : commands) {
    void* raw = nullptr;
    if (redisGetReply(ctx_, &raw) != REDIS_OK || raw == nullptr) {
      connection_failed(describe_args(args));
    }
    replies.emplace_back(static_cast<redisReply*>(raw));
  }
  return replies;
}

std::vector<const redisReply*> RedisConnection::transaction(const std::vector<Args>& commands,
                                                            std::vector<RedisReply>& keep_alive) {
  std::vector<Args> all;
  all.reserve(commands.size() + 2);
  all.push_back({"MULTI"});
  all.insert(all.end(), commands.begin(), commands.end());
  all.push_back({"EXEC"});
  keep_alive = pipeline(all);
  const redisReply* exec = keep_alive.back().get();
  if (exec->type == REDIS_REPLY_NIL) {
    throw RedisNotApplied("redis at " + loc_.endpoint() + ": transaction aborted");
  }
  if (exec->type != REDIS_REPLY_ARRAY || exec->elements != commands.size()) {
    throw IoError("redis at " + loc_.endpoint() + ": unexpected reply type to EXEC");
  }
  std::vector<const redisReply*> out;
  for (std::size_t i = 0; i < exec->elements; ++i) {
    if (exec->element[i]->type == REDIS_REPLY_ERROR) {
      throw_reply_error(exec->element[i], "EXEC (" + describe_args(commands[i]) + ")");
    }
    out.push_back(exec->element[i]);
  }
  return out;
}

std::optional<std::string> RedisConnection::as_optional_string(const redisReply* r,
                                                               const std::string& what) {
  if (r->type == REDIS_REPLY_NIL) return std::nullopt;
  if (r->type != REDIS_REPLY_STRING && r->type != REDIS_REPLY_STATUS) {
    throw IoError("redis: unexpected reply type to " + what);
  }
  return std::string(r->str, r->len);
}

long long RedisConnection::as_integer(const redisReply* r, const std::string& what) {
  if (r->type != REDIS_REPLY_INTEGER) throw IoError("redis: unexpected reply type to " + what);
  return r->integer;
}

std::vector<std::string> RedisConnection::as_string_array(const redisReply* r,
                                                          const std::string& what) {
  if (r->type != REDIS_REPLY_ARRAY) throw IoError("redis: unexpected reply type to " + what);
  std::vector<std::string> out;
  out.reserve(r->elements);
  for (std::size_t i = 0; i < r->elements; ++i) {
    const redisReply* e = r->element[i];
    if (e->type == REDIS_REPLY_STRING || e->type == REDIS_REPLY_STATUS) {
      out.emplace_back(e->str, e->len);
    } else {
      out.emplace_back();
    }
  }
  return out;
}

}  // namespace gmi
