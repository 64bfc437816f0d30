#!/bin/bash
# Where a warm `run --engine kvm IMAGE true` spends its time, inside the L1:
#   scripts/nested-kvm.sh -- bench/nested/trace_warm.sh [IMAGE]
# One cold run (writes the snapshot), three warm runs with SUPERMACHINE_TRACE
# (milestones on stderr) and their wall time, then the CLI's bare process
# cost (`supermachine version`). doc/benchmarks.md has the figures.
root=$(cd "$(dirname "$0")/../.." && pwd)
cli=$root/build/bin/supermachine
image=${1:-oci:$HOME/.cache/supermachine/demo-image:busybox}
export XDG_CACHE_HOME=$(mktemp -d /tmp/trace-warm.XXXX)
export SUPERMACHINE_KERNEL_DIR=${SUPERMACHINE_KERNEL_DIR:-$HOME/.cache/supermachine/kernels/current}
export SUPERMACHINE_AGENT=${SUPERMACHINE_AGENT:-$root/build/bin/supermachine-agent}
seconds() { date +%s.%N; }
"$cli" run --engine kvm "$image" true; echo "cold: status $?"
for i in 1 2 3; do
    start=$(seconds)
    SUPERMACHINE_TRACE=1 "$cli" run --engine kvm "$image" true
    status=$?
    echo "warm $i: status $status, wall $(echo "$(seconds) - $start" | bc) s"
done
start=$(seconds); "$cli" version >/dev/null 2>&1
echo "supermachine version: wall $(echo "$(seconds) - $start" | bc) s"
rm -rf "$XDG_CACHE_HOME"
