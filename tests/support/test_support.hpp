#pragma once
/// Test helpers: scratch directories, a real redis-server on a free port, subprocesses.
#include <chrono>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

namespace gmi::testing {

/// A fresh directory under the system temp dir, removed on destruction.
class TempDir {
 public:
  TempDir();
  ~TempDir();
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  const std::filesystem::path& path() const { return path_; }

 private:
  std::filesystem::path path_;
};

/// Starts a real `redis-server` (no persistence) on a free loopback port; killed on
/// destruction. Skips the calling test (GTEST_SKIP) only when no redis-server binary
/// exists and GMI_REQUIRE_REDIS is unset; CI sets GMI_REQUIRE_REDIS=1 so it fails instead.
class RedisServer {
 public:
  /// `password`: when non-empty, the server requires it (requirepass).
  /// `persistent`: append-only file with fsync on every write, so restart() loses nothing.
  explicit RedisServer(const std::string& password = "", bool persistent = false);
  ~RedisServer();
  RedisServer(const RedisServer&) = delete;
  RedisServer& operator=(const RedisServer&) = delete;
  bool started() const { return pid_ > 0; }
  int port() const { return port_; }
  std::string uri() const;  ///< redis://127.0.0.1:PORT
  /// kill -9, then start again on the same port and data directory.
  void restart();
  void kill9();
  void start();

 private:
  int pid_ = -1;
  int port_ = 0;
  std::string password_;
  bool persistent_ = false;
  TempDir dir_;
};

/// A real Redis Cluster on loopback: `masters` redis-server processes started with
/// cluster-enabled (node timeout 2 s), joined by `redis-cli --cluster create`, each master
/// holding an equal share of the 16384 slots; every process killed on destruction. Skips
/// like RedisServer when redis-server or redis-cli is missing (fails under GMI_REQUIRE_REDIS).
class RedisClusterServers {
 public:
  explicit RedisClusterServers(int masters = 3);
  ~RedisClusterServers();
  RedisClusterServers(const RedisClusterServers&) = delete;
  RedisClusterServers& operator=(const RedisClusterServers&) = delete;
  bool started() const { return ready_; }
  const std::vector<int>& ports() const { return ports_; }
  /// redis-cluster://127.0.0.1:P1,127.0.0.1:P2,... followed by `query` ("?partitions=6").
  std::string uri(const std::string& query = "") const;
  /// Runs redis-cli against the node on `port` with `args`; its stdout (trailing newline trimmed).
  std::string cli(int port, const std::vector<std::string>& args) const;
  /// The node id of the node on `port` (CLUSTER MYID).
  std::string node_id(int port) const;
  /// Moves `slot`, keys and all, from the master on `from` to the one on `to`, and tells
  /// every master; after it the old owner answers MOVED for the slot's keys.
  void move_slot(int slot, int from, int to) const;
  /// The first half of move_slot: `to` IMPORTING and `from` MIGRATING the slot, the keys
  /// named moved (MIGRATE), the rest left behind: the old owner answers ASK for moved keys.
  void start_migration(int slot, int from, int to, const std::vector<std::string>& keys) const;
  /// The second half: the remaining keys moved and the slot given to `to` everywhere.
  void finish_migration(int slot, int from, int to) const;
  void kill9(int port);

 private:
  std::vector<int> ports_, pids_;
  bool ready_ = false;
  TempDir dir_;
};

/// A process running in the background (a service under test), its stdout and stderr
/// appended to `log`. Killed with SIGKILL on destruction if still running.
class BackgroundProcess {
 public:
  BackgroundProcess(std::vector<std::string> argv, std::vector<std::string> extra_env,
                    std::filesystem::path log);
  ~BackgroundProcess();
  BackgroundProcess(const BackgroundProcess&) = delete;
  BackgroundProcess& operator=(const BackgroundProcess&) = delete;

  int pid() const { return pid_; }
  bool running();
  void signal(int sig);
  /// The exit code (-signal when killed), or nullopt if still running after `timeout`.
  std::optional<int> wait(std::chrono::milliseconds timeout);
  std::string log() const;

 private:
  int pid_ = -1;
  std::optional<int> status_;
  std::filesystem::path log_;
};

struct ProcessResult {
  int exit_code = -1;  ///< -signal when killed by a signal
  std::string out;
  std::string err;
};

/// Runs argv (no shell), with extra environment entries "K=V", capturing stdout/stderr.
ProcessResult run_process(const std::vector<std::string>& argv,
                          const std::vector<std::string>& extra_env = {},
                          const std::string& stdin_data = "");

/// Runs the gmi binary under test with `args`.
ProcessResult run_gmi(std::vector<std::string> args, const std::vector<std::string>& extra_env = {});

/// A free TCP port on 127.0.0.1.
int free_port();

/// Path of the gmi binary under test.
std::string gmi_binary();

}  // namespace gmi::testing
