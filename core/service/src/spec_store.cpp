// The two spec stores behind open_spec_store(): a directory and Redis.
//
// Directory layout ("dir:PATH" or a plain PATH):
//   PATH/<model_id>.gmispec   one spec per model, replaced atomically (temp file in PATH,
//                             fsync, rename, fsync PATH)
//   PATH/.generation          decimal counter, bumped (by atomic rename) after every put and
//                             every remove that removed something; absent means 0
//   PATH/.lock                flock()ed while the counter is bumped, so that two writers
//                             never both turn N into N+1
//   PATH/hub.gmimetric        the hub's metric (gmi/metric.hpp), replaced atomically under
//                             PATH/.metric-lock, which makes put_metric's version check and
//                             write one step
// Readers need no lock. Files copied into PATH by hand are listed and read, but they do not
// bump the generation; a cache notices them at the next put/remove.
//
// Redis layout ("redis://[USER@]HOST[:PORT][/DB][?prefix=P]", prefix defaults to "gmi"),
// documented for operators in docs/redis-keys.md:
//   {prefix}:spec:{model_id}  STRING  the spec blob, exactly as serialize_spec() writes it
//   {prefix}:models           SET     the model ids that have a spec
//   {prefix}:generation       STRING  integer, INCR'd on every put and every effective remove
//   {prefix}:spec-changes     STREAM  one entry {model: ID} per put/remove, trimmed to ~100k,
//                                     so that caches fetch only what changed
//   {prefix}:metric           HASH    {version: N, models: M, blob: gmimetric bytes}, the hub's metric,
//                                     replaced by one Lua script that checks the version
//   {prefix}:upload-seq       HASH    model id -> upload number of its stored spec (put_fenced's fence)
// put and remove change the first four in one Lua script, so a reader never sees a spec
// without its id in the set, or a change without a new generation.
//
// Redis Cluster ("redis-cluster://HOST:PORT[,...][?prefix=P&partitions=K]"): models are
// spread over K partitions (model_partition: FNV-1a of the id, modulo K), and partition N's
// keys carry the hash tag {pN}, so that they share a slot and one script still changes them
// together: {prefix}:{pN}:spec:{model_id}, :models, :generation, :spec-changes, :upload-seq.
// The hub-wide keys carry {hub}: {prefix}:{hub}:generation (INCR'd after each partition's
// write) and {prefix}:{hub}:metric. A change cursor is the K partitions' cursors, joined by ','.
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
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <random>
#include <string_view>
#include <system_error>

