// The Redis SpecStore against a real redis-server: store behaviour, the documented key
// layout (docs/redis-keys.md), authentication, database selection, and failures.
#include <gtest/gtest.h>
#include <hiredis/hiredis.h>

#include <cstdlib>
#include <fstream>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "gmi/error.hpp"
#include "gmi/spec.hpp"
#include "gmi/spec_store.hpp"
#include "spec_fixtures.hpp"
#include "test_support.hpp"

namespace gmi {
namespace {

using testing::make_random_spec;
using testing::RedisServer;

struct ReplyDeleter {
  void operator()(redisReply* r) const { freeReplyObject(r); }
};
using Reply = std::unique_ptr<redisReply, ReplyDeleter>;

/// A plain hiredis connection, to look at (and damage) what the store wrote.
class RawRedis {
 public:
  explicit RawRedis(int port, const std::string& password = "")
      : ctx_(redisConnect("127.0.0.1", port)) {
    if (!ctx_ || ctx_->err) throw std::runtime_error("RawRedis: cannot connect");
    if (!password.empty()) cmd({"AUTH", password});
  }
  ~RawRedis() { redisFree(ctx_); }
  RawRedis(const RawRedis&) = delete;
  RawRedis& operator=(const RawRedis&) = delete;

  Reply cmd(const std::vector<std::string>& args) {
    std::vector<const char*> argv;
    std::vector<size_t> lens;
    for (const auto& a : args) {
      argv.push_back(a.data());
      lens.push_back(a.size());
    }
    auto* r = static_cast<redisReply*>(
        redisCommandArgv(ctx_, static_cast<int>(args.size()), argv.data(), lens.data()));
    if (r == nullptr) throw std::runtime_error("RawRedis: connection failed");
    return Reply(r);
  }
  std::optional<std::string> get(const std::string& key) {
    Reply r = cmd({"GET", key});
    if (r->type == REDIS_REPLY_NIL) return std::nullopt;
    return std::string(r->str, r->len);
  }
  std::set<std::string> members(const std::string& key) {
    Reply r = cmd({"SMEMBERS", key});
    std::set<std::string> out;
    for (size_t i = 0; i < r->elements; ++i) out.emplace(r->element[i]->str, r->element[i]->len);
    return out;
  }
  std::set<std::string> keys() { return members_of(cmd({"KEYS", "*"})); }
  std::string type(const std::string& key) { return cmd({"TYPE", key})->str; }

 private:
  static std::set<std::string> members_of(const Reply& r) {
    std::set<std::string> out;
    for (size_t i = 0; i < r->elements; ++i) out.emplace(r->element[i]->str, r->element[i]->len);
    return out;
  }
  redisContext* ctx_;
};

/// Sets (or unsets, with nullopt) an environment variable for one scope.
class ScopedEnv {
 public:
  ScopedEnv(const char* name, const std::optional<std::string>& value) : name_(name) {
    if (const char* old = std::getenv(name)) old_ = old;
    if (value) {
      ::setenv(name, value->c_str(), 1);
    } else {
      ::unsetenv(name);
    }
  }
  ~ScopedEnv() {
    if (old_) {
      ::setenv(name_, old_->c_str(), 1);
    } else {
      ::unsetenv(name_);
    }
  }
  ScopedEnv(const ScopedEnv&) = delete;
  ScopedEnv& operator=(const ScopedEnv&) = delete;

 private:
  const char* name_;
  std::optional<std::string> old_;
};

std::string bytes_as_string(const std::vector<std::uint8_t>& b) {
  return std::string(b.begin(), b.end());
}

template <typename E, typename F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const E& e) {
    return e.what();
  } catch (const std::exception& e) {
    ADD_FAILURE() << "wrong exception type: " << e.what();
    return "";
  }
  ADD_FAILURE() << "no exception";
  return "";
}

// No test may pick up a password from the environment it runs in.
class RedisStoreTest : public ::testing::Test {
 protected:
  ScopedEnv no_password_{"GMI_REDIS_PASSWORD", std::nullopt};
  ScopedEnv no_password_file_{"GMI_REDIS_PASSWORD_FILE", std::nullopt};
};

#define START_REDIS(server, ...)   \
  RedisServer server{__VA_ARGS__}; \
  if (!server.started()) GTEST_SKIP() << "redis-server not available"

TEST_F(RedisStoreTest, StoresGetsListsReplacesAndRemoves) {
  START_REDIS(server);
  auto store = open_spec_store(server.uri());
  testing::check_store_behaviour(*store);
}

TEST_F(RedisStoreTest, FencedWritesNeverLetAStaleUploadReplaceANewerSpec) {
  START_REDIS(server);
  auto store = open_spec_store(server.uri());
  testing::check_fenced_put_behaviour(*store);
  EXPECT_EQ(store->list(), std::vector<std::string>{"fenced"});
}

