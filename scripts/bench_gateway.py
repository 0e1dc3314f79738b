#!/usr/bin/python3
"""The gateway under hostile load: probes and submissions while clients trickle headers
and long-polls wait.

Starts a private redis-server, `gmi broker` and `gmi gateway` (its defaults: 2 event-loop
threads, gateway.max_connections 1000, header deadline 10 s), and no stage worker, so
that the jobs it accepts stay queued (broker.no_worker_wait_s is raised so that they do
not fail while the run lasts). Then:
  1. unloaded: --samples GET /healthz and --samples POST /v1/queries, one at a time;
  2. loaded: --long-polls clients long-poll queued jobs (GET /v1/jobs/ID?wait_ms=30000,
     polling again when a wait ends) and --tricklers clients send one header byte every
     --trickle-s seconds (reconnecting when the gateway cuts them off at its header
     deadline), and the same probes and submissions are timed again.
Reports latency percentiles per phase (a table, or --json), and the connections the
gateway held (its gmi_http_connections gauge) during the loaded phase. Exit 0 when every
loaded probe answered 200 within 100 ms and every submission was accepted (202) within
1 s, 1 when not, 2 on a usage error.

usage: scripts/bench_gateway.py [--gmi build/tools/gmi] [--tricklers 200] [--long-polls 50]
                                [--samples 50] [--trickle-s 2] [--json]
"""
import argparse
import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from chaos import ROOT, Supervisor, service_env, start_redis  # noqa: E402

IMAGE = b"\xff\xd8\xff\xe0" + b"not decoded: no worker runs" * 4


def timed(port, method, path, body=None, headers=None):
    """(status, seconds) of one request on a fresh connection."""
    t0 = time.perf_counter()
    try:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        c.request(method, path, body=body, headers=headers or {})
        res = c.getresponse()
        data = res.read()
        c.close()
        return res.status, time.perf_counter() - t0, data
    except OSError as e:
        return "error: %s" % e, time.perf_counter() - t0, b""


def percentiles(values):
    v = sorted(values)
    pick = lambda q: v[min(len(v) - 1, int(q * len(v)))]
    return {"p50_ms": round(pick(0.5) * 1000, 2), "p99_ms": round(pick(0.99) * 1000, 2),
            "max_ms": round(v[-1] * 1000, 2)}


def measure(port, samples):
    probes, submits, bad = [], [], []
    job_ids = []
    for _ in range(samples):
        status, s, _ = timed(port, "GET", "/healthz")
        probes.append(s)
        if status != 200:
            bad.append("healthz: %s" % status)
        status, s, data = timed(port, "POST", "/v1/queries", IMAGE, {"Content-Type": "image/jpeg"})
        submits.append(s)
        if status != 202:
            bad.append("submit: %s %s" % (status, data[:200]))
        else:
            job_ids.append(json.loads(data)["job_id"])
    return {"healthz": percentiles(probes), "submit": percentiles(submits),
            "healthz_max_s": max(probes), "submit_max_s": max(submits), "failures": bad}, job_ids


class Load:
    """Long-polls and header tricklers on their own threads until stop()."""

    def __init__(self, port, job_ids, long_polls, tricklers, trickle_s):
        self.port, self.stop_flag = port, threading.Event()
        self.cut_off = 0
        self.polls_answered = 0
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self.poll, args=(job_ids[i % len(job_ids)],), daemon=True)
                        for i in range(long_polls)]
        self.threads.append(threading.Thread(target=self.trickle, args=(tricklers, trickle_s), daemon=True))
        for t in self.threads:
            t.start()

    def poll(self, job_id):
        while not self.stop_flag.is_set():
            try:
                c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
                c.request("GET", "/v1/jobs/%s?wait_ms=30000" % job_id)
                c.getresponse().read()
                with self.lock:
                    self.polls_answered += 1
            except OSError:
                time.sleep(0.1)

    def connect(self):
        s = socket.create_connection(("127.0.0.1", self.port), timeout=5)
        s.sendall(b"POST /v1/queries HTTP/1.1\r\nHost: bench\r\nX-Trickle: ")
        return s

    def trickle(self, count, every_s):
        socks = [self.connect() for _ in range(count)]
        while not self.stop_flag.is_set():
            for i, s in enumerate(socks):
                try:
                    s.sendall(b"a")
                except OSError:
                    s.close()
                    with self.lock:
                        self.cut_off += 1
                    socks[i] = self.connect()
            self.stop_flag.wait(every_s)
        for s in socks:
            s.close()

    def stop(self):
        self.stop_flag.set()


