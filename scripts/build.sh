#!/usr/bin/env bash
# Configure and build everything (library checks, CLI, guest programs, tests).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${SUPERMACHINE_BUILD_DIR:-$root/build}
cmake -S "$root" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=${CMAKE_BUILD_TYPE:-RelWithDebInfo} "$@" >/dev/null
cmake --build "$build" -j"$(nproc)"
