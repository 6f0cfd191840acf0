"""The range cache (issue 7): serializable Range answered from cache, coherent
with etcd, and per-client limits.

Unit tests drive the pure parts (store, write spans, fill rule, coalescing,
limits) with fakes; end-to-end tests drive a real etcd and the proxy with
grpcio and compare with etcd's own answers. ``pytest -s`` prints the measured
figures (rates, staleness p50/p99).
"""
import os
import statistics
import sys
import tempfile
import threading
import time

import grpc
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial import unittest

from etcdproxy.grpc.status import GRPCError, StatusCode
from etcdproxy.pb.etcdserverpb import rpc_pb2
from etcdproxy.pb.mvccpb import kv_pb2
from etcdproxy.services.client_limits import ClientLimits
from etcdproxy.services.range_cache import RangeCache, split_header
from etcdproxy.services.range_calls import write_spans
from etcdproxy.services.range_store import Entry, RangeStore, span
from tests.support.proxy import ProxyProcess
from tests.support.grpcio import (
    AUTH, ClusterTestCase, GrpcioTestCase, R, Stubs, prefix_end, rpc_error, rpc_error_or_none)

RANGE_METRIC = "grpc_server_handled_total"
SERIAL = dict(serializable=True)


# ---------------------------------------------------------------------------
# Unit tests: pure logic


def _entry(key, range_end=b"", revision=0, token=b"", body=b"x", expires=None):
    request = rpc_pb2.RangeRequest(key=key, range_end=range_end, revision=revision, serializable=True)
    return Entry((token, request.SerializeToString()), span(key, range_end), revision, token, body, 5, expires)


