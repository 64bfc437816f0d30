#!/usr/bin/env python3
"""Warm start benchmark (doc/warm-start.md). Medians over --runs runs of:
  (a) restore to agent ready: vm::async_restore from QEMU's start to the
      agent's hello_ok + reseed + set_clock (the run's own stderr line), and
      the whole async_restore (validation included)
  (b) supermachine run IMAGE true            end to end, warm (restores the cached snapshot)
  (c) supermachine run --no-snapshot IMAGE true   cold boot of the same image
  (d) QEMU's own restore of the same guest: a normal migration (RAM in the
      stream) saved from a running restored clone, loaded by the same QEMU
      command line with a memfd and -incoming "exec:cat FILE", timed from
      spawning QEMU to the agent's first frame on the virtio-serial socket.
usage: warmrun_bench.py --cli build/bin/supermachine --image oci:/tmp/w/img:busybox [--runs 10]
"""
import argparse, glob, json, os, re, shutil, socket, statistics, subprocess, sys, tempfile, time


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
    times, notes, restore_total, restore_agent = [], set(), [], []
    for _ in range(runs):
        t = time.monotonic()
        p = subprocess.run([cli, "run"] + args, capture_output=True, text=True, timeout=300)
        times.append(time.monotonic() - t)
        if p.returncode != 0:
            sys.exit(f"{label}: exit {p.returncode}: {p.stderr}")
        for line in p.stderr.splitlines():
            m = re.search(r"restored from snapshot \S+ \((\d+) ms, engine to agent (\d+) ms\)", line)
            if m:
                restore_total.append(int(m.group(1)) / 1000)
                restore_agent.append(int(m.group(2)) / 1000)
            if "snapshot" in line or "cold boot" in line:
                notes.add(re.sub(r"\(\d+ ms, engine to agent \d+ ms\)", "(...)", line.strip()))
    return times, notes, restore_total, restore_agent


class Qmp:
    def __init__(self, path, timeout=30):
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.s = socket.socket(socket.AF_UNIX)
                self.s.connect(path)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.002)
        self.f = self.s.makefile("rw")
        self.f.readline()
        self.cmd("qmp_capabilities")

    def cmd(self, command, arguments=None):
        msg = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        self.f.write(json.dumps(msg) + "\n")
        self.f.flush()
        while True:
            reply = json.loads(self.f.readline())
            if "return" in reply or "error" in reply:
                return reply


def option_after(argv, flag, contains):
    for i, a in enumerate(argv[:-1]):
        if a == flag and contains in argv[i + 1]:
            return i + 1
    return None


