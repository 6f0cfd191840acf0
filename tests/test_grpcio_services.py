"""Every method of every etcd service, called through a grpcio client: through
the proxy, and the same call against etcd directly as the reference.

etcd's error statuses must reach the client unchanged: the same gRPC code AND
the same details string as etcd gives directly.

The proxy under test is chosen by $ETCDPROXY_TEST_KIND ("python", the default:
ours; "go": etcd's own ``etcd grpc-proxy start``).
"""
import hashlib
import threading
import time
import uuid
import grpc

from tests.support.grpcio import (
    R,
    KV,
    AUTH,
    EL,
    LK,
    conf_change,
    prefix_end,
    rpc_error,
    rpc_error_or_none,
    StreamEnded,
    GrpcioTestCase,
    events_until,
)
from tests.support.ports import free_port


# --------------------------------------------------------------------------
# KV

class KVTests(GrpcioTestCase):

    def _fill(self):
        p = self.key()
        revs = {}
        for i in range(1, 6):
            revs["k%d" % i] = self.put(p + b"k%d" % i, b"v%d" % (6 - i)).header.revision
        revs["k2b"] = self.put(p + b"k2", b"v2-new").header.revision
        return p, revs

    def test_range_options(self):
        p, revs = self._fill()
        end = prefix_end(p)
        T, O = R.RangeRequest.SortTarget, R.RangeRequest.SortOrder
        cases = {
            "single": R.RangeRequest(key=p + b"k1"),
            "missing": R.RangeRequest(key=p + b"nope"),
            "prefix": R.RangeRequest(key=p, range_end=end),
            "from_key": R.RangeRequest(key=p + b"k3", range_end=b"\0"),
            "limit": R.RangeRequest(key=p, range_end=end, limit=2),
            "desc_key": R.RangeRequest(key=p, range_end=end, sort_order=O.Value("DESCEND"),
                                       sort_target=T.Value("KEY")),
            "asc_value": R.RangeRequest(key=p, range_end=end, sort_order=O.Value("ASCEND"),
                                        sort_target=T.Value("VALUE")),
            "desc_mod": R.RangeRequest(key=p, range_end=end, sort_order=O.Value("DESCEND"),
                                       sort_target=T.Value("MOD")),
            "keys_only": R.RangeRequest(key=p, range_end=end, keys_only=True),
            "count_only": R.RangeRequest(key=p, range_end=end, count_only=True),
            "min_mod": R.RangeRequest(key=p, range_end=end, min_mod_revision=revs["k3"]),
            "max_mod": R.RangeRequest(key=p, range_end=end, max_mod_revision=revs["k3"]),
            "min_create": R.RangeRequest(key=p, range_end=end, min_create_revision=revs["k4"]),
            "max_create": R.RangeRequest(key=p, range_end=end, max_create_revision=revs["k2"]),
            "historic": R.RangeRequest(key=p + b"k2", revision=revs["k2"]),
            "historic_prefix": R.RangeRequest(key=p, range_end=end, revision=revs["k3"]),
        }
        got = {}
        for name, req in cases.items():
            pr = self.p.kv.Range(req)
            dr = self.d.kv.Range(req)
            self.assertEqual(pr, dr, "Range %s differs from etcd's answer" % name)
            got[name] = pr
        keys = lambda r: [kv.key[len(p):] for kv in r.kvs]
        self.assertEqual(keys(got["single"]), [b"k1"])
        self.assertEqual(got["single"].kvs[0].value, b"v5")
        self.assertEqual(got["single"].kvs[0].mod_revision, revs["k1"])
        self.assertEqual(got["missing"].count, 0)
        self.assertEqual(list(got["missing"].kvs), [])
        self.assertEqual(keys(got["prefix"]), [b"k1", b"k2", b"k3", b"k4", b"k5"])
        self.assertEqual(got["prefix"].kvs[1].value, b"v2-new")
        self.assertEqual(got["prefix"].kvs[1].version, 2)
        self.assertEqual(keys(got["limit"]), [b"k1", b"k2"])
        self.assertTrue(got["limit"].more)
        self.assertEqual(got["limit"].count, 5)
        self.assertEqual(keys(got["desc_key"]), [b"k5", b"k4", b"k3", b"k2", b"k1"])
        # values: k1=v5 k2=v2-new k3=v3 k4=v2 k5=v1
        self.assertEqual(keys(got["asc_value"]), [b"k5", b"k4", b"k2", b"k3", b"k1"])
        self.assertEqual(keys(got["desc_mod"])[0], b"k2")
        self.assertTrue(all(kv.value == b"" for kv in got["keys_only"].kvs))
        self.assertEqual(len(got["keys_only"].kvs), 5)
        self.assertEqual(list(got["count_only"].kvs), [])
        self.assertEqual(got["count_only"].count, 5)
        self.assertEqual(keys(got["min_mod"]), [b"k2", b"k3", b"k4", b"k5"])
        self.assertEqual(keys(got["max_mod"]), [b"k1", b"k3"])
        self.assertEqual(keys(got["min_create"]), [b"k4", b"k5"])
        self.assertEqual(keys(got["max_create"]), [b"k1", b"k2"])
        self.assertEqual(got["historic"].kvs[0].value, b"v4")
        self.assertEqual(keys(got["historic_prefix"]), [b"k1", b"k2", b"k3"])
        # A serializable read may come from a cache: its data must match.
        sr = self.p.kv.Range(R.RangeRequest(key=p, range_end=end, serializable=True))
        self.assertEqual(list(sr.kvs), list(got["prefix"].kvs))

    def test_put_options(self):
        k = self.key("k")
        r1 = self.put(k, b"one")
        self.assertFalse(r1.HasField("prev_kv"))
        r2 = self.put(k, b"two", prev_kv=True)
        self.assertEqual(r2.prev_kv.value, b"one")
        self.assertEqual(r2.prev_kv.mod_revision, r1.header.revision)
        self.assertEqual(r2.header.revision, r1.header.revision + 1)
        lease = self.p.lease.LeaseGrant(R.LeaseGrantRequest(TTL=60)).ID
        self.addCleanup(rpc_error_or_none, self.d.lease.LeaseRevoke, R.LeaseRevokeRequest(ID=lease))
        self.put(k, b"three", lease=lease)
        self.put(k, b"", ignore_value=True, lease=lease)
        kv = self.get(k).kvs[0]
        self.assertEqual((kv.value, kv.lease, kv.version), (b"three", lease, 4))
        self.put(k, b"four", ignore_lease=True)
        kv = self.get(k).kvs[0]
        self.assertEqual((kv.value, kv.lease), (b"four", lease))
        self.assertEqual(self.d.kv.Range(R.RangeRequest(key=k)).kvs[0], kv)
        # etcd's errors, relayed unchanged
        self.both_errors("kv", "Put", R.PutRequest(key=self.key("missing"), ignore_value=True),
                         grpc.StatusCode.INVALID_ARGUMENT, "etcdserver: key not found")
        self.both_errors("kv", "Put", R.PutRequest(key=k, value=b"x", lease=0x7eadbeef),
                         grpc.StatusCode.NOT_FOUND, "etcdserver: requested lease not found")
        self.both_errors("kv", "Put", R.PutRequest(key=b"", value=b"x"),
                         grpc.StatusCode.INVALID_ARGUMENT, "etcdserver: key is not provided")

    def test_delete_range(self):
        p = self.key()
        for i in range(4):
            self.put(p + b"d%d" % i, b"x%d" % i)
        r = self.p.kv.DeleteRange(R.DeleteRangeRequest(key=p + b"d0"))
        self.assertEqual(r.deleted, 1)
        self.assertEqual(list(r.prev_kvs), [])
        r = self.p.kv.DeleteRange(R.DeleteRangeRequest(key=p + b"d0"))
        self.assertEqual(r.deleted, 0)
        r = self.p.kv.DeleteRange(R.DeleteRangeRequest(key=p, range_end=prefix_end(p), prev_kv=True))
        self.assertEqual(r.deleted, 3)
        self.assertEqual([(kv.key, kv.value) for kv in r.prev_kvs],
                         [(p + b"d%d" % i, b"x%d" % i) for i in (1, 2, 3)])
        self.assertEqual(self.d.kv.Range(R.RangeRequest(key=p, range_end=prefix_end(p))).count, 0)
        self.assertEqual(self.get(p, range_end=prefix_end(p)).count, 0)

    def test_txn(self):
        k, other = self.key("k"), self.key("other")
        first = self.put(k, b"x")
        C = R.Compare
        ok = R.TxnRequest(
            compare=[C(key=k, target=C.CompareTarget.Value("VALUE"),
                       result=C.CompareResult.Value("EQUAL"), value=b"x"),
                     C(key=k, target=C.CompareTarget.Value("MOD"),
                       result=C.CompareResult.Value("EQUAL"), mod_revision=first.header.revision),
                     C(key=k, target=C.CompareTarget.Value("VERSION"),
                       result=C.CompareResult.Value("GREATER"), version=0)],
            success=[R.RequestOp(request_put=R.PutRequest(key=k, value=b"y", prev_kv=True)),
                     R.RequestOp(request_range=R.RangeRequest(key=k)),
                     R.RequestOp(request_put=R.PutRequest(key=other, value=b"o")),
                     R.RequestOp(request_txn=R.TxnRequest(
                         success=[R.RequestOp(request_range=R.RangeRequest(key=other))]))],
            failure=[R.RequestOp(request_range=R.RangeRequest(key=k))])
        r = self.p.kv.Txn(ok)
        self.assertTrue(r.succeeded)
        self.assertEqual(len(r.responses), 4)
        self.assertEqual(r.responses[0].response_put.prev_kv.value, b"x")
        self.assertEqual(r.responses[1].response_range.kvs[0].value, b"y")
        self.assertEqual(r.responses[3].response_txn.responses[0].response_range.kvs[0].value, b"o")
        self.assertEqual(r.header.revision, first.header.revision + 1)
        # the same compare fails now: the failure branch runs
        r2 = self.p.kv.Txn(ok)
        self.assertFalse(r2.succeeded)
        self.assertEqual(len(r2.responses), 1)
        self.assertEqual(r2.responses[0].response_range.kvs[0].value, b"y")
        self.assertEqual(r2, self.d.kv.Txn(ok))
        # delete inside a txn, with a compare on a missing key's version
        dele = R.TxnRequest(
            compare=[C(key=self.key("missing"), target=C.CompareTarget.Value("VERSION"),
                       result=C.CompareResult.Value("EQUAL"), version=0)],
            success=[R.RequestOp(request_delete_range=R.DeleteRangeRequest(key=other, prev_kv=True))])
        r3 = self.p.kv.Txn(dele)
        self.assertTrue(r3.succeeded)
        self.assertEqual(r3.responses[0].response_delete_range.deleted, 1)
        self.assertEqual(r3.responses[0].response_delete_range.prev_kvs[0].value, b"o")
        # etcd's error for a txn writing one key twice, relayed unchanged
        dup = R.TxnRequest(success=[R.RequestOp(request_put=R.PutRequest(key=k, value=b"1")),
                                    R.RequestOp(request_put=R.PutRequest(key=k, value=b"2"))])
        self.both_errors("kv", "Txn", dup, grpc.StatusCode.INVALID_ARGUMENT,
                         "etcdserver: duplicate key given in txn request")

    def test_compact_and_compacted_revision_error(self):
        k = self.key("c")
        revs = [self.put(k, b"v%d" % i).header.revision for i in range(4)]
        r = self.p.kv.Compact(R.CompactionRequest(revision=revs[2], physical=True))
        self.assertGreaterEqual(r.header.revision, revs[3])
        self.assertEqual(self.get(k, revision=revs[2]).kvs[0].value, b"v2")
        compacted = "etcdserver: mvcc: required revision has been compacted"
        future = "etcdserver: mvcc: required revision is a future revision"
        self.both_errors("kv", "Range", R.RangeRequest(key=k, revision=revs[1]),
                         grpc.StatusCode.OUT_OF_RANGE, compacted)
        self.both_errors("kv", "Range", R.RangeRequest(key=k, revision=revs[3] + 1000),
                         grpc.StatusCode.OUT_OF_RANGE, future)
        self.both_errors("kv", "Compact", R.CompactionRequest(revision=revs[1]),
                         grpc.StatusCode.OUT_OF_RANGE, compacted)
        self.both_errors("kv", "Compact", R.CompactionRequest(revision=revs[3] + 1000),
                         grpc.StatusCode.OUT_OF_RANGE, future)
        # a serializable read below the compaction is refused as well
        pe = rpc_error(self.p.kv.Range, R.RangeRequest(key=k, revision=revs[0], serializable=True))
        self.assertEqual(pe, (grpc.StatusCode.OUT_OF_RANGE, compacted))

    def test_request_too_large(self):
        big = R.PutRequest(key=self.key("big"), value=b"x" * (1600 * 1024))
        self.both_errors("kv", "Put", big, grpc.StatusCode.INVALID_ARGUMENT,
                         "etcdserver: request is too large")
        # and the proxy still works afterwards
        self.assertEqual(self.put(self.key("small"), b"s").header.cluster_id,
                         self.d.kv.Range(R.RangeRequest(key=b"x")).header.cluster_id)


