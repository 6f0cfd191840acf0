#!/usr/bin/env python3
"""The etcdgrpcproxy soak test (issue 11): mixed load against this proxy for
a given time, with the proxy's memory and file descriptors watched.

    make soak          # 10 minutes
    make soak-ci       # 60 s (scripts/test runs it after the suite)
    .venv/bin/python bench/soak.py [--duration SECONDS] [--out DIR]

Starts one etcd (free loopback ports, data dir on tmpfs when /dev/shm exists)
and this proxy in front of it (``twistd -n etcdgrpcproxy``), then runs, all at
once and for --duration seconds: puts (on a few watched keys and on others),
serializable and linearizable gets, 1000 watchers on the watched keys (over
several connections and streams), lease keep-alive clients (a few hundred on
distinct leases, some on one shared lease) and churning connections (connect,
one Range / Watch / LeaseKeepAlive, close). The load generator is grpc.aio in
this process (one asyncio loop in a thread of its own); the rates are
moderate, for a 2-core machine where the proxy is pure Python.

The proxy's RSS (/proc/PID/status VmRSS) and open file descriptors
(/proc/PID/fd) are sampled every few seconds. The run passes when: no request
failed; every watcher got every put on its key after its start exactly once,
in order (checked per watcher by revision); every lease is still alive at the
end (LeaseTimeToLive TTL > 0) and every keep-alive was answered with TTL > 0;
after the warm-up (first 20 % of the run, at least 10 s) the largest RSS is
within 10 % of the RSS at the end of the warm-up and the largest FD count
within 10 % (or a small absolute slack, for churning connections) of the count
then; once every client has gone, the proxy's FDs are back to what they were
before any client came; the proxy ran throughout, stopped cleanly on SIGTERM
and its log has no traceback or unhandled error; and the load ran at least at
half its set rates.

Prints a table of samples while it runs and a summary at the end; writes
DIR/soak.json (default bench/results/, git-ignored), a time-stamped copy, and
the proxy's and etcd's logs to DIR/soak-logs/. The last line is
``SOAK PASSED ...`` or ``SOAK FAILED ...``. Exit status: 0 passed, 1 failed,
2 bad usage.

This file is the command (arguments, the run, the report, the results); the
load generator is bench/soak_load.py, the sampling and the checks
bench/soak_checks.py, and what they share (bench/run.py's helpers)
bench/soak_common.py.
"""
import argparse
import datetime
import importlib
import json
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
import traceback

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH_DIR)
VENV_PY = os.path.join(REPO, ".venv", "bin", "python")

try:
    import grpc
    importlib.import_module("twisted")  # the proxy under test runs with sys.executable
except ImportError:
    if os.path.exists(VENV_PY) and os.path.realpath(sys.executable) != os.path.realpath(VENV_PY):
        os.execv(VENV_PY, [VENV_PY] + sys.argv)
    raise

sys.path.insert(0, REPO)
from tests.support import aio  # noqa: E402
from tests.support.proxy import ProxyProcess  # noqa: E402
from tests.support.stubs import load_stubs  # noqa: E402

from soak_common import SoakError, bench, say  # noqa: E402
from soak_checks import (HEADER, Sampler, check_flat, load_ran, own_connections_to,  # noqa: E402
                         row, wait_fds)
from soak_load import CATCH_UP_TIMEOUT, Load, Stats  # noqa: E402

FDS_SETTLE_TIMEOUT = 10.0   # after the clients left, the proxy's FDs must settle within this
FDS_RELEASED_SLACK = 2      # ... to at most the count before any client + this


# ----------------------------------------------------------------- settings

