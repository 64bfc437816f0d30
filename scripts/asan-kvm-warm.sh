#!/bin/bash
# The kvm engine's warm path under AddressSanitizer + UBSan, in the nested
# L1 (scripts/nested-kvm.sh): a cold run that writes the container, warm
# runs restoring it, two clones at once, `snapshot -o DIR`, `restore DIR`,
# `restore --snapshot-to`, then a corrupted and a truncated container
# (refused, 125) and a truncated cache entry (rebuilt). Fails on any
# sanitizer report or unexpected exit status. Builds the instrumented CLI in
# build-asan/ first (≈ 20 min on 2 cores; only the CLI).
# Usage: scripts/asan-kvm-warm.sh [IMAGE]   (default: the demo image)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
image=${1:-oci:$HOME/.cache/supermachine/demo-image:busybox}
if [ "${1:-}" != --inside ]; then
    cmake -S "$root" -B "$root/build-asan" -G Ninja -DCMAKE_BUILD_TYPE=Debug \
        -DSUPERMACHINE_BUILD_TESTS=OFF -DSUPERMACHINE_BUILD_EXAMPLES=OFF -DSUPERMACHINE_BUILD_BENCH=OFF \
        -DCMAKE_CXX_FLAGS="-fsanitize=address,undefined -fno-omit-frame-pointer -O1" \
        -DCMAKE_EXE_LINKER_FLAGS="-fsanitize=address,undefined" >/dev/null
    ninja -C "$root/build-asan" supermachine
    [ -x "$root/build/bin/supermachine-agent" ] || ninja -C "$root/build" supermachine-agent
    log=$(mktemp)
    SUPERMACHINE_AGENT="$root/build/bin/supermachine-agent" \
        "$root/scripts/nested-kvm.sh" --memory 6144 -- "$root/scripts/asan-kvm-warm.sh" --inside "$image" | tee "$log"
    if grep -q "Sanitizer\|runtime error" "$log"; then echo "FAIL: sanitizer report"; exit 1; fi
    if grep -q "^UNEXPECTED" "$log"; then echo "FAIL: unexpected status"; exit 1; fi
    echo "PASS: no sanitizer report, every status as expected"
    exit 0
fi
image=$2
cli=$root/build-asan/bin/supermachine
export XDG_CACHE_HOME=$(mktemp -d /tmp/asan-kvm-warm.XXXX)
export SUPERMACHINE_KERNEL_DIR=${SUPERMACHINE_KERNEL_DIR:-$HOME/.cache/supermachine/kernels/current}
export SUPERMACHINE_AGENT=$root/build/bin/supermachine-agent
export ASAN_OPTIONS=detect_leaks=1:halt_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
set +e
expect() { # STATUS CMD...: run, and say so when the status differs
    local want=$1; shift
    "$@"; local got=$?
    [ "$got" = "$want" ] || echo "UNEXPECTED: status $got (want $want): $*"
}
expect 0 "$cli" run --engine kvm "$image" sh -c 'echo cold-ok'
expect 0 "$cli" run --engine kvm "$image" sh -c 'echo warm-ok; head -c 16 /dev/urandom | od -An -tx1'
expect 5 "$cli" run --engine kvm "$image" sh -c 'exit 5'
"$cli" run --engine kvm "$image" sh -c 'echo clone-a' & a=$!
expect 0 "$cli" run --engine kvm "$image" sh -c 'echo clone-b'
wait $a || echo "UNEXPECTED: the first clone failed"
dir=$XDG_CACHE_HOME/snapdir
expect 0 "$cli" snapshot -q -o "$dir" "$image"
expect 0 "$cli" restore -q "$dir" -- sh -c 'echo restored-ok'
expect 0 "$cli" restore -q --snapshot-to "$dir.next" "$dir" -- sh -c 'echo mark > /tmp/m'
expect 0 "$cli" restore -q "$dir.next" -- cat /tmp/m
printf '\xff\xff\xff\xff' | dd of="$dir/machine.snap" bs=1 seek=64 conv=notrunc 2>/dev/null
expect 125 "$cli" restore -q "$dir" -- true
truncate -s 10000 "$dir/machine.snap"
expect 125 "$cli" restore -q "$dir" -- true
find "$XDG_CACHE_HOME/supermachine/snapshots" -name machine.snap -exec truncate -s 5000 {} \;
expect 0 "$cli" run --engine kvm "$image" sh -c 'echo rebuilt-ok'
rm -rf "$XDG_CACHE_HOME"