def gauge(port, name):
    status, _, data = timed(port, "GET", "/metrics")
    for line in data.decode(errors="replace").splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--gmi", default=os.path.join(ROOT, "build", "tools", "gmi"))
    ap.add_argument("--tricklers", type=int, default=200)
    ap.add_argument("--long-polls", type=int, default=50)
    ap.add_argument("--samples", type=int, default=50)
    ap.add_argument("--trickle-s", type=float, default=2.0)
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = ap.parse_args()
    if not os.access(args.gmi, os.X_OK):
        print("bench_gateway: %s is not an executable gmi" % args.gmi, file=sys.stderr)
        return 2
    if min(args.tricklers, args.long_polls, args.samples) < 1 or args.trickle_s <= 0:
        print("bench_gateway: counts must be at least 1 and --trickle-s positive", file=sys.stderr)
        return 2
    tmp = tempfile.mkdtemp(prefix="gmi-gwbench-")
    _, redis, r = start_redis(tmp, persistent=False)
    env, port = service_env(r.port, {"GMI_BROKER_NO_WORKER_WAIT_S": "3600"})
    sup = Supervisor(args.gmi, env, tmp)
    try:
        sup.start("broker", ["broker"])
        sup.start("gateway", ["gateway"])
        for _ in range(200):
            if timed(port, "GET", "/readyz")[0] == 200:
                break
            time.sleep(0.1)
        unloaded, job_ids = measure(port, args.samples)
        load = Load(port, job_ids, args.long_polls, args.tricklers, args.trickle_s)
        time.sleep(max(1.0, args.trickle_s))  # every trickler and long-poll is in place
        held = gauge(port, "gmi_http_connections")
        loaded, _ = measure(port, args.samples)
        held_after = gauge(port, "gmi_http_connections")
        with load.lock:  # long-polls that ended while the loaded phase ran (0: all waited)
            polls_ended = load.polls_answered
        load.stop()
    finally:
        sup.stop_all()
        redis.terminate()
        redis.wait()
        subprocess.run(["rm", "-rf", tmp])
    ok = (not loaded["failures"] and loaded["healthz_max_s"] < 0.1 and loaded["submit_max_s"] < 1.0)
    out = {"tricklers": args.tricklers, "long_polls": args.long_polls, "samples": args.samples,
           "trickle_every_s": args.trickle_s, "connections_held": [held, held_after],
           "tricklers_cut_off_and_reconnected": load.cut_off, "long_polls_ended_while_measuring": polls_ended,
           "unloaded": unloaded, "loaded": loaded, "pass": ok}
    if args.json:
        print(json.dumps(out))
    else:
        print("gateway under %d header tricklers (1 byte / %.1f s) and %d long-polls; %d samples per phase"
              % (args.tricklers, args.trickle_s, args.long_polls, args.samples))
        print("connections held by the gateway during the loaded phase: %s (long-polls that ended "
              "meanwhile: %d; tricklers cut off and reconnected: %d)" % ([held, held_after], polls_ended, load.cut_off))
        print("%-10s %-8s %10s %10s %10s" % ("phase", "request", "p50 ms", "p99 ms", "max ms"))
        for phase, m in (("unloaded", unloaded), ("loaded", loaded)):
            for req in ("healthz", "submit"):
                p = m[req]
                print("%-10s %-8s %10.2f %10.2f %10.2f" % (phase, req, p["p50_ms"], p["p99_ms"], p["max_ms"]))
        for phase, m in (("unloaded", unloaded), ("loaded", loaded)):
            for f in m["failures"][:5]:
                print("%s failure: %s" % (phase, f))
        print("targets (loaded): /healthz < 100 ms, submission accepted < 1 s: %s" % ("PASS" if ok else "FAIL"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
