#!/usr/bin/env bash
# The whole test suite: build, then every CTest test. Tests that need what
# this host cannot give print "SKIP: <reason>" and show as skipped.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${SUPERMACHINE_BUILD_DIR:-$root/build}
"$root/scripts/build.sh"
cd "$build"
ctest --output-on-failure -j"${SUPERMACHINE_TEST_JOBS:-2}" "$@"