def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--duration", type=float, default=600.0, help="seconds of load (default 600)")
    p.add_argument("--warmup", type=float, default=None,
                   help="seconds of warm-up before RSS/FDs must be flat (default: 20%% of the run, at least 10)")
    p.add_argument("--sample-interval", type=float, default=None,
                   help="seconds between samples (default 2 for runs up to 2 min, else 5)")
    p.add_argument("--out", default=os.path.join(BENCH_DIR, "results"),
                   help="results directory (default bench/results)")
    g = p.add_argument_group("load (per second unless said)")
    g.add_argument("--watchers", type=int, default=1000, help="watchers on the watched keys (1000)")
    g.add_argument("--watch-keys", type=int, default=4, help="watched keys (4)")
    g.add_argument("--watch-conns", type=int, default=10, help="connections the watchers use (10)")
    g.add_argument("--watch-streams", type=int, default=100, help="watch streams over them (100)")
    g.add_argument("--watched-put-rate", type=float, default=10.0, help="puts on the watched keys (10)")
    g.add_argument("--put-rate", type=float, default=15.0, help="puts on other keys (15)")
    g.add_argument("--keys", type=int, default=200, help="other keys (200)")
    g.add_argument("--sget-rate", type=float, default=50.0, help="serializable gets (50)")
    g.add_argument("--lget-rate", type=float, default=25.0, help="linearizable gets (25)")
    g.add_argument("--kv-conns", type=int, default=4, help="connections the puts and gets use (4)")
    g.add_argument("--lease-clients", type=int, default=300,
                   help="keep-alive clients, each on a lease of its own (300)")
    g.add_argument("--shared-lease-clients", type=int, default=50,
                   help="keep-alive clients on one shared lease (50)")
    g.add_argument("--lease-conns", type=int, default=25, help="connections the keep-alive clients use (25)")
    g.add_argument("--lease-ttl", type=int, default=10,
                   help="lease TTL in s (10); each client sends a keep-alive every TTL/3")
    g.add_argument("--churn-rate", type=float, default=8.0,
                   help="connections opened, used for one call or watch, and closed (8)")
    g.add_argument("--churn-concurrency", type=int, default=4, help="churning clients at once (4)")
    g.add_argument("--fd-slack", type=int, default=None,
                   help="FDs above the warm-up count tolerated when 10%% is less "
                   "(default 2 x churn concurrency + 4)")
    p.add_argument("--proxy-arg", action="append", default=[],
                   help="extra flag for the proxy (repeatable), e.g. --proxy-arg=--debug")
    opts = p.parse_args(argv)
    if opts.duration <= 0:
        p.error("--duration must be positive")
    if opts.warmup is None:
        opts.warmup = max(10.0, 0.2 * opts.duration)
    if opts.sample_interval is None:
        opts.sample_interval = 2.0 if opts.duration <= 120 else 5.0
    if opts.warmup + 2 * opts.sample_interval > opts.duration:
        p.error("--duration %.0f leaves no samples after the warm-up of %.0f s (sampled every %.0f s)"
                % (opts.duration, opts.warmup, opts.sample_interval))
    if opts.fd_slack is None:
        opts.fd_slack = 2 * opts.churn_concurrency + 4
    for name in ("watch_keys", "watch_conns", "watch_streams", "keys", "kv_conns", "lease_conns"):
        if getattr(opts, name) < 1:
            p.error("--%s must be at least 1" % name.replace("_", "-"))
    if opts.lease_ttl < 3:
        p.error("--lease-ttl must be at least 3")
    return opts


# ------------------------------------------------------------------ summary

KINDS = [
    # (key, label, unit)
    ("put_watched", "put (watched keys)", "puts"),
    ("put", "put (other keys)", "puts"),
    ("sget", "serializable get", "gets"),
    ("lget", "linearizable get", "gets"),
    ("keepalive", "lease keep-alive", "keep-alives"),
    ("churn_range", "churn: connect, Range, close", "connections"),
    ("churn_watch", "churn: connect, Watch created, close", "connections"),
    ("churn_keepalive", "churn: connect, LeaseKeepAlive answered, close", "connections"),
]


# --------------------------------------------------------------------- main

