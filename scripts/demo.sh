#!/usr/bin/env bash
# The end-to-end demo on one machine: installs dependencies, builds gmi, renders a small
# demo hub of style "models" from real photos, builds every model's spec, then identifies
# held-out images (content no spec has seen) and prints each one's true model and top 4.
#
# usage: scripts/demo.sh [--models N] [--queries N]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
models=10
queries=5
while [ $# -gt 0 ]; do
  case "$1" in
    --models) models=$2; shift 2 ;;
    --queries) queries=$2; shift 2 ;;
    -h|--help) sed -n '2,7p' "$0"; exit 0 ;;
    *) echo "demo: unknown option $1" >&2; exit 2 ;;
  esac
done
cd "$root"
scripts/install-deps.sh
scripts/build.sh build
gmi=$root/build/tools/gmi
out=$root/out/demo
rm -rf "$out"
mkdir -p "$out"

echo "== 1. rendering a demo hub of $models models (scripts/make_hub.py)"
/usr/bin/python3 scripts/make_hub.py --out "$out/hub" --models "$models" --regions 3 \
  --queries-per-model 3 --seed 11 --quiet
echo "== 2. building one spec per model (gmi spec build)"
for dir in "$out"/hub/models/*/; do
  m=$(basename "$dir")
  "$gmi" spec build --model "$m" --manifest "$dir/manifest.jsonl" --info "$dir/model.json" \
    --store "dir:$out/specs"
done
"$gmi" spec inspect --store "dir:$out/specs"
echo
echo "== 3. identifying held-out query images (gmi identify)"
n=0
while IFS= read -r line && [ "$n" -lt "$queries" ]; do
  image=$(/usr/bin/python3 -c 'import json,sys; print(json.loads(sys.argv[1])["image"])' "$line")
  truth=$(/usr/bin/python3 -c 'import json,sys; print(json.loads(sys.argv[1])["model"])' "$line")
  echo "-- query $image   true model: $truth"
  "$gmi" identify --store "dir:$out/specs" --top 4 "$out/hub/$image"
  echo
  n=$((n + 1))
done <"$out/hub/queries.jsonl"
echo "== 4. all held-out queries, every scorer (gmi identify --batch)"
runs=()
for scorer in weighted rkme mean popularity; do
  "$gmi" identify --store "dir:$out/specs" --top 0 --scorer "$scorer" \
    --batch "$out/hub/queries.jsonl" >"$out/results-$scorer.jsonl" 2>/dev/null
  runs+=("$scorer=$out/results-$scorer.jsonl")
done
# The same, without the hub-learned metric (identify learns one on the fly by default).
"$gmi" identify --store "dir:$out/specs" --top 0 --metric none \
  --batch "$out/hub/queries.jsonl" >"$out/results-weighted-raw.jsonl" 2>/dev/null
runs+=("weighted/no-metric=$out/results-weighted-raw.jsonl")
/usr/bin/python3 scripts/accuracy.py --models "$models" "${runs[@]}"
echo "-- storing the hub's metric (gmi hub learn-metric): identify and the service then use this version"
"$gmi" hub learn-metric --store "dir:$out/specs"

echo
echo "== 5. the same hub as a service: gmi serve (broker, stage workers, HTTP gateway)"
# A private redis-server and free ports, so the demo never touches anything else.
ports=($(/usr/bin/python3 -c 'import socket
for _ in range(4):
    s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'))
redis_dir=$(mktemp -d)
redis-server --port "${ports[0]}" --bind 127.0.0.1 --save "" --appendonly yes --dir "$redis_dir" \
  --daemonize no --loglevel warning >/dev/null &
redis_pid=$!
export GMI_REDIS_URI=redis://127.0.0.1:${ports[0]} GMI_GATEWAY_PORT=${ports[1]}
export GMI_BROKER_FRONTEND=tcp://127.0.0.1:${ports[2]} GMI_GATEWAY_BROKER=tcp://127.0.0.1:${ports[2]}
export GMI_BROKER_BACKEND=tcp://127.0.0.1:${ports[3]} GMI_SERVE_OPS_PORT=-1 GMI_LOG_LEVEL=warn
"$gmi" serve --config config/gmi.yaml >"$out/serve.log" 2>&1 &
serve_pid=$!
cleanup() { kill -TERM "$serve_pid" 2>/dev/null; wait "$serve_pid" 2>/dev/null || true
            kill "$redis_pid" 2>/dev/null; wait "$redis_pid" 2>/dev/null || true; rm -rf "$redis_dir"; }
trap cleanup EXIT
for i in $(seq 100); do grep -q "HTTP on port" "$out/serve.log" && break; sleep 0.1; done
echo "-- uploading every model (gmi upload: decode -> embed -> spec, stored in Redis)"
for dir in "$out"/hub/models/*/; do
  m=$(basename "$dir")
  "$gmi" upload --model "$m" --manifest "$dir/manifest.jsonl" --json |
    /usr/bin/python3 -c 'import json, sys
j = json.load(sys.stdin); s = j["result"]["spec"]
print("   %-24s %-9s n=%d r=%d residual=%.2e" % (j["model_id"], j["state"], s["n"], s["r"], s["residual_mmd2"]))'
done
# The uploads made the hub due for a metric: a metric job learns it; the score workers pick up
# new specs and the new metric within score.refresh_ms.
for i in $(seq 100); do "$gmi" hub metric --store "$GMI_REDIS_URI" >/dev/null 2>&1 && break; sleep 0.2; done
sleep 1
line=$(head -1 "$out/hub/queries.jsonl")
image=$(/usr/bin/python3 -c 'import json,sys; print(json.loads(sys.argv[1])["image"])' "$line")
truth=$(/usr/bin/python3 -c 'import json,sys; print(json.loads(sys.argv[1])["model"])' "$line")
echo "-- POST /v1/queries with $image (true model: $truth), then GET the ranked answer"
/usr/bin/python3 - "$GMI_GATEWAY_PORT" "$out/hub/$image" <<'PY'
import json, sys, urllib.request
port, path = sys.argv[1], sys.argv[2]
base = f"http://127.0.0.1:{port}"
req = urllib.request.Request(f"{base}/v1/queries?top=4", data=open(path, "rb").read(),
                             headers={"Content-Type": "image/jpeg"}, method="POST")
job = json.load(urllib.request.urlopen(req))
print(f"   202 Accepted: job {job['job_id']}")
answer = json.load(urllib.request.urlopen(f"{base}/v1/queries/{job['job_id']}?wait_ms=20000"))
print(f"   {answer['state']} in {answer['timings']['total_s'] * 1000:.1f} ms "
      f"(stages computing {answer['timings']['compute_s'] * 1000:.1f} ms)")
print(f"   {'rank':>4}  {'model':<32} {'MMD^2':>10}")
for r in answer["result"]["results"]:
    print(f"   {r['rank']:>4}  {r['model']:<32} {r['score']:>10.6f}")
m = answer["result"].get("metric")
print(f"   metric: v{m['version']} {m['checksum']} ({m['dim']} dims)" if m else "   metric: none")
PY
echo "-- the same query over ZeroMQ (gmi query)"
"$gmi" query --top 4 "$out/hub/$image"
