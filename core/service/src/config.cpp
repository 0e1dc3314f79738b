// Layered settings (see config.hpp): defaults < YAML file < GMI_* environment < set().
#include "gmi/config.hpp"

#include <fcntl.h>
#include <unistd.h>
#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <set>
#include <sstream>

#include "gmi/error.hpp"

namespace gmi {
namespace {

// Secrets are short; a cap keeps a mistaken path (/dev/zero, a disk image) from eating memory.
constexpr std::size_t kMaxSecretBytes = 64 * 1024;
// Far above any real config file; a guard against pointing --config at a large file.
constexpr std::size_t kMaxConfigBytes = 4 * 1024 * 1024;

std::string lower(std::string s) {
  std::transform(s.begin(), s.end(), s.begin(),
                 [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  return s;
}

// Quotes a value for an error message; control characters are escaped so that a stray byte
// in an environment variable cannot break the log line that reports it.
std::string quote(const std::string& s) {
  std::string out = "\"";
  for (unsigned char c : s) {
    if (c == '"' || c == '\\') {
      out += '\\';
      out += static_cast<char>(c);
    } else if (c < 0x20 || c == 0x7f) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\x%02x", c);
      out += buf;
    } else {
      out += static_cast<char>(c);
    }
  }
  return out + "\"";
}

std::string format_number(double v) {
  std::ostringstream os;
  os << v;
  return os.str();
}

// Edit distance, for "did you mean" hints on misspelt keys.
std::size_t distance(const std::string& a, const std::string& b) {
  std::vector<std::size_t> row(b.size() + 1);
  for (std::size_t j = 0; j <= b.size(); ++j) row[j] = j;
  for (std::size_t i = 1; i <= a.size(); ++i) {
    std::size_t diag = row[0];
    row[0] = i;
    for (std::size_t j = 1; j <= b.size(); ++j) {
      std::size_t up = row[j];
      row[j] = std::min({row[j] + 1, row[j - 1] + 1, diag + (a[i - 1] == b[j - 1] ? 0 : 1)});
      diag = up;
    }
  }
  return row[b.size()];
}

std::string suggestion(const std::string& key) {
  std::string best;
  std::size_t best_d = 3;  // farther than this is a different word, not a typo
  for (const auto& k : Config::schema()) {
    std::size_t d = distance(key, k.key);
    if (d < best_d) {
      best_d = d;
      best = k.key;
    }
  }
  return best.empty() ? "" : " (did you mean " + quote(best) + "?)";
}

bool known(const std::string& key) {
  const auto& s = Config::schema();
  return std::any_of(s.begin(), s.end(), [&](const ConfigKey& k) { return k.key == key; });
}

[[noreturn]] void unknown_key(const std::string& key) {
  throw InputError("unknown configuration key " + quote(key) + suggestion(key));
}

// Flattens nested maps into dotted keys. Only scalars may be leaves: a sequence has no
// meaning for any key, and silently taking its first element would hide a mistake.
void flatten(const YAML::Node& node, const std::string& prefix, const std::string& path,
             std::map<std::string, std::string>& out) {
  auto where = [&]() { return "config file " + path + ": "; };
  switch (node.Type()) {
    case YAML::NodeType::Map: {
      std::set<std::string> seen;
      for (const auto& kv : node) {
        if (!kv.first.IsScalar()) {
          throw InputError(where() + "a key under " + quote(prefix.empty() ? "(top)" : prefix) +
                           " is not a plain name");
        }
        std::string name = kv.first.Scalar();
        const std::string full = prefix.empty() ? name : prefix + "." + name;
        if (!seen.insert(name).second) {
          // YAML forbids it; yaml-cpp keeps both and lookups see the first: a silent trap.
          const auto mark = kv.first.Mark();
          throw InputError(
              where() +
              (mark.is_null() ? std::string() : "line " + std::to_string(mark.line + 1) + ": ") +
              "key " + quote(full) + " appears twice");
        }
        flatten(kv.second, full, path, out);
      }
      return;
    }
    case YAML::NodeType::Scalar:
      if (prefix.empty()) throw InputError(where() + "expected a map of sections, not a scalar");
      out[prefix] = node.Scalar();
      return;
    case YAML::NodeType::Null:
      // `key:` with nothing after it reads as the empty value ("" is valid, e.g. no API key).
      if (!prefix.empty()) out[prefix] = "";
      return;
    case YAML::NodeType::Sequence:
      throw InputError(
          where() +
          (prefix.empty() ? std::string("expected a map of sections") : "key " + quote(prefix)) +
          ": lists are not allowed, only single values");
    case YAML::NodeType::Undefined:
      return;
  }
}

// Reads a whole file with POSIX calls so that the error names the real cause (ENOENT, EACCES,
// EISDIR). Returns errno on failure, 0 on success; EFBIG when it is longer than `limit`.
int read_file(const std::string& path, std::size_t limit, std::string& out) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return errno;
  out.clear();
  char buf[4096];
  int err = 0;
  for (;;) {
    ssize_t n = ::read(fd, buf, sizeof buf);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      err = errno;
      break;
    }
    if (n == 0) break;
    out.append(buf, static_cast<std::size_t>(n));
    if (out.size() > limit) {
      err = EFBIG;
      break;
    }
  }
  ::close(fd);
  return err;
}

}  // namespace