def run(opts):
    started = datetime.datetime.now().strftime("%Y-%m-%dT%H:%M:%S")
    t_start = time.monotonic()
    stats = Stats()
    checks = []         # (name, ok, detail)
    figures = {}
    base_dir = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    workdir = tempfile.mkdtemp(prefix="etcdproxy-soak-", dir=base_dir)
    etcd = proxy = load = sampler = None
    proxy_log = ""
    fatal = None
    load_s = None
    try:
        say("soak: %.0f s of load, warm-up %.0f s, a sample every %.0f s; workdir %s (%s)" % (
            opts.duration, opts.warmup, opts.sample_interval, workdir, "tmpfs" if base_dir else "disk"))
        stubs = load_stubs()
        etcd = bench.Etcd(workdir).start()
        proxy = ProxyProcess([etcd.endpoint], extra_args=opts.proxy_arg).start()
        say("etcd %s (pid %d), proxy %s (pid %d)" % (etcd.endpoint, etcd.pid, proxy.address, proxy.pid))
        sampler = Sampler(proxy, etcd, stats)
        time.sleep(1.0)     # the proxy's endpoint monitor connects to etcd
        sampler.sample("fresh", 0.0)
        load = Load(proxy.address, opts, stats, stubs)
        t0 = time.monotonic()
        aio.run(load.setup(), timeout=120.0)
        say("set-up %.1f s: %d watchers on %d keys over %d streams and %d connections; %d leases "
            "(+%d clients on 1 shared lease) over %d connections" % (
                time.monotonic() - t0, len(load.watchers), opts.watch_keys, opts.watch_streams,
                opts.watch_conns, len(load.leases), opts.shared_lease_clients, opts.lease_conns))
        sampler.sample("setup", 0.0)
        stats.t0 = time.monotonic()
        aio.loop().call_soon_threadsafe(load.start)
        say("")
        say(HEADER)
        for s in sampler.samples:
            say(row(s))
        n = 1
        while True:
            t_next = stats.t0 + min(n * opts.sample_interval, opts.duration)
            time.sleep(max(0.0, t_next - time.monotonic()))
            if not proxy.is_running():
                raise SoakError("the proxy exited with %s during the run:\n%s" % (
                    proxy.proc.poll(), bench._tail(proxy.log(), 6000)))
            if not etcd.alive():
                raise SoakError("etcd exited during the run:\n%s" % etcd.log())
            s = sampler.sample("load", time.monotonic() - stats.t0)
            say(row(s))
            if s["t"] >= opts.duration - 0.01:
                break
            n += 1
        load_s = time.monotonic() - stats.t0
        failures = aio.run(load.stop_and_check(), timeout=CATCH_UP_TIMEOUT + 90.0)
        sampler.sample("closed", time.monotonic() - stats.t0)
        fresh_fds = sampler.samples[0]["fds"]
        # a connection the load generator failed to close is the proxy's to keep
        still_open = own_connections_to(proxy.port)
        limit = fresh_fds + FDS_RELEASED_SLACK + still_open
        t_closed = time.monotonic()
        fds_after = wait_fds(proxy.pid, limit, FDS_SETTLE_TIMEOUT)
        rss_after = bench.rss_bytes(proxy.pid) // 1024
        figures["fds_after_clients_left"] = fds_after
        figures["rss_kb_after_clients_left"] = rss_after
        figures["client_connections_left_open"] = still_open
        checks.append(("the proxy's FDs back to their count before any client once all left",
                       fds_after <= limit,
                       "%d FDs %.1f s after the clients closed, %d before any client (limit %d: +%d, "
                       "+%d connection(s) the load generator still has open)" % (
                           fds_after, time.monotonic() - t_closed, fresh_fds, limit, FDS_RELEASED_SLACK,
                           still_open)))
        flat_checks, flat = check_flat(sampler.samples, opts.warmup, opts.fd_slack)
        figures.update(flat)
        checks += flat_checks
        checks.append(("no errors", stats.total_errors() == 0,
                       "%d error(s): %s" % (stats.total_errors(), dict(stats.errors))
                       if stats.total_errors() else "0 failed or wrong requests, stream ends or cancels"))
        checks.append(("every watcher got every event exactly once, in order",
                       not [f for f in failures if "watchers" in f],
                       "; ".join(f for f in failures if "watchers" in f) or
                       "%d watchers, %d events, caught up %.2f s after the last put" % (
                           len(load.watchers), stats.events, load.catch_up_s)))
        lease_fail = [f for f in failures if "leases" in f]
        checks.append(("every lease alive at the end (LeaseTimeToLive TTL > 0)", not lease_fail,
                       "; ".join(lease_fail) or "%d leases, TTL %d..%d s" % (
                           len(load.lease_ttls), min(load.lease_ttls.values() or [0]),
                           max(load.lease_ttls.values() or [0]))))
        checks.append(load_ran(opts, stats, load_s))
    except (SoakError, AssertionError, Exception) as e:
        fatal = "%s: %s" % (type(e).__name__, e)
        if not isinstance(e, SoakError):
            fatal += "\n" + traceback.format_exc()
        say("!! %s" % fatal)
        checks.append(("the soak ran to its end", False, fatal[:3000]))
        if load is not None:
            try:
                aio.run(load.close(), timeout=30.0)
            except Exception:
                pass
    finally:
        rc = None
        if proxy is not None:
            was_running = proxy.is_running()
            rc = proxy.stop()
            proxy_log = proxy.log()
            if fatal is None:
                # twistd ends with the signal that stopped it: -SIGTERM is a clean stop
                # (SIGKILL, -9, would mean it did not stop within 10 s)
                checks.append(("the proxy stopped cleanly on SIGTERM",
                               was_running and rc in (0, -signal.SIGTERM),
                               "exit status %s" % rc if was_running else "it had exited before"))
        etcd_log = bench._read(etcd.log_path) if etcd is not None else ""
        if etcd is not None:
            etcd.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    problems = bench.scan_log(proxy_log)
    if proxy is not None:
        checks.append(("no traceback or unhandled error in the proxy's log", problems["count"] == 0,
                       "%d line(s); first:\n%s" % (problems["count"], problems["first"])
                       if problems["count"] else "clean (%d lines)" % len(proxy_log.splitlines())))
    passed = all(ok for _, ok, _ in checks) and fatal is None
    result = {
        "passed": passed, "started": started, "elapsed_s": round(time.monotonic() - t_start, 1),
        "load_s": round(load_s, 1) if load_s else None,
        "settings": {k: v for k, v in vars(opts).items()},
        "machine": platform.platform(), "cores": os.cpu_count(), "python": sys.version.split()[0],
        "grpcio": grpc.__version__, "etcd_version": bench.etcd_version(), "tmpfs": base_dir is not None,
        "checks": [{"name": n, "ok": ok, "detail": d} for n, ok, d in checks],
        "requests": dict(stats.done), "events": stats.events,
        "errors": dict(stats.errors), "error_samples": stats.error_samples,
        "keepalive_answer_max_s": round(stats.keepalive_max_s, 3),
        "loadgen_loop_lag_max_ms": round(1000 * stats.loop_lag_max_s, 1),
        "watchers": len(load.watchers) if load else 0,
        "watched_puts": {k.decode(): len(v) for k, v in load.put_revs.items()} if load else {},
        "catch_up_s": round(load.catch_up_s, 3) if load and load.catch_up_s is not None else None,
        "figures": figures,
        "samples": sampler.samples if sampler else [],
    }
    report(opts, result, checks)
    write_results(opts.out, result, proxy_log, etcd_log)
    verdict = "SOAK %s: %.0f s of load, %d requests, %d watch events, %d error(s), proxy RSS %s MB, FDs %s" % (
        "PASSED" if passed else "FAILED", load_s or 0, sum(stats.done.values()), stats.events,
        stats.total_errors(),
        "%.1f -> %.1f (max %.1f)" % (figures["rss_kb"]["start"] / 1024.0, figures["rss_kb"]["end"] / 1024.0,
                                     figures["rss_kb"]["max"] / 1024.0) if "rss_kb" in figures else "?",
        "%d -> %d (max %d)" % (figures["fds"]["start"], figures["fds"]["end"], figures["fds"]["max"])
        if "fds" in figures else "?")
    if not passed:
        verdict += "; failed: " + ", ".join(n for n, ok, _ in checks if not ok)
    say(verdict)
    return 0 if passed else 1


