// The two spec stores behind open_spec_store(): a directory and Redis.
//
// Directory layout ("dir:PATH" or a plain PATH):
//   PATH/<model_id>.gmispec   one spec per model, replaced atomically (temp file in PATH,
//                             fsync, rename, fsync PATH)
//   PATH/.generation          decimal counter, bumped (by atomic rename) after every put and
//                             every remove that removed something; absent means 0
//   PATH/.lock                flock()ed while the counter is bumped, so that two writers
//                             never both turn N into N+1
// Readers need no lock. Files copied into PATH by hand are listed and read, but they do not
// bump the generation; a cache notices them at the next put/remove.
//
// Redis layout ("redis://[USER@]HOST[:PORT][/DB][?prefix=P]", prefix defaults to "gmi"),
// documented for operators in docs/redis-keys.md:
//   {prefix}:spec:{model_id}  STRING  the spec blob, exactly as serialize_spec() writes it
//   {prefix}:models           SET     the model ids that have a spec
//   {prefix}:generation       STRING  integer, INCR'd on every put and every effective remove
// put and remove change all three in one MULTI/EXEC transaction, so a reader never sees a
// spec without its id in the set, or a change without a new generation.
#include "unique_fd.hpp"
#include "gmi/spec_store.hpp"

#include <fcntl.h>
#include <hiredis/hiredis.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <charconv>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <random>
#include <string_view>
#include <system_error>

#include "gmi/error.hpp"

