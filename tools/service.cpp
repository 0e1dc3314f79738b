#include "service.hpp"

#include <signal.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <sstream>
#include <thread>

#include <nlohmann/json.hpp>
#include <zmq.hpp>

#include "gmi/broker.hpp"
#include "gmi/broker_client.hpp"
#include "gmi/config.hpp"
#include "gmi/error.hpp"
#include "gmi/gateway.hpp"
#include "gmi/log.hpp"
#include "gmi/manifest.hpp"
#include "gmi/ops.hpp"
#include "gmi/wire.hpp"
#include "gmi/workers/runtime.hpp"

namespace gmi::cli {
namespace {

using nlohmann::json;

std::atomic<bool> g_stop{false};

std::atomic<bool> g_reload_keys{false};  // SIGHUP: re-read curve.clients_dir

extern "C" void on_signal(int) { g_stop.store(true); }
extern "C" void on_hangup(int) { g_reload_keys.store(true); }

void install_signal_handlers() {
  struct sigaction sa {};
  sa.sa_handler = on_signal;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGTERM, &sa, nullptr);
  sigaction(SIGINT, &sa, nullptr);
  struct sigaction hup {};
  hup.sa_handler = on_hangup;
  sigemptyset(&hup.sa_mask);
  sigaction(SIGHUP, &hup, nullptr);
  signal(SIGPIPE, SIG_IGN);
}

void wait_for_stop() {
  while (!g_stop.load()) std::this_thread::sleep_for(std::chrono::milliseconds(50));
}

std::string read_file_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw IoError("cannot read " + path);
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// CURVE settings shared by every process: off, or key files named in the config.
struct Curve {
  bool enabled = false;
  wire::CurveKeys server;        // the broker's (secret included) — broker only
  std::string server_public;     // everyone else
  wire::CurveKeys client;
};

Curve load_curve(const Config& c, bool is_broker) {
  Curve cv;
  cv.enabled = c.get_bool("curve.enabled");
  if (!cv.enabled) return cv;
  auto need = [&](const char* key) {
    std::string path = c.get_string(key);
    if (path.empty()) throw InputError(std::string("curve.enabled is true but ") + key + " is empty");
    return path;
  };
  if (is_broker) {
    cv.server = wire::read_curve_key_file(need("curve.server_keys"));
  } else {
    cv.server_public = wire::read_curve_key_file(need("curve.server_public")).public_key;
    cv.client = wire::read_curve_key_file(need("curve.client_keys"));
  }
  return cv;
}

BrokerOptions broker_options(const Config& c) {
  BrokerOptions o;
  o.frontend = {c.get_string("broker.frontend")};
  o.backend = {c.get_string("broker.backend")};
  o.redis_uri = c.get_string("redis.uri");
  o.store.result_ttl_s = static_cast<int>(c.get_int("redis.result_ttl_s"));
  o.store.dead_letter_ttl_s = static_cast<int>(c.get_int("redis.dead_letter_ttl_s"));
  o.store.events_maxlen = c.get_int("redis.job_events_maxlen");
  o.heartbeat_ms = static_cast<int>(c.get_int("broker.heartbeat_ms"));
  o.liveness = static_cast<int>(c.get_int("broker.liveness"));
  o.max_attempts = static_cast<int>(c.get_int("broker.max_attempts"));
  o.backoff_ms = static_cast<int>(c.get_int("broker.backoff_ms"));
  o.backoff_max_ms = static_cast<int>(c.get_int("broker.backoff_max_ms"));
  o.max_pending_jobs = static_cast<std::size_t>(c.get_int("broker.max_pending_jobs"));
  o.max_pending_bytes = static_cast<std::size_t>(c.get_int("broker.max_pending_bytes"));
  o.claim_bytes = static_cast<std::size_t>(c.get_int("broker.claim_bytes"));
  o.task_timeout_s = static_cast<int>(c.get_int("broker.task_timeout_s"));
  o.reconcile_s = static_cast<int>(c.get_int("broker.reconcile_s"));
  o.query_deadline_s = static_cast<int>(c.get_int("broker.query_deadline_s"));
  o.upload_deadline_s = static_cast<int>(c.get_int("broker.upload_deadline_s"));
  o.metric_deadline_s = static_cast<int>(c.get_int("broker.metric_deadline_s"));
  o.no_worker_wait_s = static_cast<int>(c.get_int("broker.no_worker_wait_s"));
  o.allow_partial = c.get_bool("score.allow_partial");
  o.max_message_bytes = c.get_int("broker.max_message_bytes");
  o.score_shards = static_cast<int>(c.get_int("score.shards"));
  o.query_route = split_route(c.get_string("routes.query"));
  o.upload_route = split_route(c.get_string("routes.upload"));
  o.interrogator = c.get_string("interrogate.interrogator");
  Curve cv = load_curve(c, true);
  o.curve = cv.enabled;
  o.curve_server = cv.server;
  o.curve_clients_dir = c.get_string("curve.clients_dir");
  o.reload_keys = &g_reload_keys;
  return o;
}

workers::WorkerOptions worker_options(const Config& c) {
  workers::WorkerOptions o;
  o.broker = c.get_string("worker.broker");
  o.redis_uri = c.get_string("redis.uri");  // where claimed inputs are fetched from
  o.heartbeat_ms = static_cast<int>(c.get_int("broker.heartbeat_ms"));
  o.liveness = static_cast<int>(c.get_int("broker.liveness"));
  // The watchdog's deadline is the broker's: past it, the broker retries the task elsewhere.
  o.compute_deadline_s = static_cast<int>(c.get_int("broker.task_timeout_s"));
  Curve cv = load_curve(c, false);
  o.curve_server_public = cv.server_public;
  o.curve_client = cv.client;
  return o;
}

BrokerClientOptions client_options(const Config& c, const std::string& endpoint) {
  BrokerClientOptions o;
  o.endpoint = endpoint.empty() ? c.get_string("gateway.broker") : endpoint;
  Curve cv = load_curve(c, false);
  o.curve_server_public = cv.server_public;
  o.curve_client = cv.client;
  return o;
}

GatewayOptions gateway_options(const Config& c) {
  GatewayOptions o;
  o.host = c.get_string("gateway.host");
  o.port = static_cast<int>(c.get_int("gateway.port"));
  o.broker = client_options(c, "");
  // A submission the broker does not answer is a 503 within this bound, not after retries:
  // the HTTP client retries (with its Idempotency-Key), and no gateway thread waits long.
  o.broker.timeout_ms = static_cast<int>(c.get_int("gateway.broker_timeout_ms"));
  o.broker.submit_attempts = 1;
  o.spec_store_uri = spec_store_uri(c);
  const std::string key_file = c.get_string("gateway.api_key_file");
  if (const char* k = std::getenv("GMI_API_KEY"); k != nullptr && *k != '\0') {
    o.api_key = k;
  } else if (!key_file.empty()) {
    o.api_key = read_secret_file(key_file, "the API key file");
  }
  o.max_query_bytes = static_cast<std::size_t>(c.get_int("gateway.max_query_bytes"));
  o.max_upload_bytes = static_cast<std::size_t>(c.get_int("gateway.max_upload_bytes"));
  o.threads = static_cast<int>(c.get_int("gateway.threads"));
  o.max_wait_ms = static_cast<int>(c.get_int("gateway.max_wait_ms"));
  o.max_connections = static_cast<int>(c.get_int("gateway.max_connections"));
  o.header_timeout_ms = static_cast<int>(c.get_int("gateway.header_timeout_ms"));
  o.body_timeout_ms = static_cast<int>(c.get_int("gateway.body_timeout_ms"));
  return o;
}

// An OpsServer on ops.host:`port` (-1: none) reporting `ready` (/readyz) and `alive`
// (/healthz; none: always alive).
std::unique_ptr<OpsServer> start_ops(const Config& c, int port, std::function<std::string()> ready,
                                     std::function<std::string()> alive = {}) {
  if (port < 0) return nullptr;
  OpsServerOptions o;
  o.host = c.get_string("ops.host");
  o.port = port;
  o.not_ready_reason = std::move(ready);
  o.not_alive_reason = std::move(alive);
  auto ops = std::make_unique<OpsServer>(o);
  ops->start();
  log::info("ops endpoints", {{"port", ops->port()}, {"paths", {"/metrics", "/healthz", "/readyz"}}});
  return ops;
}

}  // namespace

