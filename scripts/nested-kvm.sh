#!/usr/bin/env bash
# nested-kvm.sh [--memory MiB] [--] CMD [ARG...]
#
# Runs CMD as root inside an L1 Linux VM whose /dev/kvm runs Linux, and exits
# with CMD's status. This host's own /dev/kvm is kvm_pvm (it cannot run Linux),
# but Debian's cloud kernel under QEMU TCG with an emulated AMD CPU with SVM
# loads kvm_amd with nested paging: a slow but real KVM (doc/nested-kvm.md).
#
# Inside, the host's / is visible at the same paths (virtio-fs through
# Debian's virtiofsd, read-only, with a tmpfs overlay for writes, so the host
# sees none of them); CMD runs in the caller's current directory with the
# caller's PATH, HOME, XDG_CACHE_HOME, LANG, LC_ALL and every SUPERMACHINE_*
# variable (NESTED_KVM_ENV="A B" passes more by name), and TMPDIR=/tmp
# (writable like everything else: the overlay).
# CMD's stdout and stderr come out on ours, as written (two virtio-console
# ports); the L1 kernel's console goes to a log shown only on failure.
#
# Bounded: an L1 that prints nothing for NESTED_KVM_BOOT_TIMEOUT seconds
# (default 60) is killed and tried once more; then one line says so (exit 125).
# Nothing stays behind: QEMU and virtiofsd die with this script (parent-death
# signal, even on SIGKILL), the temporary directory is removed on exit, and
# ones left by a killed run are removed by the next one.
#
# Exit statuses: CMD's; 125 when the harness itself failed (missing tool,
# kernel, kvm_amd not loading, L1 not coming up).
set -uo pipefail

memory_mib=${NESTED_KVM_MEMORY_MIB:-3072}
boot_timeout=${NESTED_KVM_BOOT_TIMEOUT:-60}
while (($#)); do
  case "$1" in
    --memory) memory_mib=$2; shift 2 ;;
    --memory=*) memory_mib=${1#--memory=}; shift ;;
    --) shift; break ;;
    -h|--help) sed -n '2,25p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) break ;;
  esac