const std::vector<ConfigKey>& Config::schema() {
  static const std::vector<ConfigKey> keys = {
      {"log.level", "info", "least severe log level written: debug, info, warn or error",
       ConfigType::one_of("debug|info|warn|error")},
      {"log.format", "json", "log line format on stderr: json (one object per line) or text",
       ConfigType::one_of("json|text")},

      {"redis.uri", "redis://127.0.0.1:6379",
       "Redis holding specs, results and dead letters (no password here: GMI_REDIS_PASSWORD)"},
      {"redis.spec_uri", "",
       "where the specs live, when not in redis.uri: redis://..., or a Redis Cluster, "
       "redis-cluster://HOST:PORT[,HOST:PORT...][?partitions=K] (empty: redis.uri)"},
      {"redis.result_ttl_s", "86400", "seconds a finished job's result stays in Redis",
       ConfigType::integer(1, 1ll << 31)},
      {"redis.dead_letter_ttl_s", "604800", "seconds a dead-lettered job stays in Redis",
       ConfigType::integer(1, 1ll << 31)},
      {"redis.job_events_maxlen", "1000000",
       "about how many job events (accepted, stage, retry, finished, failed) the stream "
       "P:job-events keeps (0: no stream)",
       ConfigType::integer(0, 1ll << 40)},

      {"broker.frontend", "tcp://127.0.0.1:5555", "client intake endpoint the broker binds"},
      {"broker.backend", "tcp://127.0.0.1:5556", "worker endpoint the broker binds"},
      {"broker.heartbeat_ms", "500", "milliseconds between heartbeats to and from workers",
       ConfigType::integer(10, 600000)},
      {"broker.liveness", "6", "missed heartbeats before a peer counts as dead",
       ConfigType::integer(2, 1000)},
      {"broker.max_attempts", "4", "tries per task before its job goes to the dead letters",
       ConfigType::integer(1, 100)},
      {"broker.backoff_ms", "100", "delay before the first retry of a failed task",
       ConfigType::integer(0, 600000)},
      {"broker.backoff_max_ms", "5000", "upper bound of the doubling retry delay",
       ConfigType::integer(0, 3600000)},
      {"broker.max_pending_jobs", "10000", "jobs in flight before new ones are refused",
       ConfigType::integer(1, 100000000)},
      {"broker.max_pending_bytes", "4294967296",
       "payload bytes (inputs, pixels, embeddings) unfinished jobs may hold before new ones are "
       "refused as busy",
       ConfigType::integer(1024, 1ll << 50)},
      {"broker.claim_bytes", "1048576",
       "an input at least this large stays only in Redis and the first stage fetches it (a "
       "claim check: the broker relays it once and holds none of it); 0: never",
       ConfigType::integer(0, 1ll << 40)},
      {"broker.task_timeout_s", "300", "seconds a worker may hold a task before it is retried",
       ConfigType::integer(1, 86400)},
      {"broker.reconcile_s", "30",
       "seconds between adopting active jobs in Redis this broker does not hold",
       ConfigType::integer(1, 86400)},
      {"broker.query_deadline_s", "120",
       "seconds a query may take from acceptance before it fails \"deadline exceeded\" "
       "(a request may set its own, up to a day)",
       ConfigType::integer(1, 86400)},
      {"broker.upload_deadline_s", "3600", "the same for an upload (spec build)",
       ConfigType::integer(1, 86400)},
      {"broker.metric_deadline_s", "21600", "the same for a metric (learn) job",
       ConfigType::integer(1, 86400)},
      {"broker.no_worker_wait_s", "30",
       "seconds a query waits at a stage or score shard with no live worker before it fails "
       "naming it (0: until its deadline)",
       ConfigType::integer(0, 86400)},
      {"broker.max_message_bytes", "268435456", "largest message accepted on either socket",
       ConfigType::integer(1024, 1ll << 34)},
      {"broker.ops_port", "9100",
       "port of the broker's /metrics, /healthz, /readyz (-1 disables, 0 picks a free port)",
       ConfigType::integer(-1, 65535)},

      {"ops.host", "0.0.0.0",
       "address every process's ops server (/metrics, /healthz, /readyz) listens on"},

      {"worker.broker", "tcp://127.0.0.1:5556", "the broker backend a worker connects to"},
      {"worker.ops_port", "0", "port of a worker's ops server (-1 disables, 0 picks a free port)",
       ConfigType::integer(-1, 65535)},

      {"decode.max_batch", "16", "most images a decode worker takes at once",
       ConfigType::integer(1, 4096)},
      {"decode.max_wait_ms", "0", "how long a decode worker waits to fill a batch",
       ConfigType::integer(0, 60000)},
      {"decode.max_pixels", "50000000", "largest image (width x height) a decoder accepts",
       ConfigType::integer(1, 1ll << 40)},
      {"decode.max_bytes", "33554432", "largest encoded image a decoder accepts",
       ConfigType::integer(1, 1ll << 34)},

      {"embed.max_batch", "64", "most images an embed worker encodes at once",
       ConfigType::integer(1, 65536)},
      {"embed.max_wait_ms", "0",
       "how long an embed worker waits to fill a batch (0: batches form while it computes)",
       ConfigType::integer(0, 60000)},
      {"embed.device", "cpu", "where TorchScript encoders run: cpu, cuda or cuda:N"},
      {"embed.fp16", "true", "half precision when embed.device is a CUDA device",
       ConfigType::boolean()},

      {"encoder.image", "auto",
       "image encoder: auto (the best installed), builtin, an installed name, or a card path"},
      {"encoder.text", "auto",
       "prompt encoder: auto (the built-in hashed one), builtin, a name or a card"},
      {"encoder.dir", "",
       "folder of installed encoders (empty: $GMI_ENCODER_DIR or ~/.local/share/gmi/encoders)"},

      {"routes.query", "decode,embed,interrogate,score",
       "stages a query job runs through, in order (with the captioner: "
       "decode,interrogate,embed,score)"},
      {"routes.upload", "decode,embed,spec",
       "stages an upload (spec build) job runs through, in order"},

      {"interrogate.interrogator", "neighbour",
       "how prompts are guessed for images: neighbour, ridge, prompt-bank or captioner",
       ConfigType::one_of("neighbour|ridge|prompt-bank|captioner")},
      {"interrogate.prompt_bank", "",
       "prompt-bank: file of prompts, one per line (platform prompts, style words)"},
      {"interrogate.bank_tau", "0.01",
       "prompt-bank: softmax temperature over the cosine similarities",
       ConfigType::number(1e-6, 1e6)},
      {"interrogate.top_k", "8", "prompt-bank: how many of the nearest bank prompts are mixed",
       ConfigType::integer(1, 100000)},
      {"interrogate.captioner", "",
       "captioner: the captioning module's card (a path or an installed name)"},
      {"interrogate.max_batch", "64", "most images an interrogate worker takes at once",
       ConfigType::integer(1, 65536)},
      {"interrogate.max_wait_ms", "0",
       "how long an interrogate worker waits to fill a batch (0: batches form while it computes)",
       ConfigType::integer(0, 60000)},

      {"score.shard", "0", "which shard of the spec store this score worker serves (0-based)",
       ConfigType::integer(0, 4095)},
      {"score.shards", "1", "how many shards the spec store is split into",
       ConfigType::integer(1, 4096)},
      {"score.refresh_ms", "500", "milliseconds between checks for new or changed specs",
       ConfigType::integer(10, 3600000)},
      {"score.storage", "f32",
       "how a score worker holds its shard's reduced points: f32, or f16 (binary16: about half "
       "the memory per spec, rankings as float32's but for near-ties)",
       ConfigType::one_of("f32|f16")},
      {"score.search", "auto",
       "how a score worker searches its shard: exact (every model scored), two-stage (a "
       "summary of every spec picks candidates, scored exactly), or auto (exact below "
       "score.two_stage_from models)",
       ConfigType::one_of("auto|exact|two-stage")},
      {"score.two_stage_from", "20000", "auto: the shard size from which the two-stage search is used",
       ConfigType::integer(1, 1LL << 40)},
      {"score.candidates", "256", "two-stage: models per query scored exactly",
       ConfigType::integer(1, 1 << 24)},
      {"score.clusters", "4", "two-stage: groups each spec is summarised by",
       ConfigType::integer(1, 255)},
      {"score.dims", "0", "two-stage: principal directions the summary's points are kept in (0: all)",
       ConfigType::integer(0, 1 << 20)},
      {"score.prompt_dims", "32", "two-stage: principal directions of the summary's prompts (0: all)",
       ConfigType::integer(0, 1 << 20)},
      {"score.residual_dims", "32",
       "two-stage: directions each point's offset from its group's mean is kept in (0: groups only)",
       ConfigType::integer(0, 1 << 20)},
      {"score.lists", "1024",
       "two-stage: inverted-file cells over the summary (0: none, every summary read per query)",
       ConfigType::integer(0, 1 << 24)},
      {"score.probe", "128", "two-stage: cells a query visits (with score.lists)",
       ConfigType::integer(1, 1 << 24)},
      {"score.coarse", "8192",
       "two-stage: a coarse pass (each model's groups alone, in few directions) keeps this many models "
       "per query for the estimate from the summaries (0: none, every listed model estimated)",
       ConfigType::integer(0, 1 << 30)},
      {"score.coarse_dims", "128", "two-stage: the coarse pass's principal directions of group means",
       ConfigType::integer(0, 1 << 16)},
      {"score.coarse_prompt_dims", "16", "two-stage: the coarse pass's principal directions of group prompts",
       ConfigType::integer(0, 1 << 16)},
      {"score.coarse_clusters", "8", "two-stage: groups per model in the coarse pass", ConfigType::integer(1, 255)},
      {"score.tail_max", "256",
       "models an upload or removal touches: the shard's mutable tail, sealed into an immutable "
       "segment at this size",
       ConfigType::integer(1, 1 << 24)},
      {"score.merge_factor", "8",
       "segments of one size band (powers of merge_factor times tail_max) merged into one in the "
       "background once there are this many",
       ConfigType::integer(2, 1024)},
      {"score.dead_fraction", "0.2",
       "a segment with more of its models replaced or removed than this is rewritten in the background",
       ConfigType::number(0.001, 1.0)},
      {"score.snapshot_dir", "",
       "a local directory where a score worker keeps its shard's segments as snapshot files, so that "
       "a restart maps them back and fetches only the changes since (empty: none)"},
      {"score.snapshot_every_s", "30", "seconds between writes of the shard snapshot (and one on shutdown)",
       ConfigType::integer(1, 86400)},
      {"score.snapshot_verify", "true",
       "check every snapshot file's checksum on restore (reads each once; false: headers and the "
       "arrays read into memory only)",
       ConfigType::boolean()},
      {"score.max_batch", "64", "most queries a score worker scores at once",
       ConfigType::integer(1, 65536)},
      {"score.max_wait_ms", "0",
       "how long a score worker waits to fill a batch (0: batches form while it computes)",
       ConfigType::integer(0, 60000)},
      {"score.allow_partial", "false",
       "a query whose score shard has no live worker (broker.no_worker_wait_s) is ranked "
       "without it, naming it in missing_shards, instead of failing",
       ConfigType::boolean()},
      {"score.scorer", "weighted", "how specs are ranked against a query: weighted",
       ConfigType::one_of("weighted|rkme|mean|nearest|popularity")},

      {"metric.use", "auto",
       "the hub-learned metric scoring uses: auto (the store's, when it has one) or none",
       ConfigType::one_of("auto|none")},
      {"metric.auto_learn", "true",
       "learn a metric (a metric job) when uploads leave the hub due for one",
       ConfigType::boolean()},
      {"metric.min_models", "4", "fewest models a metric is learnt from",
       ConfigType::integer(2, 1 << 30)},
      {"metric.relearn_growth", "0.25",
       "learn a new metric once the hub has grown by this fraction since the last",
       ConfigType::number(0.0, 1e6)},
      {"metric.dims", "0", "dimension k the metric maps to (0: all, plain whitening)",
       ConfigType::integer(0, 1 << 20)},
      {"metric.shrinkage", "1.0",
       "shrinkage of the within-model scatter, relative to its mean variance",
       ConfigType::number(1e-9, 1e9)},
      {"metric.gamma_scale", "0.05",
       "kernel width in the metric's space: scale / median squared distance",
       ConfigType::number(1e-9, 1e9)},

      {"spec.min_samples", "4", "fewest images a spec may be built from",
       ConfigType::integer(1, 1000000)},
      {"spec.max_batch", "1", "most spec builds a spec worker takes at once",
       ConfigType::integer(1, 1024)},

      {"gateway.host", "0.0.0.0", "address the HTTP gateway listens on"},
      {"gateway.port", "8080", "port the HTTP gateway listens on", ConfigType::integer(0, 65535)},
      {"gateway.broker", "tcp://127.0.0.1:5555", "the broker frontend the gateway sends jobs to"},
      {"gateway.api_key_file", "",
       "file holding the API key clients must send (empty = no key required; or GMI_API_KEY)"},
      {"gateway.max_query_bytes", "33554432", "largest query image the gateway accepts",
       ConfigType::integer(1, 1ll << 34)},
      {"gateway.max_upload_bytes", "268435456", "largest upload (spec build) the gateway accepts",
       ConfigType::integer(1, 1ll << 36)},
      {"gateway.broker_timeout_ms", "2000",
       "how long the gateway waits for the broker's answer before a 503 (on top of a wait_ms)",
       ConfigType::integer(1, 600000)},
      {"gateway.threads", "2",
       "event-loop threads of the gateway (each serves many connections; a waiting request holds none)",
       ConfigType::integer(1, 1024)},
      {"gateway.max_wait_ms", "30000", "longest a request waits for its job before it times out",
       ConfigType::integer(0, 600000)},
      {"gateway.max_connections", "1000",
       "connections the gateway serves at once; past it only probes are answered (503 busy for the rest)",
       ConfigType::integer(1, 1000000)},
      {"gateway.header_timeout_ms", "10000",
       "a request's line and headers must arrive within this (also the keep-alive idle limit)",
       ConfigType::integer(1, 600000)},
      {"gateway.body_timeout_ms", "30000", "longest gap between two reads of a request body",
       ConfigType::integer(1, 600000)},

      {"curve.enabled", "false", "encrypt and authenticate ZeroMQ traffic with CurveZMQ",
       ConfigType::boolean()},
      {"curve.server_keys", "", "path of the broker's key file"},
      {"curve.server_public", "", "path of the broker's public key file, for clients and workers"},
      {"curve.client_keys", "", "path of this client's key file"},
      {"curve.clients_dir", "",
       "broker: directory of the key files of the clients and workers allowed in (empty: "
       "anyone with the broker's public key); re-read on SIGHUP"},

      {"serve.decode_workers", "1", "decode workers `gmi serve` starts",
       ConfigType::integer(0, 256)},
      {"serve.embed_workers", "1", "embed workers `gmi serve` starts", ConfigType::integer(0, 256)},
      {"serve.interrogate_workers", "1", "interrogate workers `gmi serve` starts",
       ConfigType::integer(0, 256)},
      {"serve.score_workers", "1", "score workers `gmi serve` starts", ConfigType::integer(0, 256)},
      {"serve.spec_workers", "1", "spec workers `gmi serve` starts", ConfigType::integer(0, 256)},
      {"serve.learn_workers", "1", "learn (metric job) workers `gmi serve` starts",
       ConfigType::integer(0, 256)},
      {"serve.ops_port", "9100", "port of `gmi serve`'s ops server (-1 disables, 0 picks one)",
       ConfigType::integer(-1, 65535)},
  };
  return keys;
}