struct ServiceCommands::State {
  std::string config_file;
  std::vector<std::string> sets;
  CLI::App* serve = nullptr;
  CLI::App* broker = nullptr;
  CLI::App* worker = nullptr;
  CLI::App* gateway = nullptr;
  CLI::App* query = nullptr;
  CLI::App* upload = nullptr;
  CLI::App* job = nullptr;
  CLI::App* keygen = nullptr;
  CLI::App* config_show = nullptr;

  std::string stage;
  std::string endpoint;
  std::string image;
  int top = 4;
  std::string scorer, prompt;
  int wait_ms = 60000;
  bool json_out = false;
  bool no_wait = false;
  std::int64_t deadline_ms = 0;
  std::string model, manifest, card;
  double downloads = 0;
  std::string job_id;
  std::string key_path;

  // The effective configuration; with `check`, every value is validated against the
  // schema first (InputError listing each bad one), so no process starts half-configured.
  Config config(bool check = true) const {
    Config c = Config::load(config_file);
    for (const auto& s : sets) {
      auto eq = s.find('=');
      if (eq == std::string::npos) throw InputError("--set expects KEY=VALUE, got \"" + s + "\"");
      c.set(s.substr(0, eq), s.substr(eq + 1));
    }
    if (check) {
      const auto problems = c.validate();
      if (!problems.empty()) {
        std::string all =
            "the configuration has " + std::to_string(problems.size()) + " bad value(s):";
        for (const auto& p : problems) all += "\n  " + p;
        throw InputError(all);
      }
    }
    try {
      log::configure("gmi", c.get_string("log.level"), c.get_string("log.format"));
    } catch (const InputError&) {
      if (check) throw;
      log::configure("gmi", "info", "text");  // config show still prints, then names them
    }
    return c;
  }