#include "gmi/error.hpp"
#include "gmi/files.hpp"
#include "gmi/parallel.hpp"
#include "gmi/redis.hpp"
#include "gmi/redis_cluster.hpp"

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
Spec parse_stored(const std::uint8_t* data, std::size_t size, const std::string& model_id,
                  const std::string& where) {
  Spec spec;
  try {
    spec = parse_spec(data, size);
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

Spec parse_stored(const std::vector<std::uint8_t>& bytes, const std::string& model_id, const std::string& where) {
  return parse_stored(bytes.data(), bytes.size(), model_id, where);
}

}  // namespace

std::vector<SpecStore::Fetched> SpecStore::get_many(const std::vector<std::string>& model_ids) {
  std::vector<Fetched> out(model_ids.size());
  for (std::size_t i = 0; i < model_ids.size(); ++i) {
    try {
      out[i].spec = get(model_ids[i]);
    } catch (const SpecFormatError& e) {
      out[i].damaged = e.what();
    }
  }
  return out;
}

namespace {

// ---------------------------------------------------------------------------------------
// Directory store

using Fd = detail::UniqueFd;

[[noreturn]] void throw_io(const std::string& what, const fs::path& path, int err) {
  throw IoError(what + " " + path.string() + ": " + errno_text(err));
}

void write_file_atomically(const fs::path& target, const std::uint8_t* data, std::size_t size) {
  gmi::write_file_atomically(target.string(), data, size);
}

void fsync_dir(const fs::path& dir) { gmi::fsync_dir(dir.string()); }

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

  FencedPut put_fenced(const Spec& spec, std::uint64_t upload_seq) override {
    if (upload_seq == 0) throw InputError("put_fenced: upload sequences start at 1");
    const auto bytes = serialize_spec(spec);
    // The stored spec's extra.upload_seq is the fence; read and written under the store's
    // lock, so that two writers cannot both pass it.
    Fd lock = lock_store();
    FencedPut out;
    if (auto bytes_now = read_file(spec_path(spec.model_id))) {
      try {
        const Spec now = parse_spec(*bytes_now);
        out.stored_seq = now.extra.value("upload_seq", 0ull);
      } catch (const SpecFormatError&) {
        // a damaged spec fences nothing: replace it
      }
    }
    if (out.stored_seq > upload_seq) return out;  // equal: a retry of the same upload
    write_file_atomically(spec_path(spec.model_id), bytes.data(), bytes.size());
    out.generation = bump_generation_locked();
    out.stored = true;
    out.stored_seq = upload_seq;
    return out;
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

  std::optional<Metric> get_metric() override {
    auto bytes = read_file(metric_path());
    if (!bytes) return std::nullopt;
    try {
      return parse_metric(*bytes);
    } catch (const SpecFormatError& e) {
      throw SpecFormatError("stored metric " + metric_path().string() + " is damaged: " + e.what());
    }
  }

  MetricStamp metric_stamp() override {
    const fs::path path = metric_path();
    Fd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
    if (fd.get() < 0) {
      if (errno == ENOENT) return {};
      throw_io("cannot open", path, errno);
    }
    // Only the header and the metadata: P may be tens of megabytes.
    std::vector<std::uint8_t> head(kMetricHeaderBytes);
    if (!read_exact(fd.get(), head.data(), head.size())) damaged_metric();
    const std::uint32_t json_len = static_cast<std::uint32_t>(head[12]) | static_cast<std::uint32_t>(head[13]) << 8 |
                                   static_cast<std::uint32_t>(head[14]) << 16 |
                                   static_cast<std::uint32_t>(head[15]) << 24;
    if (json_len > (1u << 20)) damaged_metric();
    head.resize(kMetricHeaderBytes + json_len);
    if (!read_exact(fd.get(), head.data() + kMetricHeaderBytes, json_len)) damaged_metric();
    auto v = peek_metric_stamp(head.data(), head.size());
    if (!v) damaged_metric();
    return *v;
  }

  std::uint64_t put_metric(const Metric& metric, std::uint64_t expected_version) override {
    const fs::path lock_path = dir_ / ".metric-lock";
    Fd lock(::open(lock_path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0666));
    if (lock.get() < 0) throw_io("cannot open lock file", lock_path, errno);
    while (::flock(lock.get(), LOCK_EX) != 0) {
      if (errno != EINTR) throw_io("cannot lock", lock_path, errno);
    }
    const std::uint64_t current = metric_version();
    if (current != expected_version)
      throw MetricConflictError("the metric of " + describe() + " is at version " + std::to_string(current) +
                                ", not " + std::to_string(expected_version) + " (another learner stored one)");
    Metric stored = metric;
    stored.version = expected_version + 1;
    const auto bytes = serialize_metric(stored);
    write_file_atomically(metric_path(), bytes.data(), bytes.size());
    return stored.version;
  }

  bool remove_metric() override {
    if (::unlink(metric_path().c_str()) != 0) {
      if (errno == ENOENT) return false;
      throw_io("cannot remove", metric_path(), errno);
    }
    fsync_dir(dir_);
    return true;
  }

  std::string describe() const override { return "dir:" + dir_.string(); }

 private:
  fs::path metric_path() const { return dir_ / "hub.gmimetric"; }

  [[noreturn]] void damaged_metric() const {
    throw SpecFormatError("stored metric " + metric_path().string() + " is damaged (bad header)");
  }

  static bool read_exact(int fd, std::uint8_t* data, std::size_t size) {
    while (size > 0) {
      ssize_t n = ::read(fd, data, size);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) return false;
      data += n;
      size -= static_cast<std::size_t>(n);
    }
    return true;
  }

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

  // The store's lock (flock on PATH/.lock), held until the descriptor closes.
  Fd lock_store() {
    const fs::path lock_path = dir_ / ".lock";
    Fd lock(::open(lock_path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0666));
    if (lock.get() < 0) throw_io("cannot open lock file", lock_path, errno);
    while (::flock(lock.get(), LOCK_EX) != 0) {
      if (errno != EINTR) throw_io("cannot lock", lock_path, errno);
    }
    return lock;
  }

  void bump_generation() {
    Fd lock = lock_store();
    bump_generation_locked();
    // Closing the descriptor releases the lock.
  }

  std::uint64_t bump_generation_locked() {
    const std::uint64_t next = read_generation() + 1;
    const std::string text = std::to_string(next) + "\n";
    write_file_atomically(generation_path(), reinterpret_cast<const std::uint8_t*>(text.data()),
                          text.size());
    return next;
  }

  fs::path dir_;
};

// ---------------------------------------------------------------------------------------
// Redis store

// Where the store's keys are: one server (every key "P:..."), or a cluster, where model
// partition p's keys share the hash tag {pN} (one slot: a put's script touches them together)
// and the hub-wide keys share {hub}.
struct RedisLayout {
  std::string prefix = "gmi";
  int partitions = 1;
  bool tagged = false;
  std::string part(int p) const { return tagged ? prefix + ":{p" + std::to_string(p) + "}:" : prefix + ":"; }
  std::string hub() const { return tagged ? prefix + ":{hub}:" : prefix + ":"; }
};

class RedisSpecStore final : public SpecStore {
 public:
  explicit RedisSpecStore(RedisLocation loc)
      : layout_{loc.prefix, 1, false}, describe_(loc.uri()), redis_(std::make_unique<SingleRedis>(std::move(loc))) {
    init_keys();
  }
  explicit RedisSpecStore(RedisClusterLocation loc)
      : layout_{loc.prefix, loc.partitions, true}, describe_(loc.uri()),
        redis_(std::make_unique<RedisCluster>(std::move(loc))) {
    init_keys();
  }

  void put(const Spec& spec) override {
    const auto bytes = serialize_spec(spec);  // validates, model id included
    static constexpr const char* kScript = R"lua(
redis.call('SET', KEYS[1], ARGV[1])
redis.call('SADD', KEYS[2], ARGV[2])
local g = redis.call('INCR', KEYS[3])
redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[3], '*', 'model', ARGV[2])
return g
)lua";
    const int p = model_partition(spec.model_id, layout_.partitions);
    const std::string key = spec_key(spec.model_id);
    std::string_view blob(reinterpret_cast<const char*>(bytes.data()), bytes.size());
    redis_->command(key, {"EVAL", kScript, "4", key, models_[p], generations_[p], changes_[p], blob, spec.model_id,
                          kChangeLogLength});
    bump_hub_generation(p);
  }

  FencedPut put_fenced(const Spec& spec, std::uint64_t upload_seq) override {
    if (upload_seq == 0) throw InputError("put_fenced: upload sequences start at 1");
    const auto bytes = serialize_spec(spec);
    // The fence (the partition's upload-seq hash, model -> sequence) is checked and moved in
    // the same script that writes the spec, its membership, the generation and the change log.
    static constexpr const char* kScript = R"lua(
local now = tonumber(redis.call('HGET', KEYS[5], ARGV[2]) or '0')
if now > tonumber(ARGV[3]) then return {0, now, 0} end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('SADD', KEYS[2], ARGV[2])
local g = redis.call('INCR', KEYS[3])
redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[4], '*', 'model', ARGV[2])
redis.call('HSET', KEYS[5], ARGV[2], ARGV[3])
return {1, tonumber(ARGV[3]), g}
)lua";
    const int p = model_partition(spec.model_id, layout_.partitions);
    const std::string key = spec_key(spec.model_id);
    const std::string seq = std::to_string(upload_seq);
    std::string_view blob(reinterpret_cast<const char*>(bytes.data()), bytes.size());
    RedisReply r = redis_->command(key, {"EVAL", kScript, "5", key, models_[p], generations_[p], changes_[p],
                                         upload_seqs_[p], blob, spec.model_id, seq, kChangeLogLength});
    if (r->type != REDIS_REPLY_ARRAY || r->elements != 3) throw IoError("redis: unexpected reply to put_fenced");
    FencedPut out;
    out.stored = r->element[0]->integer == 1;
    out.stored_seq = static_cast<std::uint64_t>(r->element[1]->integer);
    out.generation = static_cast<std::uint64_t>(r->element[2]->integer);
    if (out.stored) {
      if (const auto g = bump_hub_generation(p)) out.generation = *g;
    }
    return out;
  }

  std::optional<Spec> get(const std::string& model_id) override {
    validate_model_id(model_id);
    const std::string key = spec_key(model_id);
    RedisReply r = redis_->command(key, {"GET", key});
    auto blob = RedisConnection::as_optional_string(r.get(), "GET " + key);
    if (!blob) return std::nullopt;
    std::vector<std::uint8_t> bytes(blob->begin(), blob->end());
    return parse_stored(bytes, model_id, "Redis key " + key + " at " + redis_->where(key));
  }

  std::vector<Fetched> get_many(const std::vector<std::string>& model_ids) override {
    std::vector<RedisRouter::Keyed> commands;
    std::vector<std::string> keys;
    keys.reserve(model_ids.size());
    for (const auto& id : model_ids) {
      validate_model_id(id);
      keys.push_back(spec_key(id));
    }
    commands.reserve(keys.size());
    for (const auto& key : keys) commands.push_back({key, {"GET", key}});
    const std::vector<RedisReply> replies = redis_->pipeline(commands);
    std::vector<Fetched> out(model_ids.size());
    for (std::size_t i = 0; i < replies.size(); ++i) {
      const redisReply* r = replies[i].get();
      if (r->type != REDIS_REPLY_NIL && r->type != REDIS_REPLY_STRING)
        throw IoError("redis: unexpected reply type to GET " + keys[i]);
    }
    parallel_for(replies.size(), default_threads(), [&](std::size_t i) {
      const redisReply* r = replies[i].get();
      if (r->type == REDIS_REPLY_NIL) return;
      try {
        out[i].spec = parse_stored(reinterpret_cast<const std::uint8_t*>(r->str), r->len, model_ids[i],
                                   "Redis key " + keys[i] + " at " + redis_->where(keys[i]));
      } catch (const SpecFormatError& e) {
        out[i].damaged = e.what();
      } catch (const std::exception& e) {  // (parse throws only SpecFormatError; anything else is named too)
        out[i].damaged = e.what();
      }
    });
    return out;
  }

  bool remove(const std::string& model_id) override {
    validate_model_id(model_id);
    // Only if present, and the generation bumped and the change logged only then: one script.
    static constexpr const char* kScript = R"lua(
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[2], ARGV[1])
redis.call('INCR', KEYS[3])
redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[2], '*', 'model', ARGV[1])
return 1
)lua";
    const int p = model_partition(model_id, layout_.partitions);
    const std::string key = spec_key(model_id);
    RedisReply r = redis_->command(key, {"EVAL", kScript, "4", key, models_[p], generations_[p], changes_[p], model_id,
                                         kChangeLogLength});
    if (RedisConnection::as_integer(r.get(), "EVAL remove") == 0) return false;
    bump_hub_generation(p);
    return true;
  }

  std::vector<std::string> list() override {
    std::vector<RedisRouter::Keyed> commands;
    for (const auto& key : models_) commands.push_back({key, {"SMEMBERS", key}});
    std::vector<std::string> ids;
    const auto replies = redis_->pipeline(commands);
    for (std::size_t p = 0; p < replies.size(); ++p)
      for (auto& id : RedisConnection::as_string_array(replies[p].get(), "SMEMBERS " + models_[p]))
        if (is_valid_model_id(id)) ids.push_back(std::move(id));
    std::sort(ids.begin(), ids.end());
    return ids;
  }

  std::uint64_t generation() override {
    RedisReply r = redis_->command(hub_generation_, {"GET", hub_generation_});
    auto text = RedisConnection::as_optional_string(r.get(), "GET " + hub_generation_);
    if (!text) return 0;
    return parse_counter(*text, hub_generation_);
  }

  // One cursor per partition (a stream entry id each), joined by ','; one partition: the id.
  SpecChanges changes_since(const std::string& cursor) override {
    const auto parts = static_cast<std::size_t>(layout_.partitions);
    std::vector<std::string> cursors;
    if (!cursor.empty()) {
      std::size_t start = 0;
      while (start <= cursor.size()) {
        std::size_t end = cursor.find(',', start);
        if (end == std::string::npos) end = cursor.size();
        cursors.push_back(cursor.substr(start, end - start));
        start = end + 1;
      }
      const bool usable = cursors.size() == parts && std::all_of(cursors.begin(), cursors.end(), [](const std::string& c) {
        return !c.empty() && c.find_first_not_of("0123456789-") == std::string::npos;
      });
      if (!usable) cursors.clear();  // another store's cursor (another layout): start afresh
    }
    SpecChanges out;
    std::vector<RedisRouter::Keyed> commands;
    if (cursors.empty()) {
      // Start now: each partition's newest entry becomes its cursor.
      for (const auto& key : changes_) commands.push_back({key, {"XREVRANGE", key, "+", "-", "COUNT", "1"}});
      const auto replies = redis_->pipeline(commands);
      std::vector<std::string> now;
      for (std::size_t p = 0; p < parts; ++p) {
        auto entries = parse_stream(replies[p].get(), changes_[p]);
        now.push_back(entries.empty() ? "0-0" : entries.front().first);
      }
      out.cursor = join(now);
      out.complete = false;
      return out;
    }
    // Each log is trimmed to kChangeLogLength entries; if a partition's oldest kept entry is
    // newer than its cursor, something may have been dropped and the caller must reload.
    std::vector<std::string> from(parts);
    for (std::size_t p = 0; p < parts; ++p) {
      from[p] = "(" + cursors[p];
      commands.push_back({changes_[p], {"XRANGE", changes_[p], "-", "+", "COUNT", "1"}});
      commands.push_back({changes_[p], {"XRANGE", changes_[p], from[p], "+"}});
    }
    const auto replies = redis_->pipeline(commands);
    out.complete = true;
    for (std::size_t p = 0; p < parts; ++p) {
      auto oldest = parse_stream(replies[2 * p].get(), changes_[p]);
      auto entries = parse_stream(replies[2 * p + 1].get(), changes_[p]);
      if (!oldest.empty() && stream_id_less(cursors[p], oldest.front().first) && cursors[p] != "0-0")
        out.complete = false;
      if (!entries.empty()) cursors[p] = entries.back().first;
      for (auto& e : entries) out.models.push_back(std::move(e.second));
    }
    out.cursor = join(cursors);
    return out;
  }

  std::optional<Metric> get_metric() override {
    RedisReply r = redis_->command(metric_key_, {"HGET", metric_key_, "blob"});
    auto blob = RedisConnection::as_optional_string(r.get(), "HGET " + metric_key_);
    if (!blob) return std::nullopt;
    std::vector<std::uint8_t> bytes(blob->begin(), blob->end());
    try {
      return parse_metric(bytes);
    } catch (const SpecFormatError& e) {
      throw SpecFormatError("stored metric (Redis key " + metric_key_ + " at " + redis_->where(metric_key_) +
                            ") is damaged: " + e.what());
    }
  }

  MetricStamp metric_stamp() override {
    RedisReply r = redis_->command(metric_key_, {"HMGET", metric_key_, "version", "models"});
    auto fields = RedisConnection::as_string_array(r.get(), "HMGET " + metric_key_);
    MetricStamp stamp;
    if (fields.size() != 2 || fields[0].empty()) return stamp;
    stamp.version = parse_counter(fields[0], metric_key_ + " version");
    if (!fields[1].empty()) stamp.models = static_cast<int>(parse_counter(fields[1], metric_key_ + " models"));
    return stamp;
  }

  std::size_t count() override {
    std::vector<RedisRouter::Keyed> commands;
    for (const auto& key : models_) commands.push_back({key, {"SCARD", key}});
    std::size_t total = 0;
    const auto replies = redis_->pipeline(commands);
    for (std::size_t p = 0; p < replies.size(); ++p)
      total += static_cast<std::size_t>(RedisConnection::as_integer(replies[p].get(), "SCARD " + models_[p]));
    return total;
  }

  std::uint64_t put_metric(const Metric& metric, std::uint64_t expected_version) override {
    // Check and replace in one script: two learners cannot both store version N + 1.
    static constexpr const char* kScript =
        "local v = redis.call('HGET', KEYS[1], 'version') "
        "if (v or '0') ~= ARGV[1] then return -1 end "
        "redis.call('HSET', KEYS[1], 'version', ARGV[2], 'models', ARGV[4], 'blob', ARGV[3]) "
        "return tonumber(ARGV[2])";
    Metric stored = metric;
    stored.version = expected_version + 1;
    const auto bytes = serialize_metric(stored);
    const std::string expected = std::to_string(expected_version), next = std::to_string(stored.version);
    std::string_view blob(reinterpret_cast<const char*>(bytes.data()), bytes.size());
    const std::string models = std::to_string(stored.models);
    RedisReply r = redis_->command(metric_key_, {"EVAL", kScript, "1", metric_key_, expected, next, blob, models});
    if (RedisConnection::as_integer(r.get(), "EVAL put_metric") < 0)
      throw MetricConflictError("the metric at " + redis_->where(metric_key_) + " is no longer at version " +
                                expected + " (another learner stored one)");
    return stored.version;
  }

  bool remove_metric() override {
    RedisReply r = redis_->command(metric_key_, {"DEL", metric_key_});
    return RedisConnection::as_integer(r.get(), "DEL " + metric_key_) > 0;
  }

  std::string describe() const override { return describe_; }

 private:
  static constexpr const char* kChangeLogLength = "100000";

  void init_keys() {
    for (int p = 0; p < layout_.partitions; ++p) {
      const std::string part = layout_.part(p);
      models_.push_back(part + "models");
      generations_.push_back(part + "generation");
      changes_.push_back(part + "spec-changes");
      upload_seqs_.push_back(part + "upload-seq");
    }
    hub_generation_ = layout_.hub() + "generation";
    metric_key_ = layout_.hub() + "metric";
  }

  // In a cluster the hub's generation is a key of its own, moved after the partition's write
  // (a script cannot reach another slot): a reader that sees generation G then reads the
  // change logs sees every write numbered G or less. One server: the partition's counter is
  // the hub's (nullopt: nothing more to do).
  std::optional<std::uint64_t> bump_hub_generation(int p) {
    if (hub_generation_ == generations_[static_cast<std::size_t>(p)]) return std::nullopt;
    RedisReply r = redis_->command(hub_generation_, {"INCR", hub_generation_});
    return static_cast<std::uint64_t>(RedisConnection::as_integer(r.get(), "INCR " + hub_generation_));
  }

  static std::string join(const std::vector<std::string>& parts) {
    std::string out;
    for (std::size_t i = 0; i < parts.size(); ++i) out += (i ? "," : "") + parts[i];
    return out;
  }

  std::uint64_t parse_counter(const std::string& text, const std::string& what) const {
    std::uint64_t value = 0;
    auto [end, err] = std::from_chars(text.data(), text.data() + text.size(), value);
    if (err != std::errc() || end != text.data() + text.size() || text.empty()) {
      throw IoError("redis at " + redis_->where(what) + ": " + what + " does not hold a non-negative integer");
    }
    return value;
  }

  std::string spec_key(const std::string& model_id) const {
    return layout_.part(model_partition(model_id, layout_.partitions)) + "spec:" + model_id;
  }

  static bool stream_id_less(const std::string& a, const std::string& b) {
    auto split = [](const std::string& id) {
      auto dash = id.find('-');
      std::uint64_t ms = 0, seq = 0;
      std::from_chars(id.data(), id.data() + (dash == std::string::npos ? id.size() : dash), ms);
      if (dash != std::string::npos) std::from_chars(id.data() + dash + 1, id.data() + id.size(), seq);
      return std::pair{ms, seq};
    };
    return split(a) < split(b);
  }

  // XRANGE reply -> (entry id, model id) pairs.
  static std::vector<std::pair<std::string, std::string>> parse_stream(const redisReply* r, const std::string& key) {
    std::vector<std::pair<std::string, std::string>> out;
    if (r->type != REDIS_REPLY_ARRAY) {
      throw IoError("redis: unexpected reply type to XRANGE " + key);
    }
    for (std::size_t i = 0; i < r->elements; ++i) {
      const redisReply* e = r->element[i];
      if (e->type != REDIS_REPLY_ARRAY || e->elements != 2) continue;
      std::string id(e->element[0]->str, e->element[0]->len);
      auto fields = RedisConnection::as_string_array(e->element[1], "XRANGE fields");
      std::string model;
      for (std::size_t f = 0; f + 1 < fields.size(); f += 2) {
        if (fields[f] == "model") model = fields[f + 1];
      }
      out.emplace_back(std::move(id), std::move(model));
    }
    return out;
  }

  RedisLayout layout_;
  std::string describe_;
  std::unique_ptr<RedisRouter> redis_;
  std::vector<std::string> models_, generations_, changes_, upload_seqs_;  // per partition
  std::string hub_generation_, metric_key_;
};

}  // namespace

