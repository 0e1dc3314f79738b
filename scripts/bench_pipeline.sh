#!/usr/bin/env bash
# Pipeline load benchmark: starts a private redis-server (free port, no persistence) in a
# temp dir, renders a small demo hub, then for each mode
#   serve      one `gmi serve` (broker + stage workers + gateway in one process, inproc)
#   processes  `gmi broker` + one `gmi worker --stage S` per stage (TCP between them)
#   processes-2embed  the same with two embed workers (does throughput grow with workers?)
# uploads every model's spec, and runs bench/load_pipeline at 1, 4 and 16 clients.
# Prints one combined table and writes one JSON line per run to out/bench-pipeline.jsonl.
# Builds nothing: expects a build from scripts/build.sh (build/), or --build DIR.
#
# usage: scripts/bench_pipeline.sh [--build DIR] [--models N] [--clients "1 4 16"]
#          [--duration S] [--warmup S] [--modes "serve processes"] [--top K]
#          [--out FILE] [--keep]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=build
models=8
client_counts="1 4 16"
duration=5
warmup=1
modes="serve processes processes-2embed"
top=10
out_file=out/bench-pipeline.jsonl
keep=0
usage() { sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
  case "$1" in
    --build) build=$2; shift 2 ;;
    --models) models=$2; shift 2 ;;
    --clients) client_counts=$2; shift 2 ;;
    --duration) duration=$2; shift 2 ;;
    --warmup) warmup=$2; shift 2 ;;
    --modes) modes=$2; shift 2 ;;
    --top) top=$2; shift 2 ;;
    --out) out_file=$2; shift 2 ;;
    --keep) keep=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "bench_pipeline: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