class RangeStoreTests(unittest.TestCase):
    def test_invalidation_by_key_and_span(self):
        store = RangeStore(1 << 20, 100)
        single, prefix, from_key, other, fixed = (
            _entry(b"/a/1"), _entry(b"/a/", b"/a0"), _entry(b"/b", b"\0"), _entry(b"/z/"),
            _entry(b"/a/1", revision=3))
        for e in (single, prefix, from_key, other, fixed):
            self.assertTrue(store.put(e))
        store.invalidate_key(b"/a/1")
        self.assertEqual(set(store.entries), {from_key.cache_key, other.cache_key, fixed.cache_key})
        store.invalidate_key(b"/zz")  # >= /b
        self.assertEqual(set(store.entries), {other.cache_key, fixed.cache_key})
        store.invalidate_span(span(b"/y", b"/zz"))
        self.assertEqual(set(store.entries), {fixed.cache_key})  # fixed revisions never change
        store.compacted(3)
        self.assertEqual(len(store), 1)
        store.compacted(4)
        self.assertEqual(len(store), 0)
        self.assertEqual(store.bytes, 0)

    def test_lru_bounds(self):
        store = RangeStore(10 * 300, 3)
        entries = [_entry(b"k%d" % i) for i in range(5)]
        for e in entries[:3]:
            store.put(e)
        store.get(entries[0].cache_key, 0)  # most recent now
        store.put(entries[3])
        self.assertEqual(set(store.entries), {entries[0].cache_key, entries[2].cache_key, entries[3].cache_key})
        small = RangeStore(3000, 100)
        for i in range(20):
            small.put(_entry(b"k%02d" % i))
        self.assertLessEqual(small.bytes, 3000)
        self.assertEqual(len(small), 3000 // entries[0].size)
        self.assertIn(_entry(b"k19").cache_key, small.entries)
        self.assertFalse(small.put(_entry(b"big", body=b"x" * 1000)))  # alone over 1/8 of the bound

    def test_a_view_costs_the_buffer_it_keeps(self):
        buffer = bytearray(b"\n\x02\x08\x01" + b"k" * 5000)
        buffer += b"v" * 100  # (a buffer the proxy assembled has spare room)
        view = memoryview(buffer).toreadonly()[4:]
        self.assertGreater(_entry(b"a", body=view).size - _entry(b"a", body=bytes(view)).size, 3)
        self.assertEqual(_entry(b"a", body=view).size - _entry(b"a", body=b"").size, sys.getsizeof(buffer))

    def test_token_entries_expire_and_drop(self):
        store = RangeStore(1 << 20, 100)
        mine = _entry(b"k", token=b"t1", expires=10.0)
        anon = _entry(b"k")
        store.put(mine)
        store.put(anon)
        self.assertIs(store.get(mine.cache_key, 9.9), mine)
        self.assertIsNone(store.get(mine.cache_key, 10.0))
        store.put(mine)
        store.drop_tokens(with_token=True)
        self.assertEqual(list(store.entries), [anon.cache_key])

    def test_write_spans_nested_txn(self):
        inner = R.TxnRequest(success=[R.RequestOp(request_put=R.PutRequest(key=b"n1"))],
                             failure=[R.RequestOp(request_delete_range=R.DeleteRangeRequest(
                                 key=b"p/", range_end=b"p0"))])
        txn = R.TxnRequest(
            success=[R.RequestOp(request_range=R.RangeRequest(key=b"r")),
                     R.RequestOp(request_txn=inner)],
            failure=[R.RequestOp(request_put=R.PutRequest(key=b"f"))])
        got = write_spans(rpc_pb2.TxnRequest.FromString(txn.SerializeToString()))
        self.assertEqual(sorted(got), sorted([span(b"n1", b""), span(b"p/", b"p0"), span(b"f", b"")]))


class SplitHeaderTests(unittest.TestCase):
    """A filled answer is stored as etcd's bytes without its header, read
    without decoding the kvs when the header comes first (as etcd writes it)."""

    def response(self, kvs=3, **header):
        return rpc_pb2.RangeResponse(
            header=rpc_pb2.ResponseHeader(cluster_id=11, member_id=12, revision=13, raft_term=14, **header),
            kvs=[kv_pb2.KeyValue(key=b"k%d" % i, value=b"v" * i, mod_revision=i) for i in range(kvs)],
            count=kvs, more=True)

    def test_header_first_as_etcd_writes_it(self):
        for kvs in (0, 1, 300):  # 300: a header length prefix of one byte, kvs past 16 KiB
            response = self.response(kvs)
            encoded = response.SerializeToString()
            header, body = split_header(encoded)
            self.assertEqual(header, response.header)
            rest = rpc_pb2.RangeResponse()
            rest.CopyFrom(response)
            rest.ClearField("header")
            # what decoding it whole and encoding it again without its header stored
            self.assertEqual(bytes(body), rest.SerializeToString())
            # the body is etcd's own bytes after the header field
            self.assertTrue(encoded.endswith(bytes(body)))
            self.assertEqual(rpc_pb2.RangeResponse.FromString(encoded[:len(encoded) - len(body)]),
                             rpc_pb2.RangeResponse(header=response.header))

    def test_long_header(self):
        response = self.response(1)
        response.header.cluster_id = 2**64 - 1
        response.header.member_id = 2**64 - 1
        header, body = split_header(response.SerializeToString())
        self.assertEqual(header, response.header)

    def test_others_are_left_to_a_whole_decode(self):
        response = self.response(2)
        no_header = rpc_pb2.RangeResponse(kvs=response.kvs, count=2)
        self.assertIsNone(split_header(no_header.SerializeToString()))
        header_last = no_header.SerializeToString() + rpc_pb2.RangeResponse(
            header=response.header).SerializeToString()
        self.assertIsNone(split_header(header_last))
        encoded = response.SerializeToString()
        for cut in (1, 2, 5):
            self.assertIsNone(split_header(encoded[:cut]), cut)  # truncated inside the header
        self.assertIsNone(split_header(b"\n\xff\xff\xff\xff\xff\xff"))  # a runaway length
        self.assertIsNone(split_header(b"\n\x02\xff\xff"))  # a header that does not decode
        self.assertIsNone(split_header(b""))


class ClientLimitsTests(unittest.TestCase):
    class Call:
        def __init__(self, host="10.0.0.1", token=None):
            self.peer = type("Peer", (), {"host": host})()
            self.metadata = [(b"token", token)] if token else []
            self.protocol = object()
            self.ended = []

        def when_ended(self, callback):
            self.ended.append(callback)

    def test_rate_and_burst(self):
        clock = Clock()
        limits = ClientLimits(clock, rate=10, burst=5)
        results = [limits.admit(self.Call()) for _ in range(8)]
        self.assertEqual(results[:5], [None] * 5)
        self.assertIn("too many requests", results[5])
        self.assertIsNone(limits.admit(self.Call("10.0.0.2")))  # another client
        clock.advance(0.1)
        self.assertIsNone(limits.admit(self.Call()))
        self.assertIsNotNone(limits.admit(self.Call()))
        self.assertEqual(limits.limited, 4)

    def test_concurrent_by_token(self):
        limits = ClientLimits(Clock(), concurrent=2, key="token")
        a, b = self.Call(token=b"A"), self.Call(token=b"A")
        self.assertIsNone(limits.admit(a))
        self.assertIsNone(limits.admit(b))
        self.assertIn("concurrent", limits.admit(self.Call(host="other", token=b"A")))
        self.assertIsNone(limits.admit(self.Call(token=b"B")))
        a.ended[0]()
        self.assertIsNone(limits.admit(self.Call(token=b"A")))


class _FakeChannel:
    def __init__(self):
        self.calls = []

    def unary_call(self, method, request, metadata=(), timeout=None):
        d = defer.Deferred()
        self.calls.append((method, request, metadata, d))
        return d


class _FakeMonitor:
    def __init__(self):
        self.reactor = Clock()
        self.channel = _FakeChannel()

    def pick(self, avoid=()):
        return self.channel


class _Waiter:
    def __init__(self):
        self.answers = []

    def answered(self, response):
        self.answers.append(response)

    def failed(self, error):
        self.answers.append(error)


class _Watch:
    healthy = True


def _response(revision, value=b"v"):
    return rpc_pb2.RangeResponse(
        header=rpc_pb2.ResponseHeader(cluster_id=1, member_id=2, revision=revision, raft_term=3),
        kvs=[kv_pb2.KeyValue(key=b"k", value=value)],
        count=1).SerializeToString()


class RangeCacheLogicTests(unittest.TestCase):
    def setUp(self):
        self.monitor = _FakeMonitor()
        self.cache = RangeCache(self.monitor)
        self.cache.watch = _Watch()
        self.cache.watch_up(rpc_pb2.ResponseHeader(revision=10))
        self.request = rpc_pb2.RangeRequest(key=b"k", serializable=True).SerializeToString()

    def serve(self, request=None, metadata=()):
        waiter = _Waiter()
        self.cache.serve(waiter, request or self.request, list(metadata), None)
        return waiter

    def test_coalescing_and_fill(self):
        waiters = [self.serve() for _ in range(100)]
        self.assertEqual(len(self.monitor.channel.calls), 1)
        self.monitor.channel.calls[0][3].callback(_response(12))
        self.assertEqual({w.answers[0] for w in waiters}, {_response(12)})
        hit = self.serve()
        self.assertEqual(len(self.monitor.channel.calls), 1)
        self.assertEqual(rpc_pb2.RangeResponse.FromString(hit.answers[0]), rpc_pb2.RangeResponse.FromString(_response(12)))
        # the watch saw revision 15 (another key): a hit says 15, as etcd would
        self.cache.keys_changed([b"other"], 15, rpc_pb2.ResponseHeader(cluster_id=1, member_id=2, revision=15, raft_term=3))
        self.assertEqual(rpc_pb2.RangeResponse.FromString(self.serve().answers[0]).header.revision, 15)
        self.cache.keys_changed([b"k"], 16, rpc_pb2.ResponseHeader(revision=16))
        self.serve()
        self.assertEqual(len(self.monitor.channel.calls), 2)
        self.assertEqual(self.cache.stats()["coalesced"], 99)

    def test_errors_are_shared_not_cached(self):
        waiters = [self.serve() for _ in range(3)]
        self.monitor.channel.calls[0][3].errback(GRPCError(StatusCode.PERMISSION_DENIED, "etcdserver: permission denied"))
        for w in waiters:
            self.assertEqual(w.answers[0].code, StatusCode.PERMISSION_DENIED)
        self.serve()
        self.assertEqual(len(self.monitor.channel.calls), 2)

    def test_fill_refused_behind_the_watch_or_a_write(self):
        self.serve()
        self.cache.keys_changed([b"z"], 13, rpc_pb2.ResponseHeader(revision=13))
        self.monitor.channel.calls[0][3].callback(_response(12))  # older than what the watch saw
        self.serve()
        self.assertEqual(len(self.monitor.channel.calls), 2)
        self.cache.written([span(b"q", b"")], 20)  # a write through the proxy at 20
        self.monitor.channel.calls[1][3].callback(_response(19))
        self.serve()
        self.assertEqual(len(self.monitor.channel.calls), 3)
        self.assertEqual(self.cache.stats()["fills_refused"], 2)

    def test_invalidation_detaches_inflight_reads(self):
        first = self.serve()
        self.cache.written([span(b"k", b"")], 11)
        second = self.serve()  # must not join a read sent before the write completed
        self.assertEqual(len(self.monitor.channel.calls), 2)
        self.assertEqual((first.answers, second.answers), ([], []))

    def test_linearizable_never_served_from_cache_nor_joined(self):
        self.serve()
        self.monitor.channel.calls[0][3].callback(_response(12))
        linearizable = rpc_pb2.RangeRequest(key=b"k").SerializeToString()
        self.serve(linearizable)
        self.serve(linearizable)
        self.assertEqual(len(self.monitor.channel.calls), 3)

    def test_tokens_never_share_entries_and_auth_changes_drop_them(self):
        self.serve(metadata=[(b"token", b"A")])
        self.monitor.channel.calls[0][3].callback(_response(12))
        self.serve(metadata=[(b"token", b"A")])
        self.assertEqual(len(self.monitor.channel.calls), 1)
        self.serve(metadata=[(b"token", b"B")])
        self.serve()
        self.assertEqual(len(self.monitor.channel.calls), 3)
        self.cache.auth_change_started()
        self.serve(metadata=[(b"token", b"A")])
        self.assertEqual(len(self.monitor.channel.calls), 4)
        self.monitor.channel.calls[3][3].callback(_response(12))  # answered during the change
        self.cache.auth_change_ended(False)
        self.serve(metadata=[(b"token", b"A")])
        self.assertEqual(len(self.monitor.channel.calls), 5)
        self.monitor.channel.calls[4][3].callback(_response(12))
        self.monitor.reactor.advance(1.0)  # token entries live token_max_age
        self.serve(metadata=[(b"token", b"A")])
        self.assertEqual(len(self.monitor.channel.calls), 6)

    def test_watch_down_empties_and_stops_filling(self):
        self.serve()
        self.monitor.channel.calls[0][3].callback(_response(12))
        self.cache.watch.healthy = False
        self.serve()
        self.assertEqual((len(self.monitor.channel.calls), len(self.cache.store)), (2, 0))
        self.monitor.channel.calls[1][3].callback(_response(12))
        self.assertEqual(len(self.cache.store), 0)


# ---------------------------------------------------------------------------
# End to end: a real etcd, the proxy, grpcio


def _percentile(values, fraction):
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * fraction))]


