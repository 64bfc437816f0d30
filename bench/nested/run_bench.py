#!/usr/bin/env python3
"""`supermachine run IMAGE true` on the kvm engine against the QEMU engine
(`-accel kvm`), both in the same L1 and the same run, alternating:

    scripts/nested-kvm.sh python3 bench/nested/run_bench.py --runs 3

Rows (medians of --runs, wall time of the whole CLI process):
  warm   `run --engine E IMAGE true` after one priming run created E's
         snapshot (kvm: one container file; QEMU: its snapshot directory)
  cold   `run --engine E --no-snapshot IMAGE true`

Absolute times inside the harness are nested-TCG times; the ratio is the
figure to compare (doc/benchmarks.md, doc/nested-kvm.md).
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--cli", default=os.path.join(os.path.dirname(__file__), "../../build/bin/supermachine"))
    p.add_argument("--image", default="oci:" + os.path.join(os.environ.get("HOME", "/root"),
                                                           ".cache/supermachine/demo-image") + ":busybox")
    a = p.parse_args()
    cli = os.path.abspath(a.cli)
    # A cache of our own (the image's rootfs is built once in it), so the
    # snapshots measured are this run's.
    cache = tempfile.mkdtemp(prefix="run-bench-")
    env = dict(os.environ, XDG_CACHE_HOME=cache)
    kernel_dir = os.path.join(os.environ.get("HOME", "/root"), ".cache/supermachine/kernels/current")
    env.setdefault("SUPERMACHINE_KERNEL_DIR", kernel_dir)
    agent = os.path.join(os.path.dirname(cli), "supermachine-agent")
    env.setdefault("SUPERMACHINE_AGENT", agent)

    def run(engine, *extra):
        t0 = time.monotonic()
        r = subprocess.run([cli, "run", "-q", "--engine", engine, *extra, a.image, "true"],
                           env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=600)
        dt = time.monotonic() - t0
        if r.returncode != 0:
            sys.exit(f"run_bench: {engine} {extra} failed ({r.returncode}): {r.stderr.decode()[-2000:]}")
        return dt

    engines = ("kvm", "qemu")
    for e in engines:  # rootfs build, then each engine's snapshot
        print(f"priming {e}: {run(e):.2f} s", flush=True)
    rows = {}
    for label, extra in (("warm", ()), ("cold", ("--no-snapshot",))):
        times = {e: [] for e in engines}
        for i in range(a.runs):
            for e in engines:
                times[e].append(run(e, *extra))
        rows[label] = {e: statistics.median(times[e]) for e in engines}
        print(f"{label}: " + ", ".join(f"{e} {[round(t, 3) for t in times[e]]}" for e in engines),
              flush=True)
    print()
    print("| what | kvm engine | QEMU engine (-accel kvm) | ratio kvm/QEMU |")
    print("|---|---|---|---|")
    names = {"warm": "warm `run IMAGE true`", "cold": "cold `run --no-snapshot IMAGE true`"}
    for label, r in rows.items():
        print(f"| {names[label]} | {r['kvm'] * 1000:.0f} ms | {r['qemu'] * 1000:.0f} ms | "
              f"{r['kvm'] / r['qemu']:.2f}× |")
    subprocess.run(["rm", "-rf", cache])


if __name__ == "__main__":
    main()
