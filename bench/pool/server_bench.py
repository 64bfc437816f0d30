#!/usr/bin/env python3
"""The example server (example/pool_server) under load, over loopback HTTP:
requests of `true`, one keep-alive connection per client, in three modes of
the same server binary, same image, same run:

  --one-vm   every request in one running VM: the bare exec round trip
             (plus HTTP), the floor the pool is measured against
  pool 4     a pooled clone per request (min_idle 4), closed loop with 1 and
             4 clients (saturated: the pool serves at its refill rate), then
             1 client at half the saturated rate (open loop: requests arrive
             at fixed times, as a server's clients would)
  --fresh    a VM started per request

usage: server_bench.py --server build/bin/pool_server --image oci:DIR:TAG [--requests 20]
"""
import argparse, http.client, re, statistics, subprocess, sys, threading, time


servers = []  # killed on the way out, however it ends


def start(server, image, extra):
    proc = subprocess.Popen([server, image, "--port", "0", *extra], stdout=subprocess.PIPE,
                            text=True)
    servers.append(proc)
    banner = proc.stdout.readline()
    m = re.search(r"127\.0\.0\.1:(\d+)", banner)
    if not m:
        proc.kill()
        sys.exit(f"pool_server {' '.join(extra)} did not start: {banner!r}")
    return proc, int(m.group(1))


def request(conn):
    t = time.monotonic()
    conn.request("POST", "/run", body="true")
    response = conn.getresponse()
    response.read()
    if response.status != 200 or response.getheader("X-Exit-Code") != "0":
        sys.exit(f"request failed: {response.status} {response.getheader('X-Exit-Code')}")
    return (time.monotonic() - t) * 1000


def closed_loop(port, requests, clients):
    """`requests` in all, from `clients` connections each sending its next at
    once: (latencies ms, seconds)."""
    latencies, lock, left, failures = [], threading.Lock(), [requests], []

    def client():
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        try:
            while True:
                with lock:
                    if left[0] == 0:
                        break
                    left[0] -= 1
                ms = request(conn)
                with lock:
                    latencies.append(ms)
        except (SystemExit, OSError, http.client.HTTPException) as e:
            failures.append(str(e))  # a thread's exit would end only the thread
        finally:
            conn.close()

    started = time.monotonic()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failures:
        sys.exit(failures[0])
    return latencies, time.monotonic() - started


def paced(port, requests, period):
    """One connection, request i sent at start + i * period (or as soon as
    the previous answer came, if later)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    latencies, started = [], time.monotonic()
    for i in range(requests):
        delay = started + i * period - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        latencies.append(request(conn))
    conn.close()
    return latencies, time.monotonic() - started


def p99(v):
    s = sorted(v)
    return s[min(len(s) - 1, int(0.99 * len(s)))]


def row(label, result):
    latencies, seconds = result
    print(f"  {label:<46} p50 {statistics.median(latencies):7.1f} ms  p99 {p99(latencies):7.1f} ms"
          f"  {len(latencies) / seconds:6.1f} req/s", flush=True)
    return statistics.median(latencies)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--server", required=True)
    ap.add_argument("--image", required=True)
    ap.add_argument("--requests", type=int, default=20)
    ap.add_argument("--fill-seconds", type=float, default=5.0,
                    help="time the pool gets to fill before the first timed request")
    a = ap.parse_args()
    n = a.requests
    print(f"example server benchmark: {n} requests of `true` over loopback HTTP\n", flush=True)

    proc, port = start(a.server, a.image, ["--one-vm"])
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    request(conn)  # the VM's first exec faults in what it touches: not timed
    conn.close()
    bare = row("one running VM (bare exec + HTTP)", closed_loop(port, n, 1))
    proc.terminate()
    proc.wait()

    proc, port = start(a.server, a.image, ["--pool", "4"])
    time.sleep(a.fill_seconds)
    saturated = closed_loop(port, n, 1)
    one = row("pool of 4, 1 client", saturated)
    time.sleep(a.fill_seconds)
    row("pool of 4, 4 clients", closed_loop(port, n, 4))
    time.sleep(a.fill_seconds)
    period = 2 * saturated[1] / n
    half = row(f"pool of 4, 1 client, a request every {period * 1000:.0f} ms", paced(port, n, period))
    proc.terminate()
    proc.wait()

    proc, port = start(a.server, a.image, ["--fresh"])
    fresh = row("a VM per request (--fresh)", closed_loop(port, n, 1))
    proc.terminate()
    proc.wait()

    print(f"\n  pool p50 / one-VM p50: saturated {one / bare:.2f}x, at half that rate "
          f"{half / bare:.2f}x (goal <= 3x); VM per request p50 / pool p50: {fresh / one:.1f}x")


if __name__ == "__main__":
    try:
        main()
    finally:
        for proc in servers:
            if proc.poll() is None:
                proc.kill()
