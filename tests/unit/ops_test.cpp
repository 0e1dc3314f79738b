#include <gtest/gtest.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <stdexcept>
#include <string>

// Debian's cpp-httplib is a compiled library built with these options, and they change the
// layout of httplib's classes; every user must define them (pkg-config --cflags cpp-httplib),
// and gmi_core links the library privately, so the test defines them itself.
// Its feature flags (OpenSSL, zlib, brotli) come from gmi_core's public link to the
// cpp-httplib package: every includer must see the same class layout as the library.
#include <httplib.h>

#include "gmi/error.hpp"
#include "gmi/ops.hpp"
#include "test_support.hpp"

namespace gmi {
namespace {

httplib::Result get(int port, const std::string& path) {
  httplib::Client client("127.0.0.1", port);
  client.set_connection_timeout(2, 0);
  client.set_read_timeout(5, 0);
  return client.Get(path.c_str());
}

OpsServerOptions loopback(int port = 0) {
  OpsServerOptions o;
  o.host = "127.0.0.1";
  o.port = port;
  return o;
}

TEST(Ops, ServesMetricsHealthAndReadiness) {
  std::atomic<bool> ready{false};
  OpsServerOptions options = loopback();
  options.not_ready_reason = [&ready]() -> std::string {
    return ready ? "" : "waiting for the broker";
  };
  OpsServer server(options);
  ASSERT_GT(server.port(), 0);
  server.start();

  Metrics::instance().jobs_total.Add({{"stage", "ops_test"}, {"outcome", "ok"}}).Increment(3);

  auto metrics = get(server.port(), "/metrics");
  ASSERT_TRUE(metrics) << httplib::to_string(metrics.error());
  EXPECT_EQ(metrics->status, 200);
  EXPECT_EQ(metrics->get_header_value("Content-Type"), "text/plain; version=0.0.4");
  EXPECT_NE(metrics->body.find("gmi_jobs_total{"), std::string::npos) << metrics->body;
  EXPECT_NE(metrics->body.find("stage=\"ops_test\""), std::string::npos) << metrics->body;

  auto health = get(server.port(), "/healthz");
  ASSERT_TRUE(health);
  EXPECT_EQ(health->status, 200);
  EXPECT_EQ(health->body, "ok\n");

  auto not_ready = get(server.port(), "/readyz");
  ASSERT_TRUE(not_ready);
  EXPECT_EQ(not_ready->status, 503);
  EXPECT_EQ(not_ready->body, "waiting for the broker\n");

  ready = true;
  auto is_ready = get(server.port(), "/readyz");
  ASSERT_TRUE(is_ready);
  EXPECT_EQ(is_ready->status, 200);
  EXPECT_EQ(is_ready->body, "ready\n");

  auto missing = get(server.port(), "/nope");
  ASSERT_TRUE(missing);
  EXPECT_EQ(missing->status, 404);
}

TEST(Ops, ReadyWithoutACheckAndFailingCheckIsNotReady) {
  OpsServer plain(loopback());
  plain.start();
  auto ok = get(plain.port(), "/readyz");
  ASSERT_TRUE(ok);
  EXPECT_EQ(ok->status, 200);

  OpsServerOptions options = loopback();
  options.not_ready_reason = []() -> std::string { throw std::runtime_error("redis down"); };
  OpsServer failing(options);
  failing.start();
  auto bad = get(failing.port(), "/readyz");
  ASSERT_TRUE(bad);
  EXPECT_EQ(bad->status, 503);
  EXPECT_NE(bad->body.find("redis down"), std::string::npos) << bad->body;
}

TEST(Ops, HealthzFailsWithTheReasonWhileTheLivenessCheckSaysSo) {
  std::atomic<bool> stuck{false};
  OpsServerOptions options = loopback();
  options.not_alive_reason = [&]() -> std::string { return stuck ? "compute stuck for 301 s" : ""; };
  OpsServer server(options);
  server.start();
  auto alive = get(server.port(), "/healthz");
  ASSERT_TRUE(alive);
  EXPECT_EQ(alive->status, 200);
  stuck = true;
  auto dead = get(server.port(), "/healthz");
  ASSERT_TRUE(dead);
  EXPECT_EQ(dead->status, 503);
  EXPECT_EQ(dead->body, "compute stuck for 301 s\n");
}

TEST(Ops, CounterIncrementsShowInTheMetricsText) {
  auto& c = Metrics::instance().retries_total.Add({{"stage", "ops_test"}, {"reason", "timeout"}});
  c.Increment();
  c.Increment();
  std::string text = Metrics::instance().serialize();
  EXPECT_NE(text.find("gmi_retries_total{reason=\"timeout\",stage=\"ops_test\"} 2"),
            std::string::npos)
      << text;
}

TEST(Ops, PortInUseIsAnIoErrorNamingIt) {
  OpsServer first(loopback());
  first.start();
  try {
    OpsServer second(loopback(first.port()));
    FAIL() << "a second server bound a port already in use";
  } catch (const IoError& e) {
    EXPECT_EQ(std::string(e.what()),
              "cannot listen on 127.0.0.1:" + std::to_string(first.port()) + " for the ops server");
  }
  // The first server is untouched.
  auto health = get(first.port(), "/healthz");
  ASSERT_TRUE(health);
  EXPECT_EQ(health->status, 200);
}

TEST(Ops, PortTakenByAnotherListenerIsAnIoError) {
  int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  ASSERT_GE(fd, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ASSERT_EQ(::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr), 0);
  ASSERT_EQ(::listen(fd, 1), 0);
  socklen_t len = sizeof addr;
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len);
  EXPECT_THROW(OpsServer server(loopback(ntohs(addr.sin_port))), IoError);
  ::close(fd);
}

TEST(Ops, PortOutOfRangeIsAnInputError) {
  EXPECT_THROW(OpsServer server(loopback(70000)), InputError);
  EXPECT_THROW(OpsServer server(loopback(-1)), InputError);
}

TEST(Ops, PortIsReleasedOnDestructionEvenIfNeverStarted) {
  int port = 0;
  {
    OpsServer never_started(loopback());
    port = never_started.port();
  }
  {
    OpsServer again(loopback(port));  // throws if the first one still holds the port
    again.start();
    again.stop();
    again.stop();  // idempotent
  }
  OpsServer third(loopback(port));
  third.start();
  auto health = get(port, "/healthz");
  ASSERT_TRUE(health);
  EXPECT_EQ(health->status, 200);
}

TEST(Ops, ConstructStartAndDestroyQuicklyManyTimes) {
  auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < 100; ++i) {
    OpsServer server(loopback());
    if (i % 2 == 0) server.start();
    if (i % 4 == 0) server.stop();
  }
  // A stop() that misses the listen loop would hang here forever; this bounds the slow case.
  EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::seconds(20));
}

