#!/usr/bin/env bash
# Installs dependencies, builds, and runs the whole test suite (unit + integration with a
# real redis-server and real gmi processes). With --sanitize, also builds and runs the
# suite under AddressSanitizer + UndefinedBehaviorSanitizer.
set -euo pipefail
cd "$(dirname "$0")/.."
sanitize=0
for arg in "$@"; do
  case "$arg" in
    --sanitize) sanitize=1 ;;
    -h|--help) echo "usage: scripts/test.sh [--sanitize]"; exit 0 ;;
    *) echo "unknown option $arg" >&2; exit 2 ;;
  esac
done
scripts/install-deps.sh
export GMI_REQUIRE_REDIS=1   # a missing redis-server fails the suite instead of skipping
scripts/build.sh build
ctest --test-dir build --output-on-failure -j "$(nproc)"
if [ "$sanitize" = 1 ]; then
  scripts/build.sh build-asan -DGMI_SANITIZE=ON -DCMAKE_BUILD_TYPE=RelWithDebInfo -DGMI_BUILD_BENCH=OFF
  # The reference checks are Python alone (no gmi code runs in them): the first run covers them.
  ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
    ctest --test-dir build-asan --output-on-failure -j "$(nproc)" -LE reference
fi
