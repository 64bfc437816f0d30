#!/usr/bin/env bash
# Build every libFuzzer target with clang (ASan + UBSan) and run each for a
# bounded time (FUZZ_SECONDS, default 20). Any crash fails the run.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${SUPERMACHINE_FUZZ_BUILD_DIR:-$root/build-fuzz}
seconds=${FUZZ_SECONDS:-20}
cmake -S "$root/fuzz" -B "$build" -G Ninja -DCMAKE_CXX_COMPILER=clang++ -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build "$build" -j"$(nproc)"
shopt -s nullglob
status=0
for exe in "$build"/*_fuzz; do
  name=$(basename "$exe")
  corpus="$build/corpus/$name"; mkdir -p "$corpus"
  seeds=("$root/fuzz/corpus/$name")
  [ -d "${seeds[0]}" ] || seeds=()
  echo "fuzz: $name for ${seconds}s"
  if ! "$exe" -max_total_time="$seconds" -rss_limit_mb=2048 -print_final_stats=0 "$corpus" "${seeds[@]}" \
        > "$build/$name.log" 2>&1; then
    echo "fuzz: $name FAILED"; tail -40 "$build/$name.log"; status=1
  fi
done
exit $status
