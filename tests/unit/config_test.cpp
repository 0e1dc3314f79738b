#include <gtest/gtest.h>

#include <cstdlib>
#include <fstream>
#include <functional>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "gmi/config.hpp"
#include "gmi/error.hpp"
#include "test_support.hpp"

namespace gmi {
namespace {

/// Sets (or unsets) an environment variable for one scope and restores the old value, so
/// that one test's GMI_* variables cannot leak into the next.
class ScopedEnv {
 public:
  ScopedEnv(std::string name, std::optional<std::string> value) : name_(std::move(name)) {
    if (const char* old = std::getenv(name_.c_str())) old_ = old;
    if (value) {
      ::setenv(name_.c_str(), value->c_str(), 1);
    } else {
      ::unsetenv(name_.c_str());
    }
  }
  ~ScopedEnv() {
    if (old_) {
      ::setenv(name_.c_str(), old_->c_str(), 1);
    } else {
      ::unsetenv(name_.c_str());
    }
  }
  ScopedEnv(const ScopedEnv&) = delete;
  ScopedEnv& operator=(const ScopedEnv&) = delete;

 private:
  std::string name_;
  std::optional<std::string> old_;
};

std::string write_file(const testing::TempDir& dir, const std::string& name,
                       const std::string& text) {
  auto path = (dir.path() / name).string();
  std::ofstream(path, std::ios::binary) << text;
  return path;
}

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const InputError& e) {
    return std::string("InputError: ") + e.what();
  } catch (const IoError& e) {
    return std::string("IoError: ") + e.what();
  }
  return "no error";
}

TEST(Config, SchemaHasTheDocumentedKeysAndUniqueEnvNames) {
  const auto& schema = Config::schema();
  EXPECT_EQ(schema.size(), 108u);
  std::set<std::string> keys, envs;
  for (const auto& k : schema) {
    EXPECT_TRUE(keys.insert(k.key).second) << "duplicate key " << k.key;
    EXPECT_TRUE(envs.insert(Config::env_name(k.key)).second) << "env clash for " << k.key;
    EXPECT_FALSE(k.help.empty()) << k.key;
    EXPECT_NE(k.key.find('.'), std::string::npos) << k.key;
  }
  Config c = Config::load("");
  EXPECT_EQ(c.get_int("broker.heartbeat_ms", 1, 600000), 500);
  EXPECT_EQ(c.get_string("broker.frontend"), "tcp://127.0.0.1:5555");
  EXPECT_EQ(c.get_string("encoder.image"), "auto");
  EXPECT_TRUE(c.get_bool("embed.fp16"));
  EXPECT_EQ(c.get_string("gateway.api_key_file"), "");
  EXPECT_EQ(c.get_int("broker.ops_port", -1, 65535), 9100);
  EXPECT_FALSE(c.get_bool("curve.enabled"));
}

TEST(Config, EveryDefaultHasItsTypeAndBadValuesAreEachNamed) {
  Config c = Config::load("");
  EXPECT_TRUE(c.validate().empty());
  std::size_t typed = 0;
  for (const auto& k : Config::schema()) typed += k.type.kind != ConfigType::Kind::kString;
  EXPECT_GE(typed, 50u);                       // every number, flag and choice says what it takes
  EXPECT_EQ(c.get_int("broker.liveness"), 6);  // bounds from the schema
  c.set("broker.liveness", "1");
  c.set("metric.shrinkage", "-3");
  c.set("metric.use", "sometimes");
  c.set("embed.fp16", "perhaps");
  const auto problems = c.validate();
  ASSERT_EQ(problems.size(), 4u);
  EXPECT_NE(problems[0].find("an integer in [2, 1000]"), std::string::npos) << problems[0];
  EXPECT_THROW(c.get_int("broker.liveness"), InputError);
  EXPECT_THROW(c.get_choice("metric.use"), InputError);
  c.set("metric.use", "none");
  EXPECT_EQ(c.get_choice("metric.use"), "none");
  EXPECT_THROW(c.get_int("redis.uri"), InputError);  // not an integer key
}