  void add_config_options(CLI::App* cmd) {
    cmd->add_option("--config,-c", config_file,
                    "YAML configuration file (see config/gmi.yaml); GMI_* variables override it")
        ->envname("GMI_CONFIG");
    cmd->add_option("--set", sets, "override one setting, KEY=VALUE (e.g. --set score.shards=2)");
  }

  int run_broker() {
    Config c = config();
    log::configure("broker", c.get_string("log.level"), c.get_string("log.format"));
    install_signal_handlers();
    zmq::context_t ctx;
    Broker broker(ctx, broker_options(c));
    auto ops = start_ops(c, static_cast<int>(c.get_int("broker.ops_port")),
                         [&] { return broker.not_ready_reason(); });
    broker.run(g_stop);
    return 0;
  }

  int run_worker() {
    Config c = config();
    log::configure("worker-" + stage, c.get_string("log.level"), c.get_string("log.format"));
    install_signal_handlers();
    zmq::context_t ctx;
    workers::StageWorker worker(ctx, worker_options(c), workers::make_stage(stage, c));
    auto ops = start_ops(c, static_cast<int>(c.get_int("worker.ops_port")),
                         [&] { return worker.not_ready_reason(); },
                         [&] { return worker.not_alive_reason(); });
    worker.run(g_stop);
    return 0;
  }

  int run_gateway() {
    Config c = config();
    log::configure("gateway", c.get_string("log.level"), c.get_string("log.format"));
    install_signal_handlers();
    zmq::context_t ctx;
    Gateway gateway(ctx, gateway_options(c));
    gateway.start();
    wait_for_stop();
    log::info("gateway stopping");
    gateway.stop();
    return 0;
  }

