#!/usr/bin/env python3
"""CPU per proxied call of two builds of this proxy and of the Go proxy, in
rounds that alternate the three, against one etcd: on a noisy machine, builds
measured minutes apart (two bench/run.py runs) differ by more than a step of
work changes; interleaved, each round sees the same machine.

    .venv/bin/python bench/compare_builds.py --base /path/to/other/checkout
        [--load put|range-l|range-s] [--clients 64] [--total 20000] [--rounds 5]

``--base`` is another checkout of this repository (e.g. ``git worktree add
/tmp/base REV``); this checkout is "now". Each round starts each proxy afresh,
warms it with 3000 calls, then takes its utime + stime over ``--total`` calls of
etcd's tools/benchmark (bench/setup.sh builds it). Prints each one's median and
the ratios of medians. One etcd (data on tmpfs) and the proxies on free loopback
ports, all stopped at the end.
"""

import argparse
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from bench.profile_unary import BENCHMARK, LOADS  # noqa: E402
from tests.support.etcd import EtcdCluster  # noqa: E402
from tests.support.proxy import ProxyProcess  # noqa: E402

WARM_UP = 3000


class BuildProxy(ProxyProcess):
    """This proxy from the checkout at ``root`` (None: etcd's Go proxy)."""

    def __init__(self, endpoints, root):
        super().__init__(endpoints, kind="go" if root is None else "python")
        self.root = root

    def _env(self):
        env = super()._env()
        if self.root is not None:
            env["PYTHONPATH"] = self.root
        return env


def cpu_seconds(pid):
    fields = open("/proc/%d/stat" % pid).read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", required=True, help="the other checkout")
    ap.add_argument("--load", choices=sorted(LOADS), default="put")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--total", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    builds = (("base", os.path.abspath(args.base)), ("now", ROOT), ("go", None))
    figures = {name: [] for name, _ in builds}
    with EtcdCluster() as etcd:
        if args.load.startswith("range"):
            subprocess.run(["etcdctl", "--endpoints", etcd.endpoint, "put", "/bench/hot", "v" * 256],
                           check=True, capture_output=True, env=dict(os.environ, ETCDCTL_API="3"))
        for _ in range(args.rounds):
            for name, root in builds:
                proxy = BuildProxy([etcd.endpoint], root).start()
                try:
                    command = [BENCHMARK, "--endpoints", proxy.address, "--clients", str(args.clients),
                               "--conns", str(args.clients)] + LOADS[args.load]
                    subprocess.run(command + ["--total", str(WARM_UP)], check=True, capture_output=True)
                    before = cpu_seconds(proxy.pid)
                    subprocess.run(command + ["--total", str(args.total)], check=True, capture_output=True,
                                   timeout=900)
                    figures[name].append((cpu_seconds(proxy.pid) - before) / args.total * 1e6)
                finally:
                    proxy.stop()
    medians = {name: statistics.median(values) for name, values in figures.items()}
    print("%s c=%d, %d calls x %d rounds: proxy CPU us per call, median (rounds)"
          % (args.load, args.clients, args.total, args.rounds))
    for name, values in figures.items():
        print("  %-4s %6.1f  (%s)" % (name, medians[name], " ".join("%.0f" % v for v in values)))
    print("  now/go %.2f, base/go %.2f, now/base %.2f" % (
        medians["now"] / medians["go"], medians["base"] / medians["go"], medians["now"] / medians["base"]))


if __name__ == "__main__":
    main()
