#!/usr/bin/env bash
# One broker's ceiling: starts a private redis-server (free port, no persistence) in a temp
# dir and runs bench/bench_broker (broker + trivial stages + clients in one process) for
# each client count, then once more with Redis paused (CLIENT PAUSE) mid-run to show that a
# Redis stall loses no worker. Prints each run's table; writes one JSON line per run to
# out/bench-broker.jsonl. Builds nothing: expects build/ from scripts/build.sh, or --build DIR.
#
# usage: scripts/bench_broker.sh [--build DIR] [--clients "1 2 4"] [--window N]
#          [--duration S] [--stall-ms MS] [--out FILE]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=build
client_counts="1 2 4"
window=64
duration=10
stall_ms=3000
out_file=out/bench-broker.jsonl
usage() { sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
  case "$1" in
    --build) build=$2; shift 2 ;;
    --clients) client_counts=$2; shift 2 ;;
    --window) window=$2; shift 2 ;;
    --duration) duration=$2; shift 2 ;;
    --stall-ms) stall_ms=$2; shift 2 ;;
    --out) out_file=$2; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "bench_broker.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
bench="$root/$build/bench/bench_broker"
[ -x "$bench" ] || { echo "bench_broker.sh: $bench not found; build with scripts/build.sh first" >&2; exit 1; }
command -v redis-server >/dev/null || { echo "bench_broker.sh: redis-server is not installed" >&2; exit 1; }
tmp=$(mktemp -d)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no --dir "$tmp" \
  --daemonize yes --pidfile "$tmp/redis.pid" --logfile "$tmp/redis.log"
cleanup() { [ -f "$tmp/redis.pid" ] && kill "$(cat "$tmp/redis.pid")" 2>/dev/null || true; rm -rf "$tmp"; }
trap cleanup EXIT
for _ in $(seq 50); do redis-cli -p "$port" ping >/dev/null 2>&1 && break; sleep 0.1; done
mkdir -p "$(dirname "$out_file")"
runs=$(mktemp)
for c in $client_counts; do
  "$bench" --redis "redis://127.0.0.1:$port/0" --clients "$c" --window "$window" --duration "$duration" --json | tee -a "$runs"
done
if [ "$stall_ms" -gt 0 ]; then
  "$bench" --redis "redis://127.0.0.1:$port/0" --clients "${client_counts##* }" --window "$window" \
    --duration "$duration" --stall-ms "$stall_ms" --json | tee -a "$runs"
fi
cat "$runs" >> "$out_file"
python3 - "$runs" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
print(f"{'clients':>7} {'window':>6} {'stall ms':>8} {'jobs/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'lost':>4} {'gap s':>6} {'failed':>6}")
for r in rows:
    print(f"{r['clients']:>7} {r['window']:>6} {r.get('stall_ms', 0):>8} {r['jobs_per_s']:>8.0f} "
          f"{r['latency_ms_p50']:>7.2f} {r['latency_ms_p99']:>7.2f} {r['worker_lost_retries']:>4} "
          f"{r['longest_gap_s']:>6.3f} {r['failed'] + r['refused']:>6}")
PY
rm -f "$runs"
echo "bench_broker.sh: JSON lines appended to $out_file"
