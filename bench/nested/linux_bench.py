#!/usr/bin/env python3
"""Linux on our kvm engine against QEMU `-M microvm -accel kvm`, same kernel,
same initramfs, same memory, same kernel command line, in the same run.

Runs where KVM runs Linux; on this development host that is inside the
nested harness (an L1 under QEMU TCG with an emulated SVM CPU):

    scripts/nested-kvm.sh python3 bench/nested/linux_bench.py --runs 5

Rows (medians of --runs, both engines alternating):
  cold boot   process start -> the kernel's first line ("Linux version", not
              QEMU's real-mode setup stub's "Probing EDD", which we skip
              by entering the 64-bit kernel directly), -> /init, -> exit
  restore     process start -> first console line of a restored guest
              (ours: `supermachine restore F` of `boot --snapshot-to F`;
               QEMU: `-incoming "exec:cat F"` of an HMP `migrate` of the
               same guest, booted and saved the same way)
  memory      the VMM's resident memory outside guest RAM, while the
              restored guest runs (smaps: every mapping but guest RAM),
              anonymous apart from file-backed (program and libraries)

Absolute times inside the harness are nested-TCG times; the ratio is the
figure to compare (doc/benchmarks.md, doc/nested-kvm.md).
"""
import argparse
import glob
import os
import re
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

INIT_MARKER = "BENCH-INIT-REACHED"


def kernel_path():
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.environ["HOME"], ".cache")
    found = sorted(glob.glob(os.path.join(cache, "supermachine/kernels/current/boot/vmlinuz-*")))
    if not found:
        sys.exit("linux_bench: no kernel in the cache (scripts/fetch-kernel.sh)")
    return found[0]


def make_initramfs(path, script):
    """busybox + /init; no modules (no devices needed), so /init runs at once."""
    root = tempfile.mkdtemp(prefix="bench-initramfs-")
    try:
        for d in ("bin", "dev", "proc", "sys"):
            os.makedirs(os.path.join(root, d))
        shutil.copy("/bin/busybox", os.path.join(root, "bin/busybox"))
        for applet in ("sh", "mount", "echo", "sleep", "poweroff"):
            os.symlink("busybox", os.path.join(root, "bin", applet))
        with open(os.path.join(root, "init"), "w") as f:
            f.write("#!/bin/sh\nexport PATH=/bin\nmount -t proc proc /proc\n" + script)
        os.chmod(os.path.join(root, "init"), 0o755)
        subprocess.run(f"cd {root} && find . | cpio -o -H newc --quiet | gzip -1 > {path}",
                       shell=True, check=True)
    finally:
        shutil.rmtree(root)


class timed_process:
    """A VMM process whose stdout is watched for markers, timed from its start."""

    def __init__(self, argv):
        self.start = time.monotonic()
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL)
        self.output = b""

    def wait_for(self, marker, timeout=300.0):
        """ms from process start until `marker` (bytes) is in the output; None at EOF/timeout."""
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while marker not in self.output:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                return None
            self.output += chunk.replace(b"\r", b"")  # the guest's tty writes CRLF
        return (time.monotonic() - self.start) * 1000

    def wait_exit(self, timeout=300.0):
        while self.wait_for(b"\x00never\x00", timeout) is not None:
            pass
        self.proc.wait(timeout=timeout)
        return (time.monotonic() - self.start) * 1000

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def rss_outside_guest_kib(pid, guest_mib):
    """Resident KiB outside guest RAM (one mapping >= its size), as (anonymous,
    file-backed): heap, stacks and private data, vs program and library text
    shared with every other process running them."""
    anon, files, size, is_file = 0, 0, 0, False
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            fields = line.split()
            if len(fields) >= 5 and "-" in fields[0] and ":" in fields[3]:  # a mapping's header
                is_file = fields[4] != "0"  # its inode
            elif line.startswith("Size:"):
                size = int(fields[1])
            elif line.startswith("Rss:") and size < guest_mib * 1024:
                if is_file:
                    files += int(fields[1])
                else:
                    anon += int(fields[1])
    return anon, files


def qemu_argv(kernel, initrd, cmdline, mib, extra=()):
    return ["qemu-system-x86_64", "-M", "microvm,acpi=on", "-accel", "kvm", "-cpu", "host",
            "-m", str(mib), "-nodefaults", "-no-user-config", "-display", "none",
            "-serial", "stdio", "-no-reboot", "-kernel", kernel, "-initrd", initrd,
            "-append", cmdline, *extra]


def ours_argv(cli, kernel, initrd, cmdline, mib, extra=()):
    return [cli, "boot", "--engine", "kvm", "--kernel", kernel, "--initrd", initrd,
            "--cmdline", cmdline, "--memory", str(mib), *extra]


def hmp(sock_path, command, timeout=120.0):
    """One HMP command over a monitor socket; returns what QEMU answered."""
    s = socket.socket(socket.AF_UNIX)
    s.connect(sock_path)
    s.settimeout(timeout)
    out = b""
    while b"(qemu)" not in out:
        out += s.recv(4096)
    s.sendall(command.encode() + b"\n")
    out = b""
    while out.count(b"(qemu)") < 1:
        out += s.recv(4096)
    s.close()
    return out.decode(errors="replace")


