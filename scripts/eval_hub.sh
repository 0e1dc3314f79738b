#!/usr/bin/env bash
# The evaluation benchmark: builds a reproducible hub (scripts/make_hub.py), builds every
# model's spec with `gmi spec build`, runs `gmi identify --batch` once per scorer with the
# defaults (the hub-learned metric, learnt on the fly from the specs) and once per scorer
# with --metric none (the encoder's raw space), and prints top-1..top-4 accuracy.
#
# --spec-args "..." passes options to every `gmi spec build` (e.g. "--optimizer gradient
# --tolerance 1e-5", the fit before L-BFGS).
#
# usage: scripts/eval_hub.sh [--out DIR] [--gmi PATH] [--skip-hub] [--spec-args "..."]
#        [make_hub.py options...]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=$root/out/eval
gmi=$root/build/tools/gmi
skip_hub=0
spec_args=""
hub_args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --out) out=$2; shift 2 ;;
    --gmi) gmi=$2; shift 2 ;;
    --skip-hub) skip_hub=1; shift ;;
    --spec-args) spec_args=$2; shift 2 ;;
    -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
    *) hub_args+=("$1"); shift ;;
  esac
done
[ -x "$gmi" ] || { echo "eval_hub: $gmi not built (scripts/build.sh)" >&2; exit 1; }
hub=$out/hub
specs=$out/specs
mkdir -p "$out"
if [ "$skip_hub" = 0 ]; then
  rm -rf "$hub"
  /usr/bin/python3 "$root/scripts/make_hub.py" --out "$hub" "${hub_args[@]}"
fi
rm -rf "$specs"
models=$(ls "$hub/models")
count=$(echo "$models" | wc -l)
start=$(date +%s%N)
for m in $models; do
  "$gmi" spec build --model "$m" --manifest "$hub/models/$m/manifest.jsonl" \
    --info "$hub/models/$m/model.json" --store "dir:$specs" $spec_args >/dev/null
done
end=$(date +%s%N)
echo "eval_hub: built $count specs in $(( (end - start) / 1000000 )) ms"
runs=()
for scorer in weighted rkme mean nearest popularity; do
  "$gmi" identify --store "dir:$specs" --top 0 --scorer "$scorer" --batch "$hub/queries.jsonl" \
    >"$out/results-$scorer.jsonl" 2>"$out/identify-$scorer.log"
  runs+=("$scorer=$out/results-$scorer.jsonl")
done
for scorer in weighted rkme mean nearest; do
  "$gmi" identify --store "dir:$specs" --top 0 --scorer "$scorer" --metric none --batch "$hub/queries.jsonl" \
    >"$out/results-$scorer-raw.jsonl" 2>"$out/identify-$scorer-raw.log"
  runs+=("$scorer/raw=$out/results-$scorer-raw.jsonl")
done
/usr/bin/python3 "$root/scripts/accuracy.py" --models "$count" --json "$out/accuracy.json" \
  --png "$out/accuracy.png" "${runs[@]}"
