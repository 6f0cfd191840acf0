#!/usr/bin/env python3
"""The etcdgrpcproxy bench suite: this proxy side by side with etcd's own Go
proxy (``etcd grpc-proxy start``) and with etcd itself, in one run.

    make bench            # full suite (~15 min)
    make bench-quick      # quick mode (under 2 min, without W7)
    .venv/bin/python bench/run.py [--quick] [--workloads W1,W4] [--reps N] [--out DIR]

Starts one etcd (data dir on tmpfs when /dev/shm exists), the Go proxy and
this proxy in front of it, and runs the workloads W1-W7 (see bench/README.md)
against the three targets, alternating targets within every repetition.
Before every measured run etcd is compacted and defragmented. Results: a
markdown table with medians, min-max and the ratios this/Go and this/direct,
printed at the end and written to DIR/latest.md and DIR/latest.json.

Exit status: 0 when every run succeeded; 1 when any run of this proxy or of
etcd directly saw an error, a lost, duplicated or reordered event, or when a
target crashed (errors of the Go proxy are reported but only fail the run
with --strict); 2 on bad usage or a missing load generator.
"""
import argparse
import datetime
import json
import math
import os
import platform
import queue
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH_DIR)
VENV_PY = os.path.join(REPO, ".venv", "bin", "python")

try:
    import twisted  # noqa: F401  (the proxy under test runs with sys.executable)
except ImportError:
    if os.path.exists(VENV_PY) and os.path.realpath(sys.executable) != os.path.realpath(VENV_PY):
        os.execv(VENV_PY, [VENV_PY] + sys.argv)
    raise

sys.path.insert(0, REPO)
import h2.exceptions  # noqa: E402
from tests.support.etcd import parse_metrics  # noqa: E402
from tests.support.ports import free_ports  # noqa: E402
from tests.support.process import stop_process  # noqa: E402
from tests.support.proxy import ProxyProcess  # noqa: E402
from tests.support.rawh2 import H2Client, grpc_frame  # noqa: E402
from etcdproxy.grpc.status import StatusCode  # noqa: E402
from etcdproxy.pb.etcdserverpb import rpc_pb2  # noqa: E402

BIN_DIR = os.path.join(BENCH_DIR, ".build", "bin")
BENCHMARK = os.path.join(BIN_DIR, "benchmark")
DRIVER = os.path.join(BIN_DIR, "etcdbench-driver")
ETCD = os.environ.get("ETCDPROXY_BENCH_ETCD", "etcd")
TARGETS = ("direct", "go", "this")
TARGET_LABEL = {"direct": "direct (etcd)", "go": "Go proxy", "this": "this proxy"}
CLK_TCK = os.sysconf("SC_CLK_TCK")

# --------------------------------------------------------------------- modes

# W4's acceptance configuration (issue 5): 1000 watchers on one key, 10 per
# watch stream, 10 streams per connection; exactly 10,000 puts.
SHARED_FANOUT = {"watchers": 1000, "per_stream": 10, "per_conn": 10, "puts": 10000, "value_size": 128}
# W7: the same fan-out with bigger values, so that a stream that is never
# read gets 2000 x 4 KiB = 8 MiB, twice this proxy's --watch-send-buffer.
STALLED_FANOUT = dict(SHARED_FANOUT, puts=2000, value_size=4096)
W7_WITHOUT, W7_WITH, W7_RATIO = "without stalled client", "with 1 stalled client", "with / without"
W7_P99_LIMIT = 1.2      # issue 5: the others' delivery p99 within 20 % of the run without

QUICK = {
    "reps": 1,
    "w1": {1: 1000, 16: 3000, 64: 5000},          # concurrency -> requests
    "w2": {16: 4000, 64: 4000},
    "w3": {64: 3000},
    "w4_watchers": [100, 1000], "w4_duration": 1.5, "w4_shared": dict(SHARED_FANOUT, puts=1000),
    "w5_watchers": [0, 1000], "w5_conns": 1000, "w5_settle": (0.3, 0.5),
    "w6_watchers": 1000, "w6_clients": 1000, "w6_ttl": 3, "w6_interval": 1.0,
    "w6_duration": 1.5, "w6_gets": 2000,
    "w7": STALLED_FANOUT,
    "w8": 10,
}
FULL = {
    "reps": 3,
    "w1": {1: 3000, 16: 10000, 64: 15000},
    "w2": {16: 15000, 64: 15000},
    "w3": {64: 10000},
    "w4_watchers": [100, 1000, 5000], "w4_duration": 5.0, "w4_shared": SHARED_FANOUT,
    "w5_watchers": [0, 1000, 10000], "w5_conns": 1000, "w5_settle": (0.5, 1.0),
    "w6_watchers": 1000, "w6_clients": 1000, "w6_ttl": 6, "w6_interval": 2.0,
    "w6_duration": 4.0, "w6_gets": 3000,
    "w7": STALLED_FANOUT,
    "w8": 20,
}
# W8: a Kubernetes-sized LIST, one linearizable Range of this many keys of this size.
LARGE_LIST = {"keys": 10000, "value_size": 500}
ALL_WORKLOADS = ("W1", "W2", "W3", "W4", "W5", "W6", "W7", "W8")
# Quick mode leaves out W7 (about 5 min on its own) unless asked for.
QUICK_WORKLOADS = ("W1", "W2", "W3", "W4", "W5", "W6", "W8")


class BenchError(Exception):
    pass


class TargetCrashed(BenchError):
    pass


def say(msg):
    print(msg, flush=True)


# ------------------------------------------------------------- /proc helpers

def cpu_seconds(pid):
    """utime + stime of ``pid`` in seconds (all its threads)."""
    with open("/proc/%d/stat" % pid) as f:
        data = f.read()
    rest = data[data.rindex(")") + 2:].split()
    return (int(rest[11]) + int(rest[12])) / CLK_TCK


