#!/usr/bin/env python3
"""Python function calls per proxied call: the proxy runs under twistd's
cProfile while etcd's tools/benchmark drives it, and the calls cProfile counted
are divided by the calls made (warm-up included). A count, not a time: it moves
little with the machine's noise, so it shows a change of the per-call path
where CPU figures cannot (cProfile slows the proxy several times; its times
are not the proxy's).

    .venv/bin/python bench/count_calls.py [--load put|range-l|range-s] [--total 20000]
                                          [--clients 64] [--top 40]

Needs bench/setup.sh (tools/benchmark). One etcd (data on tmpfs) and one proxy
on free loopback ports, both stopped at the end.
"""

import argparse
import os
import pstats
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from bench.profile_unary import BENCHMARK, LOADS  # noqa: E402
from tests.support.etcd import EtcdCluster  # noqa: E402
from tests.support.proxy import ProxyProcess  # noqa: E402

WARM_UP = 2000


class ProfiledProxy(ProxyProcess):
    """The proxy under twistd's cProfile, its figures saved at exit."""

    def __init__(self, endpoints, stats_file):
        super().__init__(endpoints)
        self.stats_file = stats_file

    def command(self):
        command = super().command()
        at = command.index("-n")
        return command[:at] + ["--profile=" + self.stats_file, "--profiler=cprofile", "--savestats"] + command[at:]


def where(filename):
    name = filename.split("site-packages/")[-1]
    root = os.path.dirname(HERE) + "/"
    return name[len(root):] if name.startswith(root) else name


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--load", choices=sorted(LOADS), default="put")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--total", type=int, default=20000)
    ap.add_argument("--top", type=int, default=40)
    args = ap.parse_args()
    stats_file = tempfile.mktemp(suffix=".prof")
    with EtcdCluster() as etcd:
        if args.load.startswith("range"):
            subprocess.run(["etcdctl", "--endpoints", etcd.endpoint, "put", "/bench/hot", "v" * 256],
                           check=True, capture_output=True, env=dict(os.environ, ETCDCTL_API="3"))
        proxy = ProfiledProxy([etcd.endpoint], stats_file).start()
        try:
            base = [BENCHMARK, "--endpoints", proxy.address, "--clients", str(args.clients),
                    "--conns", str(args.clients)] + LOADS[args.load]
            for total in (WARM_UP, args.total):
                subprocess.run(base + ["--total", str(total)], check=True, capture_output=True, timeout=900)
        finally:
            proxy.stop()  # (twistd writes the figures as it exits)
    calls = args.total + WARM_UP
    stats = pstats.Stats(stats_file).stats
    os.unlink(stats_file)
    python = sum(v[1] for k, v in stats.items() if k[0] != "~")
    builtin = sum(v[1] for k, v in stats.items() if k[0] == "~")
    print("%s c=%d: %.0f Python function calls and %.0f built-in calls per proxied call"
          % (args.load, args.clients, python / calls, builtin / calls))
    rows = sorted(((v[1], "%s:%d %s" % (where(k[0]), k[1], k[2])) for k, v in stats.items() if k[0] != "~"),
                  reverse=True)
    print("\nPython functions by calls per proxied call (top %d):" % args.top)
    for count, name in rows[:args.top]:
        print("  %5.2f  %s" % (count / calls, name))


if __name__ == "__main__":
    main()
