#!/usr/bin/python3
"""Chaos run: real gmi processes under faults, then a check that nothing was lost.

Starts a private redis-server (append-only file, fsync always), `gmi broker`, `gmi
gateway` and workers (decode x2, embed, interrogate, score x2, spec, learn), renders a
small hub (scripts/make_hub.py), and for --duration seconds has --clients HTTP clients
send mixed queries and uploads (each with an Idempotency-Key, retried with the same key
on 502/503 or a lost connection) while a driver
  - kill -9s a random gmi process every --kill-every seconds (a supervisor restarts it),
  - SIGSTOPs one worker once for longer than the liveness window, then SIGCONTs it,
  - restarts Redis once (SIGTERM; started again on its append-only file),
  - fills Redis to its memory limit once (maxmemory just above what it holds, filler
    keys until it refuses writes), holds it there, then frees it.
Every model is uploaded once before the faults begin. Then it stops the faults, waits (up to --settle seconds) for every accepted job to end,
and checks:
  1. every accepted job ended: finished, or failed with a reason;
  2. exactly once: P:job-events holds exactly one end event per job;
  3. nothing duplicated: every Idempotency-Key named one job, and every job the stream saw
     accepted is a client's job (or a metric job the broker made);
  4. no spec is older than its model's newest finished upload (P:upload-seq).
Prints a table of the figures, writes them as JSON (--out), exits 0 when every check
passes, 1 when one fails, 2 on a usage error.

usage: scripts/chaos.py [--gmi build/tools/gmi] [--duration 120] [--clients 4]
                        [--kill-every 3] [--models 6] [--seed 1] [--out out/chaos.json]
"""
import argparse
import http.client
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class Resp:
    """A minimal Redis client (RESP2) over one socket."""

    def __init__(self, port):
        self.port = port
        self.sock = None

    def _connect(self):
        self.sock = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        self.buf = b""

    def _line(self):
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise ConnectionError("redis closed the connection")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def _exact(self, n):
        while len(self.buf) < n + 2:
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise ConnectionError("redis closed the connection")
            self.buf += chunk
        data, self.buf = self.buf[:n], self.buf[n + 2:]
        return data

    def _reply(self):
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            raise RuntimeError(rest.decode())
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            return None if n < 0 else self._exact(n)
        if kind == b"*":
            n = int(rest)
            return None if n < 0 else [self._reply() for _ in range(n)]
        raise RuntimeError("bad reply %r" % line)

    def __call__(self, *args):
        for attempt in range(2):
            try:
                if self.sock is None:
                    self._connect()
                out = b"*%d\r\n" % len(args)
                for a in args:
                    a = a if isinstance(a, bytes) else str(a).encode()
                    out += b"$%d\r\n%s\r\n" % (len(a), a)
                self.sock.sendall(out)
                return self._reply()
            except (OSError, ConnectionError):
                self.sock = None
                if attempt == 1:
                    raise