# --------------------------------------------------------------------------
# Watch

class WatchTests(GrpcioTestCase):

    def create(self, stream, **kw):
        stream.send(R.WatchRequest(create_request=R.WatchCreateRequest(**kw)))
        r = stream.recv()
        self.assertTrue(r.created, "expected a created response, got %r" % r)
        self.assertFalse(r.canceled, r)
        self.assertEqual(list(r.events), [])
        return r

    def test_create_events_prev_kv_cancel(self):
        k = self.key("w")
        s = self.stream(self.p.watch.Watch)
        created = self.create(s, key=k, prev_kv=True)
        wid = created.watch_id
        r1 = self.put(k, b"a")
        self.assertGreaterEqual(r1.header.revision, created.header.revision)
        r2 = self.put(k, b"b")
        self.put(self.key("not-watched"), b"zz")
        r3 = self.p.kv.DeleteRange(R.DeleteRangeRequest(key=k))
        evs, _ = events_until(s, 3, wid)
        PUT, DELETE = KV.Event.EventType.Value("PUT"), KV.Event.EventType.Value("DELETE")
        self.assertEqual([e.type for e in evs], [PUT, PUT, DELETE])
        self.assertEqual([e.kv.key for e in evs], [k, k, k])
        self.assertEqual([e.kv.value for e in evs[:2]], [b"a", b"b"])
        self.assertEqual([e.kv.mod_revision for e in evs],
                         [r1.header.revision, r2.header.revision, r3.header.revision])
        self.assertFalse(evs[0].HasField("prev_kv"))
        self.assertEqual(evs[1].prev_kv.value, b"a")
        self.assertEqual(evs[2].prev_kv.value, b"b")
        s.expect_nothing(0.3)
        s.send(R.WatchRequest(cancel_request=R.WatchCancelRequest(watch_id=wid)))
        c = s.recv()
        self.assertTrue(c.canceled, c)
        self.assertEqual(c.watch_id, wid)
        self.put(k, b"after-cancel")
        s.expect_nothing(0.5)
        # the stream itself stays usable
        created2 = self.create(s, key=k)
        r = self.put(k, b"again")
        evs, _ = events_until(s, 1, created2.watch_id)
        self.assertEqual((evs[0].kv.value, evs[0].kv.mod_revision), (b"again", r.header.revision))

    def test_filters(self):
        k = self.key("f")
        s = self.stream(self.p.watch.Watch)
        F = R.WatchCreateRequest.FilterType
        noput = self.create(s, key=k, filters=[F.Value("NOPUT")]).watch_id
        nodel = self.create(s, key=k, filters=[F.Value("NODELETE")]).watch_id
        self.assertNotEqual(noput, nodel)
        rp = self.put(k, b"p")
        rd = self.p.kv.DeleteRange(R.DeleteRangeRequest(key=k))
        got = {noput: [], nodel: []}
        deadline = time.monotonic() + 5
        while not (got[noput] and got[nodel]) and time.monotonic() < deadline:
            r = s.recv(max(0.01, deadline - time.monotonic()))
            self.assertIn(r.watch_id, got, r)
            got[r.watch_id].extend(r.events)
        s.expect_nothing(0.5)
        self.assertEqual([(e.type, e.kv.mod_revision) for e in got[noput]],
                         [(KV.Event.EventType.Value("DELETE"), rd.header.revision)])
        self.assertEqual([(e.type, e.kv.mod_revision, e.kv.value) for e in got[nodel]],
                         [(KV.Event.EventType.Value("PUT"), rp.header.revision, b"p")])

    def test_prefix_and_start_revision(self):
        p = self.key()
        revs = [self.put(p + b"%d" % i, b"v%d" % i).header.revision for i in range(3)]
        self.put(prefix_end(p) + b"outside", b"no")
        s = self.stream(self.p.watch.Watch)
        created = self.create(s, key=p, range_end=prefix_end(p), start_revision=revs[0])
        evs, _ = events_until(s, 3, created.watch_id)
        self.assertEqual([(e.kv.key, e.kv.value, e.kv.mod_revision) for e in evs],
                         [(p + b"%d" % i, b"v%d" % i, revs[i]) for i in range(3)])
        r = self.put(p + b"live", b"L")
        evs, _ = events_until(s, 1, created.watch_id)
        self.assertEqual((evs[0].kv.key, evs[0].kv.mod_revision), (p + b"live", r.header.revision))
        s.expect_nothing(0.3)

    def test_several_watchers_on_one_stream_and_two_streams(self):
        k = self.key("m")
        s1 = self.stream(self.p.watch.Watch)
        s2 = self.stream(self.p.watch.Watch)
        a = self.create(s1, key=k).watch_id
        b = self.create(s1, key=k, prev_kv=True).watch_id
        c = self.create(s2, key=k).watch_id
        self.assertNotEqual(a, b)
        self.put(k, b"1")
        r = self.put(k, b"2")
        got = {a: [], b: []}
        deadline = time.monotonic() + 5
        while (len(got[a]) < 2 or len(got[b]) < 2) and time.monotonic() < deadline:
            m = s1.recv(max(0.01, deadline - time.monotonic()))
            got[m.watch_id].extend(m.events)
        self.assertEqual([e.kv.value for e in got[a]], [b"1", b"2"])
        self.assertEqual([e.kv.value for e in got[b]], [b"1", b"2"])
        self.assertEqual(got[b][1].prev_kv.value, b"1")
        self.assertFalse(got[a][1].HasField("prev_kv"))
        evs, _ = events_until(s2, 2, c)
        self.assertEqual([e.kv.mod_revision for e in evs][-1], r.header.revision)

    def test_progress_request(self):
        k = self.key("pr")
        s = self.stream(self.p.watch.Watch)
        self.create(s, key=k)
        rev = self.put(self.key("other"), b"x").header.revision
        s.send(R.WatchRequest(progress_request=R.WatchProgressRequest()))
        r = s.recv(5)
        self.assertEqual(list(r.events), [])
        self.assertFalse(r.created or r.canceled, r)
        self.assertGreaterEqual(r.header.revision, rev)
        # etcd answers a progress request with watch_id -1
        d = self.stream(self.d.watch.Watch)
        self.create(d, key=k)
        d.send(R.WatchRequest(progress_request=R.WatchProgressRequest()))
        self.assertEqual(r.watch_id, d.recv(5).watch_id)

    def test_watch_from_compacted_revision(self):
        k = self.key("cw")
        revs = [self.put(k, b"%d" % i).header.revision for i in range(3)]
        self.p.kv.Compact(R.CompactionRequest(revision=revs[2]))
        answers = []
        for stubs in (self.p, self.d):
            s = self.stream(stubs.watch.Watch)
            s.send(R.WatchRequest(create_request=R.WatchCreateRequest(key=k, start_revision=revs[0])))
            msgs = []
            deadline = time.monotonic() + 5
            while not any(m.canceled for m in msgs) and time.monotonic() < deadline:
                msgs.append(s.recv(max(0.01, deadline - time.monotonic())))
            answers.append(msgs)
        pm, dm = answers
        last = pm[-1]
        self.assertTrue(last.canceled, pm)
        self.assertEqual(last.compact_revision, revs[2])
        self.assertEqual(last.compact_revision, dm[-1].compact_revision)
        self.assertEqual([m.created for m in pm], [m.created for m in dm])
        self.assertEqual(sum(len(m.events) for m in pm), 0)