def rss_bytes(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def machine_cpu():
    """(busy, total) jiffies over all CPUs, from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    total = sum(fields[:8])
    return total - idle, total


def children_cpu():
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def _tail(text, n=3000):
    return text[-n:] if text else ""


def _read(path):
    try:
        with open(path, "rb") as f:
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def _stop(proc, grace=10.0):
    return stop_process(proc, grace)


def ceil_div(a, b):
    return -(-a // b)


def _clean_env():
    return {k: v for k, v in os.environ.items() if not k.startswith("ETCD")}


# ----------------------------------------------------------------------- etcd

class Etcd(object):
    """One etcd member on free loopback ports, data dir under ``workdir``."""

    def __init__(self, workdir):
        self.workdir = workdir
        self.proc = None
        self.logfile = None
        self.client_port = self.peer_port = None
        self.log_path = os.path.join(workdir, "etcd.log")

    @property
    def endpoint(self):
        return "127.0.0.1:%d" % self.client_port

    @property
    def url(self):
        return "http://" + self.endpoint

    @property
    def pid(self):
        return self.proc.pid

    def start(self, timeout=30.0):
        self.client_port, self.peer_port = free_ports(2)
        peer = "http://127.0.0.1:%d" % self.peer_port
        args = [ETCD, "--name", "bench", "--data-dir", os.path.join(self.workdir, "etcd-data"),
                "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
                "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                "--initial-cluster", "bench=" + peer, "--initial-cluster-state", "new",
                "--quota-backend-bytes", str(8 * 1024 ** 3),
                "--logger", "zap", "--log-outputs", "stderr"]
        self.logfile = open(self.log_path, "ab")
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=self.logfile,
                                     stderr=subprocess.STDOUT, env=_clean_env(), cwd=self.workdir)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise BenchError("etcd exited with %s:\n%s" % (self.proc.returncode, self.log()))
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=1.0) as r:
                    if json.loads(r.read().decode()).get("health") in ("true", True):
                        return self
            except (OSError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise BenchError("etcd not healthy after %.0fs:\n%s" % (timeout, self.log()))
            time.sleep(0.1)

    def stop(self):
        _stop(self.proc)
        if self.logfile is not None:
            self.logfile.close()
            self.logfile = None

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def log(self):
        return _tail(_read(self.log_path))

    def metrics(self):
        with urllib.request.urlopen(self.url + "/metrics", timeout=10.0) as r:
            return Metrics(r.read().decode("utf-8", "replace"))


class Metrics(object):
    def __init__(self, text):
        self.samples = parse_metrics(text)

    def sum(self, name, **labels):
        return sum(v for n, lab, v in self.samples
                   if n == name and all(lab.get(k) == val for k, val in labels.items()))


# -------------------------------------------------------------------- targets

class Target(object):
    """One of the three things the load goes to: etcd directly, the Go proxy,
    or this proxy."""

    def __init__(self, name, etcd):
        self.name = name
        self.etcd = etcd
        self.proxy = None
        self.restarts = 0
        self.old_logs = []      # logs of the proxy processes replaced by restart()

    def start(self):
        if self.name == "direct":
            return self
        kind = "python" if self.name == "this" else "go"
        self.proxy = ProxyProcess([self.etcd.endpoint], kind=kind).start()
        return self

    def restart(self):
        """A fresh proxy process (for memory measurements)."""
        if self.proxy is None:
            return
        self.check_alive()
        self.proxy.stop()
        self.old_logs.append(self.proxy.log())
        self.proxy = None
        self.restarts += 1
        self.start()

    def stop(self):
        if self.proxy is not None:
            self.proxy.stop()

    @property
    def endpoint(self):
        return self.etcd.endpoint if self.proxy is None else self.proxy.address

    @property
    def pid(self):
        """The process whose CPU and memory count as the target's: the proxy,
        or etcd for direct."""
        return self.etcd.pid if self.proxy is None else self.proxy.pid

    def alive(self):
        return self.etcd.alive() if self.proxy is None else self.proxy.is_running()

    def check_alive(self):
        if not self.etcd.alive():
            raise TargetCrashed("etcd exited with %s:\n%s" % (self.etcd.proc.returncode, self.etcd.log()))
        if self.proxy is not None and not self.proxy.is_running():
            rc = self.proxy.proc.poll() if self.proxy.proc is not None else None
            raise TargetCrashed("%s exited with %s:\n%s" % (TARGET_LABEL[self.name], rc,
                                                            _tail(self.proxy.log(), 6000)))

    def log(self):
        return self.proxy.log() if self.proxy is not None else self.etcd.log()

    def all_logs(self):
        """Logs of every proxy process this target ran, oldest first."""
        parts = list(self.old_logs)
        if self.proxy is not None:
            parts.append(self.proxy.log())
        return "\n".join("===== %s proxy process %d =====\n%s" % (self.name, i + 1, text)
                         for i, text in enumerate(parts))


class Snapshot(object):
    """CPU of the target, of etcd and of the machine at one moment."""

    def __init__(self, target):
        self.t = time.monotonic()
        self.target_cpu = cpu_seconds(target.pid)
        self.etcd_cpu = cpu_seconds(target.etcd.pid)
        self.machine = machine_cpu()
        self.children = children_cpu()

    def delta(self, later):
        busy = later.machine[0] - self.machine[0]
        total = later.machine[1] - self.machine[1]
        return {
            "wall_s": later.t - self.t,
            "target_cpu_s": later.target_cpu - self.target_cpu,
            "etcd_cpu_s": later.etcd_cpu - self.etcd_cpu,
            # 100 % = every core busy
            "machine_busy_pct": 100.0 * busy / total if total > 0 else 0.0,
        }


# --------------------------------------------------------------- load drivers

class Driver(object):
    """etcdbench-driver as a child: JSON lines out, one line in per phase."""

    def __init__(self, args, logdir, timeout, check=None):
        self.check = check      # raises TargetCrashed when a target died
        self.args = [DRIVER] + args
        self.timeout = timeout
        self.deadline = time.monotonic() + timeout
        self.errpath = os.path.join(logdir, "driver-%d.err" % int(time.time() * 1000))
        self.err = open(self.errpath, "wb")
        self.cpu0 = children_cpu()
        self.proc = subprocess.Popen(self.args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.err, env=_clean_env())
        self.lines = queue.Queue()
        self.last_cpu = 0.0
        t = threading.Thread(target=self._reader, daemon=True)
        t.start()

    def _reader(self):
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def cpu(self):
        """The driver's CPU so far (while it runs)."""
        try:
            self.last_cpu = cpu_seconds(self.proc.pid)
        except (OSError, ValueError):
            pass
        return self.last_cpu

    def next(self):
        while True:
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                self.close()
                raise BenchError("driver timed out after %.0fs: %s\n%s"
                                 % (self.timeout, " ".join(self.args), _tail(_read(self.errpath))))
            try:
                line = self.lines.get(timeout=min(0.25, remaining))
                break
            except queue.Empty:
                if self.check is not None:
                    try:
                        self.check()
                    except TargetCrashed:
                        self.close()
                        raise
        if line is None:
            rc = self.proc.wait(timeout=10)
            raise BenchError("driver exited (%s) early: %s\n%s"
                             % (rc, " ".join(self.args), _tail(_read(self.errpath))))
        try:
            obj = json.loads(line)
        except ValueError:
            raise BenchError("driver printed %r" % line[:300])
        if obj.get("phase") == "fatal":
            self.close()
            raise BenchError("driver failed: %s" % obj.get("message"))
        return obj

    def proceed(self):
        self.proc.stdin.write(b"go\n")
        self.proc.stdin.flush()

    def finish(self):
        """Waits for the driver to exit; returns its total CPU seconds."""
        try:
            self.proc.wait(timeout=max(5.0, self.deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.close()
            raise BenchError("driver did not exit: %s" % " ".join(self.args))
        self.err.close()
        return children_cpu() - self.cpu0

    def close(self):
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        _stop(self.proc, grace=5.0)
        if not self.err.closed:
            self.err.close()


def run_driver_simple(args, logdir, timeout=120.0, check=None):
    """A driver run without phases (maint): returns its exit object."""
    d = Driver(args, logdir, timeout, check=check)
    try:
        obj = d.next()
        d.finish()
        return obj
    finally:
        d.close()


# ------------------------------------------------------- a stalled watch client

WATCH_METHOD = "/etcdserverpb.Watch/Watch"


class StalledWatch(object):
    """A client that watches ``key`` on one Watch stream and never reads it:
    a raw HTTP/2 connection (tests.support.rawh2) that never sends a
    WINDOW_UPDATE for the stream's DATA. A thread keeps the connection
    serviced (SETTINGS, PINGs, the connection window) until finish(), which
    then reads the stream again, to its end, to learn how the target ended it."""

    CREATE_TIMEOUT = 10.0
    END_TIMEOUT = 10.0

    def __init__(self, address, key):
        self.address = address
        self.key = key.encode()
        self.client = None
        self.sid = None
        self.error = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._pump_loop, daemon=True)

    def start(self):
        self.client = H2Client(self.address)
        create = rpc_pb2.WatchRequest(create_request=rpc_pb2.WatchCreateRequest(key=self.key))
        self.sid = self.client.request(WATCH_METHOD, grpc_frame(create.SerializeToString()), end_stream=False)
        self.client.stalled.add(self.sid)
        self._wait_created()
        self._thread.start()
        return self

    def _wait_created(self):
        r = self.client.responses[self.sid]

        def first_size():  # of the first gRPC message, once it is all there
            n = 5 + int.from_bytes(r.data[1:5], "big") if len(r.data) >= 5 else None
            return n if n is not None and len(r.data) >= n else None

        deadline = time.monotonic() + self.CREATE_TIMEOUT
        while first_size() is None and not r.done and time.monotonic() < deadline:
            self.client._pump(0.1)
        n = first_size()
        if n is None or not rpc_pb2.WatchResponse.FromString(bytes(r.data[5:n])).created:
            raise BenchError("stalled watch client: no created response from %s: %r" % (self.address, r))

    def _pump_loop(self):
        try:
            while not self._stop.is_set() and not self.client.eof and self.client.terminated is None:
                self.client._pump(0.05)
        except Exception as e:  # reported by finish()
            self.error = "%s: %s" % (type(e).__name__, e)

    def finish(self):
        """Stops the pump, then reads the stream again until it ends (at most
        END_TIMEOUT s); returns what happened: kB received while stalled,
        whether it had ended by then, the grpc-status code and message (None
        when the stream did not end with one), and a line of text."""
        self._stop.set()
        self._thread.join()
        r = self.client.responses[self.sid]
        out = {"kb_while_stalled": len(r.data) / 1024.0, "ended_while_stalled": r.done,
               "pump_error": self.error}
        try:
            self.client.stalled.discard(self.sid)
            if not r.done:
                self.client.conn.acknowledge_received_data(len(r.data), self.sid)
                self.client.flush()
            self.client.wait(self.sid, timeout=self.END_TIMEOUT)
        except (AssertionError, OSError, h2.exceptions.H2Error):
            pass  # told by the text below
        code, message = r.status or (None, None)
        out.update(code=code, message=message, reset=r.reset, kb_total=len(r.data) / 1024.0)
        out["text"] = self._describe(out)
        return out

    def _describe(self, out):
        if out["code"] is not None:
            name = {c.value: c.name for c in StatusCode}.get(out["code"], "?")
            how = "ended with grpc-status %d %s: %r" % (out["code"], name, out["message"])
        elif out["reset"] is not None:
            how = "was reset (HTTP/2 error code %s)" % out["reset"]
        elif self.client.eof or self.client.terminated is not None:
            how = "lost its connection without a status"
        else:
            how = "was still open %.0f s after the reader resumed" % self.END_TIMEOUT
        return "%s, %s while the client did not read (%.0f kB received then, %.0f kB in all)" % (
            how, "had ended" if out["ended_while_stalled"] else "had not ended",
            out["kb_while_stalled"], out["kb_total"])

    def close(self):
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        if self.client is not None:
            self.client.close()
            self.client = None


_PCT = re.compile(r"^\s*([0-9.]+)% in ([0-9.eE+-]+) secs")


STALL_TIMEOUT = 20.0
_BAR = re.compile(rb"(\d+) / (\d+)")


def _progress(f):
    """Requests done so far, from the tail of tools/benchmark's progress bar."""
    try:
        size = os.fstat(f.fileno()).st_size
        tail = os.pread(f.fileno(), 400, max(0, size - 400))
    except OSError:
        return -1
    hits = _BAR.findall(tail)
    return int(hits[-1][0]) if hits else -1


def run_benchmark(target, args, total, timeout):
    """etcd's tools/benchmark against ``target``; returns the parsed report.
    Raises TargetCrashed as soon as the target (or etcd) dies."""
    cmd = [BENCHMARK, "--endpoints", target.endpoint, "--precise", "--dial-timeout", "10s"] + args
    c0 = children_cpu()
    with tempfile.TemporaryFile() as out_f, tempfile.TemporaryFile() as err_f:
        p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out_f, stderr=err_f, env=_clean_env())
        deadline = time.monotonic() + timeout
        done, last_change = -1, time.monotonic()
        try:
            while True:
                try:
                    p.wait(timeout=0.25)
                    break
                except subprocess.TimeoutExpired:
                    pass
                target.check_alive()
                now = time.monotonic()
                if now > deadline:
                    raise BenchError("benchmark timed out after %.0fs: %s" % (timeout, " ".join(cmd)))
                # its progress bar ("N / TOTAL") tells whether requests still complete
                n = _progress(out_f)
                if n != done:
                    done, last_change = n, now
                elif now - last_change > STALL_TIMEOUT:
                    raise BenchError("benchmark made no progress for %.0fs (%s of %d requests done): %s"
                                     % (STALL_TIMEOUT, max(done, 0), total, " ".join(cmd)))
        finally:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=10)
        cpu = children_cpu() - c0
        out_f.seek(0)
        err_f.seek(0)
        out = out_f.read().decode("utf-8", "replace")
        stderr = err_f.read().decode("utf-8", "replace")
    res = {"loadgen_cpu_s": cpu, "errors": []}
    pcts = {}
    in_errors = False
    for line in out.splitlines():
        if line.startswith("  Requests/sec:"):
            res["rps"] = float(line.split()[1])
        elif line.startswith("  Average:"):
            res["avg_ms"] = float(line.split()[1]) * 1000
        elif line.startswith("  Total:"):
            res["total_s"] = float(line.split()[1])
        elif line.startswith("Error distribution"):
            in_errors = True
        elif in_errors and line.strip():
            res["errors"].append(line.strip())
        m = _PCT.match(line)
        if m:
            pcts[m.group(1)] = float(m.group(2)) * 1000
    res["p50_ms"] = pcts.get("50")
    res["p99_ms"] = pcts.get("99")
    if p.returncode != 0:
        res["errors"].append("benchmark exit %d: %s" % (p.returncode, _tail(stderr, 800)))
    if "rps" not in res and not res["errors"]:
        res["errors"].append("no report from benchmark: %s" % _tail(out, 800))
    res["requests"] = total
    return res