TEST_F(RedisStoreTest, StoresTheHubMetricInOneKeyWithIncreasingVersions) {
  START_REDIS(server);
  auto store = open_spec_store(server.uri());
  testing::check_metric_store_behaviour(*store);
  const Metric m = testing::make_test_metric(4);
  ASSERT_EQ(store->put_metric(m, 0), 1u);
  RawRedis raw(server.port());
  Reply version = raw.cmd({"HGET", "gmi:metric", "version"});
  ASSERT_EQ(version->type, REDIS_REPLY_STRING);
  EXPECT_EQ(std::string(version->str, version->len), "1");
  Reply blob = raw.cmd({"HGET", "gmi:metric", "blob"});
  ASSERT_EQ(blob->type, REDIS_REPLY_STRING);
  const std::vector<std::uint8_t> bytes(blob->str, blob->str + blob->len);
  EXPECT_EQ(parse_metric(bytes).checksum(), m.checksum());
  // Damaged bytes are an error naming the key, not a wrong metric.
  std::string damaged(blob->str, blob->len);
  damaged[damaged.size() / 2] ^= 0x40;
  raw.cmd({"HSET", "gmi:metric", "blob", damaged});
  try {
    store->get_metric();
    FAIL() << "a damaged metric was read";
  } catch (const SpecFormatError& e) {
    EXPECT_NE(std::string(e.what()).find("gmi:metric"), std::string::npos) << e.what();
  }
}

TEST_F(RedisStoreTest, KeyLayoutIsAsDocumented) {
  START_REDIS(server);
  RawRedis raw(server.port());
  auto store = open_spec_store(server.uri() + "?prefix=hub1");
  const Spec s = make_random_spec("m1");
  store->put(s);

  EXPECT_EQ(raw.keys(), (std::set<std::string>{"hub1:spec:m1", "hub1:models", "hub1:generation",
                                               "hub1:spec-changes"}));
  EXPECT_EQ(raw.type("hub1:spec:m1"), "string");
  EXPECT_EQ(raw.type("hub1:spec-changes"), "stream");
  EXPECT_EQ(raw.type("hub1:models"), "set");
  EXPECT_EQ(raw.get("hub1:spec:m1"), bytes_as_string(serialize_spec(s)));
  EXPECT_EQ(raw.members("hub1:models"), (std::set<std::string>{"m1"}));
  EXPECT_EQ(raw.get("hub1:generation"), "1");
  EXPECT_EQ(store->generation(), 1u);

  EXPECT_TRUE(store->remove("m1"));
  // Empty sets vanish; the change log stays.
  EXPECT_EQ(raw.keys(), (std::set<std::string>{"hub1:generation", "hub1:spec-changes"}));
  EXPECT_EQ(raw.get("hub1:generation"), "2");

  // The default prefix is "gmi".
  auto plain = open_spec_store(server.uri());
  plain->put(s);
  EXPECT_TRUE(raw.get("gmi:spec:m1").has_value());
  EXPECT_EQ(raw.members("gmi:models"), (std::set<std::string>{"m1"}));
  EXPECT_EQ(raw.get("gmi:generation"), "1");
}

TEST_F(RedisStoreTest, ChangeLogNamesWhatChangedSinceACursor) {
  START_REDIS(server);
  auto store = open_spec_store(server.uri());
  store->put(make_random_spec("before"));
  SpecChanges start = store->changes_since("");
  EXPECT_FALSE(start.complete);  // a new cursor: the caller loads everything once
  ASSERT_FALSE(start.cursor.empty());

  SpecChanges none = store->changes_since(start.cursor);
  EXPECT_TRUE(none.complete);
  EXPECT_TRUE(none.models.empty());
  EXPECT_EQ(none.cursor, start.cursor);

  store->put(make_random_spec("a"));
  store->put(make_random_spec("b"));
  EXPECT_TRUE(store->remove("before"));
  SpecChanges changed = store->changes_since(start.cursor);
  EXPECT_TRUE(changed.complete);
  EXPECT_EQ(changed.models, (std::vector<std::string>{"a", "b", "before"}));
  EXPECT_NE(changed.cursor, start.cursor);
  EXPECT_TRUE(store->changes_since(changed.cursor).models.empty());
}

TEST_F(RedisStoreTest, PrefixesKeepHubsApart) {
  START_REDIS(server);
  auto a = open_spec_store(server.uri() + "?prefix=hub-a");
  auto b = open_spec_store(server.uri() + "?prefix=hub-b");
  a->put(make_random_spec("only-in-a"));
  EXPECT_EQ(a->list(), (std::vector<std::string>{"only-in-a"}));
  EXPECT_TRUE(b->list().empty());
  EXPECT_FALSE(b->get("only-in-a").has_value());
  EXPECT_EQ(b->generation(), 0u);
}