TEST(Config, EnvNameUpperCasesAndReplacesDots) {
  EXPECT_EQ(Config::env_name("broker.heartbeat_ms"), "GMI_BROKER_HEARTBEAT_MS");
  EXPECT_EQ(Config::env_name("log.level"), "GMI_LOG_LEVEL");
}

TEST(Config, DefaultsWhenNoFileAndNoEnv) {
  ScopedEnv e("GMI_LOG_LEVEL", std::nullopt);
  Config c = Config::load("");
  EXPECT_EQ(c.get_string("log.level"), "info");
  EXPECT_EQ(c.source("log.level"), "default");
}

TEST(Config, ShippedYamlEqualsDefaults) {
  // Guard against a GMI_* variable in the environment of whoever runs the tests.
  std::vector<std::unique_ptr<ScopedEnv>> clear;
  for (const auto& k : Config::schema()) {
    clear.push_back(std::make_unique<ScopedEnv>(Config::env_name(k.key), std::nullopt));
  }
  const std::string path = GMI_SOURCE_DIR "/config/gmi.yaml";
  Config c = Config::load(path);
  nlohmann::json j = c.to_json();
  ASSERT_EQ(j.size(), Config::schema().size());
  for (const auto& k : Config::schema()) {
    EXPECT_EQ(c.get_string(k.key), k.default_value) << k.key;
    // Every key must be in the file, so that it documents them all.
    EXPECT_EQ(c.source(k.key), "file " + path) << k.key << " is missing from gmi.yaml";
  }
}

TEST(Config, FileOverridesDefaultsAndNamesItselfAsSource) {
  testing::TempDir dir;
  auto path = write_file(dir, "gmi.yaml",
                         "broker:\n  heartbeat_ms: 250\n  frontend: tcp://*:7000\n"
                         "log: {level: debug}\n");
  ScopedEnv e1("GMI_BROKER_HEARTBEAT_MS", std::nullopt);
  ScopedEnv e2("GMI_LOG_LEVEL", std::nullopt);
  Config c = Config::load(path);
  EXPECT_EQ(c.get_int("broker.heartbeat_ms", 1, 600000), 250);
  EXPECT_EQ(c.get_string("broker.frontend"), "tcp://*:7000");
  EXPECT_EQ(c.get_string("log.level"), "debug");
  EXPECT_EQ(c.source("broker.heartbeat_ms"), "file " + path);
  EXPECT_EQ(c.source("broker.liveness"), "default");
}

TEST(Config, EnvironmentOverridesFile) {
  testing::TempDir dir;
  auto path = write_file(dir, "gmi.yaml", "broker:\n  heartbeat_ms: 250\n");
  ScopedEnv e("GMI_BROKER_HEARTBEAT_MS", "750");
  Config c = Config::load(path);
  EXPECT_EQ(c.get_int("broker.heartbeat_ms", 1, 600000), 750);
  EXPECT_EQ(c.source("broker.heartbeat_ms"), "env GMI_BROKER_HEARTBEAT_MS");
}

TEST(Config, EmptyEnvironmentValueClearsAKey) {
  testing::TempDir dir;
  auto path = write_file(dir, "gmi.yaml", "gateway:\n  api_key_file: /etc/gmi/key\n");
  ScopedEnv e("GMI_GATEWAY_API_KEY_FILE", "");
  Config c = Config::load(path);
  EXPECT_EQ(c.get_string("gateway.api_key_file"), "");
  EXPECT_EQ(c.source("gateway.api_key_file"), "env GMI_GATEWAY_API_KEY_FILE");
}

TEST(Config, SetOverridesEnvironment) {
  ScopedEnv e("GMI_BROKER_HEARTBEAT_MS", "750");
  Config c = Config::load("");
  c.set("broker.heartbeat_ms", "125");
  EXPECT_EQ(c.get_int("broker.heartbeat_ms", 1, 600000), 125);
  EXPECT_EQ(c.source("broker.heartbeat_ms"), "flag");
  c.set("broker.heartbeat_ms", "126", "flag --heartbeat-ms");
  EXPECT_EQ(c.source("broker.heartbeat_ms"), "flag --heartbeat-ms");
}