class Supervisor:
    """Runs the gmi processes, restarting any that dies (as Kubernetes would)."""

    def __init__(self, gmi, env, logdir):
        self.gmi, self.env, self.logdir = gmi, env, logdir
        self.procs = {}  # name -> (args, Popen)
        self.lock = threading.Lock()
        self.restarts = {}
        self.running = True

    def start(self, name, args):
        log = open(os.path.join(self.logdir, name + ".log"), "ab")
        p = subprocess.Popen([self.gmi] + args, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        with self.lock:
            self.procs[name] = (args, p)

    def watch(self):
        while self.running:
            with self.lock:
                dead = [(n, a) for n, (a, p) in self.procs.items() if p.poll() is not None]
            for name, args in dead:
                self.restarts[name] = self.restarts.get(name, 0) + 1
                self.start(name, args)
            time.sleep(0.2)

    def pids(self):
        with self.lock:
            return {n: p.pid for n, (a, p) in self.procs.items() if p.poll() is None}

    def stop_all(self):
        self.running = False
        with self.lock:
            procs = [p for a, p in self.procs.values()]
        for p in procs:
            try:
                p.send_signal(signal.SIGCONT)
                p.terminate()
            except ProcessLookupError:
                pass
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()


def multipart(fields, files):
    boundary = "gmi" + uuid.uuid4().hex
    body = b""
    for name, value in fields:
        body += ("--%s\r\nContent-Disposition: form-data; name=\"%s\"\r\n\r\n" % (boundary, name)).encode()
        body += value.encode() + b"\r\n"
    for name, data in files:
        body += ("--%s\r\nContent-Disposition: form-data; name=\"%s\"; filename=\"%s\"\r\n"
                 "Content-Type: image/jpeg\r\n\r\n" % (boundary, name, name)).encode()
        body += data + b"\r\n"
    body += ("--%s--\r\n" % boundary).encode()
    return body, "multipart/form-data; boundary=" + boundary


class Clients:
    def __init__(self, port, hub, seed):
        self.port, self.hub = port, hub
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.keys = {}  # idempotency key -> set of job ids answered
        self.sent = {}  # idempotency key -> kind, for every key sent (answered or not)
        self.jobs = {}  # job id -> {"kind", "model"}
        self.counts = {"query_sent": 0, "upload_sent": 0, "retries": 0, "given_up": 0, "refused_4xx": 0}
        self.stop = False

    def post(self, path, body, ctype, key):
        """POSTs with the same key until a 202 (or a 4xx); returns the job id or None."""
        with self.lock:
            self.sent[key] = "upload" if "/uploads" in path else "query"
        for attempt in range(60):
            if attempt:
                with self.lock:
                    self.counts["retries"] += 1
                time.sleep(min(0.1 * attempt, 1.0))
            try:
                c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
                c.request("POST", path, body=body, headers={"Content-Type": ctype, "Idempotency-Key": key})
                r = c.getresponse()
                data = r.read()
                c.close()
            except (OSError, http.client.HTTPException):
                continue
            if r.status == 202:
                job = json.loads(data)["job_id"]
                with self.lock:
                    self.keys.setdefault(key, set()).add(job)
                return job
            if r.status in (502, 503, 504):
                continue
            with self.lock:
                self.counts["refused_4xx"] += 1
            sys.stderr.write("chaos: %s answered %d: %s\n" % (path, r.status, data[:200]))
            return None
        with self.lock:
            self.counts["given_up"] += 1
        return None

    def follow(self, job):
        """Long-polls the job until it ends (a closed loop keeps the load one the pipeline
        can carry, so that deadlines measure faults, not an ever-growing queue)."""
        deadline = time.time() + 200
        while time.time() < deadline and not self.stop:
            try:
                c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=15)
                c.request("GET", "/v1/jobs/%s?wait_ms=5000" % job)
                r = c.getresponse()
                data = r.read()
                c.close()
                if r.status == 200 and json.loads(data).get("state") in ("finished", "failed"):
                    return
            except (OSError, http.client.HTTPException, ValueError):
                pass
            time.sleep(0.1)

    def run(self, index):
        rng = random.Random(self.rng.random() + index)
        while not self.stop:
            if rng.random() < 0.2:
                model = rng.choice(list(self.hub["models"]))
                images = self.hub["models"][model]
                chosen = rng.sample(images, k=max(4, len(images) - rng.randint(0, 2)))
                manifest = "".join(json.dumps({"image": n, "prompt": p}) + "\n" for n, p, d in chosen)
                body, ctype = multipart([("manifest", manifest)], [(n, d) for n, p, d in chosen])
                key = uuid.uuid4().hex
                with self.lock:
                    self.counts["upload_sent"] += 1
                job = self.post("/v1/models/%s/uploads" % model, body, ctype, key)
                if job:
                    with self.lock:
                        self.jobs[job] = {"kind": "upload", "model": model}
                    self.follow(job)
            else:
                data = rng.choice(self.hub["queries"])
                key = uuid.uuid4().hex
                with self.lock:
                    self.counts["query_sent"] += 1
                job = self.post("/v1/queries?top=3", data, "image/jpeg", key)
                if job:
                    with self.lock:
                        self.jobs[job] = {"kind": "query", "model": None}
                    self.follow(job)
            time.sleep(rng.uniform(0.0, 0.05))


def load_hub(path):
    hub = {"models": {}, "queries": []}
    for m in sorted(os.listdir(os.path.join(path, "models"))):
        rows = []
        with open(os.path.join(path, "models", m, "manifest.jsonl")) as f:
            for line in f:
                e = json.loads(line)
                with open(os.path.join(path, "models", m, e["image"]), "rb") as img:
                    rows.append((os.path.basename(e["image"]), e["prompt"], img.read()))
        hub["models"][m] = rows
    with open(os.path.join(path, "queries.jsonl")) as f:
        for line in f:
            e = json.loads(line)
            with open(os.path.join(path, e["image"]), "rb") as img:
                hub["queries"].append(img.read())
    return hub