def report(opts, result, checks):
    say("")
    say("== soak summary (%.0f s of load; the whole run %.0f s)" % (result["load_s"] or 0, result["elapsed_s"]))
    req = result["requests"]
    labels = dict((k, (label, unit)) for k, label, unit in KINDS)
    for k, (label, unit) in labels.items():
        n = req.get(k, 0)
        rate = n / result["load_s"] if result["load_s"] else 0
        say("  %-48s %9d %s (%.1f/s)" % (label, n, unit, rate))
    say("  %-48s %9d events to %d watchers (%s puts on the watched keys), caught up %s s after the last put"
        % ("watch events delivered", result["events"], result["watchers"],
           sum(result["watched_puts"].values()), result["catch_up_s"]))
    say("  %-48s %9.3f s" % ("slowest keep-alive answer", result["keepalive_answer_max_s"]))
    say("  %-48s %9.1f ms" % ("load generator's loop lag, max", result["loadgen_loop_lag_max_ms"]))
    f = result["figures"]
    samples = result["samples"]
    if "rss_kb" in f:
        fresh = samples[0]
        r, d = f["rss_kb"], f["fds"]
        say("  proxy RSS MB: fresh %.1f, start %.1f, warm-up end (t=%.0f s) %.1f, end %.1f, max %.1f "
            "(after warm-up %.1f, %+.1f %%); %.1f after the clients left" % (
                fresh["rss_kb"] / 1024.0, r["start"] / 1024.0, f["warmup_end_t"], r["warmup_end"] / 1024.0,
                r["end"] / 1024.0, r["max"] / 1024.0, r["max_after_warmup"] / 1024.0,
                r["growth_after_warmup_pct"], f.get("rss_kb_after_clients_left", 0) / 1024.0))
        say("  proxy FDs: fresh %d, start %d, warm-up end %d, end %d, max %d (after warm-up %d, limit %d); "
            "%s after the clients left" % (fresh["fds"], d["start"], d["warmup_end"], d["end"], d["max"],
                                           d["max_after_warmup"], d["limit"], f.get("fds_after_clients_left")))
        load = [s for s in samples if s["phase"] == "load" and "proxy_cpu_pct" in s]
        if load:
            def mean(k):
                vals = [s[k] for s in load if s.get(k) is not None]
                return sum(vals) / len(vals) if vals else 0.0
            say("  CPU (mean over the samples): proxy %.0f %% of a core, load generator %.0f %%, "
                "machine %.0f %% busy (100 = both cores)" % (
                    mean("proxy_cpu_pct"), mean("loadgen_cpu_pct"), mean("machine_busy_pct")))
    if result["error_samples"]:
        say("  errors (first %d):" % len(result["error_samples"]))
        for e in result["error_samples"][:20]:
            say("    t=%.1f %s: %s" % (e["t"], e["kind"], e["error"]))
    say("== checks")
    for name, ok, detail in checks:
        say("  [%s] %s: %s" % ("ok" if ok else "FAIL", name, detail))


