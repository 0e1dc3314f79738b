#!/usr/bin/env bash
# The scoring benchmark across hub sizes, one command: for each size, build/bench/bench_score
# on the overlapping synthetic hub (hub_synth.hpp) with exact float32, exact binary16 and the
# two-stage search (the services' defaults: score.lists 1024, probe 128, coarse 8192, 256
# candidates), recall against float32 exact in the same run; the packed NumPy version of the
# same score (scripts/bench_score_numpy.py) at the sizes NumPy holds (--numpy-max); the
# machine's read bandwidth (NumPy, every core reading a slice of a 1 GiB array), from which the bandwidth bound
# of exact scoring (its bytes per query / bandwidth); with --upload, upload-to-visible through
# a private redis-server (build/bench/bench_upload). r = 32, d = 512, dt = 256 unless given.
# Writes OUT/scale-*.json, OUT/scale.md (the table) and OUT/scale.png (latency and recall
# against hub size; needs python3-matplotlib).
#
# usage: scripts/bench_scale.sh [--out out/bench] [--sizes "1000 10000 100000"]
#        [--numpy-max 10000] [--queries 50] [--recall-queries 300] [--d 512] [--upload]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bench=$root/build/bench/bench_score
out=out/bench sizes="1000 10000 100000" numpy_max=10000 queries=50 recall=300 d=512 dt=256 r=32 upload=0
while [ $# -gt 0 ]; do
  case "$1" in
    --out) out=$2; shift 2 ;;
    --sizes) sizes=$2; shift 2 ;;
    --numpy-max) numpy_max=$2; shift 2 ;;
    --queries) queries=$2; shift 2 ;;
    --recall-queries) recall=$2; shift 2 ;;
    --d) d=$2; shift 2 ;;
    --upload) upload=1; shift ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) echo "bench_scale: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
[ -x "$bench" ] || { echo "bench_scale: $bench not built (scripts/build.sh)" >&2; exit 1; }
mkdir -p "$out"
common=(--hub overlap --scorers weighted --r "$r" --d "$d" --dt "$dt" --queries "$queries"
        --recall-queries "$recall" --batches 64 --repeats 3 --json)
two_stage=(--lists 1024 --probe 128 --coarse 8192 --candidates 256)

/usr/bin/python3 - "$out/scale-bandwidth.json" <<'PY'
import json, os, sys, threading, time
import numpy as np
# Every core reads its slice of a 1 GiB array at once (NumPy lets go of the GIL while it sums).
a = np.ones(1 << 28, np.float32)
cores = os.cpu_count() or 1
parts = np.array_split(a, cores)
def once():
    threads = [threading.Thread(target=p.sum) for p in parts]
    t0 = time.perf_counter()
    for t in threads: t.start()
    for t in threads: t.join()
    return time.perf_counter() - t0
once()
best = min(once() for _ in range(5))
json.dump({"read_gb_per_s": a.nbytes / best / 1e9,
           "how": "NumPy sums of a 1 GiB float32 array, one slice per core (%d) at once, best of 5" % cores},
          open(sys.argv[1], "w"))
PY

runs=()
for m in $sizes; do
  for mode in exact-f32 exact-f16 two-stage; do
    f=$out/scale-$m-$mode.json
    case $mode in
      exact-f32) args=(--search exact --storage f32) ;;
      exact-f16) args=(--search exact --storage f16) ;;
      two-stage) args=(--search two-stage --storage f32 "${two_stage[@]}") ;;
    esac
    echo "bench_scale: $m specs, $mode" >&2
    "$bench" --models "$m" "${args[@]}" "${common[@]}" >"$f"
    runs+=("$f")
  done
  if [ "$m" -le "$numpy_max" ]; then
    echo "bench_scale: $m specs, NumPy packed" >&2
    /usr/bin/python3 "$root/scripts/bench_score_numpy.py" --models "$m" --r "$r" --d "$d" --dt "$dt" \
      --queries 5 --packed-only --json >"$out/scale-$m-numpy.json"
    runs+=("$out/scale-$m-numpy.json")
  fi
  if [ "$upload" = 1 ]; then
    port=$(( 20000 + RANDOM % 20000 ))
    dir=$(mktemp -d)
    redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no --dir "$dir" --daemonize yes >/dev/null
    trap 'redis-cli -p '"$port"' shutdown nosave >/dev/null 2>&1 || true; rm -rf '"$dir" EXIT
    sleep 0.5
    echo "bench_scale: $m specs, upload-to-visible" >&2
    "$root/build/bench/bench_upload" --store "redis://127.0.0.1:$port" --models "$m" --uploads 100 \
      --storage f16 --r "$r" --d "$d" --dt "$dt" --json >"$out/scale-$m-upload.json"
    redis-cli -p "$port" shutdown nosave >/dev/null 2>&1 || true
    rm -rf "$dir"
    trap - EXIT
    runs+=("$out/scale-$m-upload.json")
  fi
done
/usr/bin/python3 "$root/scripts/scale_report.py" --bandwidth "$out/scale-bandwidth.json" \
  --md "$out/scale.md" --png "$out/scale.png" "${runs[@]}"
echo "bench_scale: wrote $out/scale.md and $out/scale.png" >&2