TEST_F(RedisStoreTest, DatabaseNumberSelectsTheDatabase) {
  START_REDIS(server);
  auto store = open_spec_store(server.uri() + "/3");
  store->put(make_random_spec("in-db-3"));
  RawRedis raw(server.port());
  EXPECT_FALSE(raw.get("gmi:spec:in-db-3").has_value());  // db 0
  raw.cmd({"SELECT", "3"});
  EXPECT_TRUE(raw.get("gmi:spec:in-db-3").has_value());
  EXPECT_TRUE(open_spec_store(server.uri())->list().empty());
  EXPECT_EQ(open_spec_store(server.uri() + "/3?prefix=gmi")->list(),
            (std::vector<std::string>{"in-db-3"}));
  EXPECT_THROW(open_spec_store(server.uri() + "/99"), IoError);  // past `databases 16`
}

TEST_F(RedisStoreTest, DamagedBlobIsASpecFormatErrorNamingTheModel) {
  START_REDIS(server);
  auto store = open_spec_store(server.uri());
  RawRedis raw(server.port());
  raw.cmd({"SET", "gmi:spec:garbage", std::string("not a spec\0\xff", 12)});
  raw.cmd({"SADD", "gmi:models", "garbage"});
  std::string msg = error_of<SpecFormatError>([&] { store->get("garbage"); });
  EXPECT_NE(msg.find("'garbage'"), std::string::npos) << msg;

  std::string blob = bytes_as_string(serialize_spec(make_random_spec("flipped")));
  blob[30] ^= 1;
  raw.cmd({"SET", "gmi:spec:flipped", blob});
  msg = error_of<SpecFormatError>([&] { store->get("flipped"); });
  EXPECT_NE(msg.find("checksum"), std::string::npos) << msg;

  // A valid spec stored under another model's key is refused too.
  raw.cmd({"SET", "gmi:spec:other", bytes_as_string(serialize_spec(make_random_spec("real")))});
  EXPECT_THROW(store->get("other"), SpecFormatError);
}

TEST_F(RedisStoreTest, GetManyFetchesInOnePipelineAndReportsTheDamagedInTheirSlots) {
  START_REDIS(server);
  auto store = open_spec_store(server.uri());
  std::vector<std::string> ids;
  for (int m = 0; m < 70; ++m) {  // more than one pipelined batch of the hub cache's
    store->put(make_random_spec("many-" + std::to_string(m), 100 + m));
    ids.push_back("many-" + std::to_string(m));
  }
  RawRedis raw(server.port());
  raw.cmd({"SET", "gmi:spec:broken", std::string("not a spec\0\xff", 12)});
  ids.insert(ids.begin() + 10, "broken");
  ids.insert(ids.begin() + 20, "absent");
  const auto got = store->get_many(ids);
  ASSERT_EQ(got.size(), ids.size());
  for (std::size_t i = 0; i < ids.size(); ++i) {
    if (ids[i] == "broken") {
      EXPECT_FALSE(got[i].spec.has_value());
      EXPECT_NE(got[i].damaged.find("'broken'"), std::string::npos) << got[i].damaged;
    } else if (ids[i] == "absent") {
      EXPECT_FALSE(got[i].spec.has_value());
      EXPECT_TRUE(got[i].damaged.empty());
    } else {
      ASSERT_TRUE(got[i].spec.has_value()) << ids[i];
      EXPECT_TRUE(got[i].damaged.empty());
      const Spec want = *store->get(ids[i]);
      EXPECT_EQ(got[i].spec->model_id, ids[i]);
      EXPECT_EQ(serialize_spec(*got[i].spec), serialize_spec(want)) << "the same spec get() reads";
    }
  }
  EXPECT_THROW(store->get_many({"bad/id"}), InputError);
}

TEST_F(RedisStoreTest, ErrorRepliesAreIoErrorsWithTheReplyText) {
  START_REDIS(server);
  auto store = open_spec_store(server.uri());
  RawRedis raw(server.port());
  raw.cmd({"SET", "gmi:models", "not-a-set"});
  std::string msg = error_of<IoError>([&] { store->list(); });
  EXPECT_NE(msg.find("WRONGTYPE"), std::string::npos) << msg;
  msg = error_of<IoError>([&] { store->put(make_random_spec("m")); });
  EXPECT_NE(msg.find("WRONGTYPE"), std::string::npos) << msg;
  raw.cmd({"SET", "gmi:generation", "abc"});
  EXPECT_THROW(store->generation(), IoError);
}

