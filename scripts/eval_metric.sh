#!/usr/bin/env bash
# Measures the hub-learned metric on an evaluation hub whose specs are built (by
# scripts/eval_hub.sh): accuracy against the mapped dimension k, and generalisation:
# the metric learnt on half of the models (every other one, in id order) and used
#   - on the whole hub ("grown": the hub grew from M/2 to M after it was learnt, no refresh),
#     reported separately for queries of the models it saw and of those it never saw;
#   - on a hub of the unseen half alone.
# Everything goes through the CLI (`gmi hub learn-metric`, `gmi identify --metric ...`).
# Writes OUT/metric.json and OUT/metric-k.png (accuracy against k).
#
# usage: scripts/eval_metric.sh --hub HUB --specs SPECDIR --out OUT [--gmi PATH] [--dims "8 16 32"]
#        [--scorer weighted]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
gmi=$root/build/tools/gmi
hub="" specs="" out="" scorer=weighted
dims="8 16 32 64 128 256 512"
while [ $# -gt 0 ]; do
  case "$1" in
    --hub) hub=$2; shift 2 ;;
    --specs) specs=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --gmi) gmi=$2; shift 2 ;;
    --dims) dims=$2; shift 2 ;;
    --scorer) scorer=$2; shift 2 ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "eval_metric: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
[ -n "$hub" ] && [ -n "$specs" ] && [ -n "$out" ] || { echo "eval_metric: --hub, --specs and --out are needed" >&2; exit 2; }
[ -x "$gmi" ] || { echo "eval_metric: $gmi not built (scripts/build.sh)" >&2; exit 1; }
mkdir -p "$out"
queries=$hub/queries.jsonl
identify() {  # STORE OUTFILE ARGS...
  local store=$1 file=$2; shift 2
  "$gmi" identify --store "dir:$store" --top 0 --scorer "$scorer" --batch "$queries" "$@" >"$file" 2>>"$out/identify.log"
}

# Accuracy against k (learnt on the fly from every spec, as `gmi identify` does).
identify "$specs" "$out/k-raw.jsonl" --metric none
identify "$specs" "$out/k-full.jsonl" --metric learn
for k in $dims; do
  identify "$specs" "$out/k-$k.jsonl" --metric learn --metric-dims "$k"
  echo "eval_metric: k=$k done" >&2
done

# Halves: A = every other model in id order, B = the rest.
rm -rf "$out/half-a" "$out/half-b" "$out/grown"
mkdir -p "$out/half-a" "$out/half-b" "$out/grown"
i=0
for f in $(ls "$specs"/*.gmispec | sort); do
  if [ $((i % 2)) = 0 ]; then cp "$f" "$out/half-a/"; else cp "$f" "$out/half-b/"; fi
  cp "$f" "$out/grown/"
  i=$((i + 1))
done
"$gmi" hub learn-metric --store "dir:$out/half-a" --json >"$out/half-a-metric.json"
cp "$out/half-a/hub.gmimetric" "$out/grown/"
cp "$out/half-a/hub.gmimetric" "$out/half-b/"
identify "$out/grown" "$out/grown.jsonl" --metric stored
identify "$out/half-b" "$out/unseen-learnt-on-a.jsonl" --metric stored
identify "$out/half-b" "$out/unseen-raw.jsonl" --metric none
identify "$out/half-b" "$out/unseen-own.jsonl" --metric learn

/usr/bin/python3 "$root/scripts/metric_report.py" --out "$out" --half-a "$out/half-a" --dims "$dims" \
  --title "$(basename "$(dirname "$hub")")/$(basename "$hub"), $(ls "$specs"/*.gmispec | wc -l) models, $scorer"
