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
/usr/bin/python3 scripts/accuracy.py --models "$models" "${runs[@]}"
