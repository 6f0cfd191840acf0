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
"""
import argparse
import array
import asyncio
import collections
import datetime
import gc
import importlib.util
import itertools
import json
import math
import os
import platform
import random
import resource
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
    import grpc  # noqa: F401
    import twisted  # noqa: F401  (the proxy under test runs with sys.executable)
except ImportError:
    if os.path.exists(VENV_PY) and os.path.realpath(sys.executable) != os.path.realpath(VENV_PY):
        os.execv(VENV_PY, [VENV_PY] + sys.argv)
    raise

sys.path.insert(0, REPO)
import grpc.aio  # noqa: E402

from tests.support import aio  # noqa: E402
from tests.support.proxy import ProxyProcess  # noqa: E402
from tests.support.stubs import load_stubs  # noqa: E402


def _load_bench_run():
    """bench/run.py as a module (its etcd runner and /proc helpers)."""
    spec = importlib.util.spec_from_file_location("etcdproxy_bench_run", os.path.join(BENCH_DIR, "run.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


bench = _load_bench_run()
say = bench.say

pb = None           # the grpcio stubs, loaded in main()
R = None

UNARY_TIMEOUT = 10.0        # deadline of every unary call
CREATE_TIMEOUT = 10.0       # a watch create must be answered within this
CATCH_UP_TIMEOUT = 30.0     # after the last put, every watcher must have it within this
FDS_SETTLE_TIMEOUT = 10.0   # after the clients left, the proxy's FDs must settle within this
FDS_RELEASED_SLACK = 2      # ... to at most the count before any client + this
CHANNEL_OPTIONS = [
    # every channel is a connection of its own (grpcio shares connections
    # between channels with the same arguments by default)
    ("grpc.use_local_subchannel_pool", 1),
    ("grpc.enable_retries", 0),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
]
MAX_ERROR_SAMPLES = 50


class SoakError(Exception):
    """The soak could not run (set-up failed, the proxy died)."""


class Failed(Exception):
    """A request's answer was wrong (not an RPC error)."""


def fd_count(pid):
    return len(os.listdir("/proc/%d/fd" % pid))


def self_cpu():
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


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


# -------------------------------------------------------------------- stats

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


class Stats(object):
    """Counters of the load, written on the asyncio loop and read by the
    sampler (plain ints: reading them from another thread is safe)."""

    def __init__(self):
        self.t0 = time.monotonic()
        self.done = collections.Counter()
        self.events = 0
        self.errors = collections.Counter()
        self.error_samples = []
        self.keepalive_max_s = 0.0
        self.loop_lag_max_s = 0.0       # whole run
        self.loop_lag_window_s = 0.0    # since the last sample

    def error(self, kind, text):
        self.errors[kind] += 1
        if len(self.error_samples) < MAX_ERROR_SAMPLES:
            self.error_samples.append({"t": round(time.monotonic() - self.t0, 3), "kind": kind,
                                       "error": text[:500]})
        if sum(self.errors.values()) <= 5:
            say("  !! error (%s): %s" % (kind, text[:300]))

    def total_errors(self):
        return sum(self.errors.values())


def rpc_text(e):
    if isinstance(e, grpc.aio.AioRpcError):
        return "%s: %s" % (e.code().name, e.details())
    if isinstance(e, asyncio.TimeoutError):
        return "timed out"
    return "%s: %s" % (type(e).__name__, e)


# --------------------------------------------------------------------- load

class Watcher(object):
    __slots__ = ("key", "watch_id", "stream", "created_rev", "last", "revs")

    def __init__(self, key, watch_id, stream, created_rev):
        self.key = key
        self.watch_id = watch_id
        self.stream = stream
        self.created_rev = created_rev
        self.last = created_rev
        self.revs = array.array("q")


class WatchStream(object):
    def __init__(self, index, call):
        self.index = index
        self.call = call
        self.watchers = {}      # watch_id -> Watcher
        self.task = None