class _Helpers:
    def ranges_at_etcd(self):
        return self.etcd.metric(RANGE_METRIC, labels={"grpc_method": "Range"})

    def get(self, stubs=None, **kw):
        kw.setdefault("serializable", True)
        return (stubs or self.p).kv.Range(R.RangeRequest(**kw))

    def assertSameAnswer(self, **kw):
        """The proxy's answer (from cache the second time) equals etcd's own."""
        self.get(**kw)
        proxied = self.get(**kw)
        direct = self.get(self.d, **kw)
        self.assertEqual(proxied, direct)
        return proxied

    def _wait_for(self, predicate, timeout=5.0):
        started = time.monotonic()
        while not predicate():
            self.assertLess(time.monotonic() - started, timeout, "timed out")
            time.sleep(0.002)
        return time.monotonic() - started


class RangeCacheLoadTests(_Helpers, GrpcioTestCase):
    """Load at etcd: no fixed-revision entries here (their compaction probe is a Range)."""

    def test_hammer_one_key_costs_etcd_one_range(self):
        key = self.key("hot")
        self.d.kv.Put(R.PutRequest(key=key, value=b"v1"))
        time.sleep(0.2)
        before = self.ranges_at_etcd()
        n, threads = 12000, 4
        errors = []

        def hammer():
            stubs = Stubs(self.proxied)
            try:
                request = R.RangeRequest(key=key, serializable=True)
                for _ in range(n // threads):
                    if stubs.kv.Range(request).kvs[0].value != b"v1":
                        errors.append("wrong value")
            except Exception as e:  # pragma: no cover
                errors.append(e)
            finally:
                stubs.close()

        started = time.monotonic()
        workers = [threading.Thread(target=hammer) for _ in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        elapsed = time.monotonic() - started
        self.assertEqual(errors, [])
        upstream = self.ranges_at_etcd() - before
        print(f"\nrange cache: {n} serializable gets of one key in {elapsed:.2f} s "
              f"({n / elapsed:.0f}/s, {threads} clients): {upstream:.0f} Range at etcd")
        self.assertLessEqual(upstream, 1)
        # the same key, linearizable: every read goes to etcd
        before = self.ranges_at_etcd()
        m = 1000
        started = time.monotonic()
        for _ in range(m):
            self.get(key=key, serializable=False)
        elapsed = time.monotonic() - started
        print(f"range cache: {m} linearizable gets in {elapsed:.2f} s ({m / elapsed:.0f}/s, 1 client); "
              f"{self.ranges_at_etcd() - before:.0f} Range at etcd")
        self.assertGreaterEqual(self.ranges_at_etcd() - before, m)

    def test_hammer_with_writes(self):
        key = self.key("hotw")
        self.d.kv.Put(R.PutRequest(key=key, value=b"0"))
        time.sleep(0.2)
        before = self.ranges_at_etcd()
        writes = 0
        for i in range(2000):
            if i % 200 == 0:
                (self.d if writes % 2 else self.p).kv.Put(R.PutRequest(key=key, value=b"%d" % i))
                writes += 1
            self.get(key=key)
        upstream = self.ranges_at_etcd() - before
        print(f"\nrange cache: 2000 gets, {writes} writes: {upstream:.0f} Range at etcd")
        self.assertLessEqual(upstream, 1 + writes)

    def test_concurrent_identical_misses_cost_one_range(self):
        key = self.key("herd")
        self.d.kv.Put(R.PutRequest(key=key, value=b"v"))
        n = 100
        stubs = [Stubs(self.proxied) for _ in range(10)]
        for s in stubs:
            s.kv.Range(R.RangeRequest(key=self.key("warm"), serializable=True))  # connect
        self.addCleanup(lambda: [s.close() for s in stubs])
        time.sleep(0.2)
        before = self.ranges_at_etcd()
        barrier = threading.Barrier(n)
        answers = []

        def read(i):
            barrier.wait()
            answers.append(stubs[i % 10].kv.Range(R.RangeRequest(key=key, serializable=True)))

        workers = [threading.Thread(target=read, args=(i,)) for i in range(n)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        self.assertEqual(len(answers), n)
        self.assertEqual(self.ranges_at_etcd() - before, 1)
        for a in answers:
            self.assertEqual(a.kvs[0].value, b"v")



class RangeCacheCoherenceTests(_Helpers, GrpcioTestCase):
    proxy_args = ("--cache-check-interval=0.5",)

    def test_answers_equal_etcds(self):
        p = self.key()
        for i in range(5):
            self.d.kv.Put(R.PutRequest(key=p + b"k%d" % i, value=b"v%d" % i))
        rev = self.d.kv.Put(R.PutRequest(key=p + b"k1", value=b"new")).header.revision
        time.sleep(0.1)
        T, O = R.RangeRequest.SortTarget, R.RangeRequest.SortOrder
        for kw in (dict(key=p + b"k1"), dict(key=p + b"missing"), dict(key=p, range_end=prefix_end(p)),
                   dict(key=p, range_end=prefix_end(p), limit=2), dict(key=p, range_end=prefix_end(p), count_only=True),
                   dict(key=p, range_end=prefix_end(p), keys_only=True),
                   dict(key=p, range_end=prefix_end(p), sort_order=O.Value("DESCEND"), sort_target=T.Value("MOD")),
                   dict(key=p + b"k1", revision=rev - 1), dict(key=p + b"k3", range_end=b"\0")):
            self.assertSameAnswer(**kw)
        # a linearizable read's answer fills the cache for the serializable one
        self.get(key=p + b"k4", serializable=False)
        self.assertEqual(self.get(key=p + b"k4"), self.get(self.d, key=p + b"k4"))

    def test_direct_write_staleness(self):
        key = self.key("stale")
        self.d.kv.Put(R.PutRequest(key=key, value=b"-1"))
        self.get(key=key)
        delays = []
        for i in range(300):
            self.get(key=key)  # cached
            value = b"%d" % i
            self.d.kv.Put(R.PutRequest(key=key, value=value))
            acked = time.monotonic()
            while True:
                kvs = self.get(key=key).kvs
                if kvs and kvs[0].value == value:
                    break
                self.assertLess(time.monotonic() - acked, 5.0, "write never became visible")
            delays.append(time.monotonic() - acked)
        p50, p99 = statistics.median(delays), _percentile(delays, 0.99)
        print(f"\nrange cache staleness after a direct write: p50 {p50 * 1000:.2f} ms, "
              f"p99 {p99 * 1000:.2f} ms, max {max(delays) * 1000:.2f} ms ({len(delays)} trials; "
              f"includes one proxy read round trip)")
        self.assertLess(p99, 0.25)

    def test_writes_through_proxy_invalidate_at_once(self):
        p = self.key()
        a, b, c = p + b"a", p + b"b", p + b"c"
        for k in (a, b, c):
            self.p.kv.Put(R.PutRequest(key=k, value=b"0"))
        for kw in (dict(key=a), dict(key=b), dict(key=c), dict(key=p, range_end=prefix_end(p))):
            self.get(**kw)
        # nested Txn: the put of b is in the inner txn's failure branch
        inner = R.TxnRequest(
            compare=[R.Compare(key=a, target=R.Compare.CompareTarget.Value("VALUE"),
                               result=R.Compare.CompareResult.Value("EQUAL"), value=b"nope")],
            success=[R.RequestOp(request_put=R.PutRequest(key=c, value=b"inner-success"))],
            failure=[R.RequestOp(request_put=R.PutRequest(key=b, value=b"inner-failure"))])
        self.p.kv.Txn(R.TxnRequest(success=[R.RequestOp(request_txn=inner)]))
        self.assertEqual(self.get(key=b).kvs[0].value, b"inner-failure")
        self.assertEqual(self.get(key=c).kvs[0].value, b"0")
        self.assertEqual(self.get(key=p, range_end=prefix_end(p)), self.get(self.d, key=p, range_end=prefix_end(p)))
        # DeleteRange with a prefix
        self.p.kv.DeleteRange(R.DeleteRangeRequest(key=p, range_end=prefix_end(p)))
        self.assertEqual(list(self.get(key=a).kvs), [])
        self.assertEqual(self.get(key=p, range_end=prefix_end(p)).count, 0)

    def test_writes_elsewhere_invalidate(self):
        p = self.key()
        a, b = p + b"a", p + b"b"
        for k in (a, b):
            self.d.kv.Put(R.PutRequest(key=k, value=b"0"))
        self.get(key=a)
        self.get(key=p, range_end=prefix_end(p))
        inner = R.TxnRequest(success=[R.RequestOp(request_put=R.PutRequest(key=a, value=b"nested"))])
        self.d.kv.Txn(R.TxnRequest(failure=[R.RequestOp(request_txn=inner)],
                                   compare=[R.Compare(key=a, version=99, target=R.Compare.CompareTarget.Value("VERSION"))]))
        self._wait_for(lambda: self.get(key=a).kvs[0].value == b"nested", 0.5)
        self.d.kv.DeleteRange(R.DeleteRangeRequest(key=p, range_end=prefix_end(p)))
        self._wait_for(lambda: self.get(key=p, range_end=prefix_end(p)).count == 0, 0.5)
        self.assertEqual(list(self.get(key=a).kvs), [])

    def test_lease_expiry_invalidates(self):
        key = self.key("leased")
        lease = self.d.lease.LeaseGrant(R.LeaseGrantRequest(TTL=2)).ID
        self.d.kv.Put(R.PutRequest(key=key, value=b"v", lease=lease))
        self.assertEqual(len(self.get(key=key).kvs), 1)
        self.assertEqual(len(self.get(key=key).kvs), 1)  # cached
        waited = self._wait_for(lambda: not self.get(key=key).kvs, 10.0)
        self.assertEqual(list(self.get(self.d, key=key).kvs), [])
        print(f"\nrange cache: leased key gone through the proxy {waited:.2f} s after caching (TTL 2 s)")

    def test_compaction(self):
        key = self.key("compact")
        r1 = self.d.kv.Put(R.PutRequest(key=key, value=b"1")).header.revision
        r2 = self.d.kv.Put(R.PutRequest(key=key, value=b"2")).header.revision
        r3 = self.d.kv.Put(R.PutRequest(key=key, value=b"3")).header.revision
        for r in (r1, r2):
            self.assertSameAnswer(key=key, revision=r)
        # through the proxy: at once
        self.p.kv.Compact(R.CompactionRequest(revision=r2))
        self.assertSameError(rpc_error(self.get, key=key, revision=r1),
                             rpc_error(self.get, self.d, key=key, revision=r1))
        self.assertEqual(self.get(key=key, revision=r2).kvs[0].value, b"2")
        # the cache still caches after a Compact through it
        before = self.ranges_at_etcd()
        for _ in range(20):
            self.get(key=key, revision=r3)
        self.assertLessEqual(self.ranges_at_etcd() - before, 1)
        # elsewhere: within the check interval (0.5 s here)
        self.d.kv.Compact(R.CompactionRequest(revision=r3))
        waited = self._wait_for(lambda: rpc_error_or_none(self.get, key=key, revision=r2) is not None, 3.0)
        print(f"\nrange cache: compaction made directly seen after {waited:.2f} s")
        self.assertSameError(rpc_error(self.get, key=key, revision=r2),
                             rpc_error(self.get, self.d, key=key, revision=r2))

class RangeCacheAuthTests(GrpcioTestCase):
    """With etcd auth: answers never cross tokens, permission changes take effect."""

    proxy_args = ("--cache-check-interval=0.2", "--cache-token-max-age=1")

    def setUp(self):
        d = self.d.auth
        d.UserAdd(R.AuthUserAddRequest(name="root", password="rootpw"))
        d.RoleAdd(R.AuthRoleAddRequest(name="root"))
        d.UserGrantRole(R.AuthUserGrantRoleRequest(user="root", role="root"))
        for user in ("alice", "bob"):
            d.UserAdd(R.AuthUserAddRequest(name=user, password=user))
        d.RoleAdd(R.AuthRoleAddRequest(name="reader"))
        self.perm = AUTH.Permission(permType=AUTH.Permission.Type.Value("READ"), key=b"/sec/", range_end=b"/sec0")
        d.RoleGrantPermission(R.AuthRoleGrantPermissionRequest(name="reader", perm=self.perm))
        d.UserGrantRole(R.AuthUserGrantRoleRequest(user="alice", role="reader"))
        self.d.kv.Put(R.PutRequest(key=b"/sec/x", value=b"secret"))
        self.addCleanup(self._reset)

    def _reset(self):
        try:
            md = [("token", self.token(self.d, "root"))]
            self.d.auth.AuthDisable(R.AuthDisableRequest(), metadata=md)
        except grpc.RpcError:
            pass  # auth was not enabled
        for user in ("root", "alice", "bob"):
            rpc_error_or_none(self.d.auth.UserDelete, R.AuthUserDeleteRequest(name=user))
        for role in ("root", "reader"):
            rpc_error_or_none(self.d.auth.RoleDelete, R.AuthRoleDeleteRequest(role=role))

    def token(self, stubs, user):
        return stubs.auth.Authenticate(R.AuthenticateRequest(name=user, password=user + ("pw" if user == "root" else ""))).token

    def read(self, token=None, stubs=None):
        md = [("token", token)] if token else None
        return (stubs or self.p).kv.Range(R.RangeRequest(key=b"/sec/x", serializable=True), metadata=md)

    def test_answers_never_cross_users_and_revoke_takes_effect(self):
        self.assertEqual(self.read().kvs[0].value, b"secret")  # cached without a token
        self.d.auth.AuthEnable(R.AuthEnableRequest())  # elsewhere
        time.sleep(0.5)  # > check interval: tokenless entries are gone
        self.assertEqual(rpc_error(self.read), rpc_error(self.read, stubs=self.d))
        alice, bob = self.token(self.d, "alice"), self.token(self.d, "bob")
        for _ in range(3):
            self.assertEqual(self.read(alice).kvs[0].value, b"secret")
        denied = rpc_error(self.read, bob)
        self.assertEqual(denied, rpc_error(self.read, bob, stubs=self.d))
        self.assertEqual(denied[0], grpc.StatusCode.PERMISSION_DENIED)
        # revoked through the proxy: at once
        root = [("token", self.token(self.d, "root"))]
        self.p.auth.RoleRevokePermission(R.AuthRoleRevokePermissionRequest(
            role="reader", key=b"/sec/", range_end=b"/sec0"), metadata=root)
        self.assertEqual(rpc_error(self.read, alice)[0], grpc.StatusCode.PERMISSION_DENIED)
        # granted and cached again, then revoked elsewhere: within --cache-token-max-age
        self.d.auth.RoleGrantPermission(R.AuthRoleGrantPermissionRequest(name="reader", perm=self.perm),
                                        metadata=root)
        self.assertEqual(self.read(alice).kvs[0].value, b"secret")
        self.d.auth.RoleRevokePermission(R.AuthRoleRevokePermissionRequest(
            role="reader", key=b"/sec/", range_end=b"/sec0"), metadata=root)
        started = time.monotonic()
        while rpc_error_or_none(self.read, alice) is None:
            self.assertLess(time.monotonic() - started, 1.5)
            time.sleep(0.01)
        print(f"\nrange cache: permission revoked elsewhere seen after {time.monotonic() - started:.2f} s")


    def test_auth_enabled_before_the_proxy_starts(self):
        """With --cache-watch-user the invalidation watch works with auth on."""
        self.d.auth.AuthEnable(R.AuthEnableRequest())
        fd, password_file = tempfile.mkstemp(prefix="etcdproxy-test-pw-")
        self.addCleanup(os.remove, password_file)
        with os.fdopen(fd, "w") as f:
            f.write("rootpw\n")
        proxy = ProxyProcess(self.etcd.endpoints, extra_args=[
            "--cache-watch-user=root", "--cache-watch-password-file=" + password_file])
        proxy.start()
        self.addCleanup(proxy.stop)
        stubs = Stubs(proxy.address)
        self.addCleanup(stubs.close)
        alice, bob = self.token(self.d, "alice"), self.token(self.d, "bob")
        time.sleep(0.3)  # the invalidation watch is up
        ranges = lambda: self.etcd.metric(RANGE_METRIC, labels={"grpc_method": "Range"})
        before, started = ranges(), time.monotonic()
        for _ in range(500):
            self.assertEqual(self.read(alice, stubs).kvs[0].value, b"secret")
        elapsed, upstream = time.monotonic() - started, ranges() - before
        print(f"\nrange cache with auth: 500 gets in {elapsed:.2f} s: {upstream:.0f} Range at etcd "
              f"(entries with a token live 1 s)")
        self.assertLessEqual(upstream, 2 + elapsed)
        self.assertEqual(rpc_error(self.read, bob, stubs), rpc_error(self.read, bob, self.d))
        self.assertEqual(rpc_error(self.read, None, stubs), rpc_error(self.read, None, self.d))
        root = [("token", self.token(self.d, "root"))]
        self.d.kv.Put(R.PutRequest(key=b"/sec/x", value=b"changed"), metadata=root)
        started = time.monotonic()
        while self.read(alice, stubs).kvs[0].value != b"changed":
            self.assertLess(time.monotonic() - started, 0.5)
        print(f"range cache with auth: a direct write seen after {(time.monotonic() - started) * 1000:.1f} ms")


class ClientLimitTests(GrpcioTestCase):
    proxy_args = ("--client-max-rps=50", "--client-burst=50", "--client-max-concurrent=3")

    def test_rate_limit(self):
        time.sleep(1.1)  # a full bucket
        codes = []
        for _ in range(120):
            e = rpc_error_or_none(self.p.kv.Range, R.RangeRequest(key=b"x", serializable=True))
            codes.append(e and (e.code(), e.details()))
        limited = [c for c in codes if c]
        self.assertGreater(len(limited), 40)
        self.assertLess(len(limited), 120 - 49)
        self.assertEqual(limited[0][0], grpc.StatusCode.RESOURCE_EXHAUSTED)
        self.assertIn("too many requests from this client", limited[0][1])

    def test_concurrent_limit(self):
        time.sleep(1.1)
        streams = [self.p.watch.Watch(iter([R.WatchRequest(create_request=R.WatchCreateRequest(key=b"w"))]))
                   for _ in range(3)]
        for s in streams:
            next(s)  # created
        self.addCleanup(lambda: [s.cancel() for s in streams])
        code, details = rpc_error(self.p.kv.Range, R.RangeRequest(key=b"x"))
        self.assertEqual(code, grpc.StatusCode.RESOURCE_EXHAUSTED)
        self.assertIn("too many concurrent calls", details)
        streams.pop().cancel()
        time.sleep(0.2)
        self.p.kv.Range(R.RangeRequest(key=b"x"))


class RangeCacheFailoverTests(ClusterTestCase):
    """The member holding the invalidation watch dies or hangs: the cache
    empties and no stale answer is served after the monitor notices."""

    def _stale_after(self, how):
        self.addCleanup(self.restore_cluster)
        proxy = ProxyProcess(self.etcd.endpoints)
        proxy.start()
        self.addCleanup(proxy.stop)
        stubs = Stubs(proxy.address)
        self.addCleanup(stubs.close)
        key = ("/failover/%s" % self._testMethodName).encode()
        self.direct[0].kv.Put(R.PutRequest(key=key, value=b"old"))
        time.sleep(0.3)
        read = lambda: stubs.kv.Range(R.RangeRequest(key=key, serializable=True), timeout=10).kvs[0].value
        self.assertEqual(read(), b"old")
        used = self.member_ids.index(stubs.maint.Status(R.StatusRequest()).header.member_id)
        other = self.direct[(used + 1) % 3]
        (self.etcd.kill if how == "kill" else self.etcd.pause)(used)
        started = time.monotonic()
        while True:
            try:
                other.kv.Put(R.PutRequest(key=key, value=b"new"), timeout=2)
                break
            except grpc.RpcError:  # an election
                self.assertLess(time.monotonic() - started, 10)
        acked = time.monotonic()
        while True:
            try:
                if read() == b"new":
                    break
            except grpc.RpcError:
                pass
            self.assertLess(time.monotonic() - acked, 6.0, "stale answer served")
            time.sleep(0.01)
        return time.monotonic() - acked

    def test_sigkill(self):
        waited = self._stale_after("kill")
        print(f"\nrange cache: write seen {waited:.3f} s after SIGKILL of the watch's member")
        self.assertLess(waited, 1.0)

    def test_sigstop(self):
        waited = self._stale_after("pause")
        print(f"\nrange cache: write seen {waited:.3f} s after SIGSTOP of the watch's member "
              f"(bound: --health-check-interval + --health-check-timeout)")
        self.assertLess(waited, 4.5)