std::string Config::env_name(const std::string& key) {
  std::string out = "GMI_";
  for (unsigned char c : key) {
    out += c == '.' ? '_' : static_cast<char>(std::toupper(c));
  }
  return out;
}

Config Config::load(const std::string& yaml_path) {
  Config config;
  for (const auto& k : schema()) config.values_[k.key] = {k.default_value, "default"};

  if (!yaml_path.empty()) {
    std::string text;
    if (int err = read_file(yaml_path, kMaxConfigBytes, text)) {
      throw InputError("config file " + yaml_path + ": " + std::strerror(err));
    }
    YAML::Node root;
    try {
      root = YAML::Load(text);
    } catch (const YAML::Exception& e) {
      // yaml-cpp counts from 0; editors count from 1.
      std::string where = e.mark.is_null()
                              ? std::string()
                              : "line " + std::to_string(e.mark.line + 1) + ", column " +
                                    std::to_string(e.mark.column + 1) + ": ";
      throw InputError("config file " + yaml_path + ": " + where + e.msg);
    }
    std::map<std::string, std::string> flat;
    flatten(root, "", yaml_path, flat);
    for (const auto& [key, value] : flat) {
      if (!known(key)) {
        throw InputError("config file " + yaml_path + ": unknown key " + quote(key) +
                         suggestion(key));
      }
      config.values_[key] = {value, "file " + yaml_path};
    }
  }

  // Set-but-empty counts: "" is a valid value, and the only way to clear a key from the env.
  for (const auto& k : schema()) {
    std::string name = env_name(k.key);
    if (const char* v = std::getenv(name.c_str())) config.values_[k.key] = {v, "env " + name};
  }
  return config;
}