TEST(Config, UnknownFileKeyIsAnErrorNamingIt) {
  testing::TempDir dir;
  auto path = write_file(dir, "gmi.yaml", "broker:\n  hartbeat_ms: 250\n");
  std::string err = error_of([&] { Config::load(path); });
  EXPECT_NE(err.find("InputError: config file " + path + ": unknown key \"broker.hartbeat_ms\""),
            std::string::npos)
      << err;
  EXPECT_NE(err.find("did you mean \"broker.heartbeat_ms\""), std::string::npos) << err;
}

TEST(Config, SectionGivenAsScalarIsAnUnknownKey) {
  testing::TempDir dir;
  auto path = write_file(dir, "gmi.yaml", "broker: 5\n");
  std::string err = error_of([&] { Config::load(path); });
  EXPECT_NE(err.find("unknown key \"broker\""), std::string::npos) << err;
}

TEST(Config, SequenceValueIsAnErrorNamingTheKey) {
  testing::TempDir dir;
  auto path = write_file(dir, "gmi.yaml", "broker:\n  frontend: [a, b]\n");
  std::string err = error_of([&] { Config::load(path); });
  EXPECT_EQ(err.rfind("InputError: config file " + path, 0), 0u) << err;
  EXPECT_NE(err.find("broker.frontend"), std::string::npos) << err;
}

TEST(Config, MissingFileIsAnInputErrorNamingIt) {
  testing::TempDir dir;
  auto path = (dir.path() / "nope.yaml").string();
  std::string err = error_of([&] { Config::load(path); });
  EXPECT_EQ(err, "InputError: config file " + path + ": No such file or directory");
}

TEST(Config, YamlSyntaxErrorGivesLineAndColumn) {
  testing::TempDir dir;
  auto path = write_file(dir, "gmi.yaml", "log:\n  level: info\n  format: [json\n");
  std::string err = error_of([&] { Config::load(path); });
  EXPECT_EQ(err.rfind("InputError: config file " + path + ": line ", 0), 0u) << err;
  EXPECT_NE(err.find("column"), std::string::npos) << err;
}

TEST(Config, EmptyFileGivesDefaults) {
  testing::TempDir dir;
  auto path = write_file(dir, "gmi.yaml", "# nothing set\n");
  ScopedEnv e("GMI_BROKER_LIVENESS", std::nullopt);
  Config c = Config::load(path);
  EXPECT_EQ(c.get_int("broker.liveness", 1, 100), 6);
  EXPECT_EQ(c.source("broker.liveness"), "default");
}

TEST(Config, NullLeafReadsAsEmpty) {
  testing::TempDir dir;
  auto path = write_file(dir, "gmi.yaml", "curve:\n  server_keys:\n");
  ScopedEnv e("GMI_CURVE_SERVER_KEYS", std::nullopt);
  Config c = Config::load(path);
  EXPECT_EQ(c.get_string("curve.server_keys"), "");
  EXPECT_EQ(c.source("curve.server_keys"), "file " + path);
}

TEST(Config, IntOutOfRangeNamesKeyAndSource) {
  ScopedEnv e("GMI_BROKER_HEARTBEAT_MS", "abc");
  Config c = Config::load("");
  EXPECT_EQ(error_of([&] { c.get_int("broker.heartbeat_ms", 1, 600000); }),
            "InputError: broker.heartbeat_ms = \"abc\" (from env GMI_BROKER_HEARTBEAT_MS): "
            "expected an integer in [1, 600000]");
  c.set("broker.heartbeat_ms", "600001");
  EXPECT_EQ(error_of([&] { c.get_int("broker.heartbeat_ms", 1, 600000); }),
            "InputError: broker.heartbeat_ms = \"600001\" (from flag): "
            "expected an integer in [1, 600000]");
}