def write_results(outdir, result, proxy_log, etcd_log):
    try:
        os.makedirs(outdir, exist_ok=True)
        stamp = result["started"].replace(":", "").replace("-", "")
        for name in ("soak.json", "soak-%ds-%s.json" % (result["settings"]["duration"], stamp)):
            with open(os.path.join(outdir, name), "w") as f:
                json.dump(result, f, indent=1)
        logdir = os.path.join(outdir, "soak-logs")
        os.makedirs(logdir, exist_ok=True)
        for name, text in (("proxy.log", proxy_log), ("etcd.log", etcd_log)):
            with open(os.path.join(logdir, name), "w") as f:
                f.write(text)
        say("results: %s; logs: %s" % (os.path.join(outdir, "soak.json"), logdir))
    except OSError as e:
        say("could not write the results: %s" % e)


def main(argv=None):
    opts = parse_args(sys.argv[1:] if argv is None else argv)

    def on_signal(signum, frame):
        raise KeyboardInterrupt("signal %d" % signum)

    signal.signal(signal.SIGTERM, on_signal)
    try:
        return run(opts)
    except KeyboardInterrupt:
        say("SOAK FAILED: interrupted")
        return 1


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    # grpc.aio's loop thread is a daemon that is never closed (tests/support/aio.py)
    os._exit(code)