void Config::set(const std::string& key, const std::string& value, const std::string& source) {
  auto it = values_.find(key);
  if (it == values_.end()) unknown_key(key);
  it->second = {value, source};
}

const Config::Value& Config::find(const std::string& key) const {
  auto it = values_.find(key);
  if (it == values_.end()) unknown_key(key);
  return it->second;
}

std::string Config::get_string(const std::string& key) const { return find(key).text; }

long long Config::get_int(const std::string& key, long long min, long long max) const {
  const Value& v = find(key);
  long long out = 0;
  const char* begin = v.text.data();
  const char* end = begin + v.text.size();
  auto [ptr, ec] = std::from_chars(begin, end, out);
  if (v.text.empty() || ec != std::errc() || ptr != end || out < min || out > max) {
    throw InputError(key + " = " + quote(v.text) + " (from " + v.source +
                     "): expected an integer in [" + std::to_string(min) + ", " +
                     std::to_string(max) + "]");
  }
  return out;
}

double Config::get_double(const std::string& key, double min, double max) const {
  const Value& v = find(key);
  double out = 0;
  const char* begin = v.text.data();
  const char* end = begin + v.text.size();
  auto [ptr, ec] = std::from_chars(begin, end, out);
  if (v.text.empty() || ec != std::errc() || ptr != end || !std::isfinite(out) || out < min ||
      out > max) {
    throw InputError(key + " = " + quote(v.text) + " (from " + v.source +
                     "): expected a number in [" + format_number(min) + ", " + format_number(max) +
                     "]");
  }
  return out;
}