def start_redis(tmp, persistent):
    """A private redis-server in `tmp` on a free port: (its argv, the process, a client)."""
    port = free_port()
    argv = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", tmp, "--save", "",
            "--logfile", os.path.join(tmp, "redis.log")]
    argv += ["--appendonly", "yes", "--appendfsync", "always"] if persistent else ["--appendonly", "no"]
    proc = subprocess.Popen(argv)
    r = Resp(port)
    for _ in range(100):
        try:
            r("PING")
            break
        except OSError:
            time.sleep(0.1)
    return argv, proc, r


def service_env(redis_port, extra):
    """The environment of a private gmi deployment on free ports (broker, gateway, workers),
    plain-text warn logs, no ops ports; returns (env, gateway port)."""
    front, back, gport = free_port(), free_port(), free_port()
    env = dict(os.environ)
    env.update({
        "GMI_REDIS_URI": "redis://127.0.0.1:%d/0" % redis_port, "GMI_REDIS_PASSWORD": "",
        "GMI_REDIS_PASSWORD_FILE": "", "GMI_BROKER_FRONTEND": "tcp://127.0.0.1:%d" % front,
        "GMI_BROKER_BACKEND": "tcp://127.0.0.1:%d" % back, "GMI_WORKER_BROKER": "tcp://127.0.0.1:%d" % back,
        "GMI_GATEWAY_BROKER": "tcp://127.0.0.1:%d" % front, "GMI_GATEWAY_PORT": str(gport),
        "GMI_GATEWAY_HOST": "127.0.0.1", "GMI_BROKER_OPS_PORT": "-1", "GMI_WORKER_OPS_PORT": "-1",
        "GMI_LOG_FORMAT": "text", "GMI_LOG_LEVEL": "warn",
    })
    env.update(extra)
    return env, gport


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--gmi", default=os.path.join(ROOT, "build", "tools", "gmi"))
    ap.add_argument("--duration", type=float, default=120, help="seconds of faults and traffic")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--kill-every", type=float, default=3, help="mean seconds between kill -9s")
    ap.add_argument("--models", type=int, default=6)
    ap.add_argument("--settle", type=float, default=300, help="seconds to wait for jobs to end afterwards")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--encoder", default="builtin",
                    help="encoder.image for the run (builtin: fast, so that more jobs meet the faults)")
    ap.add_argument("--out", default=os.path.join(ROOT, "out", "chaos.json"))
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (logs, AOF)")
    args = ap.parse_args()
    if not os.access(args.gmi, os.X_OK):
        print("chaos: %s is not an executable gmi; build first (scripts/build.sh)" % args.gmi, file=sys.stderr)
        return 2
    rng = random.Random(args.seed)
    tmp = tempfile.mkdtemp(prefix="gmi-chaos-")
    print("chaos: working in", tmp)

    subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "make_hub.py"), "--out", os.path.join(tmp, "hub"),
                    "--models", str(args.models), "--regions", "2", "--queries-per-model", "3", "--seed",
                    str(args.seed), "--quiet"], check=True)
    hub = load_hub(os.path.join(tmp, "hub"))

    redis_args, redis, r = start_redis(tmp, persistent=True)
    env, gport = service_env(r.port, {
        "GMI_BROKER_HEARTBEAT_MS": "100", "GMI_BROKER_LIVENESS": "10", "GMI_BROKER_BACKOFF_MS": "50",
        "GMI_BROKER_BACKOFF_MAX_MS": "400", "GMI_BROKER_MAX_ATTEMPTS": "6", "GMI_BROKER_RECONCILE_S": "5",
        "GMI_SCORE_REFRESH_MS": "200", "GMI_METRIC_MIN_MODELS": "3", "GMI_ENCODER_IMAGE": args.encoder,
    })
    sup = Supervisor(args.gmi, env, tmp)
    sup.start("broker", ["broker"])
    sup.start("gateway", ["gateway"])
    workers = [("decode-0", "decode"), ("decode-1", "decode"), ("embed-0", "embed"), ("interrogate-0", "interrogate"),
               ("score-0", "score"), ("score-1", "score"), ("spec-0", "spec"), ("learn-0", "learn")]
    for name, stage in workers:
        sup.start(name, ["worker", "--stage", stage])
    threading.Thread(target=sup.watch, daemon=True).start()

    clients = Clients(gport, hub, args.seed)
    # Every model once before the faults begin, so that queries meet a hub.
    for model, rows in hub["models"].items():
        manifest = "".join(json.dumps({"image": n, "prompt": p}) + "\n" for n, p, d in rows)
        body, ctype = multipart([("manifest", manifest)], [(n, d) for n, p, d in rows])
        job = clients.post("/v1/models/%s/uploads" % model, body, ctype, uuid.uuid4().hex)
        if job:
            clients.jobs[job] = {"kind": "upload", "model": model}
            clients.follow(job)
    preloaded = len(clients.jobs)
    threads = [threading.Thread(target=clients.run, args=(i,), daemon=True) for i in range(args.clients)]
    for t in threads:
        t.start()

    faults = {"kill9": {}, "sigstop": 0, "redis_restart": 0, "redis_full_s": 0.0}
    t0 = time.time()
    done_stop = done_restart = done_fill = False
    next_kill = t0 + rng.expovariate(1 / args.kill_every)
    while time.time() - t0 < args.duration:
        now = time.time()
        frac = (now - t0) / args.duration
        if now >= next_kill:
            pids = sup.pids()
            if pids:
                name = rng.choice(sorted(pids))
                try:
                    os.kill(pids[name], signal.SIGKILL)
                    faults["kill9"][name] = faults["kill9"].get(name, 0) + 1
                except ProcessLookupError:
                    pass
            next_kill = now + rng.expovariate(1 / args.kill_every)
        if frac > 0.25 and not done_stop:
            done_stop = True
            name = rng.choice([n for n, s in workers])
            pid = sup.pids().get(name)
            if pid:
                os.kill(pid, signal.SIGSTOP)
                time.sleep(3.0)  # three times the 1 s liveness window
                try:
                    os.kill(pid, signal.SIGCONT)
                except ProcessLookupError:
                    pass
                faults["sigstop"] += 1
        if frac > 0.5 and not done_restart:
            done_restart = True
            redis.terminate()
            redis.wait()
            time.sleep(1.0)
            redis = subprocess.Popen(redis_args)
            faults["redis_restart"] += 1
        if frac > 0.75 and not done_fill:
            done_fill = True
            started = time.time()
            used = int(dict(l.split(":", 1) for l in r("INFO", "memory").decode().split("\r\n")
                            if ":" in l)["used_memory"])
            r("CONFIG", "SET", "maxmemory", str(used + (4 << 20)))
            filler = 0
            try:
                while filler < 10000:
                    r("SET", "chaos:fill:%d" % filler, b"x" * 65536)
                    filler += 1
            except RuntimeError:
                pass  # OOM: full
            time.sleep(4.0)
            for i in range(filler):
                r("DEL", "chaos:fill:%d" % i)
            r("CONFIG", "SET", "maxmemory", "0")
            faults["redis_full_s"] = round(time.time() - started, 1)
        time.sleep(0.05)

    clients.stop = True
    for t in threads:
        t.join(timeout=90)
    # Faults over: every process up, then wait for every accepted job to end.
    settle_start = time.time()
    pending = set(clients.jobs)
    results = {}
    while pending and time.time() - settle_start < args.settle:
        for job in list(pending):
            raw = r("GET", "gmi:result:" + job)
            if raw is not None:
                results[job] = json.loads(raw)
                pending.discard(job)
        time.sleep(0.5)
    settle_s = time.time() - settle_start

    # The job-event stream.
    ends, accepted_seen = {}, set()
    last = "-"
    while True:
        batch = r("XRANGE", "gmi:job-events", last, "+", "COUNT", "10000")
        if not batch:
            break
        for entry_id, fields in batch:
            f = dict(zip(fields[::2], fields[1::2]))
            job, event = f[b"job"].decode(), f[b"event"].decode()
            if event == "accepted":
                accepted_seen.add(job)
            elif event in ("finished", "failed"):
                ends[job] = ends.get(job, 0) + 1
        last = "(" + batch[-1][0].decode()
    upload_seq = {}
    raw = r("HGETALL", "gmi:upload-seq") or []
    for k, v in zip(raw[::2], raw[1::2]):
        upload_seq[k.decode()] = int(v)
    newest_finished = {}
    for job, info in clients.jobs.items():
        res = results.get(job)
        if info["kind"] != "upload" or not res or res.get("state") != "finished":
            continue
        params = json.loads(r("HGET", "gmi:job:" + job, "params") or b"{}")
        seq = params.get("upload_seq")
        if seq is not None:
            newest_finished[info["model"]] = max(newest_finished.get(info["model"], 0), seq)
    states = {}
    for job, res in results.items():
        states[res.get("state", "?")] = states.get(res.get("state", "?"), 0) + 1
    failed_reasons = {}
    for res in results.values():
        if res.get("state") == "failed":
            reason = res.get("error", "")[:60]
            failed_reasons[reason] = failed_reasons.get(reason, 0) + 1
    # Jobs the stream saw accepted that no client was told of: a metric job the broker
    # made, or the job of a key whose client gave up (its idempotency record names it).
    # Anything else was made twice.
    by_key = {}
    for key, kind in clients.sent.items():
        rec = r("GET", "gmi:idem:%s|:%s" % (kind, key))
        if rec is not None:
            by_key[key] = rec.decode().split(" ", 1)[-1]
    given_up_jobs = {j for k, j in by_key.items() if k not in clients.keys}
    unknown = [j for j in accepted_seen if j not in clients.jobs]
    made_twice = [j for j in unknown if j not in given_up_jobs and
                  (r("HGET", "gmi:job:" + j, "kind") or b"").decode() != "metric"]
    sup.stop_all()
    redis.terminate()
    redis.wait()

    checks = {
        "every_accepted_job_ended": not pending and all(
            res.get("state") == "finished" or (res.get("state") == "failed" and res.get("error"))
            for res in results.values()),
        "one_end_event_per_job": all(ends.get(j, 0) == 1 for j in clients.jobs) and all(
            n == 1 for n in ends.values()),
        "one_job_per_idempotency_key": all(len(v) == 1 for v in clients.keys.values()) and all(
            by_key.get(k) in v for k, v in clients.keys.items()) and not made_twice,
        "no_spec_older_than_its_newest_finished_upload": all(
            upload_seq.get(m, 0) >= s for m, s in newest_finished.items()),
    }
    figures = {
        "duration_s": args.duration, "clients": args.clients, "settle_s": round(settle_s, 1),
        "jobs_accepted": len(clients.jobs), "preloaded_uploads": preloaded, "encoder": args.encoder,
        "queries_accepted": sum(1 for i in clients.jobs.values() if i["kind"] == "query"),
        "uploads_accepted": sum(1 for i in clients.jobs.values() if i["kind"] == "upload"),
        "states": states, "failed_reasons": failed_reasons, "not_ended": len(pending),
        "jobs_with_two_end_events": sum(1 for n in ends.values() if n > 1),
        "jobs_with_no_end_event": sum(1 for j in clients.jobs if ends.get(j, 0) == 0),
        "broker_made_jobs": len(unknown) - len(given_up_jobs & set(unknown)), "made_twice": len(made_twice),
        "client": clients.counts, "faults": faults,
        "restarts": sup.restarts, "checks": checks, "seed": args.seed,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(figures, f, indent=1)
    print("%-44s %s" % ("seconds of faults / to settle", "%s / %s" % (args.duration, figures["settle_s"])))
    print("%-44s %d (queries %d, uploads %d)" % ("jobs accepted", figures["jobs_accepted"],
                                                 figures["queries_accepted"], figures["uploads_accepted"]))
    print("%-44s %s" % ("ended", json.dumps(states)))
    for reason, n in sorted(failed_reasons.items(), key=lambda x: -x[1]):
        print("    failed %4d  %s" % (n, reason))
    print("%-44s %s" % ("kill -9 (by process)", json.dumps(faults["kill9"])))
    print("%-44s %d / %d / %.1f s" % ("SIGSTOP / Redis restarts / Redis full", faults["sigstop"],
                                      faults["redis_restart"], faults["redis_full_s"]))
    print("%-44s %s" % ("client retries (same key) / given up", "%d / %d" % (clients.counts["retries"],
                                                                           clients.counts["given_up"])))
    print("%-44s %d / %d" % ("jobs the broker made (metric) / made twice", figures["broker_made_jobs"],
                                 len(made_twice)))
    for name, ok in checks.items():
        print("%-44s %s" % (name.replace("_", " "), "PASS" if ok else "FAIL"))
    print("chaos: figures in", args.out)
    if not args.keep:
        subprocess.run(["rm", "-rf", tmp])
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
