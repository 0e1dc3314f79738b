#!/usr/bin/env bash
# The spec fit's residual MMD^2 against time, for choosing when the fit stops.
# For each n and r: one traced (L-BFGS) fit of --cap iterations with no tolerance, where
# candidate stopping rules stop on that trace, the original fit (three gradient steps per
# iteration, tol 1e-5, cap 100) timed on the same data, and the peer procedure (learnware's
# RKMETableSpecification defaults: 3 rounds of step 0.1) on the same joint samples. The
# "converged" MMD^2 is the lower of the trace's last J and the original fit's end.
# Synthetic clustered data (bench_fit's), d = 512, dt = 256, lambda 1.
# Writes OUT/fit-N-R.json, OUT/fit-plateau.md (tables) and OUT/fit-plateau.png (J/converged
# against seconds, one curve per run; needs python3-matplotlib).
#
# usage: scripts/bench_fit_plateau.sh [--out out/fit] [--n "200 500 1000 2000 5000"]
#        [--r "16 32 64"] [--cap 1000] [--lambda 1]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bench=$root/build/bench/bench_fit
out=out/fit ns="200 500 1000 2000 5000" rs="16 32 64" cap=1000 lambda=1
while [ $# -gt 0 ]; do
  case "$1" in
    --out) out=$2; shift 2 ;;
    --n) ns=$2; shift 2 ;;
    --r) rs=$2; shift 2 ;;
    --cap) cap=$2; shift 2 ;;
    --lambda) lambda=$2; shift 2 ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "bench_fit_plateau: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
[ -x "$bench" ] || { echo "bench_fit_plateau: $bench not built (scripts/build.sh)" >&2; exit 1; }
mkdir -p "$out"
runs=()
for n in $ns; do
  for r in $rs; do
    f=$out/fit-$n-$r.json
    echo "bench_fit_plateau: n=$n r=$r" >&2
    "$bench" --trace --n "$n" --r "$r" --lambda "$lambda" --trace-cap "$cap" --json "$f" >"$out/fit-$n-$r.txt"
    runs+=("$f")
  done
done
/usr/bin/python3 "$root/scripts/fit_plateau_report.py" --md "$out/fit-plateau.md" \
  --png "$out/fit-plateau.png" "${runs[@]}"