bool Config::get_bool(const std::string& key) const {
  const Value& v = find(key);
  std::string t = lower(v.text);
  if (t == "true" || t == "yes" || t == "on" || t == "1") return true;
  if (t == "false" || t == "no" || t == "off" || t == "0") return false;
  throw InputError(key + " = " + quote(v.text) + " (from " + v.source +
                   "): expected true/false, yes/no, on/off or 1/0");
}

namespace {
const ConfigKey& schema_key(const std::string& key) {
  for (const auto& k : Config::schema()) {
    if (k.key == key) return k;
  }
  throw InputError("unknown config key " + quote(key));
}
}  // namespace

std::string ConfigType::describe() const {
  switch (kind) {
    case Kind::kInteger:
      return "an integer in [" + std::to_string(int_min) + ", " + std::to_string(int_max) + "]";
    case Kind::kNumber:
      return "a number in [" + format_number(min) + ", " + format_number(max) + "]";
    case Kind::kBoolean:
      return "true/false, yes/no, on/off or 1/0";
    case Kind::kOneOf: {
      std::string out = "one of ";
      for (char c : choices) out += c == '|' ? std::string(", ") : std::string(1, c);
      return out;
    }
    case Kind::kString:
      break;
  }
  return "any text";
}

long long Config::get_int(const std::string& key) const {
  const ConfigType& t = schema_key(key).type;
  if (t.kind != ConfigType::Kind::kInteger)
    throw InputError("config key " + quote(key) + " is not an integer");
  return get_int(key, t.int_min, t.int_max);
}

