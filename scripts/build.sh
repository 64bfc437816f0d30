#!/usr/bin/env bash
# Configure and build (by default everything: library checks, CLI, guest
# programs, tests, benchmarks).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${SUPERMACHINE_BUILD_DIR:-$root/build}
# Optimized without debug info by default: the test suite is heavy on
# Boost.Asio/Beast templates, and -g doubles their compile time on 2 cores.
# Asserts stay on (no NDEBUG). CMAKE_BUILD_TYPE=Debug etc. still works.
type=${CMAKE_BUILD_TYPE:-Release}
flags=()
[ "$type" = Release ] && flags+=(-DCMAKE_CXX_FLAGS_RELEASE=-O2 -DCMAKE_C_FLAGS_RELEASE=-O2)
# SUPERMACHINE_BUILD_TARGETS="a b": only those (setup.sh builds just the
# CLI and the agent, what the main job needs); default: everything.
targets=()
for t in ${SUPERMACHINE_BUILD_TARGETS:-}; do targets+=(--target "$t"); done
cmake -S "$root" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE="$type" "${flags[@]}" "$@" >/dev/null
cmake --build "$build" -j"$(nproc)" "${targets[@]}"
