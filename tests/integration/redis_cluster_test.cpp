// The spec store against a real local Redis Cluster of three masters (redis-server
// --cluster-enabled yes, joined by redis-cli --cluster create): slots as the server computes
// them, partitions spread over every master with one hash tag each, the store's behaviour,
// redirections (MOVED after a slot moved, ASK during a migration), a lost master.
#include <gtest/gtest.h>
#include <hiredis/hiredis.h>

#include <chrono>
#include <map>
#include <memory>
#include <random>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "gmi/error.hpp"
#include "gmi/redis_cluster.hpp"
#include "gmi/spec_store.hpp"
#include "spec_fixtures.hpp"
#include "test_support.hpp"

namespace gmi {
namespace {

using testing::make_random_spec;
using testing::RedisClusterServers;

#define START_CLUSTER(cluster)   \
  RedisClusterServers cluster{3}; \
  if (!cluster.started()) GTEST_SKIP() << "redis-server / redis-cli not available"

// Every key on every master, by master port.
std::map<int, std::vector<std::string>> keys_by_master(const RedisClusterServers& cluster) {
  std::map<int, std::vector<std::string>> out;
  for (const int port : cluster.ports()) {
    const std::string text = cluster.cli(port, {"KEYS", "*"});
    std::istringstream lines(text);
    for (std::string key; std::getline(lines, key);)
      if (!key.empty()) out[port].push_back(key);
  }
  return out;
}

TEST(RedisClusterSlots, AgreeWithTheServerOnTagsAndPlainKeys) {
  START_CLUSTER(cluster);
  std::vector<std::string> keys = {"123456789", "foo", "{user1000}.following", "{user1000}.followers",
                                   "foo{}{bar}", "foo{{bar}}zap", "foo{bar}{zap}", "{}", "{", "}", "a{b",
                                   "gmi:{p3}:spec:model-7", "gmi:{hub}:metric", ""};
  std::mt19937 rng(7);
  for (int i = 0; i < 200; ++i) {
    std::string k;
    const int len = 1 + static_cast<int>(rng() % 24);
    for (int c = 0; c < len; ++c) k += "ab{}:-xyz0123456789"[rng() % 19];
    keys.push_back(k);
  }
  for (const auto& key : keys) {
    const std::string server = cluster.cli(cluster.ports()[0], {"CLUSTER", "KEYSLOT", key});
    EXPECT_EQ(std::to_string(redis_key_slot(key)), server) << "key \"" << key << "\"";
  }
  EXPECT_EQ(crc16_xmodem("123456789"), 0x31C3);
  EXPECT_EQ(redis_key_slot("{user1000}.following"), redis_key_slot("{user1000}.followers"));
}

TEST(RedisClusterUri, ParsesNodesAndParametersAndRefusesWhatCannotWork) {
  const RedisClusterLocation loc = parse_redis_cluster_uri("redis-cluster://alice@10.0.0.1:7000,[::1]:7001?prefix=hub&partitions=12");
  ASSERT_EQ(loc.seeds.size(), 2u);
  EXPECT_EQ(loc.seeds[0].endpoint(), "10.0.0.1:7000");
  EXPECT_EQ(loc.seeds[1].endpoint(), "[::1]:7001");
  EXPECT_EQ(loc.user, "alice");
  EXPECT_EQ(loc.seeds[1].user, "alice");
  EXPECT_EQ(loc.prefix, "hub");
  EXPECT_EQ(loc.partitions, 12);
  EXPECT_EQ(parse_redis_cluster_uri("redis-cluster://h:1").partitions, 16);
  auto refused = [](const std::string& uri, const std::string& says) {
    try {
      parse_redis_cluster_uri(uri);
      ADD_FAILURE() << uri << " accepted";
    } catch (const InputError& e) {
      EXPECT_NE(std::string(e.what()).find(says), std::string::npos) << e.what();
    }
  };
  refused("redis-cluster://u:secret@h:1", "password");
  refused("redis-cluster://h:1?password=x", "password");
  refused("redis-cluster://h:1/2", "database 0");
  refused("redis-cluster://h:1?prefix={x}", "hash tags");
  refused("redis-cluster://h:1?partitions=0", "partitions");
  refused("redis-cluster://h:1,,h:2", "empty node");
  refused("redis-cluster://h:99999", "port");
  refused("redis-cluster://h:1?shards=3", "unknown parameter");
  EXPECT_THROW(open_spec_store("redis-cluster://h:1?partitions=x"), InputError);
  // Job state stays on one server: a cluster URI there says so.
  try {
    parse_redis_uri("redis-cluster://h:1,h:2");
    ADD_FAILURE() << "a cluster URI taken for one server";
  } catch (const InputError& e) {
    EXPECT_NE(std::string(e.what()).find("only the spec store"), std::string::npos) << e.what();
  }
}

TEST(RedisClusterStore, BehavesAsAStoreWithEachPartitionOnOneSlotAndEveryMasterUsed) {
  START_CLUSTER(cluster);
  auto store = open_spec_store(cluster.uri("?partitions=6"));
  testing::check_store_behaviour(*store);
  auto metric = open_spec_store(cluster.uri("?prefix=metric&partitions=6"));
  testing::check_metric_store_behaviour(*metric);
  auto fenced = open_spec_store(cluster.uri("?prefix=fenced&partitions=6"));
  testing::check_fenced_put_behaviour(*fenced);
  EXPECT_EQ(fenced->list(), std::vector<std::string>{"fenced"});

  auto hub = open_spec_store(cluster.uri("?prefix=hub&partitions=6"));
  std::vector<std::string> ids;
  for (int m = 0; m < 60; ++m) ids.push_back("model-" + std::to_string(m));
  const std::uint64_t before = hub->generation();
  for (std::size_t m = 0; m < ids.size(); ++m) hub->put(make_random_spec(ids[m], static_cast<unsigned>(m + 1)));
  EXPECT_EQ(hub->generation(), before + ids.size()) << "the hub's generation moves once per put";
  std::vector<std::string> sorted = ids;
  std::sort(sorted.begin(), sorted.end());
  EXPECT_EQ(hub->list(), sorted);
  EXPECT_EQ(hub->count(), ids.size());
  const auto fetched = hub->get_many(ids);
  for (std::size_t m = 0; m < ids.size(); ++m) {
    ASSERT_TRUE(fetched[m].spec) << ids[m];
    EXPECT_EQ(serialize_spec(*fetched[m].spec), serialize_spec(make_random_spec(ids[m], static_cast<unsigned>(m + 1))));
  }

  // Where the keys went: every master holds some; each partition's keys share one slot.
  std::map<std::string, std::set<int>> slots_of_tag;
  std::set<int> masters_used;
  for (const auto& [port, keys] : keys_by_master(cluster)) {
    for (const auto& key : keys) {
      if (key.rfind("hub:", 0) != 0) continue;
      masters_used.insert(port);
      const auto open = key.find('{'), close = key.find('}');
      ASSERT_NE(open, std::string::npos) << key << " has no hash tag";
      slots_of_tag[key.substr(open, close - open + 1)].insert(redis_key_slot(key));
    }
  }
  EXPECT_EQ(masters_used.size(), 3u) << "six partitions should reach all three masters";
  EXPECT_EQ(slots_of_tag.size(), 7u) << "{p0} ... {p5} and {hub}";
  for (const auto& [tag, slots] : slots_of_tag) EXPECT_EQ(slots.size(), 1u) << tag;
  for (const auto& id : ids) {
    const int p = model_partition(id, 6);
    EXPECT_TRUE(slots_of_tag.count("{p" + std::to_string(p) + "}")) << id;
  }
}

TEST(RedisClusterStore, TheChangeCursorFollowsEveryPartition) {
  START_CLUSTER(cluster);
  auto store = open_spec_store(cluster.uri("?partitions=5"));
  const SpecChanges start = store->changes_since("");
  EXPECT_FALSE(start.complete);
  EXPECT_EQ(std::count(start.cursor.begin(), start.cursor.end(), ','), 4) << start.cursor;
  std::set<std::string> put;
  for (int m = 0; m < 20; ++m) {
    const std::string id = "m" + std::to_string(m);
    store->put(make_random_spec(id, static_cast<unsigned>(m + 3)));
    put.insert(id);
  }
  ASSERT_TRUE(store->remove("m3"));
  EXPECT_FALSE(store->remove("m3"));
  const SpecChanges changes = store->changes_since(start.cursor);
  EXPECT_TRUE(changes.complete);
  EXPECT_EQ(std::set<std::string>(changes.models.begin(), changes.models.end()), put);
  EXPECT_EQ(changes.models.size(), 21u) << "20 puts and one effective remove";
  const SpecChanges none = store->changes_since(changes.cursor);
  EXPECT_TRUE(none.complete);
  EXPECT_TRUE(none.models.empty());
  EXPECT_EQ(none.cursor, changes.cursor);
  // A cursor of another layout (one server's, or another partition count) starts afresh.
  EXPECT_FALSE(store->changes_since("1700000000000-0").complete);
  EXPECT_FALSE(store->changes_since("0-0,0-0").complete);
}

TEST(RedisCluster, FollowsMovedAfterASlotMovesAndAskDuringItsMigration) {
  START_CLUSTER(cluster);
  RedisCluster client(parse_redis_cluster_uri(cluster.uri()));
  const std::string a = "{tag}a", b = "{tag}b";
  client.command(a, {"SET", a, "1"});
  client.command(b, {"SET", b, "2"});
  const int slot = redis_key_slot(a);
  const std::string from_endpoint = client.where(a);
  const int from = std::stoi(from_endpoint.substr(from_endpoint.rfind(':') + 1));
  const int to = from == cluster.ports()[0] ? cluster.ports()[1] : cluster.ports()[0];

  // Half migrated: `a` has left, `b` has not. The client's map still says `from`.
  cluster.start_migration(slot, from, to, {a});
  EXPECT_EQ(cluster.cli(to, {"CLUSTER", "COUNTKEYSINSLOT", std::to_string(slot)}), "1");
  auto value = [](const RedisReply& r) { return std::string(r->str, r->len); };
  EXPECT_EQ(value(client.command(a, {"GET", a})), "1");
  EXPECT_EQ(client.redirects().ask, 1u) << "a key that has left is asked for where it went";
  EXPECT_EQ(value(client.command(b, {"GET", b})), "2");
  EXPECT_EQ(client.redirects().ask, 1u) << "a key that stayed is served where it was";
  EXPECT_EQ(client.where(a), from_endpoint) << "ASK leaves the map as it was";

  cluster.finish_migration(slot, from, to);
  EXPECT_EQ(value(client.command(b, {"GET", b})), "2");
  EXPECT_EQ(client.redirects().moved, 1u);
  EXPECT_EQ(client.where(a), "127.0.0.1:" + std::to_string(to)) << "MOVED updates the map";
  const auto both = client.pipeline({{a, {"GET", a}}, {b, {"GET", b}}});
  EXPECT_EQ(value(both[0]) + value(both[1]), "12");
  EXPECT_EQ(client.redirects().moved, 1u) << "no redirection once the map is right";
}

TEST(RedisClusterStore, KeepsWorkingWhenAPartitionsSlotMovesUnderIt) {
  START_CLUSTER(cluster);
  auto store = open_spec_store(cluster.uri("?partitions=3"));
  for (int m = 0; m < 12; ++m) store->put(make_random_spec("m" + std::to_string(m), static_cast<unsigned>(m + 1)));
  const SpecChanges cursor = store->changes_since("");
  // Move partition 0's slot (its spec keys, set, counter, log and fence) to another master.
  const int slot = redis_key_slot("gmi:{p0}:models");
  RedisCluster probe(parse_redis_cluster_uri(cluster.uri()));
  const std::string owner = probe.where("gmi:{p0}:models");
  const int from = std::stoi(owner.substr(owner.rfind(':') + 1));
  const int to = from == cluster.ports()[0] ? cluster.ports()[1] : cluster.ports()[0];
  cluster.move_slot(slot, from, to);
  EXPECT_EQ(cluster.cli(from, {"CLUSTER", "COUNTKEYSINSLOT", std::to_string(slot)}), "0");

  std::string in_p0;
  for (int m = 0; m < 12 && in_p0.empty(); ++m)
    if (model_partition("m" + std::to_string(m), 3) == 0) in_p0 = "m" + std::to_string(m);
  ASSERT_FALSE(in_p0.empty());
  ASSERT_TRUE(store->get(in_p0));  // MOVED, followed
  EXPECT_EQ(store->list().size(), 12u);
  store->put(make_random_spec(in_p0, 99));
  EXPECT_EQ(serialize_spec(*store->get(in_p0)), serialize_spec(make_random_spec(in_p0, 99)));
  const SpecChanges changes = store->changes_since(cursor.cursor);
  EXPECT_TRUE(changes.complete);
  EXPECT_EQ(changes.models, std::vector<std::string>{in_p0});
  EXPECT_GT(std::stoi(cluster.cli(to, {"CLUSTER", "COUNTKEYSINSLOT", std::to_string(slot)})), 0);
}

TEST(RedisClusterStore, ALostMasterIsAnIoErrorNamingItInBoundedTime) {
  START_CLUSTER(cluster);
  const std::string uri = cluster.uri("?partitions=6");
  auto store = open_spec_store(uri);
  for (int m = 0; m < 12; ++m) store->put(make_random_spec("m" + std::to_string(m), static_cast<unsigned>(m + 1)));
  RedisCluster probe(parse_redis_cluster_uri(uri));
  const int lost = cluster.ports()[2];
  cluster.kill9(lost);
  // Some model lives on the lost master: reading it fails with an I/O error, in bounded time.
  std::string on_lost;
  for (int m = 0; m < 12 && on_lost.empty(); ++m) {
    const std::string id = "m" + std::to_string(m);
    const std::string key = "gmi:{p" + std::to_string(model_partition(id, 6)) + "}:spec:" + id;
    if (probe.where(key) == "127.0.0.1:" + std::to_string(lost)) on_lost = id;
  }
  ASSERT_FALSE(on_lost.empty()) << "six partitions over three masters: some on each";
  const auto t0 = std::chrono::steady_clock::now();
  try {
    store->get(on_lost);
    ADD_FAILURE() << "a spec on a dead master was read";
  } catch (const IoError& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find("127.0.0.1:" + std::to_string(lost)), std::string::npos) << what;
  }
  EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::seconds(10));
  // A new store cannot start without its whole hub (no master serves those slots), and
  // says so rather than hanging.
  EXPECT_THROW(open_spec_store(uri)->list(), IoError);
}

}  // namespace
}  // namespace gmi