TEST(Config, IntRejectsTrailingTextSpacesAndOverflow) {
  Config c = Config::load("");
  for (const char* bad : {"12ms", " 12", "12 ", "", "1.5", "99999999999999999999", "+-1"}) {
    c.set("broker.liveness", bad);
    EXPECT_THROW(c.get_int("broker.liveness", 0, 1000000), InputError) << bad;
  }
  c.set("broker.liveness", "-1");
  EXPECT_EQ(c.get_int("broker.liveness", -1, 10), -1);
}

TEST(Config, DoubleParsesAndRangeChecks) {
  Config c = Config::load("");
  c.set("score.refresh_ms", "2.5");
  EXPECT_DOUBLE_EQ(c.get_double("score.refresh_ms", 0, 10), 2.5);
  c.set("score.refresh_ms", "nan");
  EXPECT_THROW(c.get_double("score.refresh_ms", 0, 10), InputError);
  c.set("score.refresh_ms", "11");
  std::string err = error_of([&] { c.get_double("score.refresh_ms", 0, 10); });
  EXPECT_NE(err.find("score.refresh_ms = \"11\" (from flag)"), std::string::npos) << err;
}

TEST(Config, BoolAcceptsTheUsualSpellings) {
  Config c = Config::load("");
  for (const char* t : {"true", "TRUE", "yes", "On", "1"}) {
    c.set("curve.enabled", t);
    EXPECT_TRUE(c.get_bool("curve.enabled")) << t;
  }
  for (const char* f : {"false", "No", "OFF", "0"}) {
    c.set("curve.enabled", f);
    EXPECT_FALSE(c.get_bool("curve.enabled")) << f;
  }
  c.set("curve.enabled", "maybe");
  std::string err = error_of([&] { c.get_bool("curve.enabled"); });
  EXPECT_NE(err.find("curve.enabled = \"maybe\" (from flag)"), std::string::npos) << err;
}

TEST(Config, UnknownKeyInGetterOrSetIsAnError) {
  Config c = Config::load("");
  EXPECT_NE(error_of([&] { c.get_string("broker.nope"); }).find("unknown configuration key"),
            std::string::npos);
  EXPECT_THROW(c.get_int("nope", 0, 1), InputError);
  EXPECT_THROW(c.get_bool("nope"), InputError);
  EXPECT_THROW(c.get_double("nope", 0, 1), InputError);
  EXPECT_THROW(c.source("nope"), InputError);
  EXPECT_THROW(c.set("nope", "1"), InputError);
}

TEST(Config, ToJsonHasEveryKeyWithValueAndSource) {
  ScopedEnv e("GMI_BROKER_HEARTBEAT_MS", "42");
  Config c = Config::load("");
  nlohmann::json j = c.to_json();
  EXPECT_EQ(j.size(), Config::schema().size());
  EXPECT_EQ(j["broker.heartbeat_ms"],
            (nlohmann::json{{"value", "42"}, {"source", "env GMI_BROKER_HEARTBEAT_MS"}}));
  EXPECT_EQ(j["broker.liveness"], (nlohmann::json{{"value", "6"}, {"source", "default"}}));
}

TEST(Config, SecretFileIsTrimmedOfTrailingNewlines) {
  testing::TempDir dir;
  auto path = write_file(dir, "key", "s3cret \r\n\n");
  EXPECT_EQ(read_secret_file(path, "the API key file"), "s3cret ");
}

TEST(Config, MissingSecretFileIsAnIoErrorNamingIt) {
  testing::TempDir dir;
  auto path = (dir.path() / "missing").string();
  EXPECT_EQ(error_of([&] { read_secret_file(path, "the API key file"); }),
            "IoError: cannot read the API key file " + path + ": No such file or directory");
}

TEST(Config, EmptySecretFileIsAnInputError) {
  testing::TempDir dir;
  auto path = write_file(dir, "key", "\n");
  std::string err = error_of([&] { read_secret_file(path, "the API key file"); });
  EXPECT_EQ(err.rfind("InputError: the API key file " + path, 0), 0u) << err;
}

}  // namespace
}  // namespace gmi