def save_qemu_snapshot(kernel, initrd, cmdline, mib, workdir, path):
    monitor = os.path.join(workdir, "monitor.sock")
    p = timed_process(qemu_argv(kernel, initrd, cmdline, mib,
                                ["-monitor", f"unix:{monitor},server=on,wait=off"]))
    try:
        if p.wait_for(b"count=20\n") is None:
            sys.exit("linux_bench: QEMU's guest did not count:\n"
                     + p.output.decode(errors="replace")[-2000:])
        # Migrated running (no `stop` first): the stream's global state then
        # says "running", so `-incoming` resumes the guest by itself.
        hmp(monitor, f'migrate "exec:cat > {path}"')
        for _ in range(6000):
            if "completed" in hmp(monitor, "info migrate"):
                break
            time.sleep(0.05)
        else:
            sys.exit("linux_bench: QEMU's migration did not complete")
    finally:
        p.kill()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cli", default="build/bin/supermachine")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--memory", type=int, default=256, help="guest MiB")
    args = ap.parse_args()
    cli = os.path.abspath(args.cli)
    kernel = kernel_path()
    work = tempfile.mkdtemp(prefix="linux-bench-")
    try:
        boot_initrd = os.path.join(work, "boot.cpio.gz")
        count_initrd = os.path.join(work, "count.cpio.gz")
        make_initramfs(boot_initrd, f"echo {INIT_MARKER}\npoweroff -f\n")
        make_initramfs(count_initrd, f"echo {INIT_MARKER}\n"
                       "i=0; while true; do i=$((i+1)); echo count=$i; sleep 0.1; done\n")
        cmdline = "console=ttyS0 panic=-1"
        mib = args.memory

        # Cold boot, alternating.
        cold = {"ours": [], "qemu": []}
        for _ in range(args.runs):
            for name in ("ours", "qemu"):
                argv = (ours_argv(cli, kernel, boot_initrd, cmdline, mib) if name == "ours"
                        else qemu_argv(kernel, boot_initrd, cmdline, mib))
                p = timed_process(argv)
                first = p.wait_for(b"Linux version")
                init = p.wait_for(INIT_MARKER.encode())
                end = p.wait_exit()
                if init is None or p.proc.returncode != 0:
                    sys.exit(f"linux_bench: {name} cold boot failed ({p.proc.returncode}):\n"
                             + p.output.decode(errors="replace")[-2000:])
                cold[name].append((first, init, end))

        # Snapshots of the counting guest, each VMM's own.
        ours_snap = os.path.join(work, "ours.snap")
        qemu_snap = os.path.join(work, "qemu.migration")
        p = timed_process(ours_argv(cli, kernel, count_initrd, cmdline, mib,
                                    ["--snapshot-after-ms", "20000", "--snapshot-to", ours_snap]))
        p.wait_exit()
        if not os.path.exists(ours_snap):
            sys.exit("linux_bench: no snapshot from `boot --snapshot-to`:\n"
                     + p.output.decode(errors="replace")[-2000:])
        save_qemu_snapshot(kernel, count_initrd, cmdline, mib, work, qemu_snap)

        restore = {"ours": [], "qemu": []}
        memory = {"ours": [], "qemu": []}
        for _ in range(args.runs):
            for name in ("ours", "qemu"):
                argv = ([cli, "restore", ours_snap] if name == "ours"
                        else qemu_argv(kernel, count_initrd, cmdline, mib,
                                       ["-incoming", f"exec:cat {qemu_snap}"]))
                p = timed_process(argv)
                first = p.wait_for(b"count=", 120)
                if first is None:
                    sys.exit(f"linux_bench: {name} restore printed nothing:\n"
                             + p.output.decode(errors="replace")[-2000:])
                # Let it run 10 more counts (1 s) before reading its memory.
                at = p.output.index(b"count=")
                while b"\n" not in p.output[at:] and p.wait_for(b"\x00", 0.1) is None \
                        and p.proc.poll() is None:
                    pass  # the rest of the first count line
                n = int(re.match(rb"count=(\d+)\n", p.output[at:]).group(1))
                p.wait_for(b"count=%d\n" % (n + 10), 60)
                memory[name].append(rss_outside_guest_kib(p.proc.pid, mib))
                p.kill()
                restore[name].append(first)

        med = lambda xs: statistics.median(xs)
        print(f"nested (TCG + SVM), Linux {os.path.basename(kernel)[8:]}, {mib} MiB, "
              f"medians of {args.runs}")
        print(f"{'':34}{'ours':>10}{'QEMU':>10}{'ours/QEMU':>11}")
        for i, what in enumerate(("cold boot -> kernel's first line",
                                  "cold boot -> /init", "cold boot -> exit (power-off)")):
            o, q = med([r[i] for r in cold["ours"]]), med([r[i] for r in cold["qemu"]])
            print(f"{what:34}{o:9.0f}ms{q:9.0f}ms{o / q:10.2f}x")
        o, q = med(restore["ours"]), med(restore["qemu"])
        print(f"{'restore -> first console line':34}{o:9.0f}ms{q:9.0f}ms{o / q:10.2f}x"
              f"  (ours {q / o:.1f}x faster)")
        for i, what in enumerate(("VMM memory beyond guest RAM: anon",
                                  "  + program and libraries (shared)")):
            o, q = med([m[i] for m in memory["ours"]]), med([m[i] for m in memory["qemu"]])
            print(f"{what:34}{o / 1024:8.1f}MiB{q / 1024:7.1f}MiB{o / q:10.2f}x")
        print(f"snapshot files: ours {os.path.getsize(ours_snap) >> 20} MiB, "
              f"QEMU {os.path.getsize(qemu_snap) >> 20} MiB")
    finally:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