done
fail() { echo "nested-kvm: $*" >&2; exit 125; }
(($#)) || fail "usage: nested-kvm.sh [--memory MiB] [--] CMD [ARG...]"
[[ $memory_mib =~ ^[0-9]+$ ]] && ((memory_mib >= 512)) || fail "--memory wants MiB >= 512, not '$memory_mib'"

qemu=$(command -v qemu-system-x86_64) || fail "qemu-system-x86_64 not found (apt-get install qemu-system-x86; scripts/install-deps.sh)"
virtiofsd=${NESTED_KVM_VIRTIOFSD:-/usr/lib/qemu/virtiofsd}
[ -x "$virtiofsd" ] || fail "virtiofsd not found at $virtiofsd (apt-get install qemu-system-common)"
busybox=$(command -v busybox) || fail "busybox not found (apt-get install busybox-static)"
command -v cpio >/dev/null || fail "cpio not found (apt-get install cpio)"
command -v setpriv >/dev/null || fail "setpriv not found (apt-get install util-linux)"
[ "$(id -u)" -eq 0 ] || fail "must run as root (virtiofsd shares / with sandbox=chroot)"

# The L1 kernel: the guest kernel cache scripts/fetch-kernel.sh fills.
cache=${XDG_CACHE_HOME:-$HOME/.cache}/supermachine/kernels/current
kernel=${NESTED_KVM_KERNEL:-$(ls "$cache"/boot/vmlinuz-* 2>/dev/null | head -n1)}
[ -n "$kernel" ] && [ -r "$kernel" ] || fail "no L1 kernel in $cache/boot (run scripts/fetch-kernel.sh)"
release=$(basename "$kernel"); release=${release#vmlinuz-}
modules=$(dirname "$kernel")/../lib/modules/$release/kernel
# Load order matters: virtio before virtio_ring fails on virtio_break_device.
l1_modules=(virt/lib/irqbypass arch/x86/kvm/kvm arch/x86/kvm/kvm-amd
            drivers/virtio/virtio_ring drivers/virtio/virtio drivers/virtio/virtio_mmio
            drivers/char/virtio_console fs/fuse/fuse fs/fuse/virtiofs fs/overlayfs/overlay)
for m in "${l1_modules[@]}"; do
  [ -r "$modules/$m.ko" ] || fail "kernel module $m.ko missing under $modules"
done

# Under TCG the L1's TSC is the host's. On a loaded host its calibration
# against the PIT fails ("Unable to calibrate against PIT ... Marking TSC
# unstable") and the kernel then hangs silently for minutes (the hang the
# issue saw in 2 of 15 boots; measured here beside a 2-job build: 2 of 2).
# So tell it the rate (lpj for Debian's HZ=250), as the qemu engine does.
tsc_khz=${NESTED_KVM_TSC_KHZ:-}
if [ -z "$tsc_khz" ]; then
  mhz=$(dmesg 2>/dev/null | sed -n 's/.*tsc: Refined TSC clocksource calibration: \([0-9.]*\) MHz.*/\1/p' | tail -n1)
  [ -n "$mhz" ] || mhz=$(dmesg 2>/dev/null | sed -n 's/.*tsc: Detected \([0-9.]*\) MHz.*/\1/p' | tail -n1)
  [ -n "$mhz" ] || ! grep -qw constant_tsc /proc/cpuinfo ||
    mhz=$(awk -F: '/^cpu MHz/ {print $2; exit}' /proc/cpuinfo)
  [ -n "$mhz" ] && tsc_khz=$(awk "BEGIN{printf \"%d\", $mhz * 1000}")
fi
timer_args=""
[[ $tsc_khz =~ ^[0-9]+$ ]] && ((tsc_khz > 100000 && tsc_khz < 10000000)) &&
  timer_args="tsc_early_khz=$tsc_khz lpj=$((tsc_khz * 4))"

# A directory per run, named after our PID so a later run can tell a
# killed run's leftovers (dead PID) from a live run's.
base=${NESTED_KVM_RUNTIME_DIR:-/tmp}
for stale in "$base"/nested-kvm.*; do
  [ -d "$stale" ] || continue
  pid=${stale##*.}
  [[ $pid =~ ^[0-9]+$ ]] && ! kill -0 "$pid" 2>/dev/null && rm -rf "$stale"
done
run=$base/nested-kvm.$$
rm -rf "$run"; mkdir -p "$run" || fail "cannot create $run"

children=()
cleanup() {
  trap - EXIT INT TERM HUP
  for pid in "${children[@]}"; do kill -KILL "$pid" 2>/dev/null; done
  wait 2>/dev/null
  rm -rf "$run"
}
trap cleanup EXIT
trap 'cleanup; exit 130' INT
trap 'cleanup; exit 143' TERM
trap 'cleanup; exit 129' HUP

# What runs inside: the command line, quoted, in the caller's directory and
# environment. The L1 reads it from $run through the shared root.
{
  printf 'cd %q || exit 125\n' "$PWD"
  env_names=(PATH HOME XDG_CACHE_HOME LANG LC_ALL ${NESTED_KVM_ENV:-})
  while IFS='=' read -r name _; do
    [[ $name == SUPERMACHINE_* ]] && env_names+=("$name")
  done < <(env)
  for name in "${env_names[@]}"; do
    [ -n "${!name+x}" ] && printf 'export %s=%q\n' "$name" "${!name}"
  done
  printf 'export NESTED_KVM=1 TMPDIR=/tmp\n'
  printf 'exec'; printf ' %q' "$@"; printf '\n'
} > "$run/command.sh"

# The L1's initramfs: busybox, the modules, and /init.
mkdir -p "$run/initramfs/bin" "$run/initramfs/modules"
cp "$busybox" "$run/initramfs/bin/busybox"
for m in "${l1_modules[@]}"; do cp "$modules/$m.ko" "$run/initramfs/modules/"; done
cat > "$run/initramfs/init" <<'INIT'
#!/bin/busybox sh
# L1 PID 1: KVM, the host's root (read-only) under a tmpfs overlay, then CMD.
b=/bin/busybox
$b mkdir -p /proc /sys /dev /host /rw /merged
$b mount -t proc proc /proc; $b mount -t sysfs sys /sys; $b mount -t devtmpfs dev /dev
echo "nested-kvm: L1 up"
dir=$($b sed -n 's/.*nested\.dir=\([^ ]*\).*/\1/p' /proc/cmdline)
say() { echo "nested-kvm: $*"; }
finish() { echo "$1" > "$status_port"; $b sync; $b poweroff -f; }
for m in irqbypass kvm kvm-amd virtio_ring virtio virtio_mmio virtio_console fuse virtiofs overlay; do
  $b insmod /modules/$m.ko || say "insmod $m failed"
done
# The status port first: every failure below is reported through it.
status_port=/dev/null
for p in /sys/class/virtio-ports/*; do
  [ "$($b cat $p/name 2>/dev/null)" = status ] && status_port=/dev/${p##*/}
done
[ -c /dev/kvm ] || { say "no /dev/kvm after loading kvm-amd:"; $b dmesg | $b grep -i -e kvm -e svm; finish kvm; }
$b mount -t virtiofs -o ro host /host || { say "cannot mount the host's root"; finish mount; }
$b mount -t tmpfs -o mode=0755 rw /rw && $b mkdir -p /rw/upper /rw/work
$b mount -t overlay overlay -o lowerdir=/host,upperdir=/rw/upper,workdir=/rw/work /merged ||
  { say "overlay failed"; finish mount; }
$b mount -t proc proc /merged/proc; $b mount -t sysfs sys /merged/sys
$b mount -t devtmpfs dev /merged/dev
$b mkdir -p /merged/dev/pts /merged/dev/shm
$b mount -t devpts -o ptmxmode=0666,newinstance devpts /merged/dev/pts
$b mount -t tmpfs shm /merged/dev/shm
$b mount -t tmpfs run /merged/run 2>/dev/null
$b ip link set lo up 2>/dev/null
$b hostname nested-kvm
out=/dev/null; err=/dev/null
for p in /sys/class/virtio-ports/*; do
  case "$($b cat $p/name)" in out) out=/dev/${p##*/} ;; err) err=/dev/${p##*/} ;; esac
done
say "running"
$b chroot /merged /bin/bash "$dir/command.sh" < /dev/null > "$out" 2> "$err"
finish $?
INIT
chmod +x "$run/initramfs/init"
(cd "$run/initramfs" && find . | cpio -o -H newc --quiet | gzip -1 > "$run/l1.cpio.gz") ||
  fail "cannot build the L1 initramfs"
rm -rf "$run/initramfs"
mkfifo "$run/out" "$run/err"

boot_l1() {
  : > "$run/console.log"; rm -f "$run/status" "$run/virtiofs.sock"
  # Relays from the console ports to our stdout and stderr (anew per try:
  # a killed QEMU's closing end is their EOF).
  cat "$run/out" & out_relay=$!; children+=("$out_relay")
  cat "$run/err" >&2 & err_relay=$!; children+=("$err_relay")
  setpriv --pdeathsig KILL -- "$virtiofsd" --socket-path="$run/virtiofs.sock" \
    -o source=/ -o cache=none -o sandbox=chroot > "$run/virtiofsd.log" 2>&1 &
  virtiofsd_pid=$!; children+=("$virtiofsd_pid")
  for _ in $(seq 100); do [ -S "$run/virtiofs.sock" ] && break; sleep 0.05; done
  [ -S "$run/virtiofs.sock" ] || { cat "$run/virtiofsd.log" >&2; fail "virtiofsd did not start"; }
  setpriv --pdeathsig KILL -- "$qemu" -M microvm,acpi=on,memory-backend=mem \
    -accel tcg -cpu EPYC,+svm -smp 1 -m "${memory_mib}M" \
    -object memory-backend-memfd,id=mem,size="${memory_mib}M",share=on \
    -global virtio-mmio.force-legacy=false \
    -nodefaults -no-user-config -nographic -no-reboot \
    -serial "file:$run/console.log" \
    -kernel "$kernel" -initrd "$run/l1.cpio.gz" \
    -append "console=ttyS0 earlyprintk=serial panic=-1 $timer_args nested.dir=$run" \
    -chardev socket,id=vfs,path="$run/virtiofs.sock" -device vhost-user-fs-device,chardev=vfs,tag=host \
    -device virtio-serial-device,max_ports=4 \
    -chardev file,id=out,path="$run/out" -device virtserialport,chardev=out,name=out \
    -chardev file,id=err,path="$run/err" -device virtserialport,chardev=err,name=err \
    -chardev file,id=status,path="$run/status" -device virtserialport,chardev=status,name=status \
    > "$run/qemu.log" 2>&1 &
  qemu_pid=$!; children+=("$qemu_pid")
}

# Waits until the L1 says it is up (a line from its /init) or goes silent.
# A kernel that printed nothing at all in the bound is the hang the issue
# saw; one that prints but is slow is given the bound again from its last byte.
wait_until_up() {
  local waited=0 last_size=0 size
  while ((waited < boot_timeout * 10)); do
    grep -q '^nested-kvm: L1 up' "$run/console.log" 2>/dev/null && return 0
    kill -0 "$qemu_pid" 2>/dev/null || return 2
    size=$(stat -c %s "$run/console.log" 2>/dev/null || echo 0)
    if ((size != last_size)); then last_size=$size; waited=0; fi
    sleep 0.1; waited=$((waited + 1))
  done
  return 1
}

started=$EPOCHREALTIME
for attempt in 1 2; do
  boot_l1
  wait_until_up; up=$?
  ((up == 0)) && break
  kill -KILL "$qemu_pid" "$virtiofsd_pid" "$out_relay" "$err_relay" 2>/dev/null
  wait "$qemu_pid" "$virtiofsd_pid" "$out_relay" "$err_relay" 2>/dev/null
  if ((up == 2)); then
    tail -n 20 "$run/qemu.log" "$run/console.log" >&2
    fail "QEMU exited before the L1 came up"
  fi
  echo "nested-kvm: L1 printed nothing for ${boot_timeout} s (attempt $attempt)$( ((attempt == 1)) && echo ', retrying')" >&2
  ((attempt == 2)) && { tail -n 20 "$run/console.log" >&2; fail "L1 did not come up"; }
done

wait "$qemu_pid"
wait "$out_relay" "$err_relay" 2>/dev/null
status=$(tr -dc '0-9a-z' < "$run/status" 2>/dev/null)
case "$status" in
  ''|*[!0-9]*)
    tail -n 30 "$run/console.log" >&2
    case "$status" in
      kvm) fail "kvm_amd did not give a /dev/kvm in the L1 (console above)" ;;
      mount) fail "the L1 could not mount the host's root over virtio-fs (console above)" ;;
      *) fail "the L1 ended without CMD's exit status (console above)" ;;
    esac ;;
esac
[ -n "${NESTED_KVM_VERBOSE:-}" ] &&
  echo "nested-kvm: done in $(awk "BEGIN{printf \"%.1f\", $EPOCHREALTIME - $started}") s, status $status" >&2
exit "$status"
