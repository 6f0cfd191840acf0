#!/usr/bin/env python3
"""Where this proxy's CPU goes under a unary load: py-spy samples the proxy
process while etcd's tools/benchmark drives it, and the busy samples' self time
is summed per function and per module group.

    .venv/bin/python bench/profile_unary.py [--load put|range-l|range-s] [--clients 64]
                                            [--total 40000] [--top 30]

Needs bench/setup.sh (tools/benchmark) and py-spy (installed into .venv when
missing). One etcd (data on tmpfs) and one proxy on free loopback ports, both
stopped at the end. For the issue's before/after profiles; not a timed test.
"""

import argparse
import collections
import os
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from tests.support.etcd import EtcdCluster  # noqa: E402
from tests.support.proxy import ProxyProcess  # noqa: E402

BENCHMARK = os.path.join(HERE, ".build", "bin", "benchmark")
LOADS = {
    "put": ["put", "--val-size", "256", "--key-size", "16", "--key-space-size", "100000"],
    "range-l": ["range", "/bench/hot", "--consistency", "l"],
    "range-s": ["range", "/bench/hot", "--consistency", "s"],
}


def py_spy():
    exe = os.path.join(os.path.dirname(sys.executable), "py-spy")
    if not os.path.exists(exe):
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "py-spy"], check=True)
    return exe


def group(filename):
    """The module group a frame's file belongs to."""
    parts = filename.split("/")
    for i, name in enumerate(parts[:-1]):
        if name in ("etcdproxy", "h2", "hyperframe", "hpack", "twisted", "google", "prometheus_client"):
            if name == "etcdproxy":
                return "etcdproxy/" + parts[i + 1].replace(".py", "")
            return name
    return "python/other"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--load", choices=sorted(LOADS), default="put")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--total", type=int, default=40000)
    ap.add_argument("--top", type=int, default=30)
    args = ap.parse_args()
    spy = py_spy()
    with EtcdCluster() as etcd:
        proxy = ProxyProcess([etcd.endpoint]).start()
        try:
            if args.load.startswith("range"):
                subprocess.run(["etcdctl", "--endpoints", etcd.endpoint, "put", "/bench/hot", "v" * 256],
                               check=True, capture_output=True, env=dict(os.environ, ETCDCTL_API="3"))
            out = tempfile.mktemp(suffix=".txt")
            spy_proc = subprocess.Popen([spy, "record", "--pid", str(proxy.pid), "--format", "raw",
                                         "--rate", "250", "--output", out, "--nonblocking"],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1.0)
            cmd = [BENCHMARK, "--endpoints", proxy.address, "--clients", str(args.clients),
                   "--conns", str(args.clients)] + LOADS[args.load] + ["--total", str(args.total)]
            t0 = time.monotonic()
            subprocess.run(cmd, check=True, capture_output=True, timeout=600)
            wall = time.monotonic() - t0
            spy_proc.send_signal(signal.SIGINT)
            spy_proc.wait(30)
        finally:
            proxy.stop()
    by_function, by_group = collections.Counter(), collections.Counter()
    total = 0
    with open(out) as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not stack:
                continue
            count = int(count)
            leaf = stack.split(";")[-1]
            total += count
            function, _, where = leaf.rpartition(" (")
            filename = where.split(":")[0]
            by_function["%s (%s)" % (function, filename)] += count
            by_group[group(filename)] += count
    os.unlink(out)
    print("%s c=%d, %d calls in %.1f s; %d samples" % (args.load, args.clients, args.total, wall, total))
    print("\nself time by module group:")
    for name, count in by_group.most_common():
        print("  %5.1f %%  %s" % (100.0 * count / total, name))
    print("\nself time by function (top %d):" % args.top)
    for name, count in by_function.most_common(args.top):
        print("  %5.1f %%  %s" % (100.0 * count / total, name))


if __name__ == "__main__":
    main()