double Config::get_double(const std::string& key) const {
  const ConfigType& t = schema_key(key).type;
  if (t.kind != ConfigType::Kind::kNumber)
    throw InputError("config key " + quote(key) + " is not a number");
  return get_double(key, t.min, t.max);
}

std::string Config::get_choice(const std::string& key) const {
  const ConfigType& t = schema_key(key).type;
  const Value& v = find(key);
  std::string_view rest = t.choices;
  while (!rest.empty()) {
    const auto bar = rest.find('|');
    if (rest.substr(0, bar) == v.text) return v.text;
    if (bar == std::string_view::npos) break;
    rest.remove_prefix(bar + 1);
  }
  throw InputError(key + " = " + quote(v.text) + " (from " + v.source + "): expected " +
                   t.describe());
}

std::vector<std::string> Config::validate() const {
  std::vector<std::string> problems;
  for (const auto& k : schema()) {
    try {
      switch (k.type.kind) {
        case ConfigType::Kind::kInteger:
          get_int(k.key);
          break;
        case ConfigType::Kind::kNumber:
          get_double(k.key);
          break;
        case ConfigType::Kind::kBoolean:
          get_bool(k.key);
          break;
        case ConfigType::Kind::kOneOf:
          get_choice(k.key);
          break;
        case ConfigType::Kind::kString:
          break;
      }
    } catch (const InputError& e) {
      problems.emplace_back(e.what());
    }
  }
  return problems;
}

std::string Config::source(const std::string& key) const { return find(key).source; }

nlohmann::json Config::to_json() const {
  nlohmann::json out = nlohmann::json::object();
  for (const auto& [key, v] : values_) out[key] = {{"value", v.text}, {"source", v.source}};
  return out;
}

std::string read_secret_file(const std::string& path, const std::string& what) {
  std::string data;
  int err = read_file(path, kMaxSecretBytes, data);
  if (err == EFBIG) {
    throw InputError(what + " " + path + " is larger than " + std::to_string(kMaxSecretBytes) +
                     " bytes; it should hold only the secret");
  }
  if (err != 0) throw IoError("cannot read " + what + " " + path + ": " + std::strerror(err));
  // Editors add a final newline; Windows ones add \r\n. Neither is part of the secret.
  while (!data.empty() && (data.back() == '\n' || data.back() == '\r')) data.pop_back();
  if (data.empty()) throw InputError(what + " " + path + " is empty");
  return data;
}

std::string spec_store_uri(const Config& config) {
  const std::string specs = config.get_string("redis.spec_uri");
  return specs.empty() ? config.get_string("redis.uri") : specs;
}

}  // namespace gmi
