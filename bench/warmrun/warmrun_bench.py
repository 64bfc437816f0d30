#!/usr/bin/env python3
"""Warm start benchmark (doc/warm-start.md). Medians over --runs runs of:
  (b) supermachine run IMAGE true            default path: restore the cached snapshot
                                              (where the engine can snapshot; see notes)
  (c) supermachine run --no-snapshot IMAGE true   cold boot of the same image
  (d) QEMU's own restore: qemu-system-x86_64 -incoming "exec:cat FILE" of a migration
      saved from the same kernel (busybox initramfs, QEMU's own devices only), same
      machine options as our engine, to the first console line printed after resume.
usage: warmrun_bench.py --cli build/bin/supermachine --image oci:/tmp/w/img:busybox [--runs 10]
"""
import argparse, glob, json, os, shutil, socket, statistics, subprocess, sys, tempfile, time


def kernel_path():
    d = os.environ.get("SUPERMACHINE_KERNEL_DIR")
    if not d:
        cache = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
        d = os.path.join(cache, "supermachine", "kernels", "current")
    found = glob.glob(os.path.join(d, "boot", "vmlinuz-*"))
    if not found:
        sys.exit("no kernel cached (bash scripts/fetch-kernel.sh)")
    return found[0]


def time_cli(cli, args, runs, label):
    times, notes = [], set()
    for _ in range(runs):
        t = time.monotonic()
        p = subprocess.run([cli, "run"] + args, capture_output=True, text=True, timeout=300)
        times.append(time.monotonic() - t)
        if p.returncode != 0:
            sys.exit(f"{label}: exit {p.returncode}: {p.stderr}")
        for line in p.stderr.splitlines():
            if "snapshot" in line:
                notes.add(line.strip())
    return times, notes


def make_initramfs(work):
    root = os.path.join(work, "root")
    os.makedirs(os.path.join(root, "bin"))
    os.makedirs(os.path.join(root, "dev"))
    shutil.copy("/bin/busybox", os.path.join(root, "bin", "busybox"))
    with open(os.path.join(root, "init"), "w") as f:
        f.write("#!/bin/busybox sh\n/bin/busybox mount -t proc proc /proc 2>/dev/null\n"
                "echo READY\nn=0\nwhile :; do n=$((n+1)); echo tick $n; /bin/busybox sleep 0.02; done\n")
    os.chmod(os.path.join(root, "init"), 0o755)
    os.makedirs(os.path.join(root, "proc"))
    out = os.path.join(work, "initramfs.cpio")
    subprocess.run(f"cd {root} && find . | cpio -o -H newc --quiet > {out}", shell=True, check=True)
    return out


def qemu_args(kernel, initrd, qmp, memory):
    m = f"{memory}M"
    return ["qemu-system-x86_64", "-M", "microvm,acpi=on,memory-backend=mem", "-m", m,
            "-object", f"memory-backend-memfd,id=mem,size={m},share=on", "-smp", "1",
            "-nodefaults", "-no-user-config", "-nographic", "-serial", "stdio", "-monitor", "none",
            "-no-reboot", "-global", "virtio-mmio.force-legacy=false", "-kernel", kernel,
            "-append", "console=ttyS0 quiet panic=-1 reboot=t rdinit=/init",
            "-accel", "tcg", "-icount", "shift=auto", "-initrd", initrd,
            "-qmp", f"unix:{qmp},server=on,wait=off"]


def qmp_command(path, command, arguments=None):
    s = socket.socket(socket.AF_UNIX)
    s.connect(path)
    f = s.makefile("rw")
    f.readline()
    f.write(json.dumps({"execute": "qmp_capabilities"}) + "\n"); f.flush(); f.readline()
    msg = {"execute": command}
    if arguments:
        msg["arguments"] = arguments
    f.write(json.dumps(msg) + "\n"); f.flush()
    while True:
        reply = json.loads(f.readline())
        if "return" in reply or "error" in reply:
            s.close()
            return reply


def wait_line(proc, prefix, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            return False
        if line.startswith(prefix):
            return True
    return False


def qemu_restore(runs, memory):
    work = tempfile.mkdtemp(prefix="warmrun-bench-")
    try:
        kernel = kernel_path()
        initrd = make_initramfs(work)
        qmp = os.path.join(work, "qmp.sock")
        image = os.path.join(work, "migration")
        boot = subprocess.Popen(qemu_args(kernel, initrd, qmp, memory), stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        if not wait_line(boot, "READY", 120):
            sys.exit("busybox guest did not come up")
        wait_line(boot, "tick", 30)
        qmp_command(qmp, "migrate", {"uri": f"exec:cat > {image}"})
        while qmp_command(qmp, "query-migrate")["return"].get("status") != "completed":
            time.sleep(0.05)
        boot.kill(); boot.wait()
        size = os.path.getsize(image)
        times = []
        for i in range(runs):
            sock = os.path.join(work, f"q{i}.sock")
            t = time.monotonic()
            p = subprocess.Popen(qemu_args(kernel, initrd, sock, memory) +
                                 ["-incoming", f"exec:cat {image}"], stdin=subprocess.DEVNULL,
                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            ok = wait_line(p, "tick", 60)
            times.append(time.monotonic() - t)
            p.kill(); p.wait()
            if not ok:
                sys.exit("QEMU restore printed nothing")
        return times, size
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cli", default="build/bin/supermachine")
    ap.add_argument("--image", required=True)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--memory", type=int, default=512)
    a = ap.parse_args()
    med = lambda xs: statistics.median(xs) * 1000
    # Prime: the first default run creates the snapshot (or learns that it cannot).
    subprocess.run([a.cli, "run", a.image, "true"], timeout=300)
    b, b_notes = time_cli(a.cli, [a.image, "true"], a.runs, "b")
    c, _ = time_cli(a.cli, ["--no-snapshot", a.image, "true"], a.runs, "c")
    d, d_size = qemu_restore(a.runs, a.memory)
    warm = any("restored" in n for n in b_notes)
    print(f"runs: {a.runs}; memory {a.memory} MiB; QEMU TCG; medians")
    print("| | median | vs (d) |")
    print("|---|---|---|")
    print(f"| (b) run IMAGE true, default path{' (warm)' if warm else ' (engine refused: cold)'} "
          f"| {med(b):.0f} ms | {med(d)/med(b):.2f}x |")
    print(f"| (c) run --no-snapshot IMAGE true (cold) | {med(c):.0f} ms | {med(d)/med(c):.2f}x |")
    print(f"| (d) QEMU's own -incoming restore ({d_size >> 20} MiB stream) | {med(d):.0f} ms | 1.00x |")
    print(f"(b)/(c): {med(b)/med(c):.2f}")
    for n in sorted(b_notes):
        print("note:", n)


if __name__ == "__main__":
    main()
