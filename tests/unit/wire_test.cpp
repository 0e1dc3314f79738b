#include <gtest/gtest.h>

#include <sys/stat.h>

#include <chrono>
#include <cstring>
#include <fstream>
#include <optional>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "gmi/error.hpp"
#include "gmi/wire.hpp"
#include "test_support.hpp"

namespace gmi {
namespace {

using nlohmann::json;
using wire::Channel;

// The WireError message for `header` on `channel` with `frames` binary frames ("" if none).
std::string wire_error(const json& header, Channel channel, std::size_t frames) {
  try {
    wire::validate_header(header, channel, frames);
  } catch (const wire::WireError& e) {
    return e.what();
  }
  return "";
}

::testing::AssertionResult contains(const std::string& text, const std::string& part) {
  if (text.find(part) != std::string::npos) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << "\"" << text << "\" does not contain \"" << part << "\"";
}

// Receives one message within `ms` (nullopt when none came).
std::optional<wire::RawMessage> recv_within(zmq::socket_t& s, bool routed, int ms) {
  zmq::pollitem_t item{s.handle(), 0, ZMQ_POLLIN, 0};
  if (zmq::poll(&item, 1, std::chrono::milliseconds(ms)) == 0) return std::nullopt;
  return wire::recv_raw(s, routed, /*dontwait=*/true);
}

TEST(Wire, HeaderHasVersionAndType) {
  const json h = wire::header("ping");
  EXPECT_EQ(h["v"], wire::kVersion);
  EXPECT_EQ(h["type"], "ping");
  EXPECT_NO_THROW(wire::validate_header(h, Channel::kClientToBroker, 0));
}

TEST(Wire, RejectsWrongVersionNamingBoth) {
  EXPECT_EQ(wire::kVersion, 2);
  json h = wire::header("ping");
  h["v"] = 1;  // the positional-frames protocol this side no longer speaks
  const std::string msg = wire_error(h, Channel::kClientToBroker, 0);
  EXPECT_TRUE(contains(msg, "version 1"));
  EXPECT_TRUE(contains(msg, "speaks 2"));
  // Through the byte-level parser as well, and on every channel.
  EXPECT_THROW(wire::parse_header(R"({"v":1,"type":"pong"})", Channel::kBrokerToClient, 0),
               wire::WireError);
  EXPECT_THROW(wire::parse_header(R"({"v":3,"type":"tasks","tasks":[]})", Channel::kBrokerToWorker, 0),
               wire::WireError);
  EXPECT_THROW(wire::parse_header(R"({"v":0,"type":"heartbeat"})", Channel::kWorkerToBroker, 0),
               wire::WireError);
  EXPECT_TRUE(contains(wire_error(json{{"type", "ping"}}, Channel::kClientToBroker, 0), "\"v\""));
  const json string_version{{"v", "1"}, {"type", "ping"}};
  EXPECT_TRUE(contains(wire_error(string_version, Channel::kClientToBroker, 0), "\"v\""));
}

TEST(Wire, RejectsFrameCountMismatch) {
  json q = wire::header("submit_query");
  q["top"] = 5;
  EXPECT_NO_THROW(wire::validate_header(q, Channel::kClientToBroker, 1));
  const std::string msg = wire_error(q, Channel::kClientToBroker, 0);
  EXPECT_TRUE(contains(msg, "submit_query"));
  EXPECT_TRUE(contains(msg, "got 0"));
  EXPECT_FALSE(wire_error(q, Channel::kClientToBroker, 2).empty());

  json g = wire::header("get_job");
  g["job_id"] = wire::random_id();
  EXPECT_FALSE(wire_error(g, Channel::kClientToBroker, 1).empty());

  // Uploads: one prompt per image frame, at least one image.
  json u = wire::header("submit_upload");
  u["model_id"] = "m";
  u["prompts"] = {"a", "b"};
  EXPECT_NO_THROW(wire::validate_header(u, Channel::kClientToBroker, 2));
  EXPECT_TRUE(contains(wire_error(u, Channel::kClientToBroker, 3), "2 prompts but 3"));
  u["prompts"] = json::array();
  EXPECT_TRUE(contains(wire_error(u, Channel::kClientToBroker, 0), "at least one image"));

  // Frames a worker's results announce (through their slots) must all be there.
  json r = wire::header("results");
  r["results"] = {{{"task", "t1"}, {"ok", true},
                   {"slots", {{{"name", "captions"}, {"kind", "text"}, {"frames", 2}}}}},
                  {{"task", "t2"}, {"ok", false}, {"error", "bad"}}};
  EXPECT_NO_THROW(wire::validate_header(r, Channel::kWorkerToBroker, 2));
  EXPECT_FALSE(wire_error(r, Channel::kWorkerToBroker, 1).empty());
  EXPECT_FALSE(wire_error(r, Channel::kWorkerToBroker, 3).empty());
}

TEST(Wire, RejectsUnknownType) {
  const std::string msg = wire_error(wire::header("launch_missiles"), Channel::kClientToBroker, 0);
  EXPECT_TRUE(contains(msg, "launch_missiles"));
  // A type is known only on its own channel.
  EXPECT_TRUE(contains(wire_error(wire::header("accepted"), Channel::kClientToBroker, 0),
                       "unknown message type"));
  EXPECT_TRUE(contains(wire_error(wire::header("ping"), Channel::kBrokerToClient, 0),
                       "unknown message type"));
  EXPECT_FALSE(wire_error(wire::header("tasks"), Channel::kWorkerToBroker, 0).empty());
  EXPECT_TRUE(contains(wire_error(json{{"v", 2}}, Channel::kClientToBroker, 0), "\"type\""));
}

TEST(Wire, RejectsMissingWrongTypedAndOutOfRangeFields) {
  json q = wire::header("submit_query");
  for (int top : {0, 1001}) {
    q["top"] = top;
    EXPECT_TRUE(contains(wire_error(q, Channel::kClientToBroker, 1), "\"top\"")) << top;
  }
  q["top"] = "10";
  EXPECT_TRUE(contains(wire_error(q, Channel::kClientToBroker, 1), "integer"));
  q["top"] = 10;
  q["scorer"] = std::string(33, 's');
  EXPECT_TRUE(contains(wire_error(q, Channel::kClientToBroker, 1), "\"scorer\""));

  EXPECT_TRUE(contains(wire_error(wire::header("get_job"), Channel::kClientToBroker, 0),
                       "missing field \"job_id\""));
  json g = wire::header("get_job");
  g["job_id"] = wire::random_id();
  g["wait_ms"] = 600001;
  EXPECT_TRUE(contains(wire_error(g, Channel::kClientToBroker, 0), "\"wait_ms\""));

  json e = wire::header("error");
  e["code"] = "busy";
  EXPECT_TRUE(contains(wire_error(e, Channel::kBrokerToClient, 0), "missing field \"error\""));
  json j = wire::header("job");
  j["job"] = {{"job_id", "x"}, {"kind", "query"}};
  EXPECT_TRUE(contains(wire_error(j, Channel::kBrokerToClient, 0), "job.state"));

  json ready = wire::header("ready");
  ready["stage"] = "paint";
  ready["worker"] = "w";
  ready["credit"] = 1;
  EXPECT_TRUE(contains(wire_error(ready, Channel::kWorkerToBroker, 0), "stage"));
  ready["stage"] = "score";
  ready["shard"] = 2;
  ready["shards"] = 2;
  EXPECT_TRUE(contains(wire_error(ready, Channel::kWorkerToBroker, 0), "\"shard\""));
}

TEST(Wire, RejectsMalformedHeaderBytes) {
  EXPECT_THROW(wire::parse_header("", Channel::kClientToBroker, 0), wire::WireError);
  EXPECT_THROW(wire::parse_header("{not json", Channel::kClientToBroker, 0), wire::WireError);
  EXPECT_THROW(wire::parse_header("[1,2]", Channel::kClientToBroker, 0), wire::WireError);
  EXPECT_THROW(wire::parse_header(std::string("\xff\xfe", 2), Channel::kClientToBroker, 0),
               wire::WireError);
  // A WireError is an InputError: not retryable.
  EXPECT_THROW(wire::parse_header("", Channel::kClientToBroker, 0), InputError);
  wire::RawMessage empty;
  EXPECT_THROW(wire::decode(empty, Channel::kClientToBroker), wire::WireError);
}

TEST(Wire, RoundTripsOverInprocSockets) {
  zmq::context_t ctx;
  zmq::socket_t router(ctx, zmq::socket_type::router);
  router.set(zmq::sockopt::linger, 0);
  router.bind("inproc://wire-test");
  zmq::socket_t dealer(ctx, zmq::socket_type::dealer);
  dealer.set(zmq::sockopt::linger, 0);
  dealer.connect("inproc://wire-test");

  // Binary frames with zero bytes, an empty frame, and a larger one.
  const std::string zeros("\0a\0\0b\0", 6);
  std::string big(100000, '\0');
  for (std::size_t i = 0; i < big.size(); ++i) big[i] = static_cast<char>(i * 7);
  json h = wire::header("submit_upload");
  h["model_id"] = "model-a";
  h["prompts"] = {"one", "", "three"};
  h["req"] = "7";
  ASSERT_TRUE(wire::send(dealer, "", h, {zeros, "", big}));

  auto raw = recv_within(router, /*routed=*/true, 2000);
  ASSERT_TRUE(raw.has_value());
  EXPECT_FALSE(raw->routing.empty());
  ASSERT_EQ(raw->parts.size(), 4u);
  const std::string routing = raw->routing;
  const wire::Message m = wire::decode(*raw, Channel::kClientToBroker);
  EXPECT_EQ(m.type(), "submit_upload");
  EXPECT_EQ(m.header["req"], "7");
  EXPECT_EQ(m.header["prompts"], h["prompts"]);
  ASSERT_EQ(m.frames.size(), 3u);
  EXPECT_EQ(m.frames[0], zeros);
  EXPECT_EQ(m.frames[1], "");
  EXPECT_EQ(m.frames[2], big);

  json reply = wire::header("accepted");
  reply["job_id"] = wire::random_id();
  reply["req"] = "7";
  ASSERT_TRUE(wire::send(router, routing, reply));
  auto back = recv_within(dealer, /*routed=*/false, 2000);
  ASSERT_TRUE(back.has_value());
  EXPECT_TRUE(back->routing.empty());
  const wire::Message r = wire::decode(*back, Channel::kBrokerToClient);
  EXPECT_EQ(r.type(), "accepted");
  EXPECT_EQ(r.header["job_id"], reply["job_id"]);
  EXPECT_TRUE(r.frames.empty());

  // Nothing waiting: recv_raw with dontwait answers nullopt.
  EXPECT_FALSE(wire::recv_raw(dealer, false, /*dontwait=*/true).has_value());
}

TEST(Wire, PackRowsRoundTrip) {
  std::mt19937 rng(3);
  std::normal_distribution<float> normal;
  RowMatrix m(3, 5);
  for (Eigen::Index i = 0; i < m.size(); ++i) m.data()[i] = normal(rng);
  m(1, 2) = 0.0f;
  m(2, 4) = -0.0f;
  const std::string bytes = wire::pack_rows(m);
  ASSERT_EQ(bytes.size(), 3u * 5u * 4u);
  const RowMatrix back = wire::unpack_rows(bytes, 3, 5);
  ASSERT_EQ(back.rows(), 3);
  ASSERT_EQ(back.cols(), 5);
  EXPECT_EQ(0, std::memcmp(back.data(), m.data(), bytes.size()));
  // Row-major, little-endian: the first float is m(0, 0).
  float first = 0;
  std::memcpy(&first, bytes.data(), 4);
  EXPECT_EQ(first, m(0, 0));

  EXPECT_THROW(wire::unpack_rows(bytes, 5, 4), wire::WireError);
  EXPECT_THROW(wire::unpack_rows(bytes.substr(1), 3, 5), wire::WireError);
  const RowMatrix empty(0, 7);
  EXPECT_TRUE(wire::pack_rows(empty).empty());
  EXPECT_EQ(wire::unpack_rows("", 0, 7).rows(), 0);
}

TEST(Wire, RandomIdsAreLowerHexAndDistinct) {
  std::set<std::string> seen;
  for (int i = 0; i < 1000; ++i) {
    const std::string id = wire::random_id();
    ASSERT_EQ(id.size(), 32u);
    for (char c : id) ASSERT_TRUE((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f')) << id;
    seen.insert(id);
  }
  EXPECT_EQ(seen.size(), 1000u);
}

TEST(Wire, CurveKeyFilesRoundTrip) {
  testing::TempDir dir;
  const std::string path = (dir.path() / "broker.key").string();
  const wire::CurveKeys keys = wire::generate_curve_key_files(path);
  EXPECT_EQ(keys.public_key.size(), 40u);
  EXPECT_EQ(keys.secret_key.size(), 40u);

  const wire::CurveKeys full = wire::read_curve_key_file(path);
  EXPECT_EQ(full.public_key, keys.public_key);
  EXPECT_EQ(full.secret_key, keys.secret_key);
  const wire::CurveKeys pub = wire::read_curve_key_file(path + ".pub");
  EXPECT_EQ(pub.public_key, keys.public_key);
  EXPECT_TRUE(pub.secret_key.empty());

  struct stat st {};
  ASSERT_EQ(::stat(path.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0600u) << "the secret key file must be private";

  // Regenerating gives a new pair.
  EXPECT_NE(wire::generate_curve_key_files(path).public_key, keys.public_key);

  EXPECT_THROW(wire::read_curve_key_file((dir.path() / "absent.key").string()), IoError);
  const std::string bad = (dir.path() / "bad.key").string();
  std::ofstream(bad) << "public tooshort\n";
  EXPECT_THROW(wire::read_curve_key_file(bad), InputError);
  std::ofstream(bad, std::ios::trunc) << "private " << keys.secret_key << "\n";
  EXPECT_THROW(wire::read_curve_key_file(bad), InputError);
  std::ofstream(bad, std::ios::trunc) << "secret " << keys.secret_key << "\n";
  EXPECT_THROW(wire::read_curve_key_file(bad), InputError);  // no public key

  // A client or server needs its secret key.
  zmq::context_t ctx;
  zmq::socket_t s(ctx, zmq::socket_type::dealer);
  EXPECT_THROW(wire::make_curve_server(s, pub), InputError);
  EXPECT_THROW(wire::make_curve_client(s, keys.public_key, pub), InputError);
}

TEST(Wire, CurveClientWithWrongServerKeyGetsNoReply) {
  testing::TempDir dir;
  const auto server_keys = wire::generate_curve_key_files((dir.path() / "server.key").string());
  const auto client_keys = wire::generate_curve_key_files((dir.path() / "client.key").string());
  const auto other_keys = wire::generate_curve_key_files((dir.path() / "other.key").string());

  zmq::context_t ctx;
  zmq::socket_t server(ctx, zmq::socket_type::router);
  server.set(zmq::sockopt::linger, 0);
  wire::make_curve_server(server, server_keys);
  const std::string endpoint = "tcp://127.0.0.1:" + std::to_string(testing::free_port());
  server.bind(endpoint);

  // Answers the pings that arrive within `ms` (returning after the first `enough`); returns
  // how many it answered.
  const auto serve = [&](int ms, int enough) {
    int answered = 0;
    const auto until = std::chrono::steady_clock::now() + std::chrono::milliseconds(ms);
    while (answered < enough && std::chrono::steady_clock::now() < until) {
      auto raw = recv_within(server, /*routed=*/true, 50);
      if (!raw) continue;
      const wire::Message m = wire::decode(*raw, Channel::kClientToBroker);
      json pong = wire::header("pong");
      pong["req"] = m.header.value("req", "");
      wire::send(server, raw->routing, pong);
      ++answered;
    }
    return answered;
  };

  {
    zmq::socket_t good(ctx, zmq::socket_type::dealer);
    good.set(zmq::sockopt::linger, 0);
    wire::make_curve_client(good, server_keys.public_key, client_keys);
    good.connect(endpoint);
    json ping = wire::header("ping");
    ping["req"] = "good";
    ASSERT_TRUE(wire::send(good, "", ping));
    EXPECT_EQ(serve(2000, 1), 1);
    auto reply = recv_within(good, false, 1000);
    ASSERT_TRUE(reply.has_value()) << "a client with the right server key gets its reply";
    EXPECT_EQ(wire::decode(*reply, Channel::kBrokerToClient).header["req"], "good");
  }
  {
    zmq::socket_t wrong(ctx, zmq::socket_type::dealer);
    wrong.set(zmq::sockopt::linger, 0);
    wire::make_curve_client(wrong, other_keys.public_key, client_keys);
    wrong.connect(endpoint);
    json ping = wire::header("ping");
    ping["req"] = "wrong";
    ASSERT_TRUE(wire::send(wrong, "", ping));
    EXPECT_EQ(serve(500, 1), 0) << "the handshake must fail, so the server never sees the ping";
    EXPECT_FALSE(recv_within(wrong, false, 500).has_value());
  }
}

}  // namespace
}  // namespace gmi
