#include "test_support.hpp"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>
#include <random>
#include <stdexcept>
#include <thread>

#include <gtest/gtest.h>

extern char** environ;

namespace gmi::testing {
namespace fs = std::filesystem;

TempDir::TempDir() {
  std::random_device rd;
  for (int attempt = 0; attempt < 100; ++attempt) {
    fs::path p = fs::temp_directory_path() / ("gmi-test-" + std::to_string(rd()));
    std::error_code ec;
    if (fs::create_directory(p, ec)) {
      path_ = p;
      return;
    }
  }
  throw std::runtime_error("TempDir: could not create a temporary directory");
}

TempDir::~TempDir() {
  std::error_code ec;
  fs::remove_all(path_, ec);
}

int free_port() {
  int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = 0;
  if (::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) {
    ::close(fd);
    throw std::runtime_error("free_port: bind failed");
  }
  socklen_t len = sizeof addr;
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len);
  int port = ntohs(addr.sin_port);
  ::close(fd);
  return port;
}

static bool port_accepts(int port) {
  int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = htons(static_cast<uint16_t>(port));
  bool ok = ::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0;
  ::close(fd);
  return ok;
}

// Starts argv[0] with argv, its stdout sent to /dev/null; the child's pid.
static pid_t spawn_quiet(std::vector<std::string> args) {
  pid_t pid = ::fork();
  if (pid == 0) {
    int devnull = ::open("/dev/null", O_WRONLY);
    ::dup2(devnull, 1);
    std::vector<char*> cargs;
    for (auto& a : args) cargs.push_back(a.data());
    cargs.push_back(nullptr);
    ::execv(cargs[0], cargs.data());
    ::_exit(127);
  }
  return pid;
}

static std::string find_redis_server() {
  for (const char* p : {"/usr/bin/redis-server", "/usr/local/bin/redis-server"}) {
    if (::access(p, X_OK) == 0) return p;
  }
  return {};
}

RedisServer::RedisServer(const std::string& password, bool persistent)
    : password_(password), persistent_(persistent) {
  if (find_redis_server().empty()) {
    if (std::getenv("GMI_REQUIRE_REDIS")) {
      ADD_FAILURE() << "redis-server not found but GMI_REQUIRE_REDIS is set";
    }
    return;
  }
  port_ = free_port();
  start();
}

void RedisServer::start() {
  std::vector<std::string> args = {find_redis_server(), "--port", std::to_string(port_),
                                   "--bind", "127.0.0.1", "--save", "",
                                   "--dir", dir_.path().string(), "--daemonize", "no",
                                   "--loglevel", "warning"};
  if (persistent_) {
    for (const char* a : {"--appendonly", "yes", "--appendfsync", "always"}) args.push_back(a);
  } else {
    for (const char* a : {"--appendonly", "no"}) args.push_back(a);
  }
  if (!password_.empty()) {
    args.push_back("--requirepass");
    args.push_back(password_);
  }
  pid_ = spawn_quiet(args);
  for (int i = 0; i < 400; ++i) {
    if (port_accepts(port_)) return;
    std::this_thread::sleep_for(std::chrono::milliseconds(25));
  }
  ADD_FAILURE() << "redis-server did not start listening on port " << port_;
}

void RedisServer::kill9() {
  if (pid_ > 0) {
    ::kill(pid_, SIGKILL);
    int status = 0;
    ::waitpid(pid_, &status, 0);
    pid_ = -1;
  }
}

void RedisServer::restart() {
  kill9();
  start();
}

RedisServer::~RedisServer() { kill9(); }

namespace {

// A loopback port P that is free, with P + 10000 (its cluster bus) free too.
int free_cluster_port() {
  std::random_device rd;
  for (int attempt = 0; attempt < 200; ++attempt) {
    const int port = 20000 + static_cast<int>(rd() % 20000);
    auto bindable = [](int p) {
      int fd = ::socket(AF_INET, SOCK_STREAM, 0);
      sockaddr_in addr{};
      addr.sin_family = AF_INET;
      addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
      addr.sin_port = htons(static_cast<uint16_t>(p));
      const bool ok = ::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0;
      ::close(fd);
      return ok;
    };
    if (bindable(port) && bindable(port + 10000)) return port;
  }
  throw std::runtime_error("free_cluster_port: no free port pair");
}

}  // namespace