# ------------------------------------------------------------------ the suite

class Suite(object):
    def __init__(self, opts, mode):
        self.opts = opts
        self.mode = mode
        self.records = []
        self.failures = []          # (target, text)
        self.workdir = None
        self.etcd = None
        self.targets = {}
        self.seq = 0

    # -- lifecycle -----------------------------------------------------------

    def start(self):
        base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
        self.workdir = tempfile.mkdtemp(prefix="etcdproxy-bench-", dir=base)
        self.tmpfs = base is not None
        say("workdir %s (%s)" % (self.workdir, "tmpfs" if self.tmpfs else "disk"))
        self.etcd = Etcd(self.workdir).start()
        for name in TARGETS:
            self.targets[name] = Target(name, self.etcd).start()
        say("etcd %s (pid %d); Go proxy %s (pid %d); this proxy %s (pid %d)" % (
            self.etcd.endpoint, self.etcd.pid, self.targets["go"].endpoint, self.targets["go"].pid,
            self.targets["this"].endpoint, self.targets["this"].pid))

    def stop(self):
        for t in self.targets.values():
            try:
                t.stop()
            except Exception as e:  # keep stopping the others
                say("stopping %s: %s" % (t.name, e))
        if self.etcd is not None:
            self.etcd.stop()
        if self.workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def save_logs(self, outdir):
        d = os.path.join(outdir, "logs")
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "etcd.log"), "w") as f:
            f.write(_read(self.etcd.log_path) if self.etcd else "")
        for name, t in self.targets.items():
            if name != "direct":
                with open(os.path.join(d, "%s-proxy.log" % name), "w") as f:
                    f.write(t.all_logs())
        for fn in os.listdir(self.workdir or "."):
            if fn.startswith("driver-") and os.path.getsize(os.path.join(self.workdir, fn)) > 0:
                shutil.copy(os.path.join(self.workdir, fn), d)
        return d

    # -- helpers -------------------------------------------------------------

    def check_all_alive(self):
        for t in self.targets.values():
            t.check_alive()

    def maint(self, put_key=None):
        """Compact at the current revision and defragment."""
        args = ["maint", "-endpoint", self.etcd.endpoint]
        if put_key:
            args += ["-put-key", put_key, "-put-size", "256"]
        return run_driver_simple(args, self.workdir, check=self.check_etcd)

    def check_etcd(self):
        if not self.etcd.alive():
            raise TargetCrashed("etcd exited with %s:\n%s" % (self.etcd.proc.returncode, self.etcd.log()))

    def order(self, rep):
        """Targets in an order that rotates with the repetition."""
        k = rep % len(TARGETS)
        return list(TARGETS[k:] + TARGETS[:k])

    def fresh_key(self, prefix):
        self.seq += 1
        return "/bench/%s/%d-%d" % (prefix, os.getpid(), self.seq)

    def record(self, workload, config, target, rep, metrics, errors=(), extra=None):
        rec = {"workload": workload, "config": config, "target": target.name, "rep": rep,
               "metrics": metrics, "errors": list(errors)}
        if extra:
            rec["extra"] = extra
        self.records.append(rec)
        if errors:
            self.failures.append((target.name, "%s %s rep %d: %s" % (workload, config, rep + 1,
                                                                    "; ".join(map(str, errors))[:2000])))
            say("  !! %s %s %s: ERRORS: %s" % (workload, config, target.name, "; ".join(map(str, errors))[:1000]))
        return rec

    def progress(self, workload, config, rep, target, text):
        say("  [%s %s rep %d/%d] %-6s %s" % (workload, config, rep + 1, self.mode["reps"], target.name, text))

    def each_target(self, workload, config, run):
        """run(rep, target) for every repetition and target, the targets in
        an order that rotates with the repetition; see guarded()."""
        for rep in range(self.mode["reps"]):
            for name in self.order(rep):
                t = self.targets[name]
                self.guarded(workload, config, rep, t, lambda: run(rep, t))

    def guarded(self, workload, config, rep, target, fn):
        """Runs one measurement; a failure of the run is recorded (the suite
        goes on), a crashed target aborts the suite."""
        try:
            target.check_alive()
            fn()
        except TargetCrashed:
            raise
        except BenchError as e:
            self.record(workload, config, target, rep, {}, [str(e)])
        except Exception:
            self.check_all_alive()      # a dead target explains it best
            raise
        self.check_all_alive()

    # -- W1-W3: etcd's tools/benchmark ----------------------------------------

    def _benchmark_run(self, workload, config, rep, target, args, total, ranges=False):
        self.maint(put_key="/bench/hot" if ranges else None)
        timeout = 60.0 + total / 50.0
        m0 = self.etcd.metrics() if ranges else None
        s0 = Snapshot(target)
        res = run_benchmark(target, args, total, timeout)
        s1 = Snapshot(target)
        d = s0.delta(s1)
        errors = res.pop("errors")
        metrics = {
            "rps": res.get("rps"), "p50_ms": res.get("p50_ms"), "p99_ms": res.get("p99_ms"),
            "target_cpu_per_10k": d["target_cpu_s"] / total * 1e4,
            "target_cpu_ms_per_req": d["target_cpu_s"] / total * 1e3,
            "target_cpu_pct": 100.0 * d["target_cpu_s"] / max(d["wall_s"], 1e-9),
            "etcd_cpu_per_10k": d["etcd_cpu_s"] / total * 1e4,
            "loadgen_cpu_per_10k": res["loadgen_cpu_s"] / total * 1e4,
            "machine_busy_pct": d["machine_busy_pct"],
        }
        if ranges:
            m1 = self.etcd.metrics()
            r = (m1.sum("grpc_server_handled_total", grpc_method="Range")
                 - m0.sum("grpc_server_handled_total", grpc_method="Range"))
            metrics["etcd_ranges_per_req"] = r / total
        self.record(workload, config, target, rep, metrics, errors)
        self.progress(workload, config, rep, target, "%8.0f req/s  p50 %6.2f ms  p99 %7.2f ms  cpu/10k %.2fs  busy %3.0f%%" % (
            metrics["rps"] or 0, metrics["p50_ms"] or 0, metrics["p99_ms"] or 0,
            metrics["target_cpu_per_10k"], metrics["machine_busy_pct"]))

    def w1(self):
        for conc, total in sorted(self.mode["w1"].items()):
            config = "c=%d" % conc
            args = ["--clients", str(conc), "--conns", str(conc), "put", "--total", str(total),
                    "--val-size", "256", "--key-size", "16", "--key-space-size", "100000"]
            self.each_target("W1", config, lambda rep, t: self._benchmark_run("W1", config, rep, t, args, total))

    def _range(self, workload, spec, consistency):
        for conc, total in sorted(spec.items()):
            config = "c=%d" % conc
            args = ["--clients", str(conc), "--conns", str(conc), "range", "/bench/hot",
                    "--consistency", consistency, "--total", str(total)]
            self.each_target(workload, config,
                             lambda rep, t: self._benchmark_run(workload, config, rep, t, args, total, ranges=True))

    def w2(self):
        self._range("W2", self.mode["w2"], "s")

    def w3(self):
        self._range("W3", self.mode["w3"], "l")

    # -- W8: large answers ------------------------------------------------------

    def _fill_large_list(self, prefix):
        """LARGE_LIST keys under ``prefix``, put directly into etcd in Txns of 25 (one DATA frame each)."""
        client = H2Client(self.etcd.endpoint)
        try:
            value = b"v" * LARGE_LIST["value_size"]
            for start in range(0, LARGE_LIST["keys"], 25):
                txn = rpc_pb2.TxnRequest(success=[
                    rpc_pb2.RequestOp(request_put=rpc_pb2.PutRequest(key=b"%s%06d" % (prefix, i), value=value))
                    for i in range(start, min(start + 25, LARGE_LIST["keys"]))])
                answer = client.call("/etcdserverpb.KV/Txn", grpc_frame(txn.SerializeToString()))
                if answer.status is None or answer.status[0] != 0:
                    raise BenchError("filling the large list failed: %r" % (answer,))
        finally:
            client.close()

    def w8(self):
        prefix = self.fresh_key("list").encode() + b"/"
        self._fill_large_list(prefix)
        end = prefix[:-1] + b"0"  # the prefix's range end
        total = self.mode["w8"]
        config = "%d keys x %d B, c=1" % (LARGE_LIST["keys"], LARGE_LIST["value_size"])
        args = ["--clients", "1", "--conns", "1", "range", prefix.decode(), end.decode(),
                "--consistency", "l", "--total", str(total)]
        self.each_target("W8", config, lambda rep, t: self._benchmark_run("W8", config, rep, t, args, total,
                                                                          ranges=True))

    # -- W4: watch fan-out ------------------------------------------------------

    def _watchfan(self, target, key, args, timeout):
        """One etcdbench-driver watchfan run on ``key`` against ``target``:
        returns (metrics, errors, extra). CPU is taken while the writers put;
        the target's RSS when the watchers are ready and after the puts."""
        m0 = self.etcd.metrics()
        d = Driver(["watchfan", "-endpoint", target.endpoint, "-key", key, "-writers", "4", "-window", "4",
                    "-setup-timeout", "180s", "-drain-timeout", "60s", "-stall-timeout", "30s"] + args,
                   self.workdir, timeout=timeout, check=target.check_alive)
        try:
            ready = d.next()
            m1 = self.etcd.metrics()
            rss0 = rss_bytes(target.pid)
            c0 = d.cpu()
            s0 = Snapshot(target)
            d.proceed()
            res = d.next()
            s1 = Snapshot(target)
            c1 = d.cpu()
            rss1 = rss_bytes(target.pid)
            d.proceed()
            d.next()
            d.finish()
        finally:
            d.close()
        delta = s0.delta(s1)
        ev = max(res.get("events_delivered", 0), 1)
        errors = []
        if res.get("error_total"):
            errors.append("errors %s: %s" % (res.get("errors"), "; ".join(res.get("error_samples") or [])))
        metrics = {
            "events_per_s": res.get("events_per_s"),
            "puts_per_s": res.get("puts_per_s"),
            "last_p50_ms": res.get("last_watcher_latency_p50_ms"),
            "last_p99_ms": res.get("last_watcher_latency_p99_ms"),
            "target_cpu_per_1M_events": delta["target_cpu_s"] / ev * 1e6,
            "target_cpu_pct": 100.0 * delta["target_cpu_s"] / max(delta["wall_s"], 1e-9),
            "etcd_cpu_per_1M_events": delta["etcd_cpu_s"] / ev * 1e6,
            "loadgen_cpu_per_1M_events": (c1 - c0) / ev * 1e6,
            "machine_busy_pct": delta["machine_busy_pct"],
            "setup_s": ready.get("setup_s"),
            "etcd_watchers": (m1.sum("etcd_debugging_mvcc_watcher_total")
                              - m0.sum("etcd_debugging_mvcc_watcher_total")),
            "rss_before_mb": rss0 / 2.0 ** 20, "rss_after_mb": rss1 / 2.0 ** 20,
        }
        extra = {"puts": res.get("puts"), "events": res.get("events_delivered"), "streams": ready.get("streams"),
                 "connections": ready.get("connections"), "elapsed_s": res.get("elapsed_s"),
                 "errors": res.get("errors")}
        return metrics, errors, extra

    def _fanout_progress(self, workload, config, rep, target, metrics):
        self.progress(workload, config, rep, target, "%9.0f events/s  %6.1f puts/s  last p50 %7.1f ms p99 %7.1f ms  cpu/1M %.1fs  setup %.1fs  watchers at etcd %+.0f" % (
            metrics["events_per_s"] or 0, metrics["puts_per_s"] or 0, metrics["last_p50_ms"] or 0,
            metrics["last_p99_ms"] or 0, metrics["target_cpu_per_1M_events"], metrics["setup_s"] or 0,
            metrics["etcd_watchers"]))

    def _w4_timed(self, n, rep, target):
        """n watchers, one watch stream each, 20 streams per connection; the
        writers put for w4_duration seconds."""
        config = "%d watchers" % n
        self.maint()
        metrics, errors, extra = self._watchfan(
            target, self.fresh_key("w4"),
            ["-watchers", str(n), "-per-conn", "20", "-duration", "%.3fs" % self.mode["w4_duration"],
             "-value-size", "128"], timeout=300.0 + self.mode["w4_duration"])
        self.record("W4", config, target, rep, metrics, errors, extra=extra)
        self._fanout_progress("W4", config, rep, target, metrics)

    def _shared_fanout(self, spec, key, target):
        """The fan-out of ``spec`` (SHARED_FANOUT, STALLED_FANOUT): several
        watchers per stream and an exact number of puts, all of which every
        watcher must get."""
        args = ["-watchers", str(spec["watchers"]), "-per-stream", str(spec["per_stream"]),
                "-per-conn", str(spec["per_conn"]), "-duration", "0", "-max-puts", str(spec["puts"]),
                "-value-size", str(spec["value_size"])]
        metrics, errors, extra = self._watchfan(target, key, args, timeout=300.0 + spec["puts"] / 20.0)
        if not errors and extra["puts"] != spec["puts"]:
            errors.append("%s puts made, not %d" % (extra["puts"], spec["puts"]))
        return metrics, errors, extra

    def _w4_shared(self, config, rep, target):
        spec = self.mode["w4_shared"]
        self.maint()
        metrics, errors, extra = self._shared_fanout(spec, self.fresh_key("w4"), target)
        if target.name == "this":
            extra["note"] = "%s: etcd's watcher gauge rose by %.0f (acceptance: exactly 1)" % (
                config, metrics["etcd_watchers"])
        self.record("W4", config, target, rep, metrics, errors, extra=extra)
        self._fanout_progress("W4", config, rep, target, metrics)

    def w4(self):
        for n in self.mode["w4_watchers"]:
            self.each_target("W4", "%d watchers" % n, lambda rep, t: self._w4_timed(n, rep, t))
        spec = self.mode["w4_shared"]
        config = "%d watchers, %d streams, %d conns, %d puts" % (
            spec["watchers"], ceil_div(spec["watchers"], spec["per_stream"]),
            ceil_div(ceil_div(spec["watchers"], spec["per_stream"]), spec["per_conn"]), spec["puts"])
        self.each_target("W4", config, lambda rep, t: self._w4_shared(config, rep, t))

    # -- W5: memory -------------------------------------------------------------

    def _settle_rss(self, pid, wait=1.0):
        time.sleep(wait)
        return rss_bytes(pid)

    def _w5_run(self, kind, n, rep, target):
        config = ("%d idle watchers" % n) if kind == "watchers" else ("%d idle connections" % n)
        target.restart()         # a fresh proxy: no memory left from earlier workloads
        self.maint()
        settle_fresh, settle = self.mode["w5_settle"]  # seconds for RSS to settle
        base = self._settle_rss(target.pid, settle_fresh)
        etcd_base = rss_bytes(self.etcd.pid)
        if kind == "watchers" and n == 0:
            args = ["idle", "-endpoint", target.endpoint, "-conns", "1"]
        elif kind == "watchers":
            args = ["idle", "-endpoint", target.endpoint, "-watchers", str(n), "-per-conn", "20",
                    "-key-mode", "distinct", "-key", self.fresh_key("w5")]
        else:
            args = ["idle", "-endpoint", target.endpoint, "-conns", str(n), "-key", "/bench/hot"]
        d = Driver(args, self.workdir, timeout=300.0, check=target.check_alive)
        try:
            ready = d.next()
            rss = self._settle_rss(target.pid, settle)
            etcd_rss = rss_bytes(self.etcd.pid)
            d.proceed()
            end = d.next()
            d.finish()
        finally:
            d.close()
        errors = []
        for obj in (ready, end):
            if obj.get("error_total"):
                errors.append("errors %s: %s" % (obj.get("errors"), "; ".join(obj.get("error_samples") or [])))
        metrics = {"rss_mb": rss / 2.0 ** 20, "rss_fresh_mb": base / 2.0 ** 20,
                   "etcd_rss_delta_mb": (etcd_rss - etcd_base) / 2.0 ** 20,
                   "setup_s": ready.get("setup_s")}
        if n > 0:
            metrics["kb_per_item"] = (rss - base) / 1024.0 / n
        self.record("W5", config, target, rep, metrics, errors)
        self.progress("W5", config, rep, target, "RSS %7.1f MB (fresh %6.1f MB)%s" % (
            metrics["rss_mb"], metrics["rss_fresh_mb"],
            "  %.2f kB each" % metrics["kb_per_item"] if n > 0 else ""))

    def w5(self):
        cases = [("watchers", n) for n in self.mode["w5_watchers"]]
        cases.append(("conns", self.mode["w5_conns"]))
        for kind, n in cases:
            config = ("%d idle watchers" % n) if kind == "watchers" else ("%d idle connections" % n)
            self.each_target("W5", config, lambda rep, t: self._w5_run(kind, n, rep, t))

    # -- W6: load on etcd -------------------------------------------------------

    def _w6_watchers(self, rep, target):
        n = self.mode["w6_watchers"]
        config = "%d watchers on one key" % n
        target.restart()         # a fresh proxy: nothing open at etcd from earlier runs
        self.maint()
        m0 = self.etcd.metrics()
        d = Driver(["idle", "-endpoint", target.endpoint, "-watchers", str(n), "-per-conn", "20",
                    "-key-mode", "same", "-key", self.fresh_key("w6")], self.workdir, timeout=300.0,
                   check=target.check_alive)
        try:
            ready = d.next()
            # the Go proxy coalesces new watchers some time after creating them
            prev = None
            deadline = time.monotonic() + (3.0 if self.opts.quick else 6.0)
            while True:
                m1 = self.etcd.metrics()
                w = m1.sum("etcd_debugging_mvcc_watcher_total") - m0.sum("etcd_debugging_mvcc_watcher_total")
                if w == prev or time.monotonic() > deadline:
                    break
                prev = w
                time.sleep(0.5)
            streams = (m1.sum("etcd_debugging_mvcc_watch_stream_total")
                       - m0.sum("etcd_debugging_mvcc_watch_stream_total"))
            d.proceed()
            end = d.next()
            d.finish()
        finally:
            d.close()
        errors = []
        for obj in (ready, end):
            if obj.get("error_total"):
                errors.append("errors %s: %s" % (obj.get("errors"), "; ".join(obj.get("error_samples") or [])))
        metrics = {"etcd_watchers": w, "etcd_watch_streams": streams,
                   "etcd_watchers_per_client_watcher": w / float(n)}
        self.record("W6", config, target, rep, metrics, errors)
        self.progress("W6", config, rep, target, "watchers at etcd %5.0f  watch streams at etcd %5.0f" % (w, streams))

    def _w6_leases(self, shared, rep, target):
        n = self.mode["w6_clients"]
        config = "%d keep-alive clients, %s" % (n, "one shared lease" if shared else "distinct leases")
        target.restart()         # a fresh proxy: nothing open at etcd from earlier runs
        self.maint()
        args = ["leases", "-endpoint", target.endpoint, "-clients", str(n), "-per-conn", "20",
                "-ttl", str(self.mode["w6_ttl"]), "-interval", "%.3fs" % self.mode["w6_interval"],
                "-duration", "%.3fs" % self.mode["w6_duration"]]
        if shared:
            args.append("-shared")
        lk = {"grpc_method": "LeaseKeepAlive"}

        def open_streams(m):
            return m.sum("grpc_server_started_total", **lk) - m.sum("grpc_server_handled_total", **lk)

        d = Driver(args, self.workdir, timeout=300.0 + self.mode["w6_duration"], check=target.check_alive)
        try:
            ready = d.next()
            m0 = self.etcd.metrics()
            d.proceed()
            steady = d.next()
            m1 = self.etcd.metrics()
            s1 = Snapshot(target)
            t1 = time.monotonic()
            d.proceed()
            measured = d.next()
            m2 = self.etcd.metrics()
            s2 = Snapshot(target)
            t2 = time.monotonic()
            d.proceed()
            end = d.next()
            d.finish()
        finally:
            d.close()
        window = t2 - t1
        errors = []
        for obj in (ready, steady, measured, end):
            if obj.get("error_total"):
                errors.append("%s: errors %s: %s" % (obj.get("phase"), obj.get("errors"),
                                                     "; ".join(obj.get("error_samples") or [])))
                break
        msgs = (m2.sum("grpc_server_msg_received_total", **lk)
                - m1.sum("grpc_server_msg_received_total", **lk))
        metrics = {
            "etcd_keepalive_streams": open_streams(m2) - open_streams(m0),
            "etcd_keepalive_msgs_per_s": msgs / window,
            "client_keepalive_msgs_per_s": (measured["sent"] - steady["sent"]) / window,
            "etcd_lease_renewals_per_s": (m2.sum("etcd_debugging_lease_renewed_total")
                                          - m1.sum("etcd_debugging_lease_renewed_total")) / window,
            "first_answer_p50_ms": end.get("first_answer_p50_ms"),
            "first_answer_p99_ms": end.get("first_answer_p99_ms"),
            "target_cpu_pct": 100.0 * s1.delta(s2)["target_cpu_s"] / window,
            "machine_busy_pct": s1.delta(s2)["machine_busy_pct"],
        }
        self.record("W6", config, target, rep, metrics, errors)
        self.progress("W6", config, rep, target, "streams at etcd %5.0f  msgs at etcd %7.1f/s (clients %7.1f/s)  first answer p50 %.1f ms p99 %.1f ms" % (
            metrics["etcd_keepalive_streams"], metrics["etcd_keepalive_msgs_per_s"],
            metrics["client_keepalive_msgs_per_s"], metrics["first_answer_p50_ms"] or 0,
            metrics["first_answer_p99_ms"] or 0))

    def _w6_hot_gets(self, rep, target):
        total = self.mode["w6_gets"]
        config = "hot loop of serializable gets"
        self.maint(put_key="/bench/hot")
        m0 = self.etcd.metrics()
        res = run_benchmark(target, ["--clients", "1", "--conns", "1", "range", "/bench/hot",
                                     "--consistency", "s", "--total", str(total)], total, 60.0 + total / 20.0)
        m1 = self.etcd.metrics()
        r = m1.sum("grpc_server_handled_total", grpc_method="Range") - m0.sum("grpc_server_handled_total", grpc_method="Range")
        metrics = {"etcd_ranges_per_req": r / total, "rps": res.get("rps"), "p50_ms": res.get("p50_ms")}
        self.record("W6", config, target, rep, metrics, res["errors"])
        self.progress("W6", config, rep, target, "etcd Range calls per get %.3f  (%.0f gets/s)" % (
            metrics["etcd_ranges_per_req"], metrics["rps"] or 0))

    def w6(self):
        self.each_target("W6", "watchers", self._w6_watchers)
        for shared in (False, True):
            self.each_target("W6", "leases", lambda rep, t: self._w6_leases(shared, rep, t))
        self.each_target("W6", "gets", self._w6_hot_gets)

    # -- W7: stalled client isolation -------------------------------------------

    def _w7_run(self, rep, target):
        """The W7 fan-out without and with a stalled client on the same key
        (without first in the 1st, 3rd, ... repetition); records both runs and
        their ratios."""
        spec = self.mode["w7"]
        runs = {}
        cases = ((W7_WITHOUT, False), (W7_WITH, True))
        for config, stalled in (cases if rep % 2 == 0 else cases[::-1]):
            self.maint()
            key = self.fresh_key("w7")
            client = StalledWatch(target.endpoint, key) if stalled else None
            try:
                if client is not None:
                    client.start()
                metrics, errors, extra = self._shared_fanout(spec, key, target)
                if client is not None:
                    end = client.finish()
                    metrics.update(stalled_kb=end["kb_while_stalled"], stalled_grpc_status=end["code"])
                    extra["stalled"] = end
                    extra["note"] = "%s: the stalled stream %s" % (TARGET_LABEL[target.name], end["text"])
            finally:
                if client is not None:
                    client.close()
            self.record("W7", config, target, rep, metrics, errors, extra=extra)
            self._fanout_progress("W7", config, rep, target, metrics)
            runs[stalled] = metrics
        self._w7_ratios(rep, target, runs[False], runs[True])

    def _w7_ratios(self, rep, target, without, with_):
        metrics = {"p99_ratio": ratio(with_["last_p99_ms"], without["last_p99_ms"]),
                   "p50_ratio": ratio(with_["last_p50_ms"], without["last_p50_ms"]),
                   "events_ratio": ratio(with_["events_per_s"], without["events_per_s"]),
                   "rss_growth_mb": with_["rss_after_mb"] - with_["rss_before_mb"]}
        p99 = metrics["p99_ratio"]
        extra = {}
        if target.name == "this":
            extra["note"] = "this proxy: put -> last watcher p99 with / without the stalled client %s " \
                            "(acceptance: <= %.1f: %s)" % (ratio_cell(p99), W7_P99_LIMIT,
                                                           "met" if p99 is not None and p99 <= W7_P99_LIMIT
                                                           else "NOT met")
        self.record("W7", W7_RATIO, target, rep, metrics, extra=extra)
        self.progress("W7", W7_RATIO, rep, target, "p99 %s  p50 %s  events/s %s" % tuple(
            ratio_cell(metrics[m]) for m in ("p99_ratio", "p50_ratio", "events_ratio")))

    def w7(self):
        self.each_target("W7", W7_WITH, self._w7_run)