namespace gmi {
namespace {

namespace fs = std::filesystem;

constexpr const char* kSpecExtension = ".gmispec";

std::string errno_text(int err) { return std::generic_category().message(err); }

bool is_valid_model_id(const std::string& id) {
  try {
    validate_model_id(id);
    return true;
  } catch (const InputError&) {
    return false;
  }
}

// Re-throws a parse failure of stored bytes with the model and the place it came from.
Spec parse_stored(const std::vector<std::uint8_t>& bytes, const std::string& model_id,
                  const std::string& where) {
  Spec spec;
  try {
    spec = parse_spec(bytes);
  } catch (const SpecFormatError& e) {
    throw SpecFormatError("stored spec of model '" + model_id + "' (" + where +
                          ") is damaged: " + e.what());
  }
  if (spec.model_id != model_id) {
    throw SpecFormatError("stored spec " + where + " holds model '" + spec.model_id + "', not '" +
                          model_id + "'");
  }
  return spec;
}

// ---------------------------------------------------------------------------------------
// Directory store

using Fd = detail::UniqueFd;

[[noreturn]] void throw_io(const std::string& what, const fs::path& path, int err) {
  throw IoError(what + " " + path.string() + ": " + errno_text(err));
}

void write_all(int fd, const std::uint8_t* data, std::size_t size, const fs::path& path) {
  while (size > 0) {
    ssize_t n = ::write(fd, data, size);
    if (n < 0) {
      if (errno == EINTR) continue;
      throw_io("cannot write", path, errno);
    }
    data += n;
    size -= static_cast<std::size_t>(n);
  }
}

void fsync_dir(const fs::path& dir) {
  Fd fd(::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (fd.get() < 0) throw_io("cannot open directory", dir, errno);
  // Some filesystems cannot sync a directory; the rename itself has still happened.
  if (::fsync(fd.get()) != 0 && errno != EINVAL && errno != ENOTSUP) {
    throw_io("cannot sync directory", dir, errno);
  }
}

/// Replaces `target` with `bytes` so that readers see the old file or the new one, never
/// a mix, and the new one survives a crash once this returns.
void write_file_atomically(const fs::path& target, const std::uint8_t* data, std::size_t size) {
  const fs::path dir = target.parent_path();
  static thread_local std::mt19937_64 rng{std::random_device{}()};
  fs::path tmp;
  int raw_fd = -1;
  for (int attempt = 0; attempt < 100 && raw_fd < 0; ++attempt) {
    // Leading '.' and no .gmispec suffix: list() never mistakes a temp file for a spec.
    tmp = dir / ("." + target.filename().string() + ".tmp-" + std::to_string(::getpid()) + "-" +
                 std::to_string(rng()));
    raw_fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
    if (raw_fd < 0 && errno != EEXIST) throw_io("cannot create", tmp, errno);
  }
  if (raw_fd < 0) throw_io("cannot create a temporary file for", target, EEXIST);
  Fd fd(raw_fd);
  try {
    write_all(fd.get(), data, size, tmp);
    if (::fsync(fd.get()) != 0) throw_io("cannot sync", tmp, errno);
    if (fd.close() != 0) throw_io("cannot write", tmp, errno);
    if (::rename(tmp.c_str(), target.c_str()) != 0) throw_io("cannot replace", target, errno);
  } catch (...) {
    ::unlink(tmp.c_str());
    throw;
  }
  fsync_dir(dir);
}

/// The whole file, or nullopt when it does not exist.
std::optional<std::vector<std::uint8_t>> read_file(const fs::path& path) {
  Fd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (fd.get() < 0) {
    if (errno == ENOENT) return std::nullopt;
    throw_io("cannot open", path, errno);
  }
  struct stat st {};
  if (::fstat(fd.get(), &st) != 0) throw_io("cannot stat", path, errno);
  if (!S_ISREG(st.st_mode)) throw IoError(path.string() + " is not a regular file");
  std::vector<std::uint8_t> bytes;
  bytes.reserve(static_cast<std::size_t>(st.st_size));
  std::uint8_t buf[65536];
  for (;;) {
    ssize_t n = ::read(fd.get(), buf, sizeof buf);
    if (n < 0) {
      if (errno == EINTR) continue;
      throw_io("cannot read", path, errno);
    }
    if (n == 0) break;
    bytes.insert(bytes.end(), buf, buf + n);
  }
  return bytes;
}

class DirSpecStore final : public SpecStore {
 public:
  explicit DirSpecStore(fs::path dir) : dir_(std::move(dir)) {
    std::error_code ec;
    if (fs::exists(dir_, ec) && !fs::is_directory(dir_, ec)) {
      throw InputError("spec store location " + dir_.string() + " is not a directory");
    }
    fs::create_directories(dir_, ec);
    if (ec) throw IoError("cannot create spec directory " + dir_.string() + ": " + ec.message());
  }

  void put(const Spec& spec) override {
    const auto bytes = serialize_spec(spec);  // validates, model id included
    write_file_atomically(spec_path(spec.model_id), bytes.data(), bytes.size());
    bump_generation();
  }

  std::optional<Spec> get(const std::string& model_id) override {
    validate_model_id(model_id);
    const fs::path path = spec_path(model_id);
    auto bytes = read_file(path);
    if (!bytes) return std::nullopt;
    return parse_stored(*bytes, model_id, path.string());
  }

  bool remove(const std::string& model_id) override {
    validate_model_id(model_id);
    const fs::path path = spec_path(model_id);
    if (::unlink(path.c_str()) != 0) {
      if (errno == ENOENT) return false;
      throw_io("cannot remove", path, errno);
    }
    fsync_dir(dir_);
    bump_generation();
    return true;
  }

  std::vector<std::string> list() override {
    std::vector<std::string> ids;
    std::error_code ec;
    fs::directory_iterator it(dir_, ec);
    for (; !ec && it != fs::directory_iterator(); it.increment(ec)) {
      const fs::path& p = it->path();
      if (p.extension() != kSpecExtension) continue;
      std::string id = p.stem().string();
      std::error_code file_ec;
      if (!is_valid_model_id(id) || !it->is_regular_file(file_ec)) continue;
      ids.push_back(std::move(id));
    }
    if (ec) throw IoError("cannot list spec directory " + dir_.string() + ": " + ec.message());
    std::sort(ids.begin(), ids.end());
    return ids;
  }

  std::uint64_t generation() override { return read_generation(); }

  std::string describe() const override { return "dir:" + dir_.string(); }

 private:
  fs::path spec_path(const std::string& model_id) const {
    return dir_ / (model_id + kSpecExtension);
  }
  fs::path generation_path() const { return dir_ / ".generation"; }

  std::uint64_t read_generation() const {
    const fs::path path = generation_path();
    auto bytes = read_file(path);
    if (!bytes) return 0;
    std::string_view text(reinterpret_cast<const char*>(bytes->data()), bytes->size());
    while (!text.empty() && (text.back() == '\n' || text.back() == '\r')) text.remove_suffix(1);
    std::uint64_t value = 0;
    auto [end, err] = std::from_chars(text.data(), text.data() + text.size(), value);
    if (err != std::errc() || end != text.data() + text.size() || text.empty()) {
      throw IoError("generation file " + path.string() + " is damaged (expected a number)");
    }
    return value;
  }

  void bump_generation() {
    const fs::path lock_path = dir_ / ".lock";
    Fd lock(::open(lock_path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0666));
    if (lock.get() < 0) throw_io("cannot open lock file", lock_path, errno);
    while (::flock(lock.get(), LOCK_EX) != 0) {
      if (errno != EINTR) throw_io("cannot lock", lock_path, errno);
    }
    const std::string next = std::to_string(read_generation() + 1) + "\n";
    write_file_atomically(generation_path(), reinterpret_cast<const std::uint8_t*>(next.data()),
                          next.size());
    // Closing the descriptor releases the lock.
  }

  fs::path dir_;
};

// ---------------------------------------------------------------------------------------
// Redis store

struct RedisLocation {
  std::string host;
  int port = 6379;
  int db = 0;
  std::string user;  ///< empty: the default user
  std::string prefix = "gmi";

  std::string endpoint() const {
    std::string h = host.find(':') != std::string::npos ? "[" + host + "]" : host;
    return h + ":" + std::to_string(port);
  }
};

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

RedisLocation parse_redis_uri(const std::string& uri) {
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

/// GMI_REDIS_PASSWORD if set and non-empty, else the contents of GMI_REDIS_PASSWORD_FILE
/// (trailing newlines trimmed), else empty (no AUTH).
std::string redis_password() {
  if (const char* p = std::getenv("GMI_REDIS_PASSWORD"); p != nullptr && *p != '\0') return p;
  const char* file = std::getenv("GMI_REDIS_PASSWORD_FILE");
  if (file == nullptr || *file == '\0') return {};
  auto bytes = read_file(file);
  if (!bytes) {
    throw IoError(std::string("GMI_REDIS_PASSWORD_FILE names ") + file + ", which does not exist");
  }
  std::string password(bytes->begin(), bytes->end());
  while (!password.empty() && (password.back() == '\n' || password.back() == '\r')) {
    password.pop_back();
  }
  if (password.empty()) {
    throw InputError(std::string("the Redis password file ") + file + " is empty");
  }
  return password;
}

struct ReplyDeleter {
  void operator()(redisReply* r) const { freeReplyObject(r); }
};
using Reply = std::unique_ptr<redisReply, ReplyDeleter>;

struct ContextDeleter {
  void operator()(redisContext* c) const { redisFree(c); }
};

using Args = std::vector<std::string_view>;

class RedisSpecStore final : public SpecStore {
 public:
  explicit RedisSpecStore(RedisLocation loc)
      : loc_(std::move(loc)),
        password_(redis_password()),
        spec_prefix_(loc_.prefix + ":spec:"),
        models_key_(loc_.prefix + ":models"),
        generation_key_(loc_.prefix + ":generation") {
    if (!loc_.user.empty() && password_.empty()) {
      throw InputError("the Redis URI names user '" + loc_.user +
                       "' but no password is set (GMI_REDIS_PASSWORD or GMI_REDIS_PASSWORD_FILE)");
    }
    connect();  // fail at open, not at first use, when the server or the password is wrong
  }

  void put(const Spec& spec) override {
    const auto bytes = serialize_spec(spec);  // validates, model id included
    const std::string key = spec_key(spec.model_id);
    std::string_view blob(reinterpret_cast<const char*>(bytes.data()), bytes.size());
    auto replies = pipeline({{"MULTI"},
                             {"SET", key, blob},
                             {"SADD", models_key_, spec.model_id},
                             {"INCR", generation_key_},
                             {"EXEC"}});
    expect_exec(replies.back().get(), 3);
  }

  std::optional<Spec> get(const std::string& model_id) override {
    validate_model_id(model_id);
    const std::string key = spec_key(model_id);
    Reply r = command({"GET", key});
    if (r->type == REDIS_REPLY_NIL) return std::nullopt;
    if (r->type != REDIS_REPLY_STRING) unexpected("GET " + key);
    std::vector<std::uint8_t> bytes(r->str, r->str + r->len);
    return parse_stored(bytes, model_id, "Redis key " + key + " at " + loc_.endpoint());
  }

  bool remove(const std::string& model_id) override {
    validate_model_id(model_id);
    const std::string key = spec_key(model_id);
    // WATCH makes "remove only if present, and bump the generation only then" atomic:
    // EXEC aborts (nil) if the key changed after WATCH, and we look again.
    for (int attempt = 0; attempt < 16; ++attempt) {
      command({"WATCH", key});
      Reply exists = command({"EXISTS", key});
      if (exists->type != REDIS_REPLY_INTEGER) unexpected("EXISTS " + key);
      if (exists->integer == 0) {
        command({"UNWATCH"});
        return false;
      }
      auto replies = pipeline({{"MULTI"},
                               {"DEL", key},
                               {"SREM", models_key_, model_id},
                               {"INCR", generation_key_},
                               {"EXEC"}});
      if (replies.back()->type == REDIS_REPLY_NIL) continue;  // raced with another writer
      expect_exec(replies.back().get(), 3);
      return true;
    }
    throw IoError("redis at " + loc_.endpoint() + ": removing '" + model_id +
                  "' kept conflicting with concurrent writers");
  }

  std::vector<std::string> list() override {
    Reply r = command({"SMEMBERS", models_key_});
    if (r->type != REDIS_REPLY_ARRAY) unexpected("SMEMBERS " + models_key_);
    std::vector<std::string> ids;
    for (std::size_t i = 0; i < r->elements; ++i) {
      const redisReply* e = r->element[i];
      if (e->type != REDIS_REPLY_STRING) continue;
      std::string id(e->str, e->len);
      if (is_valid_model_id(id)) ids.push_back(std::move(id));
    }
    std::sort(ids.begin(), ids.end());
    return ids;
  }

  std::uint64_t generation() override {
    Reply r = command({"GET", generation_key_});
    if (r->type == REDIS_REPLY_NIL) return 0;
    if (r->type != REDIS_REPLY_STRING) unexpected("GET " + generation_key_);
    std::uint64_t value = 0;
    auto [end, err] = std::from_chars(r->str, r->str + r->len, value);
    if (err != std::errc() || end != r->str + r->len || r->len == 0) {
      throw IoError("redis at " + loc_.endpoint() + ": " + generation_key_ +
                    " does not hold a non-negative integer");
    }
    return value;
  }

  std::string describe() const override {
    std::string s = "redis://";
    if (!loc_.user.empty()) s += loc_.user + "@";
    s += loc_.endpoint();
    if (loc_.db != 0) s += "/" + std::to_string(loc_.db);
    if (loc_.prefix != "gmi") s += "?prefix=" + loc_.prefix;
    return s;
  }

 private:
  std::string spec_key(const std::string& model_id) const { return spec_prefix_ + model_id; }

  [[noreturn]] void unexpected(const std::string& what) const {
    throw IoError("redis at " + loc_.endpoint() + ": unexpected reply type to " + what);
  }

  // A dead connection is dropped, and the next call reconnects: IoError is retryable.
  [[noreturn]] void connection_failed(const std::string& doing) {
    std::string why = ctx_ && ctx_->err ? ctx_->errstr : "connection lost";
    ctx_.reset();
    throw IoError("redis at " + loc_.endpoint() + ": " + doing + " failed: " + why);
  }

  static bool is_auth_error(std::string_view text) {
    return text.rfind("NOAUTH", 0) == 0 || text.rfind("WRONGPASS", 0) == 0;
  }

  [[noreturn]] void throw_reply_error(const redisReply* r, const std::string& doing) const {
    std::string text(r->str, r->len);
    if (is_auth_error(text)) {
      throw IoError("redis at " + loc_.endpoint() + ": authentication failed (" + text +
                    "); check GMI_REDIS_PASSWORD / GMI_REDIS_PASSWORD_FILE");
    }
    throw IoError("redis at " + loc_.endpoint() + ": " + doing + ": " + text);
  }

  void connect() {
    ctx_.reset();
    const timeval connect_timeout{5, 0};
    std::unique_ptr<redisContext, ContextDeleter> ctx(
        redisConnectWithTimeout(loc_.host.c_str(), loc_.port, connect_timeout));
    if (!ctx) throw IoError("redis at " + loc_.endpoint() + ": cannot allocate a connection");
    if (ctx->err) {
      throw IoError("cannot connect to redis at " + loc_.endpoint() + ": " + ctx->errstr);
    }
    const timeval io_timeout{10, 0};
    redisSetTimeout(ctx.get(), io_timeout);
    redisEnableKeepAlive(ctx.get());
    ctx_ = std::move(ctx);
    if (!password_.empty()) {
      Args auth = loc_.user.empty() ? Args{"AUTH", password_} : Args{"AUTH", loc_.user, password_};
      Reply r = raw_command(auth, "AUTH");
      if (r->type == REDIS_REPLY_ERROR) {
        ctx_.reset();
        throw IoError("redis at " + loc_.endpoint() + ": authentication failed" +
                      (loc_.user.empty() ? "" : " for user '" + loc_.user + "'") + " (" +
                      std::string(r->str, r->len) + ")");
      }
    }
    const std::string db = std::to_string(loc_.db);
    Reply r = raw_command(loc_.db != 0 ? Args{"SELECT", db} : Args{"PING"},
                          loc_.db != 0 ? "SELECT " + db : "PING");
    if (r->type == REDIS_REPLY_ERROR) {
      ctx_.reset();
      throw_reply_error(r.get(), loc_.db != 0 ? "SELECT " + db : "PING");
    }
  }

  void ensure_connected() {
    if (!ctx_ || ctx_->err) connect();
  }

  static std::string describe_args(const Args& args) { return std::string(args.front()); }

  // One command; error replies are returned, not thrown.
  Reply raw_command(const Args& args, const std::string& doing) {
    std::vector<const char*> argv;
    std::vector<std::size_t> lens;
    for (auto a : args) {
      argv.push_back(a.data());
      lens.push_back(a.size());
    }
    auto* r = static_cast<redisReply*>(
        redisCommandArgv(ctx_.get(), static_cast<int>(args.size()), argv.data(), lens.data()));
    if (r == nullptr) connection_failed(doing);
    return Reply(r);
  }

  Reply command(const Args& args) {
    ensure_connected();
    Reply r = raw_command(args, describe_args(args));
    if (r->type == REDIS_REPLY_ERROR) throw_reply_error(r.get(), describe_args(args));
    return r;
  }

  // Sends all commands, then reads every reply (so the connection stays in step), then
  // throws on the first error reply.
  std::vector<Reply> pipeline(const std::vector<Args>& commands) {
    ensure_connected();
    for (const auto& args : commands) {
      std::vector<const char*> argv;
      std::vector<std::size_t> lens;
      for (auto a : args) {
        argv.push_back(a.data());
        lens.push_back(a.size());
      }
      if (redisAppendCommandArgv(ctx_.get(), static_cast<int>(args.size()), argv.data(),
                                 lens.data()) != REDIS_OK) {
        connection_failed(describe_args(args));
      }
    }
    std::vector<Reply> replies;
    for (const auto& args : commands) {
      void* raw = nullptr;
      if (redisGetReply(ctx_.get(), &raw) != REDIS_OK || raw == nullptr) {
        connection_failed(describe_args(args));
      }
      replies.emplace_back(static_cast<redisReply*>(raw));
    }
    for (std::size_t i = 0; i < replies.size(); ++i) {
      if (replies[i]->type == REDIS_REPLY_ERROR) {
        throw_reply_error(replies[i].get(), describe_args(commands[i]));
      }
    }
    return replies;
  }

  // EXEC's reply: one result per queued command; a command can fail inside a transaction
  // (e.g. WRONGTYPE) while the others still apply.
  void expect_exec(const redisReply* exec, std::size_t n) const {
    if (exec->type == REDIS_REPLY_NIL) {
      throw IoError("redis at " + loc_.endpoint() + ": transaction aborted");
    }
    if (exec->type != REDIS_REPLY_ARRAY || exec->elements != n) unexpected("EXEC");
    for (std::size_t i = 0; i < n; ++i) {
      if (exec->element[i]->type == REDIS_REPLY_ERROR) {
        throw_reply_error(exec->element[i], "EXEC");
      }
    }
  }

  RedisLocation loc_;
  std::string password_;
  std::string spec_prefix_;
  std::string models_key_;
  std::string generation_key_;
  std::unique_ptr<redisContext, ContextDeleter> ctx_;
};

}  // namespace

std::unique_ptr<SpecStore> open_spec_store(const std::string& uri) {
  if (uri.rfind("redis://", 0) == 0) {
    return std::make_unique<RedisSpecStore>(parse_redis_uri(uri));
  }
  if (uri.rfind("dir:", 0) == 0) {
    std::string path = uri.substr(4);
    if (path.empty()) throw InputError("spec store URI \"dir:\" names no directory");
    return std::make_unique<DirSpecStore>(path);
  }
  if (auto sep = uri.find("://"); sep != std::string::npos) {
    std::string scheme = uri.substr(0, sep);
    bool looks_like_scheme =
        !scheme.empty() && std::isalpha(static_cast<unsigned char>(scheme[0])) &&
        std::all_of(scheme.begin(), scheme.end(), [](char c) {
          return std::isalnum(static_cast<unsigned char>(c)) || c == '+' || c == '-' || c == '.';
        });
    if (looks_like_scheme) {
      throw InputError("unsupported spec store URI scheme \"" + scheme +
                       "://\" (use dir:PATH, a plain path, or redis://[USER@]HOST[:PORT][/DB])" +
                       (scheme == "rediss" ? "; TLS to Redis is not supported" : ""));
    }
  }
  if (uri.empty()) throw InputError("empty spec store location");
  return std::make_unique<DirSpecStore>(uri);
}

}  // namespace gmi