RedisClusterServers::RedisClusterServers(int masters) {
  const std::string server = find_redis_server();
  if (server.empty() || ::access("/usr/bin/redis-cli", X_OK) != 0) {
    if (std::getenv("GMI_REQUIRE_REDIS")) ADD_FAILURE() << "redis-server or redis-cli not found but GMI_REQUIRE_REDIS is set";
    return;
  }
  for (int i = 0; i < masters; ++i) {
    int port = free_cluster_port();
    while (std::find(ports_.begin(), ports_.end(), port) != ports_.end()) port = free_cluster_port();
    ports_.push_back(port);
    const fs::path dir = dir_.path() / std::to_string(port);
    fs::create_directories(dir);
    std::vector<std::string> args = {server, "--port", std::to_string(port), "--bind", "127.0.0.1", "--save", "",
                                     "--appendonly", "no", "--dir", dir.string(), "--daemonize", "no",
                                     "--loglevel", "warning", "--cluster-enabled", "yes",
                                     "--cluster-config-file", "nodes.conf", "--cluster-node-timeout", "2000"};
    pids_.push_back(spawn_quiet(args));
  }
  for (const int port : ports_) {
    bool up = false;
    for (int i = 0; i < 400 && !up; ++i) {
      up = port_accepts(port);
      if (!up) std::this_thread::sleep_for(std::chrono::milliseconds(25));
    }
    if (!up) {
      ADD_FAILURE() << "cluster node did not start listening on port " << port;
      return;
    }
  }
  std::vector<std::string> create = {"/usr/bin/redis-cli", "--cluster", "create"};
  for (const int port : ports_) create.push_back("127.0.0.1:" + std::to_string(port));
  for (const char* a : {"--cluster-replicas", "0", "--cluster-yes"}) create.push_back(a);
  const ProcessResult made = run_process(create);
  if (made.exit_code != 0) {
    ADD_FAILURE() << "redis-cli --cluster create failed: " << made.out << made.err;
    return;
  }
  // Every node must see the whole cluster up (the create returns once the config is sent).
  for (int i = 0; i < 400; ++i) {
    bool ok = true;
    for (const int port : ports_) ok = ok && cli(port, {"CLUSTER", "INFO"}).find("cluster_state:ok") != std::string::npos;
    if (ok) {
      ready_ = true;
      return;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  ADD_FAILURE() << "the Redis Cluster on ports " << ports_.front() << "... never reported cluster_state:ok";
}

RedisClusterServers::~RedisClusterServers() {
  for (const int pid : pids_) {
    if (pid <= 0) continue;
    ::kill(pid, SIGKILL);
    int status = 0;
    ::waitpid(pid, &status, 0);
  }
}

void RedisClusterServers::kill9(int port) {
  for (std::size_t i = 0; i < ports_.size(); ++i) {
    if (ports_[i] != port || pids_[i] <= 0) continue;
    ::kill(pids_[i], SIGKILL);
    int status = 0;
    ::waitpid(pids_[i], &status, 0);
    pids_[i] = -1;
  }
}

std::string RedisClusterServers::uri(const std::string& query) const {
  std::string s = "redis-cluster://";
  for (std::size_t i = 0; i < ports_.size(); ++i) s += (i ? ",127.0.0.1:" : "127.0.0.1:") + std::to_string(ports_[i]);
  return s + query;
}

std::string RedisClusterServers::cli(int port, const std::vector<std::string>& args) const {
  std::vector<std::string> argv = {"/usr/bin/redis-cli", "-p", std::to_string(port)};
  argv.insert(argv.end(), args.begin(), args.end());
  ProcessResult r = run_process(argv);
  while (!r.out.empty() && (r.out.back() == '\n' || r.out.back() == '\r')) r.out.pop_back();
  return r.out;
}

std::string RedisClusterServers::node_id(int port) const { return cli(port, {"CLUSTER", "MYID"}); }

void RedisClusterServers::start_migration(int slot, int from, int to, const std::vector<std::string>& keys) const {
  const std::string s = std::to_string(slot);
  cli(to, {"CLUSTER", "SETSLOT", s, "IMPORTING", node_id(from)});
  cli(from, {"CLUSTER", "SETSLOT", s, "MIGRATING", node_id(to)});
  for (const auto& key : keys) cli(from, {"MIGRATE", "127.0.0.1", std::to_string(to), key, "0", "5000"});
}

void RedisClusterServers::finish_migration(int slot, int from, int to) const {
  const std::string s = std::to_string(slot);
  for (;;) {
    const std::string left = cli(from, {"CLUSTER", "GETKEYSINSLOT", s, "100"});
    if (left.empty()) break;
    std::vector<std::string> args = {"MIGRATE", "127.0.0.1", std::to_string(to), "", "0", "5000", "KEYS"};
    std::istringstream lines(left);
    for (std::string key; std::getline(lines, key);)
      if (!key.empty()) args.push_back(key);
    cli(from, args);
  }
  const std::string owner = node_id(to);
  for (const int port : ports_) cli(port, {"CLUSTER", "SETSLOT", s, "NODE", owner});
}

void RedisClusterServers::move_slot(int slot, int from, int to) const {
  start_migration(slot, from, to, {});
  finish_migration(slot, from, to);
}

BackgroundProcess::BackgroundProcess(std::vector<std::string> argv,
                                     std::vector<std::string> extra_env, fs::path log)
    : log_(std::move(log)) {
  pid_t pid = ::fork();
  if (pid == 0) {
    int fd = ::open(log_.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
    ::dup2(fd, 1);
    ::dup2(fd, 2);
    int devnull = ::open("/dev/null", O_RDONLY);
    ::dup2(devnull, 0);
    for (const auto& kv : extra_env) {
      auto eq = kv.find('=');
      ::setenv(kv.substr(0, eq).c_str(), kv.substr(eq + 1).c_str(), 1);
    }
    std::vector<char*> cargs;
    for (auto& a : argv) cargs.push_back(a.data());
    cargs.push_back(nullptr);
    ::execvp(cargs[0], cargs.data());
    ::_exit(127);
  }
  pid_ = pid;
}

BackgroundProcess::~BackgroundProcess() {
  if (running()) {
    ::kill(pid_, SIGKILL);
    wait(std::chrono::milliseconds(5000));
  }
}

bool BackgroundProcess::running() {
  if (status_ || pid_ <= 0) return false;
  int status = 0;
  pid_t r = ::waitpid(pid_, &status, WNOHANG);
  if (r == pid_) {
    status_ = WIFEXITED(status) ? WEXITSTATUS(status) : -WTERMSIG(status);
    return false;
  }
  return true;
}

void BackgroundProcess::signal(int sig) {
  if (running()) ::kill(pid_, sig);
}

std::optional<int> BackgroundProcess::wait(std::chrono::milliseconds timeout) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  while (running()) {
    if (std::chrono::steady_clock::now() > deadline) return std::nullopt;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  return status_;
}

std::string BackgroundProcess::log() const {
  std::ifstream in(log_);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

std::string RedisServer::uri() const { return "redis://127.0.0.1:" + std::to_string(port_); }

std::string gmi_binary() {
#ifdef GMI_BINARY
  return GMI_BINARY;
#else
  return "gmi";
#endif
}

ProcessResult run_gmi(std::vector<std::string> args, const std::vector<std::string>& extra_env) {
  args.insert(args.begin(), gmi_binary());
  return run_process(args, extra_env);
}

ProcessResult run_process(const std::vector<std::string>& argv,
                          const std::vector<std::string>& extra_env,
                          const std::string& stdin_data) {
  int out_pipe[2], err_pipe[2], in_pipe[2];
  if (::pipe(out_pipe) || ::pipe(err_pipe) || ::pipe(in_pipe)) throw std::runtime_error("pipe");
  pid_t pid = ::fork();
  if (pid == 0) {
    ::dup2(in_pipe[0], 0);
    ::dup2(out_pipe[1], 1);
    ::dup2(err_pipe[1], 2);
    for (int fd : {out_pipe[0], out_pipe[1], err_pipe[0], err_pipe[1], in_pipe[0], in_pipe[1]}) {
      ::close(fd);
    }
    for (const auto& kv : extra_env) {
      auto eq = kv.find('=');
      ::setenv(kv.substr(0, eq).c_str(), kv.substr(eq + 1).c_str(), 1);
    }
    std::vector<char*> cargs;
    std::vector<std::string> copy = argv;
    for (auto& a : copy) cargs.push_back(a.data());
    cargs.push_back(nullptr);
    ::execvp(cargs[0], cargs.data());
    ::_exit(127);
  }
  ::close(out_pipe[1]);
  ::close(err_pipe[1]);
  ::close(in_pipe[0]);
  // Write stdin without blocking the reads (a child may print before reading everything).
  std::size_t written = 0;
  if (stdin_data.empty()) {
    ::close(in_pipe[1]);
    in_pipe[1] = -1;
  } else {
    ::fcntl(in_pipe[1], F_SETFL, O_NONBLOCK);
  }
  ProcessResult result;
  pollfd fds[3] = {{out_pipe[0], POLLIN, 0}, {err_pipe[0], POLLIN, 0}, {in_pipe[1], POLLOUT, 0}};
  int open_fds = 2;
  char buf[65536];
  while (open_fds > 0 || fds[2].fd >= 0) {
    ::poll(fds, 3, 1000);
    for (int i = 0; i < 2; ++i) {
      if (fds[i].fd >= 0 && (fds[i].revents & (POLLIN | POLLHUP | POLLERR))) {
        ssize_t n = ::read(fds[i].fd, buf, sizeof buf);
        if (n <= 0) {
          ::close(fds[i].fd);
          fds[i].fd = -1;
          --open_fds;
        } else {
          (i == 0 ? result.out : result.err).append(buf, static_cast<size_t>(n));
        }
      }
    }
    if (fds[2].fd >= 0 && (fds[2].revents & (POLLOUT | POLLERR | POLLHUP))) {
      ssize_t n = ::write(fds[2].fd, stdin_data.data() + written, stdin_data.size() - written);
      if (n > 0) written += static_cast<size_t>(n);
      if (n < 0 || written == stdin_data.size()) {
        ::close(fds[2].fd);
        fds[2].fd = -1;
      }
    }
  }
  int status = 0;
  ::waitpid(pid, &status, 0);
  result.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -WTERMSIG(status);
  return result;
}

}  // namespace gmi::testing