cd "$root"
case "$build" in /*) ;; *) build=$root/$build ;; esac
case "$out_file" in /*) ;; *) out_file=$root/$out_file ;; esac
gmi=$build/tools/gmi
load=$build/bench/load_pipeline
for exe in "$gmi" "$load"; do
  if [ ! -x "$exe" ]; then
    echo "bench_pipeline: $exe is missing; build first (scripts/build.sh $build)" >&2
    exit 2
  fi
done
for tool in redis-server redis-cli curl /usr/bin/python3; do
  command -v "$tool" >/dev/null 2>&1 || { echo "bench_pipeline: $tool not found" >&2; exit 2; }
done

tmp=$(mktemp -d "${TMPDIR:-/tmp}/gmi-bench-pipeline.XXXXXX")
pids=()        # every process this script started, service and redis
service_pids=()
stop_pids() {  # stop_pids PID...: SIGTERM, wait up to 10 s, then SIGKILL
  local p alive
  [ $# -gt 0 ] || return 0
  for p in "$@"; do kill -TERM "$p" 2>/dev/null || true; done
  for _ in $(seq 100); do
    alive=0
    for p in "$@"; do kill -0 "$p" 2>/dev/null && alive=1; done
    [ "$alive" -eq 0 ] && break
    sleep 0.1
  done
  for p in "$@"; do kill -KILL "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
}
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  if [ ${#pids[@]} -gt 0 ]; then stop_pids "${pids[@]}"; fi
  if [ "$keep" -eq 1 ] || { [ "$rc" -ne 0 ] && [ "$rc" -ne 130 ] && [ "$rc" -ne 143 ]; }; then
    echo "bench_pipeline: logs kept in $tmp" >&2
  else
    rm -rf "$tmp"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# N distinct free TCP ports on 127.0.0.1 (all held open at once, so they differ).
free_ports() {
  /usr/bin/python3 - "$1" <<'EOF'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket(); s.bind(("127.0.0.1", 0)); socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
}

# wait_http URL SECONDS PID...: until URL answers 200; fails if a PID dies or time runs out.
wait_http() {
  local url=$1 secs=$2 p
  shift 2
  for _ in $(seq $((secs * 10))); do
    curl -fsS -o /dev/null --max-time 1 "$url" 2>/dev/null && return 0
    for p in "$@"; do
      kill -0 "$p" 2>/dev/null || { echo "bench_pipeline: process $p died (logs: $tmp)" >&2; return 1; }
    done
    sleep 0.1
  done
  echo "bench_pipeline: $url not ready after ${secs}s" >&2
  return 1
}

read -r redis_port < <(free_ports 1)
echo "== redis-server on 127.0.0.1:$redis_port (temp dir $tmp)"
mkdir -p "$tmp/redis"
redis-server --port "$redis_port" --bind 127.0.0.1 --save '' --appendonly no \
  --dir "$tmp/redis" --logfile "$tmp/redis.log" &
pids+=($!)
for _ in $(seq 100); do
  redis-cli -p "$redis_port" ping >/dev/null 2>&1 && break
  sleep 0.1
done
redis-cli -p "$redis_port" ping >/dev/null

echo "== rendering a hub of $models models (scripts/make_hub.py)"
hub=$tmp/hub
/usr/bin/python3 scripts/make_hub.py --out "$hub" --models "$models" --regions 3 \
  --queries-per-model 3 --seed 11 --quiet
images=("$hub"/queries/*.jpg)
[ -e "${images[0]}" ] || { echo "bench_pipeline: no query images in $hub/queries" >&2; exit 1; }

export GMI_LOG_LEVEL=warn
export GMI_REDIS_URI="redis://127.0.0.1:$redis_port"
export GMI_GATEWAY_HOST=127.0.0.1
export GMI_GATEWAY_PORT=0
stages="decode embed interrogate score spec"

# start_mode MODE: starts the service, sets $frontend and $ready_urls.
start_mode() {
  local mode=$1 ports fport bport ops s i
  read -r -a ports < <(free_ports 12)
  fport=${ports[0]}
  bport=${ports[1]}
  frontend="tcp://127.0.0.1:$fport"
  ready_urls=()
  service_pids=()
  export GMI_BROKER_FRONTEND=$frontend
  export GMI_BROKER_BACKEND="tcp://127.0.0.1:$bport"
  export GMI_WORKER_BROKER="tcp://127.0.0.1:$bport"
  export GMI_GATEWAY_BROKER=$frontend
  case "$mode" in
    serve)
      ops=${ports[2]}
      GMI_SERVE_OPS_PORT=$ops "$gmi" serve >"$tmp/serve.log" 2>&1 &
      service_pids+=($!)
      pids+=($!)
      wait_http "http://127.0.0.1:$ops/healthz" 30 "${service_pids[@]}"
      ready_urls+=("http://127.0.0.1:$ops/readyz")
      ;;
    processes|processes-2embed)
      local mode_stages=$stages
      [ "$mode" = processes-2embed ] && mode_stages="decode embed embed interrogate score spec"
      ops=${ports[2]}
      GMI_BROKER_OPS_PORT=$ops "$gmi" broker >"$tmp/broker.log" 2>&1 &
      service_pids+=($!)
      pids+=($!)
      wait_http "http://127.0.0.1:$ops/readyz" 30 "${service_pids[@]}"
      i=3
      for s in $mode_stages; do
        ops=${ports[$i]}
        i=$((i + 1))
        GMI_WORKER_OPS_PORT=$ops "$gmi" worker --stage "$s" >"$tmp/worker-$s-$i.log" 2>&1 &
        service_pids+=($!)
        pids+=($!)
        ready_urls+=("http://127.0.0.1:$ops/readyz")
      done
      ;;
    *) echo "bench_pipeline: unknown mode $mode" >&2; return 1 ;;
  esac
}

stop_mode() {
  local p keep_pids=()
  stop_pids "${service_pids[@]}"
  for p in "${pids[@]}"; do
    case " ${service_pids[*]} " in *" $p "*) ;; *) keep_pids+=("$p") ;; esac
  done
  pids=("${keep_pids[@]}")
  service_pids=()
}

mkdir -p "$(dirname "$out_file")"
: >"$out_file"
rows=()
for mode in $modes; do
  echo "== mode $mode: starting"
  redis-cli -p "$redis_port" flushall >/dev/null
  start_mode "$mode"
  t0=$(date +%s%N)
  for dir in "$hub"/models/*/; do
    m=$(basename "$dir")
    if ! "$gmi" upload --broker "$frontend" --model "$m" --manifest "$dir/manifest.jsonl" \
      --wait-ms 120000 --json >"$tmp/upload-$mode-$m.json" 2>"$tmp/upload-$mode-$m.err"; then
      echo "bench_pipeline: upload of $m failed in mode $mode:" >&2
      cat "$tmp/upload-$mode-$m.err" "$tmp/upload-$mode-$m.json" >&2
      exit 1
    fi
  done
  t1=$(date +%s%N)
  echo "   uploaded $models models in $(((t1 - t0) / 1000000)) ms"
  # Every worker ready (the score/interrogate hub caches loaded), then ~1 s for the caches
  # to pick up the last spec (score.refresh_ms = 500).
  for url in "${ready_urls[@]}"; do wait_http "$url" 30 "${service_pids[@]}"; done
  sleep 1.2
  for c in $client_counts; do
    echo "   load: $c client(s), ${duration}s (+${warmup}s warm-up)"
    if ! "$load" --broker "$frontend" --clients "$c" --duration "$duration" --warmup "$warmup" \
      --top "$top" --images "${images[@]}" --json >"$tmp/load-$mode-$c.json" \
      2>"$tmp/load-$mode-$c.err"; then
      echo "bench_pipeline: load_pipeline failed (mode $mode, $c clients):" >&2
      cat "$tmp/load-$mode-$c.err" >&2
      exit 1
    fi
    if [ -s "$tmp/load-$mode-$c.err" ]; then sed 's/^/   /' "$tmp/load-$mode-$c.err" >&2; fi
    /usr/bin/python3 - "$mode" "$tmp/load-$mode-$c.json" "$models" >>"$out_file" <<'EOF'
import json, sys
r = json.load(open(sys.argv[2]))
print(json.dumps({"mode": sys.argv[1], "models": int(sys.argv[3]), **r}))
EOF
  done
  for p in "${service_pids[@]}"; do
    kill -0 "$p" 2>/dev/null || echo "bench_pipeline: warning: service process $p exited during the run" >&2
  done
  stop_mode
done

echo
/usr/bin/python3 - "$out_file" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
head = ("mode", "clients", "requests", "errors", "req/s", "p50 ms", "p99 ms",
        "compute p50", "overhead p50", "overhead p99")
fmt = "{:<10} {:>7} {:>8} {:>6} {:>8} {:>8} {:>8} {:>11} {:>12} {:>12}"
print(fmt.format(*head))
for r in rows:
    print(fmt.format(r["mode"], r["clients"], r["requests"], r["errors"],
                     "%.1f" % r["throughput_rps"], "%.2f" % r["latency_p50_ms"],
                     "%.2f" % r["latency_p99_ms"], "%.2f" % r["compute_p50_ms"],
                     "%.2f" % r["overhead_p50_ms"], "%.2f" % r["overhead_p99_ms"]))
print("(latencies in ms, client-side submit -> answer; overhead = latency - the stages' compute_s;"
      " target: overhead p50 <= 2 ms)")
EOF
echo "JSON lines: $out_file"