# --------------------------------------------------------------------------
# Lease

class LeaseTests(GrpcioTestCase):

    def test_grant_timetolive_leases_revoke(self):
        g = self.p.lease.LeaseGrant(R.LeaseGrantRequest(TTL=40))
        self.addCleanup(rpc_error_or_none, self.d.lease.LeaseRevoke, R.LeaseRevokeRequest(ID=g.ID))
        self.assertGreater(g.ID, 0)
        self.assertEqual(g.TTL, 40)
        self.assertEqual(g.error, "")
        k = self.key("leased")
        self.put(k, b"v", lease=g.ID)
        t = self.p.lease.LeaseTimeToLive(R.LeaseTimeToLiveRequest(ID=g.ID, keys=True))
        self.assertEqual((t.ID, t.grantedTTL, list(t.keys)), (g.ID, 40, [k]))
        self.assertTrue(35 <= t.TTL <= 40, t)
        ids = [l.ID for l in self.p.lease.LeaseLeases(R.LeaseLeasesRequest()).leases]
        self.assertIn(g.ID, ids)
        self.assertEqual(sorted(ids), sorted(l.ID for l in self.d.lease.LeaseLeases(R.LeaseLeasesRequest()).leases))
        self.p.lease.LeaseRevoke(R.LeaseRevokeRequest(ID=g.ID))
        self.assertEqual(self.d.kv.Range(R.RangeRequest(key=k)).count, 0)
        self.assertEqual(self.get(k).count, 0)
        t = self.p.lease.LeaseTimeToLive(R.LeaseTimeToLiveRequest(ID=g.ID))
        self.assertEqual((t.ID, t.TTL), (g.ID, -1))
        self.assertNotIn(g.ID, [l.ID for l in self.p.lease.LeaseLeases(R.LeaseLeasesRequest()).leases])

    def test_grant_with_id(self):
        want = 0x5eed0000 + (uuid.uuid4().int & 0xFFFF)
        g = self.p.lease.LeaseGrant(R.LeaseGrantRequest(ID=want, TTL=30))
        self.addCleanup(rpc_error_or_none, self.d.lease.LeaseRevoke, R.LeaseRevokeRequest(ID=want))
        self.assertEqual((g.ID, g.TTL), (want, 30))
        self.both_errors("lease", "LeaseGrant", R.LeaseGrantRequest(ID=want, TTL=30),
                         grpc.StatusCode.FAILED_PRECONDITION, "etcdserver: lease already exists")

    def test_unknown_lease_errors(self):
        unknown = 0x7000000000000000 + (uuid.uuid4().int & 0xFFFFFF)
        self.both_errors("lease", "LeaseRevoke", R.LeaseRevokeRequest(ID=unknown),
                         grpc.StatusCode.NOT_FOUND, "etcdserver: requested lease not found")
        # TimeToLive of an unknown lease is no error for etcd: TTL -1
        pt = self.p.lease.LeaseTimeToLive(R.LeaseTimeToLiveRequest(ID=unknown))
        dt = self.d.lease.LeaseTimeToLive(R.LeaseTimeToLiveRequest(ID=unknown))
        self.assertEqual((pt.ID, pt.TTL, pt.grantedTTL), (dt.ID, dt.TTL, dt.grantedTTL))
        self.assertEqual(pt.TTL, -1)

    def test_keepalive_stream(self):
        ttl = 5
        g = self.p.lease.LeaseGrant(R.LeaseGrantRequest(TTL=ttl))
        self.addCleanup(rpc_error_or_none, self.d.lease.LeaseRevoke, R.LeaseRevokeRequest(ID=g.ID))
        k = self.key("kept")
        self.put(k, b"alive", lease=g.ID)
        s = self.stream(self.p.lease_stream.LeaseKeepAlive)
        s.send(R.LeaseKeepAliveRequest(ID=g.ID))
        first = s.recv(5)
        self.assertEqual((first.ID, first.TTL), (g.ID, ttl))
        # keep it alive for longer than its TTL, one keep-alive a second
        answers = [first]
        end = time.monotonic() + ttl + 2
        while time.monotonic() < end:
            s.send(R.LeaseKeepAliveRequest(ID=g.ID))
            try:
                while True:
                    answers.append(s.recv(0.9))
            except StreamEnded:
                raise
            except AssertionError:
                pass
        # Through the lease coalescer, keep-alives sent more often than every
        # TTL/3 are answered from etcd's last answer, with what is left of the
        # TTL (rounded down): at least 2/3 of it; etcd itself answers the full TTL.
        self.assertTrue(all(a.ID == g.ID and ttl * 2 // 3 <= a.TTL <= ttl for a in answers), answers)
        self.assertGreaterEqual(len(answers), 2)
        t = self.d.lease.LeaseTimeToLive(R.LeaseTimeToLiveRequest(ID=g.ID))
        self.assertGreater(t.TTL, 0, "lease expired despite keep-alives")
        self.assertEqual(self.d.kv.Range(R.RangeRequest(key=k)).count, 1)

    def test_keepalive_unknown_lease(self):
        # a keep-alive for a lease etcd does not know: answer as etcd does (TTL 0)
        unknown = 0x7100000000000000 + (uuid.uuid4().int & 0xFFFFFF)
        s = self.stream(self.p.lease_stream.LeaseKeepAlive)
        s.send(R.LeaseKeepAliveRequest(ID=unknown))
        pr = s.recv(5)
        d = self.stream(self.d.lease_stream.LeaseKeepAlive)
        d.send(R.LeaseKeepAliveRequest(ID=unknown))
        dr = d.recv(5)
        self.assertEqual((pr.ID, pr.TTL), (dr.ID, dr.TTL))
        self.assertEqual((pr.ID, pr.TTL), (unknown, 0))


# --------------------------------------------------------------------------
# Cluster

class ClusterTests(GrpcioTestCase):

    def test_member_list(self):
        """etcd's answer, header included, with this proxy's address as the
        client URL of every started member."""
        pl = self.p.cluster.MemberList(R.MemberListRequest())
        dl = self.d.cluster.MemberList(R.MemberListRequest())
        self.assertEqual([list(m.clientURLs) for m in pl.members], [[self.proxied]])
        for m in dl.members:
            m.clientURLs[:] = [self.proxied]
        self.assertEqual(pl, dl)
        # IDs agree with the rest of etcd's answers
        status = self.p.maint.Status(R.StatusRequest())
        self.assertIn(status.header.member_id, [m.ID for m in pl.members])
        self.assertIn(status.leader, [m.ID for m in pl.members])

    def test_alarm_members_are_listed(self):
        member = self.p.cluster.MemberList(R.MemberListRequest()).members[0].ID
        alarm = R.AlarmRequest(action=R.AlarmRequest.ACTIVATE, memberID=member, alarm=R.NOSPACE)
        self.addCleanup(lambda: self.d.maint.Alarm(R.AlarmRequest(
            action=R.AlarmRequest.DEACTIVATE, memberID=member, alarm=R.NOSPACE)))
        self.p.maint.Alarm(alarm)
        listed = self.p.maint.Alarm(R.AlarmRequest(action=R.AlarmRequest.GET)).alarms
        self.assertEqual([(a.memberID, a.alarm) for a in listed], [(member, R.NOSPACE)])


class RelayedMemberListTests(GrpcioTestCase):
    proxy_args = ("--relay-member-list",)

    def test_member_list_is_etcds(self):
        self.assertEqual(self.p.cluster.MemberList(R.MemberListRequest()),
                         self.d.cluster.MemberList(R.MemberListRequest()))

    def test_member_errors_on_unknown_member(self):
        unknown = 0x1234567
        nf = (grpc.StatusCode.NOT_FOUND, "etcdserver: member not found")
        self.both_conf_change_errors("MemberRemove", R.MemberRemoveRequest(ID=unknown), *nf)
        self.both_conf_change_errors("MemberUpdate",
                         R.MemberUpdateRequest(ID=unknown, peerURLs=["http://127.0.0.1:1"]), *nf)
        self.both_conf_change_errors("MemberPromote", R.MemberPromoteRequest(ID=unknown), *nf)

    def test_member_add_errors(self):
        self.both_conf_change_errors("MemberAdd", R.MemberAddRequest(peerURLs=["bogus"]),
                         grpc.StatusCode.INVALID_ARGUMENT, "etcdserver: given member URLs are invalid")
        mine = list(self.d.cluster.MemberList(R.MemberListRequest()).members[0].peerURLs)
        self.both_conf_change_errors("MemberAdd", R.MemberAddRequest(peerURLs=mine),
                         grpc.StatusCode.FAILED_PRECONDITION, "etcdserver: Peer URLs already exists")

    def test_learner_add_update_promote_remove(self):
        url = "http://127.0.0.1:%d" % free_port()
        r = conf_change(self.p.cluster.MemberAdd, R.MemberAddRequest(peerURLs=[url], isLearner=True))
        mid = r.member.ID

        def cleanup():
            if mid in [m.ID for m in self.d.cluster.MemberList(R.MemberListRequest()).members]:
                conf_change(self.d.cluster.MemberRemove, R.MemberRemoveRequest(ID=mid))
        self.addCleanup(cleanup)
        self.assertTrue(r.member.isLearner)
        self.assertEqual(list(r.member.peerURLs), [url])
        self.assertIn(mid, [m.ID for m in r.members])
        # the learner is listed as etcd lists it: not started, so no client URLs
        listed = {m.ID: m for m in self.p.cluster.MemberList(R.MemberListRequest()).members}
        self.assertEqual(listed[mid], [m for m in self.d.cluster.MemberList(R.MemberListRequest()).members
                                       if m.ID == mid][0])
        self.assertEqual((listed[mid].isLearner, list(listed[mid].clientURLs)), (True, []))
        url2 = "http://127.0.0.1:%d" % free_port()
        u = conf_change(self.p.cluster.MemberUpdate, R.MemberUpdateRequest(ID=mid, peerURLs=[url2]))
        self.assertEqual([list(m.peerURLs) for m in u.members if m.ID == mid], [[url2]])
        # a learner that never started is not in sync: etcd refuses to promote it
        self.both_conf_change_errors("MemberPromote", R.MemberPromoteRequest(ID=mid),
                         grpc.StatusCode.FAILED_PRECONDITION,
                         "etcdserver: can only promote a learner member which is in sync with leader")
        rm = conf_change(self.p.cluster.MemberRemove, R.MemberRemoveRequest(ID=mid))
        self.assertNotIn(mid, [m.ID for m in rm.members])
        self.assertNotIn(mid, [m.ID for m in self.d.cluster.MemberList(R.MemberListRequest()).members])
        self.both_conf_change_errors("MemberRemove", R.MemberRemoveRequest(ID=mid),
                         grpc.StatusCode.NOT_FOUND, "etcdserver: member not found")


# --------------------------------------------------------------------------
# Maintenance

class MaintenanceTests(GrpcioTestCase):

    def test_status(self):
        ps = self.p.maint.Status(R.StatusRequest())
        ds = self.d.maint.Status(R.StatusRequest())
        self.assertEqual((ps.version, ps.leader, ps.raftTerm, ps.header.cluster_id, ps.header.member_id),
                         (ds.version, ds.leader, ds.raftTerm, ds.header.cluster_id, ds.header.member_id))
        self.assertTrue(ps.version.startswith("3."), ps.version)
        self.assertGreater(ps.dbSize, 0)
        self.assertNotEqual(ps.leader, 0)

    def test_alarm(self):
        A = R.AlarmRequest
        get = A(action=A.AlarmAction.Value("GET"))
        self.assertEqual(list(self.p.maint.Alarm(get).alarms), [])
        member = self.d.maint.Status(R.StatusRequest()).header.member_id
        nospace = R.AlarmType.Value("NOSPACE")

        def disarm():
            self.d.maint.Alarm(A(action=A.AlarmAction.Value("DEACTIVATE"), memberID=member, alarm=nospace))
        self.addCleanup(disarm)
        r = self.p.maint.Alarm(A(action=A.AlarmAction.Value("ACTIVATE"), memberID=member, alarm=nospace))
        self.assertEqual([(a.memberID, a.alarm) for a in r.alarms], [(member, nospace)])
        got = self.p.maint.Alarm(get)
        self.assertEqual([(a.memberID, a.alarm) for a in got.alarms], [(member, nospace)])
        self.assertEqual(list(got.alarms), list(self.d.maint.Alarm(get).alarms))
        # with the NOSPACE alarm raised etcd refuses writes; relayed unchanged
        self.both_errors("kv", "Put", R.PutRequest(key=self.key("k"), value=b"v"),
                         grpc.StatusCode.RESOURCE_EXHAUSTED, "etcdserver: mvcc: database space exceeded")
        r = self.p.maint.Alarm(A(action=A.AlarmAction.Value("DEACTIVATE"), memberID=member, alarm=nospace))
        self.assertEqual(list(self.p.maint.Alarm(get).alarms), [])
        self.put(self.key("k"), b"v")

    def test_defragment(self):
        before = self.d.maint.Status(R.StatusRequest())
        r = self.p.maint.Defragment(R.DefragmentRequest())
        # etcd 3.4 answers an empty DefragmentResponse (no header)
        self.assertEqual(r, self.d.maint.Defragment(R.DefragmentRequest()))
        after = self.d.maint.Status(R.StatusRequest())
        self.assertLessEqual(after.dbSize, before.dbSize)

    def test_hash_and_hashkv(self):
        for k in range(3):
            self.put(self.key("h%d" % k), b"v")
        # no writes happen between the two calls (retry if a background write did)
        for attempt in range(3):
            ph = self.p.maint.Hash(R.HashRequest())
            dh = self.d.maint.Hash(R.HashRequest())
            pk = self.p.maint.HashKV(R.HashKVRequest(revision=0))
            dk = self.d.maint.HashKV(R.HashKVRequest(revision=0))
            if ph.hash == dh.hash and pk.hash == dk.hash:
                break
        self.assertEqual(ph.hash, dh.hash)
        self.assertNotEqual(ph.hash, 0)
        self.assertEqual((pk.hash, pk.compact_revision), (dk.hash, dk.compact_revision))
        self.assertNotEqual(pk.hash, 0)

    def test_snapshot_stream(self):
        self.put(self.key("snap"), b"x" * 10000)
        s = self.stream(self.p.maint.Snapshot, R.SnapshotRequest())
        blobs, last = [], None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                m = s.recv(10)
            except StreamEnded:
                break
            blobs.append(m.blob)
            last = m
        self.assertIsNone(s.error, s.error)
        self.assertIsNotNone(last, "no snapshot message")
        self.assertEqual(last.remaining_bytes, 0)
        data = b"".join(blobs)
        # etcd ends a snapshot with the sha256 of the database that precedes it
        self.assertGreater(len(data), 32 + 4096)
        self.assertEqual(hashlib.sha256(data[:-32]).digest(), data[-32:],
                         "snapshot of %d bytes: checksum mismatch" % len(data))
        self.assertIn(b"x" * 10000, data)

    def test_move_leader_error(self):
        self.both_errors("maint", "MoveLeader", R.MoveLeaderRequest(targetID=0x12345),
                         grpc.StatusCode.FAILED_PRECONDITION, "etcdserver: bad leader transferee")


# --------------------------------------------------------------------------
# Election and Lock

class ElectionLockTests(GrpcioTestCase):

    def lease(self, ttl=30):
        lid = self.p.lease.LeaseGrant(R.LeaseGrantRequest(TTL=ttl)).ID
        self.addCleanup(lambda: rpc_error_or_none(self.d.lease.LeaseRevoke, R.LeaseRevokeRequest(ID=lid)))
        return lid

    def test_election(self):
        name = self.key("election")
        self.both_errors("election", "Leader", EL.LeaderRequest(name=name),
                         grpc.StatusCode.UNKNOWN, "election: no leader")
        l1 = self.lease()
        c = self.p.election.Campaign(EL.CampaignRequest(name=name, lease=l1, value=b"first"))
        leader = c.leader
        self.assertEqual((leader.name, leader.lease), (name, l1))
        self.assertTrue(leader.key.startswith(name + b"/"), leader)
        self.assertGreater(leader.rev, 0)
        r = self.p.election.Leader(EL.LeaderRequest(name=name))
        self.assertEqual((r.kv.key, r.kv.value), (leader.key, b"first"))
        self.assertEqual(r.kv, self.d.election.Leader(EL.LeaderRequest(name=name)).kv)
        obs = self.stream(self.p.election.Observe, EL.LeaderRequest(name=name))
        self.assertEqual(obs.recv(5).kv.value, b"first")
        self.p.election.Proclaim(EL.ProclaimRequest(leader=leader, value=b"second"))
        self.assertEqual(obs.recv(5).kv.value, b"second")
        self.assertEqual(self.p.election.Leader(EL.LeaderRequest(name=name)).kv.value, b"second")
        # a second candidate waits while the first leads
        l2 = self.lease()
        result = {}

        def campaign():
            try:
                result["r"] = self.p.election.Campaign(
                    EL.CampaignRequest(name=name, lease=l2, value=b"third"), timeout=15)
            except grpc.RpcError as e:
                result["e"] = e
        t = threading.Thread(target=campaign, daemon=True)
        t.start()
        t.join(1.0)
        self.assertTrue(t.is_alive(), "second candidate won while the first leads: %r" % result)
        self.p.election.Resign(EL.ResignRequest(leader=leader))
        t.join(10)
        self.assertFalse(t.is_alive(), "second candidate did not win after resign")
        self.assertNotIn("e", result, result.get("e"))
        self.assertEqual(result["r"].leader.lease, l2)
        self.assertEqual(obs.recv(5).kv.value, b"third")
        self.assertEqual(self.p.election.Leader(EL.LeaderRequest(name=name)).kv.value, b"third")
        self.p.election.Resign(EL.ResignRequest(leader=result["r"].leader))
        self.both_errors("election", "Leader", EL.LeaderRequest(name=name),
                         grpc.StatusCode.UNKNOWN, "election: no leader")

    def test_lock_unlock(self):
        name = self.key("lock")
        l1, l2 = self.lease(), self.lease()
        a = self.p.lock.Lock(LK.LockRequest(name=name, lease=l1))
        self.assertTrue(a.key.startswith(name + b"/"), a.key)
        held = self.d.kv.Range(R.RangeRequest(key=name + b"/", range_end=prefix_end(name + b"/")))
        self.assertEqual([kv.key for kv in held.kvs], [a.key])
        self.assertEqual(held.kvs[0].lease, l1)
        result = {}

        def lock():
            try:
                result["r"] = self.p.lock.Lock(LK.LockRequest(name=name, lease=l2), timeout=15)
            except grpc.RpcError as e:
                result["e"] = e
        t = threading.Thread(target=lock, daemon=True)
        t.start()
        t.join(1.0)
        self.assertTrue(t.is_alive(), "second Lock succeeded while the lock is held: %r" % result)
        self.p.lock.Unlock(LK.UnlockRequest(key=a.key))
        t.join(10)
        self.assertFalse(t.is_alive(), "second Lock did not get the lock after Unlock")
        self.assertNotIn("e", result, result.get("e"))
        b = result["r"].key
        self.assertNotEqual(b, a.key)
        self.p.lock.Unlock(LK.UnlockRequest(key=b))
        left = self.d.kv.Range(R.RangeRequest(key=name + b"/", range_end=prefix_end(name + b"/")))
        self.assertEqual(left.count, 0)


# --------------------------------------------------------------------------
# Auth (its own etcd cluster: enabling auth affects every client)

class AuthTests(GrpcioTestCase):

    def names(self, *what):
        tag = uuid.uuid4().hex[:6]
        return ["%s-%s" % (w, tag) for w in what]

    def test_user_and_role_management(self):
        user, role = self.names("user", "role")
        a = self.p.auth
        a.UserAdd(R.AuthUserAddRequest(name=user, password="pw1"))
        self.addCleanup(rpc_error_or_none, self.d.auth.UserDelete, R.AuthUserDeleteRequest(name=user))
        self.both_errors("auth", "UserAdd", R.AuthUserAddRequest(name=user, password="x"),
                         grpc.StatusCode.FAILED_PRECONDITION, "etcdserver: user name already exists")
        self.assertEqual(list(a.UserGet(R.AuthUserGetRequest(name=user)).roles), [])
        self.assertIn(user, a.UserList(R.AuthUserListRequest()).users)
        a.UserChangePassword(R.AuthUserChangePasswordRequest(name=user, password="pw2"))
        a.RoleAdd(R.AuthRoleAddRequest(name=role))
        self.addCleanup(rpc_error_or_none, self.d.auth.RoleDelete, R.AuthRoleDeleteRequest(role=role))
        self.both_errors("auth", "RoleAdd", R.AuthRoleAddRequest(name=role),
                         grpc.StatusCode.FAILED_PRECONDITION, "etcdserver: role name already exists")
        self.assertIn(role, a.RoleList(R.AuthRoleListRequest()).roles)
        perm = AUTH.Permission(permType=AUTH.Permission.Type.Value("READWRITE"),
                               key=b"/p/", range_end=b"/p0")
        a.RoleGrantPermission(R.AuthRoleGrantPermissionRequest(name=role, perm=perm))
        got = a.RoleGet(R.AuthRoleGetRequest(role=role))
        self.assertEqual(list(got.perm), [perm])
        self.assertEqual(got.perm, self.d.auth.RoleGet(R.AuthRoleGetRequest(role=role)).perm)
        a.UserGrantRole(R.AuthUserGrantRoleRequest(user=user, role=role))
        self.assertEqual(list(a.UserGet(R.AuthUserGetRequest(name=user)).roles), [role])
        self.both_errors("auth", "UserGrantRole", R.AuthUserGrantRoleRequest(user=user, role="no-such-role"),
                         grpc.StatusCode.FAILED_PRECONDITION, "etcdserver: role name not found")
        a.UserRevokeRole(R.AuthUserRevokeRoleRequest(name=user, role=role))
        self.assertEqual(list(a.UserGet(R.AuthUserGetRequest(name=user)).roles), [])
        a.RoleRevokePermission(R.AuthRoleRevokePermissionRequest(role=role, key=b"/p/", range_end=b"/p0"))
        self.assertEqual(list(a.RoleGet(R.AuthRoleGetRequest(role=role)).perm), [])
        a.RoleDelete(R.AuthRoleDeleteRequest(role=role))
        self.assertNotIn(role, a.RoleList(R.AuthRoleListRequest()).roles)
        self.both_errors("auth", "RoleGet", R.AuthRoleGetRequest(role=role),
                         grpc.StatusCode.FAILED_PRECONDITION, "etcdserver: role name not found")
        a.UserDelete(R.AuthUserDeleteRequest(name=user))
        self.assertNotIn(user, a.UserList(R.AuthUserListRequest()).users)
        self.both_errors("auth", "UserGet", R.AuthUserGetRequest(name=user),
                         grpc.StatusCode.FAILED_PRECONDITION, "etcdserver: user name not found")

    def test_enable_authenticate_errors_disable(self):
        a, d = self.p.auth, self.d.auth
        reader, = self.names("reader")
        # etcd needs a root user with the root role before auth can be enabled
        if "root" not in d.UserList(R.AuthUserListRequest()).users:
            d.UserAdd(R.AuthUserAddRequest(name="root", password="rootpw"))
        if "root" not in d.RoleList(R.AuthRoleListRequest()).roles:
            d.RoleAdd(R.AuthRoleAddRequest(name="root"))
        d.UserGrantRole(R.AuthUserGrantRoleRequest(user="root", role="root"))
        d.UserAdd(R.AuthUserAddRequest(name=reader, password="readerpw"))
        self.both_errors("auth", "Authenticate", R.AuthenticateRequest(name="root", password="rootpw"),
                         grpc.StatusCode.FAILED_PRECONDITION, "etcdserver: authentication is not enabled")

        def disable():
            try:
                tok = d.Authenticate(R.AuthenticateRequest(name="root", password="rootpw")).token
            except grpc.RpcError:
                return      # not enabled (any more)
            rpc_error_or_none(d.AuthDisable, R.AuthDisableRequest(), metadata=[("token", tok)])
        a.AuthEnable(R.AuthEnableRequest())
        self.addCleanup(disable)
        k = self.key("secret")

        # Authenticate through the proxy; the token works on both paths
        root = a.Authenticate(R.AuthenticateRequest(name="root", password="rootpw")).token
        self.assertTrue(root)
        rmd = [("token", root)]
        self.p.kv.Put(R.PutRequest(key=k, value=b"s"), metadata=rmd)
        self.assertEqual(self.p.kv.Range(R.RangeRequest(key=k), metadata=rmd).kvs[0].value, b"s")
        self.assertEqual(self.d.kv.Range(R.RangeRequest(key=k), metadata=rmd).kvs[0].value, b"s")
        self.both_errors("auth", "Authenticate", R.AuthenticateRequest(name="root", password="wrong"),
                         grpc.StatusCode.INVALID_ARGUMENT,
                         "etcdserver: authentication failed, invalid user ID or password")
        # no token at all
        self.both_errors("kv", "Range", R.RangeRequest(key=k),
                         grpc.StatusCode.INVALID_ARGUMENT, "etcdserver: user name is empty")
        # a bogus token
        self.both_errors("kv", "Range", R.RangeRequest(key=k), grpc.StatusCode.UNAUTHENTICATED,
                         "etcdserver: invalid auth token", metadata=[("token", "bogus.1")])
        # a user without any role
        rtok = a.Authenticate(R.AuthenticateRequest(name=reader, password="readerpw")).token
        rd = [("token", rtok)]
        self.both_errors("kv", "Range", R.RangeRequest(key=k), grpc.StatusCode.PERMISSION_DENIED,
                         "etcdserver: permission denied", metadata=rd)
        self.both_errors("kv", "Put", R.PutRequest(key=k, value=b"x"), grpc.StatusCode.PERMISSION_DENIED,
                         "etcdserver: permission denied", metadata=rd)
        self.both_errors("auth", "UserList", R.AuthUserListRequest(), grpc.StatusCode.PERMISSION_DENIED,
                         "etcdserver: permission denied", metadata=rd)
        self.assertIn(reader, a.UserList(R.AuthUserListRequest(), metadata=rmd).users)
        # the token reaches etcd on streams too
        s = self.stream(self.p.watch.Watch, metadata=rmd)
        s.send(R.WatchRequest(create_request=R.WatchCreateRequest(key=k)))
        created = s.recv(5)
        self.assertTrue(created.created and not created.canceled, created)
        r = self.p.kv.Put(R.PutRequest(key=k, value=b"t"), metadata=rmd)
        evs, _ = events_until(s, 1)
        self.assertEqual((evs[0].kv.value, evs[0].kv.mod_revision), (b"t", r.header.revision))
        s2 = self.stream(self.p.watch.Watch, metadata=rd)
        s2.send(R.WatchRequest(create_request=R.WatchCreateRequest(key=k)))
        denied = s2.recv(5)
        self.assertTrue(denied.canceled, denied)
        self.assertIn("permission denied", denied.cancel_reason)
        self.assertEqual(list(denied.events), [])
        # AuthDisable needs root; through the proxy
        self.both_errors("auth", "AuthDisable", R.AuthDisableRequest(), grpc.StatusCode.PERMISSION_DENIED,
                         "etcdserver: permission denied", metadata=rd)
        a.AuthDisable(R.AuthDisableRequest(), metadata=rmd)
        self.assertEqual(self.p.kv.Range(R.RangeRequest(key=k)).kvs[0].value, b"t")
        d.UserDelete(R.AuthUserDeleteRequest(name=reader))
