#pragma once
/// Settings for every gmi process, as dotted keys ("broker.heartbeat_ms"), layered from
/// lowest to highest precedence:
///   1. built-in defaults (the schema: a key with no default does not exist),
///   2. a YAML file (nested maps: `broker: {heartbeat_ms: 500}`),
///   3. environment variables GMI_<KEY> with dots as underscores, upper-cased
///      (GMI_BROKER_HEARTBEAT_MS),
///   4. set() calls (command-line flags).
/// Unknown keys in the file are errors naming the key and the file (typos must not pass
/// silently). Typed getters validate and name the key and where its value came from.
/// Thread-safety: const methods are safe from several threads; set() is not.
#include <map>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace gmi {

/// The values a key takes. The schema is the one place that says so: the typed getters
/// without bounds read them from here, and Config::validate() checks every key against it.
struct ConfigType {
  enum class Kind { kString, kInteger, kNumber, kBoolean, kOneOf };
  Kind kind = Kind::kString;
  long long int_min = 0, int_max = 0;  ///< kInteger
  double min = 0, max = 0;             ///< kNumber
  std::string choices;                 ///< kOneOf: "a|b|c"

  static ConfigType integer(long long lo, long long hi) {
    ConfigType t;
    t.kind = Kind::kInteger;
    t.int_min = lo;
    t.int_max = hi;
    return t;
  }
  static ConfigType number(double lo, double hi) {
    ConfigType t;
    t.kind = Kind::kNumber;
    t.min = lo;
    t.max = hi;
    return t;
  }
  static ConfigType boolean() {
    ConfigType t;
    t.kind = Kind::kBoolean;
    return t;
  }
  static ConfigType one_of(std::string choices) {
    ConfigType t;
    t.kind = Kind::kOneOf;
    t.choices = std::move(choices);
    return t;
  }
  /// "integer in [1, 100]", "one of json, text", ...: for docs and messages.
  std::string describe() const;
};

struct ConfigKey {
  std::string key;            ///< "broker.heartbeat_ms"
  std::string default_value;  ///< as text; "" is a valid value (e.g. "no API key")
  std::string help;           ///< one line, for `gmi config show` and the docs
  ConfigType type = {};       ///< kString: any text
};

class Config {
 public:
  /// The keys every gmi process knows, with their defaults (see config/gmi.yaml).
  static const std::vector<ConfigKey>& schema();

  /// Defaults from schema(), then `yaml_path` (skipped when empty; InputError when it is
  /// named but missing or malformed), then the environment.
  static Config load(const std::string& yaml_path);

  /// Overrides one key (flags). InputError for an unknown key.
  void set(const std::string& key, const std::string& value, const std::string& source = "flag");

  /// InputError naming key, value and source when the value does not parse or is out of range.
  std::string get_string(const std::string& key) const;
  long long get_int(const std::string& key, long long min, long long max) const;
  double get_double(const std::string& key, double min, double max) const;
  /// Within the bounds the schema gives the key (InputError when it gives none).
  long long get_int(const std::string& key) const;
  double get_double(const std::string& key) const;
  bool get_bool(const std::string& key) const;  ///< true/false/yes/no/on/off/1/0
  /// One of the key's schema choices.
  std::string get_choice(const std::string& key) const;
  /// Every value checked against its key's type; one message per bad value (empty: all
  /// good). `gmi config show` prints them and exits 2; each process checks at start.
  std::vector<std::string> validate() const;
  /// "default", "file PATH", "env GMI_...", or "flag".
  std::string source(const std::string& key) const;
  /// Every key with its value and source (secrets are never stored here: only file names).
  nlohmann::json to_json() const;

  /// The environment variable that overrides `key`.
  static std::string env_name(const std::string& key);

 private:
  struct Value {
    std::string text;
    std::string source;
  };
  std::map<std::string, Value> values_;
  const Value& find(const std::string& key) const;
};

/// The contents of a secret file (trailing newlines trimmed). IoError if unreadable,
/// InputError if empty. `what` names the secret in messages ("the API key file").
std::string read_secret_file(const std::string& path, const std::string& what);

/// The spec store's URI: redis.spec_uri, or redis.uri when that is empty.
std::string spec_store_uri(const Config& config);

}  // namespace gmi
