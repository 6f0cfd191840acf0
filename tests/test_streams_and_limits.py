"""Many streams, big messages, deadlines and cancellation through the proxy,
with grpcio clients; upstream effects are checked on etcd (its /metrics and
its keys).

The proxy under test is chosen by $ETCDPROXY_TEST_KIND ("python" or "go").
"""
import asyncio
import random
import time

import grpc

from tests.support import aio
from tests.support import grpcio as svc
from tests.support.grpcio import (
    CHANNEL_OPTIONS, R, LK, Stubs, pb, prefix_end, rpc_error, rpc_error_or_none)

WATCHER_TOTAL = "etcd_debugging_mvcc_watcher_total"
STREAM_TOTAL = "etcd_debugging_mvcc_watch_stream_total"


def _run_async(coro_fn, timeout):
    """Runs ``coro_fn()`` on the tests' grpc.aio loop; returns its result."""
    return aio.run(coro_fn(), timeout)


class StreamsAndLimitsTests(svc.GrpcioTestCase):

    # -- helpers -------------------------------------------------------------

    def metric(self, name):
        return self.etcd.metric(name)

    def stable_metrics(self, timeout=5.0):
        """(watchers, streams) once two samples 0.3 s apart agree."""
        last = None
        deadline = time.monotonic() + timeout
        while True:
            cur = (self.metric(WATCHER_TOTAL), self.metric(STREAM_TOTAL))
            if cur == last or time.monotonic() > deadline:
                return cur
            last = cur
            time.sleep(0.3)

    def wait_metrics(self, pred, timeout, what):
        deadline = time.monotonic() + timeout
        while True:
            cur = (self.metric(WATCHER_TOTAL), self.metric(STREAM_TOTAL))
            if pred(*cur):
                return cur
            if time.monotonic() > deadline:
                raise AssertionError("%s: etcd watchers=%s streams=%s after %.0fs"
                                     % (what, cur[0], cur[1], timeout))
            time.sleep(0.1)

    def warm_up_watch(self):
        """One watch created and cancelled first, so that an upstream stream
        the proxy keeps for all its watchers is part of the baseline."""
        s = self.stream(self.p.watch.Watch)
        s.send(R.WatchRequest(create_request=R.WatchCreateRequest(key=self.key("warm-up"))))
        self.assertTrue(s.recv(5).created)
        s.close()

    def lease(self, stubs, ttl=30):
        lid = stubs.lease.LeaseGrant(R.LeaseGrantRequest(TTL=ttl)).ID
        self.addCleanup(rpc_error_or_none, self.d.lease.LeaseRevoke, R.LeaseRevokeRequest(ID=lid))
        return lid

    def other_client(self):
        s = Stubs(self.proxied)
        self.addCleanup(s.close)
        return s

    def lock_keys(self, name):
        r = self.d.kv.Range(R.RangeRequest(key=name + b"/", range_end=prefix_end(name + b"/")))
        return [kv.key for kv in r.kvs]

    # -- many streams ----------------------------------------------------------

    def test_1000_watch_streams_on_one_channel(self):
        n = 1000
        k = self.key("many")
        value = b"to-all-%d" % random.randrange(1 << 30)
        addr = self.proxied

        async def main():
            async with grpc.aio.insecure_channel(addr, options=CHANNEL_OPTIONS) as ch:
                watch = pb.WatchStub(ch)
                kv = pb.KVStub(ch)
                calls = [watch.Watch(timeout=90) for _ in range(n)]
                try:
                    async def create(call):
                        await call.write(R.WatchRequest(create_request=R.WatchCreateRequest(key=k)))
                        r = await call.read()
                        return r is not grpc.aio.EOF and r.created and not r.canceled

                    tasks = [asyncio.ensure_future(create(c)) for c in calls]
                    done, _ = await asyncio.wait(tasks, timeout=40)
                    created = sum(1 for t in done if not t.exception() and t.result())
                    if created != n:
                        return created, 0
                    put = await kv.Put(R.PutRequest(key=k, value=value), timeout=10)

                    async def event(call):
                        while True:
                            r = await call.read()
                            if r is grpc.aio.EOF:
                                return False
                            if r.events:
                                e = r.events[0]
                                return (e.kv.value == value and
                                        e.kv.mod_revision == put.header.revision)

                    tasks = [asyncio.ensure_future(event(c)) for c in calls]
                    done, pending = await asyncio.wait(tasks, timeout=30)
                    for t in pending:
                        t.cancel()
                    got = sum(1 for t in done if not t.exception() and t.result())
                    return created, got
                finally:
                    for c in calls:
                        c.cancel()

        created, got = _run_async(main, 120)
        self.assertEqual(created, n, "watches created on one channel")
        self.assertEqual(got, n, "watchers that received the put")
        # the proxy still serves normal calls afterwards
        self.assertEqual(self.get(k).kvs[0].value, value)

    # -- big messages ----------------------------------------------------------

    def test_1mib_value_round_trip(self):
        k = self.key("big")
        value = random.Random(7).randbytes(1024 * 1024)
        w = self.stream(self.p.watch.Watch)
        w.send(R.WatchRequest(create_request=R.WatchCreateRequest(key=k)))
        self.assertTrue(w.recv(5).created)
        r = self.put(k, value)
        got = self.get(k)
        self.assertEqual(got.count, 1)
        self.assertTrue(got.kvs[0].value == value, "1 MiB value changed on the way")
        self.assertEqual(got.kvs[0].mod_revision, r.header.revision)
        self.assertTrue(self.d.kv.Range(R.RangeRequest(key=k)).kvs[0].value == value)
        evs, _ = svc.events_until(w, 1, timeout=10)
        self.assertTrue(evs[0].kv.value == value, "1 MiB watch event changed on the way")
        # a Txn with a 1 MiB response too
        t = self.p.kv.Txn(R.TxnRequest(success=[R.RequestOp(request_range=R.RangeRequest(key=k))]))
        self.assertTrue(t.responses[0].response_range.kvs[0].value == value)

    # -- deadlines and cancellation -------------------------------------------

    def test_deadline_on_blocked_lock_releases_upstream_call(self):
        name = self.key("lock")
        holder = self.other_client()
        held = holder.lock.Lock(LK.LockRequest(name=name, lease=self.lease(holder)))
        waiter_lease = self.lease(self.p)
        t0 = time.monotonic()
        err = rpc_error(self.p.lock.Lock, LK.LockRequest(name=name, lease=waiter_lease), timeout=1.0)
        elapsed = time.monotonic() - t0
        self.assertEqual(err[0], grpc.StatusCode.DEADLINE_EXCEEDED, err)
        self.assertTrue(0.9 <= elapsed <= 2.5, "DEADLINE_EXCEEDED after %.2fs" % elapsed)
        self._assert_waiter_gone(name, held, holder)

    def test_cancelled_lock_releases_upstream_call(self):
        name = self.key("lock")
        holder = self.other_client()
        held = holder.lock.Lock(LK.LockRequest(name=name, lease=self.lease(holder)))
        waiter_lease = self.lease(self.p)
        fut = self.p.lock.Lock.future(LK.LockRequest(name=name, lease=waiter_lease), timeout=20)
        # wait until the waiter's key shows up in etcd, then cancel the call
        deadline = time.monotonic() + 5
        while len(self.lock_keys(name)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        self.assertEqual(len(self.lock_keys(name)), 2, "the waiter never reached etcd")
        self.assertTrue(fut.cancel())
        self._assert_waiter_gone(name, held, holder)

    def _assert_waiter_gone(self, name, held, holder):
        deadline = time.monotonic() + 3
        while self.lock_keys(name) != [held.key] and time.monotonic() < deadline:
            time.sleep(0.05)
        self.assertEqual(self.lock_keys(name), [held.key],
                         "the abandoned Lock call still waits in etcd")
        holder.lock.Unlock(LK.UnlockRequest(key=held.key))
        t0 = time.monotonic()
        again = self.p.lock.Lock(LK.LockRequest(name=name, lease=self.lease(self.p)), timeout=2.0)
        self.assertLess(time.monotonic() - t0, 1.5)
        self.assertEqual(self.lock_keys(name), [again.key])
        self.p.lock.Unlock(LK.UnlockRequest(key=again.key))

    def test_cancelled_watch_call_closes_upstream_watch(self):
        self.warm_up_watch()
        base_w, base_s = self.stable_metrics()
        s = self.stream(self.p.watch.Watch)
        s.send(R.WatchRequest(create_request=R.WatchCreateRequest(key=self.key("w"))))
        self.assertTrue(s.recv(5).created)
        self.wait_metrics(lambda w, st: w >= base_w + 1, 5, "no upstream watcher")
        s.close()       # cancels the call (RST_STREAM)
        self.wait_metrics(lambda w, st: w <= base_w and st <= base_s, 5,
                          "upstream watch not closed after the client cancelled (baseline %s/%s)"
                          % (base_w, base_s))

    def test_watch_cancel_request_closes_upstream_watcher(self):
        self.warm_up_watch()
        base_w, base_s = self.stable_metrics()
        s = self.stream(self.p.watch.Watch)
        s.send(R.WatchRequest(create_request=R.WatchCreateRequest(key=self.key("w"))))
        created = s.recv(5)
        self.assertTrue(created.created)
        self.wait_metrics(lambda w, st: w >= base_w + 1, 5, "no upstream watcher")
        s.send(R.WatchRequest(cancel_request=R.WatchCancelRequest(watch_id=created.watch_id)))
        c = s.recv(5)
        self.assertTrue(c.canceled and c.watch_id == created.watch_id, c)
        self.wait_metrics(lambda w, st: w <= base_w, 5,
                          "upstream watcher not removed after WatchCancelRequest (baseline %s)" % base_w)
        # the client's stream stays open and usable
        k = self.key("w2")
        s.send(R.WatchRequest(create_request=R.WatchCreateRequest(key=k)))
        again = s.recv(5)
        self.assertTrue(again.created)
        r = self.put(k, b"v")
        evs, _ = svc.events_until(s, 1, again.watch_id)
        self.assertEqual(evs[0].kv.mod_revision, r.header.revision)

    def test_closed_channel_closes_upstream_watches(self):
        self.warm_up_watch()
        base_w, base_s = self.stable_metrics()
        c = Stubs(self.proxied)
        self.addCleanup(c.close)
        streams = []
        for i in range(5):
            s = self.stream(c.watch.Watch)
            s.send(R.WatchRequest(create_request=R.WatchCreateRequest(key=self.key("c%d" % i))))
            self.assertTrue(s.recv(5).created)
            streams.append(s)
        self.wait_metrics(lambda w, st: w >= base_w + 5, 5, "upstream watchers missing")
        c.close()       # the TCP connection goes away
        for s in streams:
            s.wait_end(5)
        self.wait_metrics(lambda w, st: w <= base_w and st <= base_s, 5,
                          "upstream watches not closed after the connection closed (baseline %s/%s)"
                          % (base_w, base_s))