  // Broker, every stage and the gateway in one process, over inproc sockets (plus the
  // configured TCP endpoints, so outside workers and clients can join).
  int run_serve() {
    Config c = config();
    log::configure("serve", c.get_string("log.level"), c.get_string("log.format"));
    install_signal_handlers();
    zmq::context_t ctx;
    BrokerOptions bo = broker_options(c);
    const std::string inproc_front = "inproc://gmi-frontend", inproc_back = "inproc://gmi-backend";
    bo.frontend.insert(bo.frontend.begin(), inproc_front);
    bo.backend.insert(bo.backend.begin(), inproc_back);
    Broker broker(ctx, bo);  // binds before the workers connect

    std::vector<std::unique_ptr<workers::StageWorker>> stage_workers;
    for (const auto& name : workers::stage_names()) {
      const int n = static_cast<int>(c.get_int("serve." + name + "_workers", 0, 256));
      for (int i = 0; i < n; ++i) {
        workers::WorkerOptions wo = worker_options(c);
        wo.broker = inproc_back;
        wo.curve_server_public.clear();  // inproc never leaves the process
        stage_workers.push_back(
            std::make_unique<workers::StageWorker>(ctx, wo, workers::make_stage(name, c)));
      }
    }
    GatewayOptions go = gateway_options(c);
    go.broker.endpoint = inproc_front;
    go.broker.curve_server_public.clear();
    Gateway gateway(ctx, go);

    std::atomic<bool> broker_stop{false}, workers_stop{false};
    std::thread broker_thread;
    std::vector<std::thread> worker_threads;
    // Whatever ends this scope (SIGTERM, or a port that is taken, which throws) stops and
    // joins the threads first: a std::thread destroyed while joinable aborts the process.
    struct Joiner {
      std::atomic<bool>& broker_stop;
      std::atomic<bool>& workers_stop;
      std::thread& broker;
      std::vector<std::thread>& workers;
      ~Joiner() {
        broker_stop = true;
        if (broker.joinable()) broker.join();
        workers_stop = true;
        for (auto& t : workers) {
          if (t.joinable()) t.join();
        }
      }
    } joiner{broker_stop, workers_stop, broker_thread, worker_threads};
    broker_thread = std::thread([&] { broker.run(broker_stop); });
    for (auto& w : stage_workers) worker_threads.emplace_back([&, p = w.get()] { p->run(workers_stop); });
    auto ready = [&]() -> std::string {
      if (auto r = broker.not_ready_reason(); !r.empty()) return "broker: " + r;
      for (auto& w : stage_workers) {
        if (auto r = w->not_ready_reason(); !r.empty()) return w->stage().name() + ": " + r;
      }
      return {};
    };
    auto alive = [&]() -> std::string {
      for (auto& w : stage_workers) {
        if (auto r = w->not_alive_reason(); !r.empty()) return r;
      }
      return {};
    };
    auto ops = start_ops(c, static_cast<int>(c.get_int("serve.ops_port")), ready, alive);
    gateway.start();
    log::info("serving", {{"http_port", gateway.port()}, {"workers", stage_workers.size()}});
    std::printf("gmi serve: HTTP on port %d, %zu stage workers; SIGTERM or Ctrl-C to stop\n",
                gateway.port(), stage_workers.size());
    std::fflush(stdout);
    wait_for_stop();
    // Drain from the front: no new requests, then the broker finishes what is in flight
    // (the workers still serving it), then the workers leave.
    log::info("stopping: draining the gateway, the broker, then the workers");
    gateway.stop();
    return 0;  // the joiner stops the broker, then the workers
  }

  static void print_ranking(const json& result) {
    std::printf("%4s  %-32s %12s\n", "rank", "model", "score");
    for (const auto& r : result.value("results", json::array())) {
      std::printf("%4d  %-32s %12.6f\n", r.value("rank", 0), r.value("model", "").c_str(),
                  r.value("score", 0.0));
    }
    const json metric = result.value("metric", json());
    if (metric.is_object())
      std::printf("metric: v%llu %s (%d dims)\n", static_cast<unsigned long long>(metric.value("version", 0ull)),
                  metric.value("checksum", "").c_str(), metric.value("dim", 0));
    else
      std::printf("metric: none\n");
  }

