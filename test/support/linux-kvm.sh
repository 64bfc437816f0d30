#!/usr/bin/env bash
# How CTest runs a test labelled linux-kvm (one that needs Linux on our kvm
# engine): directly where the host's KVM runs Linux, else inside an L1 Linux
# whose KVM does (scripts/nested-kvm.sh: QEMU TCG with an emulated SVM CPU).
# The rule is backend::host_kvm_runs_linux()'s: a usable /dev/kvm that is
# not kvm_pvm. So such a test never skips for want of KVM.
if [ -r /dev/kvm ] && [ -w /dev/kvm ] && [ ! -e /sys/module/kvm_pvm ]; then
  exec "$@"
fi
exec "$(dirname "$0")/../../scripts/nested-kvm.sh" -- "$@"
