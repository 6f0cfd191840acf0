"""The soak's sampling and checks (bench/soak.py): the proxy's RSS, FDs and
CPU sampled over the run (Sampler, and HEADER/row to print the samples), the
checks on them (check_flat, load_ran) and the proxy's FDs once the clients
left (own_connections_to, wait_fds)."""
import math
import os
import resource
import time

from soak_common import bench


def fd_count(pid):
    return len(os.listdir("/proc/%d/fd" % pid))


def self_cpu():
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


# ------------------------------------------------------------------ sampling

class Sampler(object):
    def __init__(self, proxy, etcd, stats):
        self.proxy = proxy
        self.etcd = etcd
        self.stats = stats
        self.samples = []
        self._prev = None

    def sample(self, phase, t):
        now = time.monotonic()
        cur = {"mono": now, "proxy_cpu": bench.cpu_seconds(self.proxy.pid), "self_cpu": self_cpu(),
               "machine": bench.machine_cpu(), "done": dict(self.stats.done), "events": self.stats.events}
        s = {"phase": phase, "t": round(t, 2),
             "rss_kb": bench.rss_bytes(self.proxy.pid) // 1024, "fds": fd_count(self.proxy.pid),
             "etcd_rss_kb": bench.rss_bytes(self.etcd.pid) // 1024,
             "done": cur["done"], "events": cur["events"], "errors": self.stats.total_errors()}
        p = self._prev
        if p is not None and now > p["mono"]:
            dt = now - p["mono"]
            busy = cur["machine"][0] - p["machine"][0]
            total = cur["machine"][1] - p["machine"][1]
            s.update(
                proxy_cpu_pct=round(100.0 * (cur["proxy_cpu"] - p["proxy_cpu"]) / dt, 1),
                loadgen_cpu_pct=round(100.0 * (cur["self_cpu"] - p["self_cpu"]) / dt, 1),
                machine_busy_pct=round(100.0 * busy / total, 1) if total > 0 else None,
                rates={k: round((cur["done"].get(k, 0) - p["done"].get(k, 0)) / dt, 1)
                       for k in set(cur["done"]) | set(p["done"])},
                events_per_s=round((cur["events"] - p["events"]) / dt, 1))
        s["loop_lag_ms"] = round(1000 * self.stats.loop_lag_window_s, 1)
        self.stats.loop_lag_window_s = 0.0
        self._prev = cur
        self.samples.append(s)
        return s


HEADER = ("%7s %8s %5s %6s %6s %6s %6s %6s %6s %6s %6s %8s %6s %6s" % (
    "t s", "RSS MB", "FDs", "proxy%", "load%", "mach%", "put/s", "sget/s", "lget/s", "ka/s", "churn",
    "events/s", "errors", "lag ms"))


def row(s):
    r = s.get("rates", {})

    def f(v, fmt="%6.1f"):
        return fmt % v if v is not None else "%6s" % "-"

    churn = sum(v for k, v in r.items() if k.startswith("churn_")) if r else None
    puts = (r.get("put", 0) + r.get("put_watched", 0)) if r else None
    label = "%7.1f" % s["t"] if s["phase"] == "load" else "%7s" % s["phase"]
    return "%s %8.1f %5d %s %s %s %s %s %s %s %s %s %6d %6.0f" % (
        label, s["rss_kb"] / 1024.0, s["fds"], f(s.get("proxy_cpu_pct")), f(s.get("loadgen_cpu_pct")),
        f(s.get("machine_busy_pct")), f(puts), f(r.get("sget") if r else None),
        f(r.get("lget") if r else None), f(r.get("keepalive") if r else None), f(churn),
        f(s.get("events_per_s"), "%8.0f"), s["errors"], s["loop_lag_ms"])


# ------------------------------------------------------------------- checks

def check_flat(samples, warmup, fd_slack):
    """RSS and FDs after the warm-up against their value at its end.
    Returns (checks, figures)."""
    load = [s for s in samples if s["phase"] == "load"]
    after = [s for s in load if s["t"] >= warmup]
    base = after[0]
    rss_max = max(s["rss_kb"] for s in after)
    fds_max = max(s["fds"] for s in after)
    rss_limit = base["rss_kb"] * 1.10
    fd_allow = max(int(math.ceil(0.10 * base["fds"])), fd_slack)
    fd_limit = base["fds"] + fd_allow
    figures = {
        "warmup_end_t": base["t"],
        "rss_kb": {"start": load[0]["rss_kb"], "warmup_end": base["rss_kb"], "end": load[-1]["rss_kb"],
                   "max": max(s["rss_kb"] for s in load), "max_after_warmup": rss_max,
                   "limit": int(rss_limit),
                   "growth_after_warmup_pct": round(100.0 * (rss_max - base["rss_kb"]) / base["rss_kb"], 2)},
        "fds": {"start": load[0]["fds"], "warmup_end": base["fds"], "end": load[-1]["fds"],
                "max": max(s["fds"] for s in load), "max_after_warmup": fds_max, "limit": fd_limit},
    }
    checks = [
        ("proxy RSS flat after the warm-up",
         rss_max <= rss_limit,
         "max %.1f MB after t=%.0f s vs %.1f MB at the end of the warm-up (%+.1f %%, limit +10 %%)" % (
             rss_max / 1024.0, warmup, base["rss_kb"] / 1024.0,
             figures["rss_kb"]["growth_after_warmup_pct"])),
        ("proxy FDs flat after the warm-up",
         fds_max <= fd_limit,
         "max %d after t=%.0f s vs %d at the end of the warm-up (limit %d: +max(10 %%, %d))" % (
             fds_max, warmup, base["fds"], fd_limit, fd_slack)),
    ]
    return checks, figures


def load_ran(opts, stats, load_s):
    """Each kind of load ran at half its set rate at least (a load generator
    that starved would make a soak of nothing pass)."""
    want = {"put_watched": opts.watched_put_rate, "put": opts.put_rate, "sget": opts.sget_rate,
            "lget": opts.lget_rate, "churn": opts.churn_rate,
            "keepalive": (opts.lease_clients + opts.shared_lease_clients) / (opts.lease_ttl / 3.0)}
    low = []
    for kind, rate in want.items():
        if rate <= 0:
            continue
        got = (sum(v for k, v in stats.done.items() if k.startswith("churn_")) if kind == "churn"
               else stats.done.get(kind, 0)) / load_s
        if got < 0.5 * rate:
            low.append("%s %.1f/s of %.1f/s" % (kind, got, rate))
    return ("load ran at half its set rates at least", not low,
            "too low: " + ", ".join(low) if low else "every kind at >= 50 %")


# ------------------------------------------------------ after the clients left

def own_connections_to(port):
    """Established TCP connections of this process to ``port`` on loopback."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            link = os.readlink("/proc/self/fd/" + fd)
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    n = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                lines = f.readlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            if cols[3] == "01" and int(cols[2].rsplit(":", 1)[1], 16) == port and cols[9] in inodes:
                n += 1
    return n


def wait_fds(pid, limit, timeout):
    deadline = time.monotonic() + timeout
    while True:
        n = fd_count(pid)
        if n <= limit or time.monotonic() > deadline:
            return n
        time.sleep(0.2)