TEST(Ops, ExtraRoutesRegisteredBeforeStartAreServed) {
  OpsServer server(loopback());
  server.http().Get("/extra", [](const httplib::Request&, httplib::Response& res) {
    res.set_content("extra\n", "text/plain");
  });
  server.start();
  auto r = get(server.port(), "/extra");
  ASSERT_TRUE(r);
  EXPECT_EQ(r->body, "extra\n");
}

TEST(Ops, SharedFamiliesHaveTheDocumentedNamesAndTypes) {
  auto& m = Metrics::instance();
  EXPECT_EQ(&m, &Metrics::instance());
  m.jobs_total.Add({{"stage", "t"}, {"outcome", "ok"}});
  m.stage_seconds.Add({{"stage", "t"}}, Metrics::latency_buckets()).Observe(0.003);
  m.batch_size.Add({{"stage", "t"}}, Metrics::size_buckets()).Observe(5);
  m.queue_depth.Add({{"stage", "t"}}).Set(7);
  m.retries_total.Add({{"stage", "t"}, {"reason", "r"}});
  m.dead_letters_total.Add({{"stage", "t"}});
  m.job_seconds.Add({{"kind", "query"}, {"outcome", "ok"}}, Metrics::latency_buckets());
  m.http_requests_total.Add({{"route", "/x"}, {"code", "200"}});
  m.workers.Add({{"stage", "t"}}).Set(2);
  m.specs_loaded.Add({{"stage", "t"}}).Set(1);
  std::string text = m.serialize();
  const std::pair<const char*, const char*> families[] = {
      {"gmi_jobs_total", "counter"},    {"gmi_stage_seconds", "histogram"},
      {"gmi_batch_size", "histogram"},  {"gmi_queue_depth", "gauge"},
      {"gmi_retries_total", "counter"}, {"gmi_dead_letters_total", "counter"},
      {"gmi_job_seconds", "histogram"}, {"gmi_http_requests_total", "counter"},
      {"gmi_workers", "gauge"},         {"gmi_specs_loaded", "gauge"},
  };
  for (const auto& [name, type] : families) {
    EXPECT_NE(text.find(std::string("# TYPE ") + name + " " + type + "\n"), std::string::npos)
        << name;
    EXPECT_NE(text.find(std::string("# HELP ") + name + " "), std::string::npos) << name;
  }
  EXPECT_NE(text.find("gmi_stage_seconds_bucket{stage=\"t\",le=\"0.005\"} 1"), std::string::npos)
      << text;
  EXPECT_NE(text.find("gmi_queue_depth{stage=\"t\"} 7"), std::string::npos) << text;
}

TEST(Ops, BucketsAreAscendingAndSpanTheDocumentedRange) {
  auto lat = Metrics::latency_buckets();
  ASSERT_EQ(lat.size(), 18u);
  EXPECT_DOUBLE_EQ(lat.front(), 1e-4);
  EXPECT_DOUBLE_EQ(lat.back(), 60);
  EXPECT_TRUE(std::is_sorted(lat.begin(), lat.end()));
  auto size = Metrics::size_buckets();
  ASSERT_EQ(size.size(), 11u);
  EXPECT_DOUBLE_EQ(size.front(), 1);
  EXPECT_DOUBLE_EQ(size[1], 2);
  EXPECT_DOUBLE_EQ(size.back(), 1024);
}

}  // namespace
}  // namespace gmi
