"""The soak's load generator (bench/soak.py): every client of the soak on one
asyncio loop (tests/support/aio.py's), grpc.aio, each channel a connection of
its own. Load sets up the watchers and leases, runs puts, gets, keep-alives and
churning connections at their set rates, counts what was done in Stats and,
at the end, checks every watcher's events and every lease.

The grpcio stubs (tests.support.stubs.load_stubs()) are passed to Load."""
import array
import asyncio
import collections
import gc
import itertools
import random
import time

import grpc.aio

from soak_common import SoakError, say

UNARY_TIMEOUT = 10.0        # deadline of every unary call
CREATE_TIMEOUT = 10.0       # a watch create must be answered within this
CATCH_UP_TIMEOUT = 30.0     # after the last put, every watcher must have it within this
CHANNEL_OPTIONS = [
    # every channel is a connection of its own (grpcio shares connections
    # between channels with the same arguments by default)
    ("grpc.use_local_subchannel_pool", 1),
    ("grpc.enable_retries", 0),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
]
MAX_ERROR_SAMPLES = 50


class Failed(Exception):
    """A request's answer was wrong (not an RPC error)."""


# -------------------------------------------------------------------- stats

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

    def __init__(self, address, opts, stats, stubs):
        self.address = address
        self.opts = opts
        self.stats = stats
        self.pb = stubs             # tests.support.stubs.load_stubs()
        self.R = stubs.rpc_pb2
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
        self.kv = [self.pb.KVStub(self.channel()) for _ in range(o.kv_conns)]
        self.lease_stubs = [self.pb.LeaseStub(self.channel()) for _ in range(o.lease_conns)]
        # every key exists before the load (gets then always find one)
        sem = asyncio.Semaphore(16)

        async def put(key):
            async with sem:
                resp = await self.kv[0].Put(self.R.PutRequest(key=key, value=b"initial"), timeout=UNARY_TIMEOUT)
                self.acked[key] = resp.header.revision

        await asyncio.gather(*(put(k) for k in self.hot_keys + self.keys))

        async def grant():
            async with sem:
                resp = await self.lease_stubs[0].LeaseGrant(self.R.LeaseGrantRequest(TTL=o.lease_ttl),
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
        call = self.pb.WatchStub(ch).Watch()
        ws = WatchStream(index, call)
        self.watch_streams.append(ws)
        for key in keys:
            await call.write(self.R.WatchRequest(create_request=self.R.WatchCreateRequest(key=key)))
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
        resp = await self._kv().Put(self.R.PutRequest(key=key, value=self._value()), timeout=UNARY_TIMEOUT)
        rev = resp.header.revision
        self.put_revs[key].append(rev)
        self.acked[key] = max(self.acked.get(key, 0), rev)

    async def put(self):
        key = random.choice(self.keys)
        resp = await self._kv().Put(self.R.PutRequest(key=key, value=self._value()), timeout=UNARY_TIMEOUT)
        self.acked[key] = max(self.acked.get(key, 0), resp.header.revision)

    def _get_key(self):
        return random.choice(self.hot_keys) if random.random() < 0.25 else random.choice(self.keys)

    async def sget(self):
        key = self._get_key()
        resp = await self._kv().Range(self.R.RangeRequest(key=key, serializable=True), timeout=UNARY_TIMEOUT)
        if len(resp.kvs) != 1 or resp.kvs[0].key != key:
            raise Failed("serializable get of %r answered %d kvs" % (key, len(resp.kvs)))

    async def lget(self):
        key = self._get_key()
        floor = self.acked.get(key, 0)
        resp = await self._kv().Range(self.R.RangeRequest(key=key), timeout=UNARY_TIMEOUT)
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
                resp = await self.pb.KVStub(ch).Range(self.R.RangeRequest(key=key, serializable=random.random() < 0.5),
                                                 timeout=UNARY_TIMEOUT)
                if len(resp.kvs) != 1:
                    raise Failed("churn get of %r answered %d kvs" % (key, len(resp.kvs)))
            elif op == "watch":
                call = self.pb.WatchStub(ch).Watch(timeout=UNARY_TIMEOUT)
                await call.write(self.R.WatchRequest(create_request=self.R.WatchCreateRequest(
                    key=random.choice(self.hot_keys))))
                resp = await call.read()
                if resp is grpc.aio.EOF or not resp.created or resp.canceled:
                    raise Failed("churn watch: %r instead of created" % (resp,))
                call.cancel()
            else:
                lease = self.shared_lease or self.leases[0]
                call = self.pb.LeaseStub(ch).LeaseKeepAlive(timeout=UNARY_TIMEOUT)
                await call.write(self.R.LeaseKeepAliveRequest(ID=lease))
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
                await call.write(self.R.LeaseKeepAliveRequest(ID=lease))
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
                        self.R.LeaseTimeToLiveRequest(ID=lease), timeout=UNARY_TIMEOUT)
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