# -------------------------------------------------------------------- report

def _unary_rows(ranges=False):
    """The rows of the tools/benchmark workloads (W1-W3)."""
    return [
        ("rps", "req/s", "high"), ("p50_ms", "p50 ms", "low"), ("p99_ms", "p99 ms", "low"),
        ("target_cpu_per_10k", "target CPU s /10k req", "low"),
        ("target_cpu_pct", "target CPU % of one core", None),
        ("etcd_cpu_per_10k", "etcd CPU s /10k req", "low"),
        *([("etcd_ranges_per_req", "etcd Range calls per request", "low")] if ranges else []),
        ("loadgen_cpu_per_10k", "load generator CPU s /10k req", None),
        ("machine_busy_pct", "machine busy % (2 cores)", None)]


# workload -> [(metric, label, better)] in display order; better: "high"/"low"/None
DISPLAY = {
    "W1": ("W1 Put throughput and latency (256-byte values, tools/benchmark)", _unary_rows()),
    "W2": ("W2 serializable Range on one hot key", _unary_rows(ranges=True)),
    "W3": ("W3 linearizable Range", _unary_rows(ranges=True)),
    "W4": ("W4 watch fan-out (one key, 4 writers, <= 4 puts in flight; \"N watchers\": one watch stream "
           "each, 20 streams per connection, puts for a fixed time)", [
        ("events_per_s", "events/s delivered (all watchers)", "high"),
        ("puts_per_s", "puts/s absorbed", "high"),
        ("last_p50_ms", "put -> last watcher p50 ms", "low"),
        ("last_p99_ms", "put -> last watcher p99 ms", "low"),
        ("target_cpu_per_1M_events", "target CPU s /1M events", "low"),
        ("target_cpu_pct", "target CPU % of one core", None),
        ("etcd_cpu_per_1M_events", "etcd CPU s /1M events", "low"),
        ("etcd_watchers", "watchers at etcd", "low"),
        ("setup_s", "watcher setup s", "low"),
        ("loadgen_cpu_per_1M_events", "load generator CPU s /1M events", None),
        ("machine_busy_pct", "machine busy % (2 cores)", None)]),
    "W5": ("W5 memory (fresh target process; direct = etcd's own RSS)", [
        ("rss_mb", "target RSS MB", "low"), ("rss_fresh_mb", "RSS of the fresh process MB", "low"),
        ("kb_per_item", "kB per watcher / connection", "low"),
        ("etcd_rss_delta_mb", "etcd RSS growth MB", "low"),
        ("setup_s", "setup s", "low")]),
    "W6": ("W6 load reduction seen by etcd (/metrics)", [
        ("etcd_watchers", "watchers at etcd", "low"),
        ("etcd_watch_streams", "watch streams at etcd", "low"),
        ("etcd_keepalive_streams", "keep-alive streams at etcd", "low"),
        ("etcd_keepalive_msgs_per_s", "keep-alive msgs/s at etcd", "low"),
        ("client_keepalive_msgs_per_s", "keep-alive msgs/s sent by clients", None),
        ("etcd_lease_renewals_per_s", "lease renewals/s at etcd", "low"),
        ("first_answer_p50_ms", "first keep-alive answer p50 ms", "low"),
        ("first_answer_p99_ms", "first keep-alive answer p99 ms", "low"),
        ("target_cpu_pct", "target CPU % of one core (keep-alive steady state)", None),
        ("machine_busy_pct", "machine busy % (2 cores)", None),
        ("etcd_ranges_per_req", "etcd Range calls per client get", "low"),
        ("rps", "gets/s (one client)", "high")]),
    "W8": ("W8 large answers: a linearizable Range of %(keys)d keys of %(value_size)d bytes (a 5 MB LIST), "
           "one client, one after the other" % LARGE_LIST, [
        ("p50_ms", "p50 ms per list", "low"), ("p99_ms", "p99 ms per list", "low"),
        ("target_cpu_ms_per_req", "target CPU ms per list", "low"),
        ("etcd_cpu_per_10k", "etcd CPU s /10k lists", None),
        ("loadgen_cpu_per_10k", "load generator CPU s /10k lists", None),
        ("machine_busy_pct", "machine busy % (2 cores)", None)]),
    "W7": ("W7 stalled client isolation (%(watchers)d watchers on one key, %(per_stream)d per stream, "
           "%(per_conn)d streams per connection, %(puts)d puts of %(value_size)d bytes; with / without one "
           "more client on the key that never reads)" % STALLED_FANOUT, [
        ("events_per_s", "events/s delivered (1000 watchers)", "high"),
        ("last_p50_ms", "put -> last watcher p50 ms", "low"),
        ("last_p99_ms", "put -> last watcher p99 ms", "low"),
        ("p99_ratio", "put -> last watcher p99, with / without", "low"),
        ("p50_ratio", "put -> last watcher p50, with / without", "low"),
        ("events_ratio", "events/s, with / without", "high"),
        ("rss_before_mb", "target RSS before the puts MB", "low"),
        ("rss_after_mb", "target RSS after the puts MB", "low"),
        ("rss_growth_mb", "target RSS growth during the run with the stalled client MB", "low"),
        ("stalled_kb", "kB the stalled stream got while not reading", None),
        ("stalled_grpc_status", "grpc-status ending the stalled stream (8 = RESOURCE_EXHAUSTED)", None),
        ("target_cpu_per_1M_events", "target CPU s /1M events", "low"),
        ("machine_busy_pct", "machine busy % (2 cores)", None)]),
}


