"""--namespace: two proxies with different namespaces over one etcd never see
each other's keys, watches, ranges over the whole keyspace and Txn included,
nor each other's locks and elections; keys come back without the prefix."""

import threading

import grpc

from tests.support.etcdctl import etcdctl
from tests.support.grpcio import EL, LK, R, Stream, Stubs, rpc_error
from tests.support.proxy import ProxyProcess
from tests.support.targets import EtcdProxyTestCase

A, B = b"/tenant-a/", b"/tenant-b/"


class NamespaceTests(EtcdProxyTestCase):
    proxy_args = ("--namespace", A.decode())

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.other = ProxyProcess(cls.etcd.endpoints, extra_args=["--namespace", B.decode()])
        cls.other.start()
        cls.addClassCleanup(cls.other.stop)
        cls.a, cls.b, cls.d = Stubs(cls.proxied), Stubs(cls.other.address), Stubs(cls.direct)
        for stubs in (cls.a, cls.b, cls.d):
            cls.addClassCleanup(stubs.close)

    def test_keys_stay_in_their_namespace(self):
        self.a.kv.Put(R.PutRequest(key=b"k", value=b"from a"))
        self.b.kv.Put(R.PutRequest(key=b"k", value=b"from b"))
        self.assertEqual(self.a.kv.Range(R.RangeRequest(key=b"k")).kvs[0].value, b"from a")
        self.assertEqual(self.b.kv.Range(R.RangeRequest(key=b"k")).kvs[0].value, b"from b")
        self.assertEqual(self.d.kv.Range(R.RangeRequest(key=A + b"k")).kvs[0].value, b"from a")
        # the whole keyspace, through each: its own keys only, without the prefix
        everything = R.RangeRequest(key=b"\0", range_end=b"\0")
        for stubs, value in ((self.a, b"from a"), (self.b, b"from b")):
            kvs = stubs.kv.Range(everything).kvs
            self.assertEqual([(kv.key, kv.value) for kv in kvs if kv.key == b"k"], [(b"k", value)])
            self.assertTrue(all(not kv.key.startswith(b"/tenant-") for kv in kvs), kvs)
        self.assertEqual(self.b.kv.Range(R.RangeRequest(key=b"k", serializable=True)).kvs[0].value, b"from b")

    def test_txn_delete_and_prev_kv(self):
        put = R.RequestOp(request_put=R.PutRequest(key=b"t/1", value=b"x", prev_kv=True))
        nested = R.RequestOp(request_txn=R.TxnRequest(success=[
            R.RequestOp(request_range=R.RangeRequest(key=b"t/", range_end=b"t0"))]))
        txn = R.TxnRequest(compare=[R.Compare(key=b"t/1", target=R.Compare.VERSION, version=0)],
                           success=[put, nested], failure=[])
        answer = self.a.kv.Txn(txn)
        self.assertTrue(answer.succeeded)
        inner = answer.responses[1].response_txn.responses[0].response_range
        self.assertEqual([kv.key for kv in inner.kvs], [b"t/1"])
        self.assertEqual(self.b.kv.Range(R.RangeRequest(key=b"t/1")).count, 0)
        deleted = self.a.kv.DeleteRange(R.DeleteRangeRequest(key=b"t/", range_end=b"t0", prev_kv=True))
        self.assertEqual([kv.key for kv in deleted.prev_kvs], [b"t/1"])
        code, details = rpc_error(self.a.kv.Put, R.PutRequest(key=b"", value=b"x"))
        self.assertEqual((code, details), (grpc.StatusCode.INVALID_ARGUMENT, "etcdserver: key is not provided"))

    def test_watch_sees_its_namespace_only(self):
        watch = Stream(self.a.watch.Watch)
        self.addCleanup(watch.close)
        watch.send(R.WatchRequest(create_request=R.WatchCreateRequest(key=b"w/", range_end=b"w0", prev_kv=True)))
        self.assertTrue(watch.recv().created)
        self.b.kv.Put(R.PutRequest(key=b"w/1", value=b"b"))
        self.a.kv.Put(R.PutRequest(key=b"w/1", value=b"a1"))
        self.a.kv.Put(R.PutRequest(key=b"w/1", value=b"a2"))
        events = [e for _ in range(2) for e in watch.recv().events]
        self.assertEqual([(e.kv.key, e.kv.value) for e in events], [(b"w/1", b"a1"), (b"w/1", b"a2")])
        self.assertEqual(events[1].prev_kv.key, b"w/1")

    def test_lease_keys(self):
        lease = self.a.lease.LeaseGrant(R.LeaseGrantRequest(TTL=30)).ID
        self.a.kv.Put(R.PutRequest(key=b"leased", value=b"v", lease=lease))
        ttl = self.a.lease.LeaseTimeToLive(R.LeaseTimeToLiveRequest(ID=lease, keys=True))
        self.assertEqual(list(ttl.keys), [b"leased"])

    def lease(self, stubs):
        lease = stubs.lease.LeaseGrant(R.LeaseGrantRequest(TTL=30)).ID
        self.addCleanup(lambda: self.d.lease.LeaseRevoke(R.LeaseRevokeRequest(ID=lease)))
        return lease

    def test_one_lock_name_in_two_namespaces(self):
        held = {side: stubs.lock.Lock(LK.LockRequest(name=b"lk", lease=self.lease(stubs)), timeout=5).key
                for side, stubs in (("a", self.a), ("b", self.b))}  # neither waits for the other
        for side, prefix in (("a", A), ("b", B)):
            self.assertTrue(held[side].startswith(b"lk/"), held[side])
            self.assertEqual(self.d.kv.Range(R.RangeRequest(key=prefix + held[side])).count, 1)
        # a second locker in namespace a waits for a's holder only
        result = {}

        def lock():
            result["key"] = self.a.lock.Lock(LK.LockRequest(name=b"lk", lease=self.lease(self.a)),
                                             timeout=10).key
        waiter = threading.Thread(target=lock, daemon=True)
        waiter.start()
        waiter.join(0.5)
        self.assertTrue(waiter.is_alive(), "got a held lock: %r" % result)
        self.b.lock.Unlock(LK.UnlockRequest(key=held["b"]))
        waiter.join(0.5)
        self.assertTrue(waiter.is_alive(), "b's unlock freed a's lock: %r" % result)
        self.a.lock.Unlock(LK.UnlockRequest(key=held["a"]))
        waiter.join(10)
        self.assertTrue(result["key"].startswith(b"lk/"), result)
        self.a.lock.Unlock(LK.UnlockRequest(key=result["key"]))
        self.assertEqual(self.d.kv.Range(R.RangeRequest(key=A + b"lk/", range_end=A + b"lk0")).count, 0)

    def test_one_election_name_in_two_namespaces(self):
        observers = {}
        leaders = {}
        for side, stubs in (("a", self.a), ("b", self.b)):
            leaders[side] = stubs.election.Campaign(EL.CampaignRequest(
                name=b"el", lease=self.lease(stubs), value=side.encode()), timeout=5).leader
            self.assertEqual(leaders[side].name, b"el")
            self.assertTrue(leaders[side].key.startswith(b"el/"), leaders[side])
            observers[side] = Stream(stubs.election.Observe, EL.LeaderRequest(name=b"el"))
            self.addCleanup(observers[side].close)
        for side, stubs in (("a", self.a), ("b", self.b)):
            kv = stubs.election.Leader(EL.LeaderRequest(name=b"el")).kv
            self.assertEqual((kv.key, kv.value), (leaders[side].key, side.encode()))
            observed = observers[side].recv(5).kv
            self.assertEqual((observed.key, observed.value), (leaders[side].key, side.encode()))
            stubs.election.Proclaim(EL.ProclaimRequest(leader=leaders[side], value=b"again " + side.encode()))
            self.assertEqual(observers[side].recv(5).kv.value, b"again " + side.encode())
        prefixed = self.d.election.Leader(EL.LeaderRequest(name=A + b"el")).kv
        self.assertEqual((prefixed.key, prefixed.value), (A + leaders["a"].key, b"again a"))
        self.a.election.Resign(EL.ResignRequest(leader=leaders["a"]))
        self.assertEqual(rpc_error(self.a.election.Leader, EL.LeaderRequest(name=b"el")),
                         (grpc.StatusCode.UNKNOWN, "election: no leader"))
        self.assertEqual(self.b.election.Leader(EL.LeaderRequest(name=b"el")).kv.value, b"again b")

    def test_requests_that_do_not_decode_are_refused(self):
        """A Txn nested deeper than protobuf's recursion limit here (etcd reads
        it) never reaches etcd with its keys unprefixed."""
        def field(number, body):  # a length-delimited field, by hand (protobuf here refuses the depth)
            size, length = bytearray(), len(body)
            while True:
                size.append(length & 0x7F | (0x80 if length > 0x7F else 0))
                length >>= 7
                if not length:
                    return bytes([number << 3 | 2]) + bytes(size) + body
        txn = R.TxnRequest(success=[R.RequestOp(request_put=R.PutRequest(key=b"escaped", value=b"x"))])
        txn = txn.SerializeToString()
        for _ in range(120):
            txn = field(2, field(4, txn))  # TxnRequest.success[0].request_txn
        raw = self.a.channel.unary_unary("/etcdserverpb.KV/Txn")
        code, details = rpc_error(raw, txn, timeout=5)
        self.assertEqual(code, grpc.StatusCode.INTERNAL, details)
        self.assertTrue(details.startswith("grpc: error unmarshalling request: "), details)
        self.assertEqual(self.d.kv.Range(R.RangeRequest(key=b"escaped")).count, 0)

    def test_proclaim_without_a_leader_gets_etcds_answer(self):
        for method, request in (("Proclaim", EL.ProclaimRequest(value=b"v")), ("Resign", EL.ResignRequest())):
            direct = rpc_error(getattr(self.d.election, method), request)
            self.assertEqual(rpc_error(getattr(self.a.election, method), request), direct)
        self.assertEqual(self.d.kv.Range(R.RangeRequest(key=A)).count, 0)

    def test_etcdctl(self):
        etcdctl(self.proxied, "put", "ctl", "v")
        self.assertEqual(etcdctl(self.proxied, "get", "ctl", "--print-value-only").stdout.strip(), "v")
        self.assertEqual(etcdctl(self.direct, "get", A.decode() + "ctl", "--print-value-only").stdout.strip(), "v")
        self.assertEqual(etcdctl(self.other.address, "get", "ctl").stdout, "")