class Load(object):
    """Every client of the soak, on the asyncio loop of tests.support.aio."""

    def __init__(self, address, opts, stats):
        self.address = address
        self.opts = opts
        self.stats = stats
        self.loop = None
        self.channels = []
        self.stopping = False       # puts, gets, churn stop
        self.closing = False        # everything stops; stream ends are expected
        self.hot_keys = [b"/soak/watched/%d" % i for i in range(opts.watch_keys)]
        self.keys = [b"/soak/kv/%04d" % i for i in range(opts.keys)]
        self.put_revs = {k: array.array("q") for k in self.hot_keys}   # acknowledged put revisions
        self.acked = {}             # key -> highest revision of an acknowledged put
        self.watch_streams = []
        self.watchers = []
        self.leases = []            # distinct leases
        self.shared_lease = None
        self.keepalive_tasks = []
        self.load_tasks = []
        self.monitor_task = None
        self._hot_cycle = itertools.cycle(self.hot_keys)
        self._churn_cycle = itertools.cycle(("range", "watch", "keepalive")
                                            if opts.lease_clients or opts.shared_lease_clients else ("range", "watch"))
        self._seq = 0
        self.catch_up_s = None
        self.lease_ttls = {}

    def channel(self):
        ch = grpc.aio.insecure_channel(self.address, options=CHANNEL_OPTIONS)
        self.channels.append(ch)
        return ch

    # -- set-up --------------------------------------------------------------

    async def setup(self):
        self.loop = asyncio.get_running_loop()
        self.monitor_task = asyncio.ensure_future(self._lag_monitor())
        o = self.opts
        self.kv = [pb.KVStub(self.channel()) for _ in range(o.kv_conns)]
        self.lease_stubs = [pb.LeaseStub(self.channel()) for _ in range(o.lease_conns)]
        # every key exists before the load (gets then always find one)
        sem = asyncio.Semaphore(16)

        async def put(key):
            async with sem:
                resp = await self.kv[0].Put(R.PutRequest(key=key, value=b"initial"), timeout=UNARY_TIMEOUT)
                self.acked[key] = resp.header.revision

        await asyncio.gather(*(put(k) for k in self.hot_keys + self.keys))

        async def grant():
            async with sem:
                resp = await self.lease_stubs[0].LeaseGrant(R.LeaseGrantRequest(TTL=o.lease_ttl),
                                                            timeout=UNARY_TIMEOUT)
                if resp.error or resp.TTL <= 0:
                    raise SoakError("LeaseGrant answered %r" % resp)
                return resp.ID

        ids = await asyncio.gather(*(grant() for _ in range(o.lease_clients + (1 if o.shared_lease_clients else 0))))
        self.leases = ids[:o.lease_clients]
        self.shared_lease = ids[o.lease_clients] if o.shared_lease_clients else None
        # watchers: stream s on connection s % conns; watcher i on key i % keys,
        # spread round-robin over the streams
        wchans = [self.channel() for _ in range(o.watch_conns)]
        per_stream = [[] for _ in range(o.watch_streams)]
        for i in range(o.watchers):
            per_stream[i % o.watch_streams].append(self.hot_keys[i % len(self.hot_keys)])
        await asyncio.gather(*(self._open_watch_stream(s, wchans[s % len(wchans)], keys)
                               for s, keys in enumerate(per_stream) if keys))
        if len(self.watchers) != o.watchers:
            raise SoakError("%d of %d watchers created" % (len(self.watchers), o.watchers))

    async def _open_watch_stream(self, index, ch, keys):
        call = pb.WatchStub(ch).Watch()
        ws = WatchStream(index, call)
        self.watch_streams.append(ws)
        for key in keys:
            await call.write(R.WatchRequest(create_request=R.WatchCreateRequest(key=key)))
            while True:
                resp = await asyncio.wait_for(call.read(), CREATE_TIMEOUT)
                if resp is grpc.aio.EOF:
                    raise SoakError("watch stream %d ended while creating watchers" % index)
                if resp.created:
                    break
                self._on_watch_response(ws, resp)
            if resp.canceled:
                raise SoakError("watch create on stream %d canceled: %r" % (index, resp.cancel_reason))
            w = Watcher(key, resp.watch_id, index, resp.header.revision)
            if resp.watch_id in ws.watchers:
                raise SoakError("watch stream %d: watch id %d created twice" % (index, resp.watch_id))
            ws.watchers[resp.watch_id] = w
            self.watchers.append(w)
        ws.task = asyncio.ensure_future(self._read_watch(ws))

    # -- watchers ------------------------------------------------------------

    async def _read_watch(self, ws):
        try:
            while True:
                resp = await ws.call.read()
                if resp is grpc.aio.EOF:
                    if not self.closing:
                        self.stats.error("watch", "watch stream %d ended (status OK)" % ws.index)
                    return
                self._on_watch_response(ws, resp)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            if not self.closing:
                self.stats.error("watch", "watch stream %d failed: %s" % (ws.index, rpc_text(e)))

    def _on_watch_response(self, ws, resp):
        w = ws.watchers.get(resp.watch_id)
        if w is None:
            self.stats.error("watch", "stream %d: response for unknown watch id %d" % (ws.index, resp.watch_id))
            return
        if resp.canceled:
            self.stats.error("watch", "stream %d watcher %d canceled: %r (compact_revision %d)"
                             % (ws.index, w.watch_id, resp.cancel_reason, resp.compact_revision))
            return
        if resp.created:
            self.stats.error("watch", "stream %d watcher %d: a second created answer" % (ws.index, w.watch_id))
        for ev in resp.events:
            rev = ev.kv.mod_revision
            self.stats.events += 1
            if ev.type != 0 or ev.kv.key != w.key:
                self.stats.error("watch", "stream %d watcher %d on %r got a %s of %r" % (
                    ws.index, w.watch_id, w.key, "PUT" if ev.type == 0 else "DELETE", ev.kv.key))
            elif rev <= w.last:
                self.stats.error("watch", "stream %d watcher %d on %r got revision %d after %d "
                                 "(duplicate or out of order)" % (ws.index, w.watch_id, w.key, rev, w.last))
            else:
                w.revs.append(rev)
                w.last = rev

    # -- puts and gets -------------------------------------------------------

    def _kv(self):
        self._seq += 1
        return self.kv[self._seq % len(self.kv)]

    def _value(self):
        return (b"%d-" % self._seq).ljust(100, b"x")

    async def put_watched(self):
        key = next(self._hot_cycle)
        resp = await self._kv().Put(R.PutRequest(key=key, value=self._value()), timeout=UNARY_TIMEOUT)
        rev = resp.header.revision
        self.put_revs[key].append(rev)
        self.acked[key] = max(self.acked.get(key, 0), rev)

    async def put(self):
        key = random.choice(self.keys)
        resp = await self._kv().Put(R.PutRequest(key=key, value=self._value()), timeout=UNARY_TIMEOUT)
        self.acked[key] = max(self.acked.get(key, 0), resp.header.revision)

    def _get_key(self):
        return random.choice(self.hot_keys) if random.random() < 0.25 else random.choice(self.keys)

    async def sget(self):
        key = self._get_key()
        resp = await self._kv().Range(R.RangeRequest(key=key, serializable=True), timeout=UNARY_TIMEOUT)
        if len(resp.kvs) != 1 or resp.kvs[0].key != key:
            raise Failed("serializable get of %r answered %d kvs" % (key, len(resp.kvs)))

    async def lget(self):
        key = self._get_key()
        floor = self.acked.get(key, 0)
        resp = await self._kv().Range(R.RangeRequest(key=key), timeout=UNARY_TIMEOUT)
        if len(resp.kvs) != 1 or resp.kvs[0].key != key:
            raise Failed("linearizable get of %r answered %d kvs" % (key, len(resp.kvs)))
        if resp.kvs[0].mod_revision < floor:
            raise Failed("stale linearizable get of %r: mod_revision %d, but a put at revision %d "
                         "was acknowledged before the get" % (key, resp.kvs[0].mod_revision, floor))

    # -- churn ---------------------------------------------------------------

    async def churn(self):
        op = next(self._churn_cycle)
        ch = grpc.aio.insecure_channel(self.address, options=CHANNEL_OPTIONS)
        try:
            if op == "range":
                key = self._get_key()
                resp = await pb.KVStub(ch).Range(R.RangeRequest(key=key, serializable=random.random() < 0.5),
                                                 timeout=UNARY_TIMEOUT)
                if len(resp.kvs) != 1:
                    raise Failed("churn get of %r answered %d kvs" % (key, len(resp.kvs)))
            elif op == "watch":
                call = pb.WatchStub(ch).Watch(timeout=UNARY_TIMEOUT)
                await call.write(R.WatchRequest(create_request=R.WatchCreateRequest(
                    key=random.choice(self.hot_keys))))
                resp = await call.read()
                if resp is grpc.aio.EOF or not resp.created or resp.canceled:
                    raise Failed("churn watch: %r instead of created" % (resp,))
                call.cancel()
            else:
                lease = self.shared_lease or self.leases[0]
                call = pb.LeaseStub(ch).LeaseKeepAlive(timeout=UNARY_TIMEOUT)
                await call.write(R.LeaseKeepAliveRequest(ID=lease))
                resp = await call.read()
                if resp is grpc.aio.EOF or resp.ID != lease or resp.TTL <= 0:
                    raise Failed("churn keep-alive of lease %x answered %r" % (lease, resp))
                call.cancel()
        except Exception as e:
            raise Failed("churn %s: %s" % (op, rpc_text(e)))
        finally:
            await ch.close()
        return "churn_" + op

    # -- keep-alive clients --------------------------------------------------

    async def _keepalive_client(self, stub, lease):
        ttl = self.opts.lease_ttl
        interval = ttl / 3.0
        await asyncio.sleep(random.uniform(0, interval))
        call = stub.LeaseKeepAlive()
        try:
            while not self.closing:
                t0 = self.loop.time()
                await call.write(R.LeaseKeepAliveRequest(ID=lease))
                try:
                    resp = await asyncio.wait_for(call.read(), ttl)
                except asyncio.TimeoutError:
                    self.stats.error("keepalive", "lease %x: keep-alive not answered within %d s" % (lease, ttl))
                    return
                took = self.loop.time() - t0
                if resp is grpc.aio.EOF:
                    if not self.closing:
                        self.stats.error("keepalive", "lease %x: keep-alive stream ended (status OK)" % lease)
                    return
                if resp.ID != lease or resp.TTL <= 0:
                    self.stats.error("keepalive", "lease %x: keep-alive answered ID %x TTL %d"
                                     % (lease, resp.ID, resp.TTL))
                else:
                    self.stats.done["keepalive"] += 1
                    self.stats.keepalive_max_s = max(self.stats.keepalive_max_s, took)
                await asyncio.sleep(max(0.0, t0 + interval - self.loop.time()))
        except asyncio.CancelledError:
            raise
        except Exception as e:
            if not self.closing:
                self.stats.error("keepalive", "lease %x: %s" % (lease, rpc_text(e)))
        finally:
            call.cancel()

    # -- running -------------------------------------------------------------

    async def _lag_monitor(self):
        """How late the loop wakes up: the load generator's own health."""
        while not self.closing:
            t = self.loop.time()
            await asyncio.sleep(0.1)
            lag = self.loop.time() - t - 0.1
            self.stats.loop_lag_max_s = max(self.stats.loop_lag_max_s, lag)
            self.stats.loop_lag_window_s = max(self.stats.loop_lag_window_s, lag)

    async def _paced(self, kind, rate, workers, op):
        """``op`` about ``rate`` times a second by ``workers`` coroutines; a
        worker that falls behind does not make up for it in a burst."""
        if rate <= 0:
            return
        interval = workers / rate

        async def worker(i):
            next_t = self.loop.time() + interval * i / workers
            while not self.stopping:
                delay = next_t - self.loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                    if self.stopping:
                        break
                try:
                    self.stats.done[await op() or kind] += 1
                except Exception as e:
                    self.stats.error(kind, rpc_text(e) if not isinstance(e, Failed) else str(e))
                next_t += interval
                if next_t < self.loop.time() - 1.0:
                    next_t = self.loop.time()

        await asyncio.gather(*(worker(i) for i in range(workers)))

    def start(self):
        """Starts every client (called on the loop)."""
        o = self.opts
        n = len(self.lease_stubs)
        for i, lease in enumerate(self.leases):
            self.keepalive_tasks.append(asyncio.ensure_future(
                self._keepalive_client(self.lease_stubs[i % n], lease)))
        for i in range(o.shared_lease_clients):
            self.keepalive_tasks.append(asyncio.ensure_future(
                self._keepalive_client(self.lease_stubs[(i * 7 + 3) % n], self.shared_lease)))
        for kind, rate, workers, op in (
                ("put_watched", o.watched_put_rate, 2, self.put_watched),
                ("put", o.put_rate, 2, self.put),
                ("sget", o.sget_rate, 4, self.sget),
                ("lget", o.lget_rate, 4, self.lget),
                ("churn", o.churn_rate, o.churn_concurrency, self.churn)):
            self.load_tasks.append(asyncio.ensure_future(self._paced(kind, rate, workers, op)))

    async def stop_and_check(self):
        """Stops puts, gets and churn; waits until every watcher has the last
        put on its key; asks LeaseTimeToLive of every lease; then closes
        every client. Returns the failures found (list of str)."""
        failures = []
        self.stopping = True
        await asyncio.gather(*self.load_tasks)
        # watchers catch up
        last = {k: max(v) if len(v) else 0 for k, v in self.put_revs.items()}
        t0 = self.loop.time()
        while True:
            behind = [w for w in self.watchers if w.last < last[w.key]]
            if not behind or self.loop.time() - t0 > CATCH_UP_TIMEOUT:
                break
            await asyncio.sleep(0.05)
        self.catch_up_s = self.loop.time() - t0
        # leases: every one still alive
        sem = asyncio.Semaphore(16)
        dead = []

        async def ttl(lease):
            async with sem:
                try:
                    resp = await self.lease_stubs[lease % len(self.lease_stubs)].LeaseTimeToLive(
                        R.LeaseTimeToLiveRequest(ID=lease), timeout=UNARY_TIMEOUT)
                    self.lease_ttls[lease] = resp.TTL
                    if resp.TTL <= 0:
                        dead.append("%x (TTL %d)" % (lease, resp.TTL))
                except Exception as e:
                    self.stats.error("lease_ttl", "LeaseTimeToLive of %x: %s" % (lease, rpc_text(e)))

        all_leases = self.leases + ([self.shared_lease] if self.shared_lease else [])
        await asyncio.gather(*(ttl(lease) for lease in all_leases))
        if dead:
            failures.append("%d of %d leases not alive at the end: %s" % (
                len(dead), len(all_leases), ", ".join(dead[:10])))
        failures += self.check_watchers(last)
        await self.close()
        return failures

    def check_watchers(self, last):
        """Every watcher has exactly the acknowledged puts on its key after its
        start revision, in order."""
        expected = {k: sorted(v) for k, v in self.put_revs.items()}
        bad = []
        for w in self.watchers:
            exp = [r for r in expected[w.key] if r > w.created_rev]
            got = list(w.revs)
            if got != exp:
                missing = sorted(set(exp) - set(got))
                extra = sorted(set(got) - set(exp))
                bad.append("stream %d watcher %d on %r (from revision %d): %d events, expected %d; "
                           "missing %s; not put %s" % (w.stream, w.watch_id, w.key.decode(), w.created_rev,
                                                      len(got), len(exp), missing[:5], extra[:5]))
        if bad:
            return ["%d of %d watchers did not get every put on their key exactly once, in order "
                    "(waited %.1f s after the last put); first: %s" % (
                        len(bad), len(self.watchers), self.catch_up_s, "; ".join(bad[:3]))]
        return []

    async def close(self):
        self.closing = True
        self.stopping = True
        for ws in self.watch_streams:
            ws.call.cancel()
        tasks = self.keepalive_tasks + [ws.task for ws in self.watch_streams if ws.task is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*(ch.close() for ch in self.channels), return_exceptions=True)
        if self.monitor_task is not None:
            self.monitor_task.cancel()
            await asyncio.gather(self.monitor_task, return_exceptions=True)
        # grpcio closes a channel's connection only once no call object of it
        # is left: drop them all
        self.channels, self.kv, self.lease_stubs = [], [], []
        self.watch_streams, self.keepalive_tasks, self.load_tasks = [], [], []
        tasks = None
        gc.collect()
        await asyncio.sleep(0.2)


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


# --------------------------------------------------------------------- main

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


def run(opts):
    global pb, R
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
        pb = load_stubs()
        R = pb.rpc_pb2
        etcd = bench.Etcd(workdir).start()
        proxy = ProxyProcess([etcd.endpoint], extra_args=opts.proxy_arg).start()
        say("etcd %s (pid %d), proxy %s (pid %d)" % (etcd.endpoint, etcd.pid, proxy.address, proxy.pid))
        sampler = Sampler(proxy, etcd, stats)
        time.sleep(1.0)     # the proxy's endpoint monitor connects to etcd
        sampler.sample("fresh", 0.0)
        load = Load(proxy.address, opts, stats)
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