def fmt_num(v):
    if v is None:
        return "-"
    if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
        return "inf" if v > 0 else "-"
    a = abs(v)
    if a == 0:
        return "0"
    if a >= 1000:
        return "%.0f" % v
    if a >= 100:
        return "%.1f" % v
    if a >= 10:
        return "%.2f" % v
    if a >= 1:
        return "%.2f" % v
    if a >= 0.01:
        return "%.3f" % v
    return "%.2g" % v


def summarize(records):
    """{(workload, config): {metric: {target: {median, min, max, n}}}}, in
    first-seen order."""
    out = {}
    for r in records:
        if r["errors"] and not r["metrics"]:
            continue
        key = (r["workload"], r["config"])
        bucket = out.setdefault(key, {})
        for m, v in r["metrics"].items():
            if v is None:
                continue
            bucket.setdefault(m, {}).setdefault(r["target"], []).append(float(v))
    summary = {}
    for key, metrics in out.items():
        summary[key] = {}
        for m, per_target in metrics.items():
            summary[key][m] = {t: {"median": statistics.median(vs), "min": min(vs), "max": max(vs), "n": len(vs)}
                               for t, vs in per_target.items()}
    return summary


def ratio(a, b):
    if a is None or b is None:
        return None
    if b == 0:
        return 1.0 if a == 0 else float("inf")
    return a / b