TEST_F(RedisStoreTest, ReconnectsAfterTheConnectionDrops) {
  START_REDIS(server);
  auto store = open_spec_store(server.uri());
  store->put(make_random_spec("m"));
  RawRedis raw(server.port());
  raw.cmd({"CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes"});
  // The first call may notice the dead connection (a retryable IoError); the next works.
  try {
    store->list();
  } catch (const IoError&) {
  }
  EXPECT_EQ(store->list(), (std::vector<std::string>{"m"}));
}

TEST_F(RedisStoreTest, ConnectionRefusedIsAnIoErrorNamingTheEndpoint) {
  const int port = testing::free_port();  // nothing listens there
  std::string msg =
      error_of<IoError>([&] { open_spec_store("redis://127.0.0.1:" + std::to_string(port)); });
  EXPECT_NE(msg.find("127.0.0.1:" + std::to_string(port)), std::string::npos) << msg;
}

TEST_F(RedisStoreTest, AuthenticatesWithThePasswordFromTheEnvironment) {
  START_REDIS(server, "s3cret-pw");
  {
    ScopedEnv pw("GMI_REDIS_PASSWORD", "s3cret-pw");
    auto store = open_spec_store(server.uri());
    testing::check_store_behaviour(*store);
    // Redis 6+ ACL form: AUTH USER PASSWORD.
    auto as_default = open_spec_store("redis://default@127.0.0.1:" + std::to_string(server.port()));
    EXPECT_EQ(as_default->list(), (std::vector<std::string>{"model-b"}));
    EXPECT_EQ(as_default->describe(), "redis://default@127.0.0.1:" + std::to_string(server.port()));
  }
  {
    ScopedEnv pw("GMI_REDIS_PASSWORD", "not-the-pw-123");
    std::string msg = error_of<IoError>([&] { open_spec_store(server.uri()); });
    EXPECT_NE(msg.find("authentication failed"), std::string::npos) << msg;
    EXPECT_EQ(msg.find("not-the-pw-123"), std::string::npos)
        << "message echoes the password: " << msg;
    msg = error_of<IoError>(
        [&] { open_spec_store("redis://nobody@127.0.0.1:" + std::to_string(server.port())); });
    EXPECT_NE(msg.find("authentication failed"), std::string::npos) << msg;
  }
  {
    std::string msg = error_of<IoError>([&] { open_spec_store(server.uri()); });
    EXPECT_NE(msg.find("authentication failed"), std::string::npos) << msg;
  }
}

TEST_F(RedisStoreTest, ReadsThePasswordFileAndTrimsItsNewline) {
  START_REDIS(server, "from-a-file");
  testing::TempDir tmp;
  const std::string file = (tmp.path() / "redis-password").string();
  std::ofstream(file) << "from-a-file\n";
  {
    ScopedEnv pw_file("GMI_REDIS_PASSWORD_FILE", file);
    auto store = open_spec_store(server.uri());
    store->put(make_random_spec("m"));
    EXPECT_EQ(store->list(), (std::vector<std::string>{"m"}));
  }
  {
    ScopedEnv pw_file("GMI_REDIS_PASSWORD_FILE", (tmp.path() / "missing").string());
    EXPECT_THROW(open_spec_store(server.uri()), Error);
  }
}

TEST_F(RedisStoreTest, RefusesAPasswordInTheUri) {
  for (const std::string uri :
       {"redis://user:hunter2@127.0.0.1:6379", "redis://:hunter2@127.0.0.1:6379/2",
        "redis://127.0.0.1:notaport?password=hunter2"}) {
    std::string msg = error_of<InputError>([&] { open_spec_store(uri); });
    EXPECT_NE(msg.find("GMI_REDIS_PASSWORD"), std::string::npos) << msg;
    EXPECT_EQ(msg.find("hunter2"), std::string::npos) << "message echoes the password: " << msg;
  }
}

TEST_F(RedisStoreTest, RefusesMalformedUris) {
  for (const std::string uri :
       {"redis://", "redis://:6379", "redis://host:0", "redis://host:65536",
        "redis://host:", "redis://host/abc", "redis://host/-1", "redis://host?unknown=1",
        "redis://host?prefix=", "redis://host?prefix=has space", "redis://::1:6379", "redis://[::1",
        "redis://@host"}) {
    EXPECT_THROW(open_spec_store(uri), InputError) << uri;
  }
}

TEST_F(RedisStoreTest, DescribeNamesTheLocationWithoutSecrets) {
  START_REDIS(server);
  auto store = open_spec_store(server.uri() + "/2?prefix=hub");
  EXPECT_EQ(store->describe(), server.uri() + "/2?prefix=hub");
}

}  // namespace
}  // namespace gmi