int model_partition(std::string_view model_id, int partitions) {
  if (partitions <= 1) return 0;
  std::uint64_t h = 1469598103934665603ull;  // FNV-1a, 64 bits
  for (const unsigned char c : model_id) {
    h ^= c;
    h *= 1099511628211ull;
  }
  return static_cast<int>(h % static_cast<std::uint64_t>(partitions));
}

std::unique_ptr<SpecStore> open_spec_store(const std::string& uri) {
  if (uri.rfind("redis-cluster://", 0) == 0) {
    return std::make_unique<RedisSpecStore>(parse_redis_cluster_uri(uri));
  }
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
                       "://\" (use dir:PATH, a plain path, redis://[USER@]HOST[:PORT][/DB] or redis-cluster://HOST:PORT[,HOST:PORT...])" +
                       (scheme == "rediss" ? "; TLS to Redis is not supported" : ""));
    }
  }
  if (uri.empty()) throw InputError("empty spec store location");
  return std::make_unique<DirSpecStore>(uri);
}

MetricLearnReport learn_store_metric(SpecStore& store, const EncoderIdentity& image_encoder,
                                     const MetricOptions& options,
                                     const std::function<void(std::size_t, std::size_t)>& progress) {
  const auto start = std::chrono::steady_clock::now();
  // Read the version first: a metric stored by someone else meanwhile wins, not ours.
  const std::uint64_t expected = store.metric_version();
  MetricLearner learner(image_encoder, options);
  MetricLearnReport report;
  const auto ids = store.list();
  for (std::size_t i = 0; i < ids.size(); ++i) {
    try {
      auto spec = store.get(ids[i]);
      if (spec && spec->image_encoder == image_encoder) {
        learner.add(*spec);
      } else {
        ++report.skipped;
      }
    } catch (const SpecFormatError&) {
      ++report.skipped;
    }
    if (progress) progress(i + 1, ids.size());
  }
  report.metric = learner.finish();
  report.metric.version = store.put_metric(report.metric, expected);
  report.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return report;
}

}  // namespace gmi