def qemu_own_restore(cli, image, runs):
    """(d): a full migration stream of a running clone of our snapshot, loaded by QEMU itself."""
    work = tempfile.mkdtemp(prefix="warmrun-bench-")
    try:
        clone = subprocess.Popen([cli, "run", "-q", image, "sleep", "120"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        argv = None
        deadline = time.monotonic() + 120
        while argv is None and time.monotonic() < deadline:
            time.sleep(0.1)
            for pid in os.listdir("/proc"):
                if not pid.isdigit():
                    continue
                try:
                    if open(f"/proc/{pid}/stat").read().split(")")[1].split()[1] != str(clone.pid):
                        continue
                    a = open(f"/proc/{pid}/cmdline").read().split("\0")[:-1]
                except OSError:
                    continue
                if a and "qemu-system" in a[0] and "chardev=restore,mode=control" in a:
                    argv, qemu_pid = a, int(pid)
        if argv is None:
            sys.exit("no restored QEMU found under supermachine run")
        # QEMU dies with the CLI (PR_SET_PDEATHSIG), so restore the same clone
        # from the snapshot under this script instead: the snapshot was taken
        # with the host detached, so the saved agent waits for a new host.
        clone.kill(); clone.wait()
        m = option_after(argv, "-object", "memory-backend-file")
        mem_path = [o for o in argv[m].split(",") if o.startswith("mem-path=")][0][len("mem-path="):]
        state = os.path.join(os.path.dirname(mem_path), "state")
        source = list(argv)
        m = source.index("chardev=restore,mode=control")  # fds 4 and 5 were the CLI's
        del source[m - 3:m + 1]
        qmp_path = os.path.join(work, "qmp-source.sock")
        source[option_after(source, "-qmp", "unix:")] = f"unix:{qmp_path},server=on,wait=off"
        source[option_after(source, "-chardev", "id=agent")] = (
            f"socket,id=agent,path={os.path.join(work, 'agent-source.sock')},server=on,wait=off")
        source_qemu = subprocess.Popen(source, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                       stderr=subprocess.DEVNULL)
        q = Qmp(qmp_path)
        q.cmd("migrate-set-capabilities",
              {"capabilities": [{"capability": "x-ignore-shared", "state": True}]})
        q.cmd("migrate-incoming", {"uri": f"exec:cat {state}"})
        while q.cmd("query-status")["return"]["status"] == "inmigrate":
            time.sleep(0.01)
        q.cmd("cont")
        time.sleep(1)  # the restored clone runs a little
        full = os.path.join(work, "full-migration")
        q.cmd("stop")
        # The clone was loaded with x-ignore-shared (capabilities persist);
        # its RAM is private, but a plain stream must not carry that flag.
        q.cmd("migrate-set-capabilities",
              {"capabilities": [{"capability": "x-ignore-shared", "state": False}]})
        q.cmd("migrate", {"uri": f"exec:cat > {full}"})
        while q.cmd("query-migrate")["return"].get("status") not in ("completed", "failed"):
            time.sleep(0.01)
        source_qemu.kill(); source_qemu.wait()
        size = os.path.getsize(full)
        # The same command line, RAM in a fresh memfd, the full stream on -incoming.
        i = option_after(argv, "-object", "memory-backend-file")
        size_opt = [o for o in argv[i].split(",") if o.startswith("size=")][0]
        argv[i] = f"memory-backend-memfd,id=mem,{size_opt},share=on"
        m = argv.index("chardev=restore,mode=control")
        del argv[m - 3:m + 1]  # a plain stream, RAM and all: no start-up monitor
        argv[argv.index("-incoming") + 1] = f"exec:cat {full}"
        times = []
        for n in range(runs):
            args = list(argv)
            qmp = os.path.join(work, f"qmp{n}.sock")
            agent = os.path.join(work, f"agent{n}.sock")
            args[option_after(args, "-qmp", "unix:")] = f"unix:{qmp},server=on,wait=off"
            k = option_after(args, "-chardev", "id=agent")
            args[k] = f"socket,id=agent,path={agent},server=on,wait=off"
            t = time.monotonic()
            p = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                 stderr=open(os.path.join(work, "qemu.err"), "w"))
            q = Qmp(qmp)
            try:
                while q.cmd("query-status")["return"]["status"] == "inmigrate":
                    time.sleep(0.002)
            except OSError:
                sys.exit("QEMU's restore failed: " + open(os.path.join(work, "qemu.err")).read())
            q.cmd("cont")
            s = socket.socket(socket.AF_UNIX)
            s.connect(agent)
            s.settimeout(60)
            got = b""
            while len(got) < 9:  # the agent's `ready` frame: header (9 bytes) + version
                chunk = s.recv(64)
                if not chunk:
                    sys.exit("QEMU's restore: agent channel closed")
                got += chunk
            times.append(time.monotonic() - t)
            p.kill(); p.wait()
        return times, size
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cli", default="build/bin/supermachine")
    ap.add_argument("--image", required=True)
    ap.add_argument("--runs", type=int, default=10)
    a = ap.parse_args()
    med = lambda xs: statistics.median(xs) * 1000
    # Prime: the first default run creates the snapshot.
    subprocess.run([a.cli, "run", a.image, "true"], timeout=300, capture_output=True)
    b, b_notes, a_total, a_agent = time_cli(a.cli, [a.image, "true"], a.runs, "b")
    c, _, _, _ = time_cli(a.cli, ["--no-snapshot", a.image, "true"], a.runs, "c")
    d, d_size = qemu_own_restore(a.cli, a.image, a.runs)
    warm = len(a_agent) == a.runs
    print(f"runs: {a.runs}; CLI defaults (512 MiB, 1 vCPU); QEMU TCG; medians")
    print("| | median | (d) / this |")
    print("|---|---|---|")
    if a_agent:
        print(f"| (a) restore: QEMU start to agent ready (hello, reseed, clock) | {med(a_agent):.0f} ms | {med(d)/med(a_agent):.1f}x |")
        print(f"| (a') whole vm::async_restore (validation included) | {med(a_total):.0f} ms | {med(d)/med(a_total):.1f}x |")
    print(f"| (b) run IMAGE true, end to end{' (warm)' if warm else ' (NOT warm)'} | {med(b):.0f} ms | {med(d)/med(b):.1f}x |")
    print(f"| (c) run --no-snapshot IMAGE true (cold) | {med(c):.0f} ms | {med(d)/med(c):.2f}x |")
    print(f"| (d) QEMU's own restore, full {d_size >> 20} MiB stream, to agent ready | {med(d):.0f} ms | 1.0x |")
    print(f"(c)/(b): {med(c)/med(b):.1f}x")
    for n in sorted(b_notes):
        print("note:", n)


if __name__ == "__main__":
    main()