  // Waits for a job to end, re-asking across broker restarts; returns the job object.
  json await_job(BrokerClient& client, const std::string& id) {
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(wait_ms);
    for (;;) {
      const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
                            deadline - std::chrono::steady_clock::now()).count();
      json job;
      try {
        job = client.get_job(id, static_cast<int>(std::clamp<long long>(left, 0, 10000)));
      } catch (const BrokerRefusal& e) {
        if (!e.retryable()) throw;
      } catch (const IoError&) {
        // The broker may be restarting; the job is safe in Redis. Ask again.
      }
      const std::string state = job.value("state", "");
      if (state == "finished" || state == "failed") return job;
      if (left <= 0) return job.empty() ? json{{"job_id", id}, {"state", "unknown"}} : job;
      if (job.empty()) std::this_thread::sleep_for(std::chrono::milliseconds(200));
    }
  }

  int report_job(const json& job, bool query) {
    const std::string state = job.value("state", "");
    if (json_out) {
      std::cout << (query && state == "finished" ? job["result"] : job).dump() << "\n";
    } else if (state == "finished" && query) {
      print_ranking(job["result"]);
    } else if (state == "finished") {
      std::printf("job %s finished: %s\n", job.value("job_id", "").c_str(), job["result"].dump().c_str());
    } else if (state == "failed") {
      std::fprintf(stderr, "gmi: job %s failed: %s\n", job.value("job_id", "").c_str(),
                   job.value("error", "").c_str());
    } else {
      std::fprintf(stderr, "gmi: job %s is still %s\n", job.value("job_id", "").c_str(), state.c_str());
    }
    if (state == "finished") return 0;
    if (state == "failed") return job.value("dead_letter", false) ? 1 : 2;
    return 1;
  }

  // After a submission: print the id (--no-wait), or wait for the job and report it.
  int follow(BrokerClient& client, const std::string& id, bool query) {
    if (no_wait) {
      std::cout << (json_out ? json{{"job_id", id}}.dump() : id) << "\n";
      return 0;
    }
    return report_job(await_job(client, id), query);
  }

  int run_query() {
    Config c = config();
    zmq::context_t ctx;
    BrokerClient client(ctx, client_options(c, endpoint));
    QueryRequest q;
    q.image = read_file_bytes(image);
    q.top = top;
    q.scorer = scorer;
    q.prompt = prompt;
    q.deadline_ms = deadline_ms;
    const std::string id = client.submit_query(q);
    return follow(client, id, true);
  }

  int run_upload() {
    Config c = config();
    zmq::context_t ctx;
    BrokerClient client(ctx, client_options(c, endpoint));
    Manifest man = read_manifest(manifest, /*require_prompt=*/true);
    for (const auto& issue : man.issues) {
      std::fprintf(stderr, "%s:%d: %s (line skipped)\n", manifest.c_str(), issue.line, issue.message.c_str());
    }
    UploadRequest u;
    u.model_id = model;
    u.downloads = downloads;
    u.card = card;
    u.deadline_ms = deadline_ms;
    for (const auto& e : man.entries) {
      u.images.push_back(read_file_bytes(e.image.string()));
      u.prompts.push_back(e.prompt);
    }
    if (u.images.empty()) throw InputError("the manifest " + manifest + " names no usable images");
    const std::string id = client.submit_upload(u);
    return follow(client, id, false);
  }

  int run_job() {
    if (!wire::is_id(job_id)) {
      throw InputError("job ids are 32 lower-case hexadecimal characters, got \"" + job_id + "\"");
    }
    Config c = config();
    zmq::context_t ctx;
    BrokerClient client(ctx, client_options(c, endpoint));
    json job = wait_ms > 0 ? await_job(client, job_id) : client.get_job(job_id, 0);
    std::cout << job.dump(json_out ? -1 : 2) << "\n";
    return 0;
  }

  int run_keygen() {
    auto keys = wire::generate_curve_key_files(key_path);
    std::printf("wrote %s (secret, mode 0600) and %s.pub\npublic key: %s\n", key_path.c_str(),
                key_path.c_str(), keys.public_key.c_str());
    return 0;
  }

  // Prints every setting, then says which values are bad (exit 2) so that what it shows
  // is what a process would run with.
  int run_config_show() {
    Config c = config(/*check=*/false);
    const auto problems = c.validate();
    json all = c.to_json();
    if (json_out) {
      for (auto& [key, v] : all.items()) {
        for (const auto& k : Config::schema()) {
          if (k.key == key) v["type"] = k.type.describe();
        }
      }
      std::cout << all.dump(2) << "\n";
    } else {
      std::printf("%-28s %-34s %s\n", "key", "value", "source");
      for (const auto& [key, v] : all.items()) {
        std::printf("%-28s %-34s %s\n", key.c_str(), v.value("value", "").c_str(),
                    v.value("source", "").c_str());
      }
    }
    for (const auto& p : problems) std::fprintf(stderr, "gmi: config: %s\n", p.c_str());
    return problems.empty() ? 0 : 2;
  }
};