def cell(stat, reps):
    if stat is None:
        return "-"
    if stat["n"] > 1 and stat["min"] != stat["max"]:
        return "%s (%s–%s)" % (fmt_num(stat["median"]), fmt_num(stat["min"]), fmt_num(stat["max"]))
    return fmt_num(stat["median"])


def ratio_cell(r):
    if r is None:
        return "-"
    if math.isinf(r):
        return "inf"
    return "%.2f" % r


def render_markdown(summary, records, failures, meta):
    lines = []
    lines.append("# etcdgrpcproxy bench: %s mode, %s" % (meta["mode"], meta["started"]))
    lines.append("")
    lines.append("Targets: **direct** = etcd %s itself, **Go** = `etcd grpc-proxy start`, **this** = "
                 "etcdgrpcproxy (twistd). Cells: median (min–max) over %d repetition(s), targets alternating. "
                 "Ratios are of medians; for req/s and events/s higher is better, for latency, CPU, memory and "
                 "etcd load lower is better. \"target CPU\" is the proxy process (etcd itself for direct). "
                 "Machine: %s, %d cores; etcd data dir on %s; suite took %.0f s."
                 % (meta["etcd_version"], meta["reps"], meta["machine"], meta["cores"],
                    "tmpfs" if meta["tmpfs"] else "disk", meta["elapsed_s"]))
    lines.append("")
    for name, prob in sorted((meta.get("proxy_log_problems") or {}).items()):
        if prob.get("count"):
            lines.append("**Warning:** the %s's log has %d traceback/error line(s); the first:"
                         % (TARGET_LABEL[name], prob["count"]))
            lines.append("")
            lines.append("```")
            lines.append(prob["first"])
            lines.append("```")
            lines.append("")
    if failures:
        lines.append("**FAILURES (%d):**" % len(failures))
        lines.append("")
        for t, text in failures:
            lines.append("- `%s`: %s" % (t, text.replace("\n", " ")[:1500]))
        lines.append("")
    order = []
    for (w, c) in summary:
        if w not in order:
            order.append(w)
    for w in order:
        title, spec = DISPLAY[w]
        lines.append("## " + title)
        lines.append("")
        lines.append("| config | metric | direct | Go proxy | this proxy | this/Go | this/direct |")
        lines.append("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
        for (ww, config), metrics in summary.items():
            if ww != w:
                continue
            first = True
            for m, label, _better in spec:
                if m not in metrics:
                    continue
                st = metrics[m]
                med = {t: st[t]["median"] if t in st else None for t in TARGETS}
                lines.append("| %s | %s | %s | %s | %s | %s | %s |" % (
                    config if first else "", label,
                    cell(st.get("direct"), meta["reps"]), cell(st.get("go"), meta["reps"]),
                    cell(st.get("this"), meta["reps"]),
                    ratio_cell(ratio(med["this"], med["go"])), ratio_cell(ratio(med["this"], med["direct"]))))
                first = False
        lines.append("")
        lines += notes(records, w)
    return "\n".join(lines) + "\n"


def notes(records, workload):
    """Markdown list of the runs' notes (``extra["note"]``) for ``workload``."""
    out = ["- rep %d: %s" % (r["rep"] + 1, r["extra"]["note"]) for r in records
           if r["workload"] == workload and "note" in r.get("extra", {})]
    return out + [""] if out else []


def write_results(outdir, summary, records, failures, meta):
    os.makedirs(outdir, exist_ok=True)
    md = render_markdown(summary, records, failures, meta)
    js = {
        "meta": meta,
        "summary": [{"workload": w, "config": c, "metrics": m} for (w, c), m in summary.items()],
        "ratios": [{"workload": w, "config": c, "metric": m,
                    "this_over_go": ratio(st.get("this", {}).get("median"), st.get("go", {}).get("median")),
                    "this_over_direct": ratio(st.get("this", {}).get("median"), st.get("direct", {}).get("median"))}
                   for (w, c), ms in summary.items() for m, st in ms.items()],
        "runs": records,
        "failures": [{"target": t, "text": x} for t, x in failures],
    }

    def clean(o):
        if isinstance(o, float) and (math.isinf(o) or math.isnan(o)):
            return None
        if isinstance(o, dict):
            return {k: clean(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [clean(v) for v in o]
        return o

    stamp = meta["started"].replace(":", "").replace("-", "")
    for name in ("latest", "bench-%s-%s" % (meta["mode"], stamp)):
        with open(os.path.join(outdir, name + ".md"), "w") as f:
            f.write(md)
        with open(os.path.join(outdir, name + ".json"), "w") as f:
            json.dump(clean(js), f, indent=1, sort_keys=False)
    return md


# ----------------------------------------------------------------------- main

_LOG_PROBLEM = re.compile(r"Traceback \(most recent call last\)|Unhandled [Ee]rror|\bCRITICAL\b|panic:")


def scan_log(text):
    """Counts lines of a proxy log that show an error (tracebacks, unhandled
    errors, Go panics); keeps the first one with some context."""
    lines = text.splitlines()
    hits = [i for i, line in enumerate(lines) if _LOG_PROBLEM.search(line)]
    first = "\n".join(lines[max(0, hits[0] - 2):hits[0] + 25]) if hits else ""
    return {"count": len(hits), "first": first}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="quick mode (under 2 min): fewer requests, 1 repetition, "
                   "100/1000 watchers, 1000 puts for the W4 acceptance configuration, no W7")
    p.add_argument("--workloads", default=None,
                   help="comma-separated subset of %s (default: all; quick mode: all but W7)"
                   % ",".join(ALL_WORKLOADS))
    p.add_argument("--reps", type=int, default=None, help="repetitions (default: 1 quick, 3 full)")
    p.add_argument("--out", default=os.path.join(BENCH_DIR, "results"),
                   help="results directory (default bench/results)")
    p.add_argument("--strict", action="store_true",
                   help="also exit non-zero when the Go reference proxy had errors")
    opts = p.parse_args(argv)
    default = QUICK_WORKLOADS if opts.quick else ALL_WORKLOADS
    wl = [w.strip().upper() for w in (opts.workloads or ",".join(default)).split(",") if w.strip()]
    bad = [w for w in wl if w not in ALL_WORKLOADS]
    if bad or not wl:
        p.error("unknown workload(s) %s; choose from %s" % (bad, ",".join(ALL_WORKLOADS)))
    opts.workload_list = wl
    return opts


def etcd_version():
    try:
        out = subprocess.run([ETCD, "--version"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             timeout=10).stdout.decode()
        m = re.search(r"etcd Version:\s*(\S+)", out)
        return m.group(1) if m else "?"
    except (OSError, subprocess.SubprocessError):
        return "?"


def main(argv=None):
    opts = parse_args(sys.argv[1:] if argv is None else argv)
    for b in (BENCHMARK, DRIVER):
        if not os.access(b, os.X_OK):
            say("missing %s: run bench/setup.sh (make bench does) first" % b)
            return 2
    mode = dict(QUICK if opts.quick else FULL)
    if opts.reps:
        mode["reps"] = opts.reps
    started = datetime.datetime.now().strftime("%Y-%m-%dT%H:%M:%S")
    t_start = time.monotonic()
    suite = Suite(opts, mode)

    def on_signal(signum, frame):
        raise KeyboardInterrupt("signal %d" % signum)

    signal.signal(signal.SIGTERM, on_signal)
    crashed = None
    interrupted = False
    say("etcdgrpcproxy bench: %s mode, workloads %s, %d repetition(s)" % (
        "quick" if opts.quick else "full", ",".join(opts.workload_list), mode["reps"]))
    try:
        suite.start()
        for w in opts.workload_list:
            say("== %s: %s" % (w, DISPLAY[w][0]))
            t0 = time.monotonic()
            getattr(suite, w.lower())()
            say("   (%s took %.1f s)" % (w, time.monotonic() - t0))
    except TargetCrashed as e:
        crashed = str(e)
        suite.failures.append(("crash", "target crashed: " + crashed[:3000]))
        say("!! TARGET CRASHED: %s" % crashed)
    except KeyboardInterrupt:
        interrupted = True
        suite.failures.append(("suite", "interrupted"))
        say("!! interrupted")
    except Exception as e:
        import traceback
        crashed = "%s: %s" % (type(e).__name__, e)
        suite.failures.append(("suite", "%s\n%s" % (crashed, traceback.format_exc())))
        say("!! %s\n%s" % (crashed, traceback.format_exc()))
    finally:
        logdir = None
        log_problems = {}
        try:
            if suite.targets:
                # logs are kept until the processes are gone: read them now
                for name, t in suite.targets.items():
                    if name != "direct":
                        log_problems[name] = scan_log(t.all_logs())
                logdir = suite.save_logs(opts.out)
        except Exception as e:
            say("could not save logs: %s" % e)
        suite.stop()
    meta = {
        "mode": "quick" if opts.quick else "full", "started": started,
        "elapsed_s": time.monotonic() - t_start, "reps": mode["reps"], "workloads": opts.workload_list,
        "settings": {k: (v if not isinstance(v, dict) else {str(a): b for a, b in v.items()})
                     for k, v in mode.items()},
        "etcd_version": etcd_version(), "machine": platform.platform(), "cores": os.cpu_count(),
        "tmpfs": getattr(suite, "tmpfs", False), "python": sys.version.split()[0],
        "crashed": crashed, "interrupted": interrupted, "logs": logdir,
        "proxy_log_problems": log_problems,
    }
    summary = summarize(suite.records)
    md = write_results(opts.out, summary, suite.records, suite.failures, meta)
    say("")
    say(md)
    say("results: %s, %s" % (os.path.join(opts.out, "latest.md"), os.path.join(opts.out, "latest.json")))
    if logdir:
        say("logs: %s" % logdir)
    for name, prob in sorted(log_problems.items()):
        if prob["count"]:
            say("warning: the %s's log has %d traceback/error line(s); first:\n%s"
                % (TARGET_LABEL[name], prob["count"], prob["first"]))
    fatal = [f for f in suite.failures if f[0] != "go" or opts.strict]
    if crashed or interrupted or fatal:
        say("FAILED: %d failure(s)%s" % (len(suite.failures), "; the suite stopped early" if crashed else ""))
        return 1
    if suite.failures:
        say("note: the Go reference proxy had %d failure(s) (see above); not fatal without --strict"
            % len(suite.failures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