ServiceCommands::ServiceCommands(CLI::App& app) : state_(std::make_unique<State>()) {
  State& s = *state_;
  s.serve = app.add_subcommand("serve", "run broker, all stage workers and the HTTP gateway in one process");
  s.broker = app.add_subcommand("broker", "run the broker: job intake, dispatch, retries, job state in Redis");
  s.worker = app.add_subcommand("worker", "run one stage worker (decode, embed, interrogate, score, spec)");
  s.worker->add_option("--stage", s.stage, "decode | embed | interrogate | score | spec | learn")->required();
  s.gateway = app.add_subcommand("gateway", "run the HTTP gateway for web frontends");

  s.query = app.add_subcommand("query", "submit a query image to a running broker and print the ranking");
  s.query->add_option("image", s.image, "query image (JPEG or PNG)")->required();
  s.query->add_option("--top,-k", s.top, "how many models to list")->capture_default_str();
  s.query->add_option("--scorer", s.scorer, "weighted | rkme | mean | nearest | popularity");
  s.query->add_option("--prompt", s.prompt, "use this text as the query's prompt");

  s.upload = app.add_subcommand("upload", "submit a model's samples to a running broker to build its spec");
  s.upload->add_option("--model", s.model, "model id")->required();
  s.upload->add_option("--manifest", s.manifest, "JSON-lines manifest {\"image\", \"prompt\"}")->required();
  s.upload->add_option("--downloads", s.downloads, "download count");
  s.upload->add_option("--card", s.card, "model card text");

  s.job = app.add_subcommand("job", "show a job's state (and result) from a running broker");
  s.job->add_option("job_id", s.job_id, "the job id")->required();

  for (auto* cmd : {s.query, s.upload, s.job}) {
    cmd->add_option("--broker", s.endpoint, "the broker's frontend (default: gateway.broker)");
    cmd->add_option("--wait-ms", s.wait_ms, "how long to wait for the job to end (0: do not wait)")
        ->capture_default_str();
    cmd->add_flag("--json", s.json_out, "print JSON");
  }
  for (auto* cmd : {s.query, s.upload}) {
    cmd->add_flag("--no-wait", s.no_wait, "print the job id and return at once");
    cmd->add_option("--deadline-ms", s.deadline_ms,
                    "the job fails \"deadline exceeded\" unless it ends this long after acceptance "
                    "(default: broker.query_deadline_s or broker.upload_deadline_s)")
        ->check(CLI::Range(std::int64_t{1}, std::int64_t{86400000}));
  }

  s.keygen = app.add_subcommand("keygen", "write a CURVE key pair for encrypted ZeroMQ links");
  s.keygen->add_option("path", s.key_path, "key file to write (PATH and PATH.pub)")->required();

  auto* config_cmd = app.add_subcommand("config", "show the effective configuration");
  config_cmd->require_subcommand(1);
  s.config_show = config_cmd->add_subcommand("show", "every setting with its value and where it came from");
  s.config_show->add_flag("--json", s.json_out, "print JSON");

  for (auto* cmd : {s.serve, s.broker, s.worker, s.gateway, s.query, s.upload, s.job, s.config_show}) {
    s.add_config_options(cmd);
  }
}

ServiceCommands::~ServiceCommands() = default;

int ServiceCommands::run() {
  State& s = *state_;
  if (s.serve->parsed()) return s.run_serve();
  if (s.broker->parsed()) return s.run_broker();
  if (s.worker->parsed()) return s.run_worker();
  if (s.gateway->parsed()) return s.run_gateway();
  if (s.query->parsed()) return s.run_query();
  if (s.upload->parsed()) return s.run_upload();
  if (s.job->parsed()) return s.run_job();
  if (s.keygen->parsed()) return s.run_keygen();
  if (s.config_show->parsed()) return s.run_config_show();
  return -1;
}

}  // namespace gmi::cli
