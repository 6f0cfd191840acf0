"""The endpoint monitor end to end: a real 3-member etcd cluster, the proxy as a
twistd process, grpcio clients (which never retry by themselves).

- SIGKILL of the member the proxy uses, under reads and writes: reads never fail,
  calls are served by another member within 2 s; a LeaseKeepAlive stream goes on
  on another member, with no error, and the lease stays alive.
- SIGSTOP of that member: detected within health-check interval + timeout, reads
  never fail, and the member rejoins the pool after SIGCONT.
- All members down, then back: UNAVAILABLE at once meanwhile, then service again
  without restarting the proxy.
- Each policy: sticky spreads proxy instances over members; round-robin and
  weighted round-robin shares counted from each member's
  grpc_server_handled_total{grpc_method="Range"}.

Measured failover times are printed (pytest -s shows them).
"""

import collections
import threading
import time
import uuid

import grpc

from tests.support.etcd import parse_metrics
from tests.support.grpcio import ClusterTestCase, R, Stream, Stubs, rpc_error
from tests.support.proxy import ProxyProcess
from tests.support.tcprelay import TCPRelay

HANDLED = "grpc_server_handled_total"
STARTED = "grpc_server_started_total"
WATCHERS = "etcd_debugging_mvcc_watcher_total"
CALL_TIMEOUT = 8.0


def report(what, seconds):
    print("\n[failover] %s: %.3f s" % (what, seconds), flush=True)


class Load:
    """Linearizable reads, serializable reads and writes through ``address``,
    each kind in its own thread on its own channel, back to back; every
    outcome is recorded with the member that answered."""

    KINDS = ("read", "serializable-read", "write")

    def __init__(self, address, key):
        self.key = key
        self.records = []  # (kind, sent, done, code, member_id)
        self.details = []  # (kind, code, details) of each failure
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(address, kind), daemon=True)
                         for kind in self.KINDS]
        for t in self._threads:
            t.start()

    def _run(self, address, kind):
        stubs = Stubs(address)
        try:
            n = 0
            while not self._stop.is_set():
                n += 1
                sent = time.monotonic()
                try:
                    if kind == "write":
                        r = stubs.kv.Put(R.PutRequest(key=self.key, value=b"%d" % n), timeout=CALL_TIMEOUT)
                    else:
                        r = stubs.kv.Range(R.RangeRequest(key=self.key, serializable=kind != "read"),
                                           timeout=CALL_TIMEOUT)
                    code, member = grpc.StatusCode.OK, r.header.member_id
                except grpc.RpcError as e:
                    code, member = e.code(), None
                    self.details.append((kind, e.code(), e.details()))
                self.records.append((kind, sent, time.monotonic(), code, member))
                time.sleep(0.02)
        finally:
            stubs.close()

    def stop(self):
        self._stop.set()
        for t in self._threads:
            t.join(CALL_TIMEOUT + 5)

    def failures(self, kind):
        return [(code, round(sent, 3)) for k, sent, _, code, _ in self.records
                if k == kind and code != grpc.StatusCode.OK]

    def first_success_elsewhere(self, kind, member, since):
        """Seconds from ``since`` to the first success of ``kind`` answered by
        another member than ``member``."""
        done = [d for k, _, d, code, m in self.records
                if k == kind and code == grpc.StatusCode.OK and m != member and d > since]
        return min(done) - since if done else None

    def members(self, kind, after):
        return {m for k, sent, _, code, m in self.records
                if k == kind and code == grpc.StatusCode.OK and sent > after}

    def wait_successes_elsewhere(self, member, since, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(self.first_success_elsewhere(k, member, since) is not None for k in self.KINDS):
                return
            time.sleep(0.1)


class EndpointFailoverTests(ClusterTestCase):
    def setUp(self):
        self.addCleanup(self.restore_cluster)

    # -- helpers --------------------------------------------------------------

    def proxy(self, *args, endpoints=None):
        p = ProxyProcess(endpoints or self.etcd.endpoints, extra_args=args)
        p.start()
        self.addCleanup(p.stop)
        return p

    def stubs(self, address):
        s = Stubs(address)
        self.addCleanup(s.close)
        return s

    def key(self):
        return ("/failover/%s/%s" % (self._testMethodName, uuid.uuid4().hex[:8])).encode()

    def used_member(self, stubs):
        """Index of the member answering calls through a (sticky) proxy."""
        member_id = stubs.maint.Status(R.StatusRequest()).header.member_id
        return self.member_ids.index(member_id)

    def leader(self):
        for i, s in enumerate(self.direct):
            if self.etcd.is_running(i):
                return self.member_ids.index(s.maint.Status(R.StatusRequest()).leader)

    def move_leader(self, target):
        """Makes member ``target`` the leader (leave_leader=False: away from it)."""
        leader = self.leader()
        if leader != target:
            self.direct[leader].maint.MoveLeader(R.MoveLeaderRequest(targetID=self.member_ids[target]))
        deadline = time.monotonic() + 10
        while self.leader() != target:
            self.assertLess(time.monotonic(), deadline, "leadership did not move")
            time.sleep(0.1)

    def range_counts(self):
        return [self.etcd.metric(HANDLED, i, {"grpc_method": "Range"}) for i in range(self.etcd.size)]

    def ranges(self, stubs, n):
        """Delta of each member's Range count over ``n`` Ranges through ``stubs``."""
        before = self.range_counts()
        key = self.key()
        for _ in range(n):
            stubs.kv.Range(R.RangeRequest(key=key))
        return [round(a - b) for a, b in zip(self.range_counts(), before)]

    def load(self, address):
        load = Load(address, self.key())
        self.addCleanup(load.stop)
        return load

    # -- SIGKILL ----------------------------------------------------------------

    def stop_used_member(self, leader, how="SIGKILL"):
        proxy = self.proxy()
        stubs = self.stubs(proxy.address)
        used = self.used_member(stubs)
        if leader:
            self.move_leader(used)
        else:
            self.move_leader((used + 1) % 3)
        # a lease kept alive through the proxy
        lease = stubs.lease.LeaseGrant(R.LeaseGrantRequest(TTL=5)).ID
        keepalive = Stream(stubs.lease_stream.LeaseKeepAlive)
        self.addCleanup(keepalive.close)
        keepalive.send(R.LeaseKeepAliveRequest(ID=lease))
        self.assertEqual(keepalive.recv().ID, lease)

        load = self.load(proxy.address)
        time.sleep(1.0)
        killed_at = time.monotonic()
        if how == "SIGKILL":
            self.etcd.kill(used)
        else:
            self.etcd.terminate(used)  # SIGTERM: etcd sends GOAWAY and stops
        # the keep-alive stream goes on, on another member: the lease stays alive
        deadline = time.monotonic() + 4
        while True:
            keepalive.send(R.LeaseKeepAliveRequest(ID=lease))
            answer = keepalive.recv(timeout=CALL_TIMEOUT)
            self.assertEqual(answer.ID, lease)
            if answer.header.member_id != self.member_ids[used]:
                break
            self.assertLess(time.monotonic(), deadline, "keep-alives still answered by the killed member")
            time.sleep(0.05)
        keepalive_moved = time.monotonic() - killed_at
        self.assertGreater(answer.TTL, 0)
        self.assertIsNone(keepalive.error)

        killed_id = self.member_ids[used]
        load.wait_successes_elsewhere(killed_id, killed_at, timeout=10)
        time.sleep(0.5)
        load.stop()
        role = "%s %s" % (how, "leader" if leader else "follower")
        report("%s: keep-alive answered by another member after" % role, keepalive_moved)
        times = {}
        for kind in Load.KINDS:
            times[kind] = load.first_success_elsewhere(kind, killed_id, killed_at)
            self.assertIsNotNone(times[kind], "no %s succeeded on another member" % kind)
            report("%s: first %s served by a new member after" % (role, kind), times[kind])
        write_failures = load.failures("write")
        print("[failover] %s: failures: %s" % (role, load.details or "none"))
        self.assertEqual(load.failures("read"), [])
        self.assertEqual(load.failures("serializable-read"), [])
        self.assertTrue(all(code == grpc.StatusCode.UNAVAILABLE for code, _ in write_failures),
                        write_failures)
        # sticky: after the switch every call goes to one new member
        self.assertEqual(len(load.members("read", killed_at + times["read"] + 0.1)), 1)
        return times

    def test_kill_follower_in_use(self):
        times = self.stop_used_member(leader=False)
        for kind in Load.KINDS:
            self.assertLess(times[kind], 2.0, kind)

    def test_terminate_follower_in_use(self):
        times = self.stop_used_member(leader=False, how="SIGTERM")
        for kind in Load.KINDS:
            self.assertLess(times[kind], 2.0, kind)

    def test_kill_leader_in_use(self):
        times = self.stop_used_member(leader=True)
        self.assertLess(times["serializable-read"], 2.0)
        # Linearizable reads wait for etcd to elect a new leader (election
        # timeout 1 s). A write sent to the new member before it noticed the
        # leader's death is forwarded to the dead leader and lost: etcd answers
        # "request timed out" after its request timeout (7 s), as it does
        # without a proxy; the next write succeeds.
        self.assertLess(times["read"], 5.0)
        self.assertLess(times["write"], CALL_TIMEOUT + 1)

    # -- SIGSTOP ----------------------------------------------------------------

    def test_frozen_member_is_detected_and_left(self):
        proxy = self.proxy("--health-check-interval=1", "--health-check-timeout=2")
        stubs = self.stubs(proxy.address)
        used = self.used_member(stubs)
        self.move_leader((used + 1) % 3)  # the election is not what is measured here
        load = self.load(proxy.address)
        time.sleep(1.0)
        frozen_at = time.monotonic()
        self.etcd.pause(used)
        frozen_id = self.member_ids[used]
        load.wait_successes_elsewhere(frozen_id, frozen_at, timeout=10)
        detected = load.first_success_elsewhere("read", frozen_id, frozen_at)
        self.assertIsNotNone(detected, "reads never moved off the frozen member")
        report("SIGSTOP (interval 1 s + timeout 2 s): first read served by a new member after", detected)
        self.assertLess(detected, 1 + 2 + 1.5)
        self.assertIn("health check timed out", proxy.log())
        self.assertEqual(load.failures("read"), [])
        self.assertEqual(load.failures("serializable-read"), [])

        # SIGCONT: the member rejoins the pool; the sticky pick stays where it is
        resumed_at = time.monotonic()
        self.etcd.resume(used)
        deadline = resumed_at + 10
        while "healthy again" not in proxy.log():
            self.assertLess(time.monotonic(), deadline, "the member did not rejoin:\n" + proxy.log())
            time.sleep(0.2)
        report("SIGCONT: member back in the pool after", time.monotonic() - resumed_at)
        time.sleep(0.5)
        load.stop()
        self.assertEqual(load.failures("read"), [])
        self.assertEqual(len(load.members("read", frozen_at + detected)), 1)  # no move back

    # -- all down ---------------------------------------------------------------

    def test_all_members_down_then_back(self):
        proxy = self.proxy()
        stubs = self.stubs(proxy.address)
        key = self.key()
        stubs.kv.Put(R.PutRequest(key=key, value=b"before"))
        for i in range(3):
            self.etcd.kill(i)
        for request in [R.RangeRequest(key=key), R.PutRequest(key=key, value=b"x")] * 3:
            method = stubs.kv.Range if isinstance(request, R.RangeRequest) else stubs.kv.Put
            started = time.monotonic()
            code, details = rpc_error(method, request, timeout=5)
            took = time.monotonic() - started
            self.assertEqual(code, grpc.StatusCode.UNAVAILABLE, details)
            self.assertLess(took, 1.5, details)
        report("all members down: UNAVAILABLE after (last call)", took)
        self.assertEqual(details, "no healthy etcd endpoint")
        # a stream too
        code, details = rpc_error(lambda: list(stubs.watch.Watch(iter([]), timeout=5)))
        self.assertEqual(code, grpc.StatusCode.UNAVAILABLE)

        for i in range(3):
            self.etcd.restart(i, wait=False)
        self.etcd.wait_healthy()
        back_at = time.monotonic()
        deadline = back_at + 20
        while True:
            try:
                r = stubs.kv.Range(R.RangeRequest(key=key), timeout=5)
                break
            except grpc.RpcError as e:
                self.assertLess(time.monotonic(), deadline, "no service after the cluster came back: %s" % e)
                time.sleep(0.1)
        report("all members back: first read through the proxy after the cluster was healthy",
               time.monotonic() - back_at)
        self.assertEqual(r.kvs[0].value, b"before")
        stubs.kv.Put(R.PutRequest(key=key, value=b"after"))

    # -- policies ---------------------------------------------------------------

    def test_sticky_spreads_proxy_instances_over_members(self):
        proxies = [ProxyProcess(self.etcd.endpoints) for _ in range(8)]
        for p in proxies:
            self.addCleanup(p.stop)
        starters = [threading.Thread(target=p.start, daemon=True) for p in proxies]
        for t in starters:
            t.start()
        for t in starters:
            t.join(60)
        used = []
        for p in proxies:
            self.assertTrue(p.is_running(), p.log())
            counts = self.ranges(self.stubs(p.address), 5)
            self.assertEqual(sorted(counts), [0, 0, 5], counts)  # one member per proxy
            used.append(counts.index(5))
        print("\n[failover] sticky: members used by 8 proxies: %s" % sorted(collections.Counter(used).items()))
        self.assertGreater(len(set(used)), 1, used)

    def test_round_robin_spreads_calls_evenly(self):
        proxy = self.proxy("--endpoint-policy=round-robin")
        self.assertEqual(self.ranges(self.stubs(proxy.address), 60), [20, 20, 20])

    def test_weighted_round_robin_follows_the_weights(self):
        eps = self.etcd.endpoints
        proxy = self.proxy("--endpoint-policy=weighted",
                           endpoints=["%s=3" % eps[0], "%s=2" % eps[1], "http://%s=1" % eps[2]])
        self.assertEqual(self.ranges(self.stubs(proxy.address), 60), [30, 20, 10])

    # -- watch streams ----------------------------------------------------------

    def test_watches_resume_on_another_member_after_sigkill(self):
        """Watch streams through the proxy survive the death of the member they
        were opened on: every watcher gets every event exactly once, in order,
        and no error; nothing is left at etcd once the clients are gone."""
        self.check_watches_survive(self.etcd.kill, "SIGKILL")

    def test_watches_resume_on_another_member_after_sigstop(self):
        self.check_watches_survive(self.etcd.pause, "SIGSTOP")

    def test_watches_survive_upstream_connections_reset_mid_stream(self):
        """The proxy's connections to etcd are reset (TCP RST) three times while
        the members stay up: streams are reopened, nothing lost or repeated."""
        relays = [TCPRelay(endpoint) for endpoint in self.etcd.endpoints]
        for relay in relays:
            self.addCleanup(relay.stop)
        proxy = self.proxy(endpoints=[relay.address for relay in relays])
        resets = []

        def reset(used):
            # Once the proxy is connected again (after the previous reset it
            # reconnects after its probe backoff, which 50 puts may not outlast).
            deadline = time.monotonic() + 10
            while not any(relay.connections for relay in relays) and time.monotonic() < deadline:
                time.sleep(0.05)
            resets.append(sum(relay.reset_all() for relay in relays))

        self.check_watches_survive(reset, "upstream connection reset", proxy=proxy, at=(100, 150, 200),
                                   moves=False)
        self.assertTrue(all(resets), resets)

    def test_watches_and_leases_survive_the_whole_cluster_down_and_back(self):
        def all_down_and_back(used):
            for i in range(3):
                self.etcd.kill(i)
            time.sleep(1.0)
            for i in range(3):
                self.etcd.restart(i, wait=False)
            self.etcd.wait_healthy()

        self.check_watches_survive(all_down_and_back, "whole cluster down and back", moves=False)

    def put(self, writer, key, n):
        """Puts value n, retried while etcd is unreachable; its revision."""
        deadline = time.monotonic() + 30
        while True:
            try:
                return writer.kv.Put(R.PutRequest(key=key, value=b"%d" % n), timeout=5).header.revision
            except grpc.RpcError:
                self.assertLess(time.monotonic(), deadline, "etcd did not come back")
                time.sleep(0.1)
                kvs = writer.kv.Range(R.RangeRequest(key=key, serializable=True), timeout=5).kvs
                if kvs and kvs[0].value == b"%d" % n:  # the failed put was applied after all
                    return kvs[0].mod_revision

    def open_at_etcd(self, i):
        """Upstream watchers, Watch streams and LeaseKeepAlive streams open at member i."""
        samples = parse_metrics(self.etcd.metrics(i))

        def total(name, method=None):
            return sum(v for n, labels, v in samples
                       if n == name and (method is None or labels.get("grpc_method") == method))
        return {"watchers": total(WATCHERS),
                "Watch streams": total(STARTED, "Watch") - total(HANDLED, "Watch"),
                "LeaseKeepAlive streams": total(STARTED, "LeaseKeepAlive") - total(HANDLED, "LeaseKeepAlive")}

    def assertOpenAtEtcd(self, expected, timeout=15):
        """Waits until the running members hold ``expected`` in all (the sums
        of `open_at_etcd`)."""
        deadline = time.monotonic() + timeout
        while True:
            per_member = [self.open_at_etcd(i) for i in range(3) if self.etcd.is_running(i)]
            found = {what: sum(counts[what] for counts in per_member) for what in expected}
            if found == expected:
                return
            self.assertLess(time.monotonic(), deadline, "at etcd: %s, expected %s" % (per_member, expected))
            time.sleep(0.5)

    def check_watches_survive(self, fault, how, proxy=None, at=(100,), moves=True):
        proxy = proxy or self.proxy()
        stubs = self.stubs(proxy.address)
        used = self.used_member(stubs)
        self.move_leader((used + 1) % 3)  # no election: only the watch path is tested
        writer = self.direct[(used + 2) % 3]
        key = self.key()
        streams = []
        for _ in range(50):  # 100 watchers
            s = Stream(stubs.watch.Watch)
            self.addCleanup(s.close)
            for create in (R.WatchCreateRequest(key=key),
                           R.WatchCreateRequest(key=key[:-1], range_end=key[:-1] + b"\xff", prev_kv=True)):
                s.send(R.WatchRequest(create_request=create))
                self.assertTrue(s.recv().created)
            streams.append(s)
        # Meanwhile: reads and writes through the proxy, and a lease kept alive.
        lease = stubs.lease.LeaseGrant(R.LeaseGrantRequest(TTL=5)).ID
        keepalive = Stream(stubs.lease_stream.LeaseKeepAlive)
        self.addCleanup(keepalive.close)
        load = self.load(proxy.address) if moves else None
        revisions = []
        for n in range(300):
            if n in at:
                fault(used)
                fault_at = time.monotonic()
            revisions.append(self.put(writer, key, n))
            if n % 50 == 0:  # a keep-alive every ~0.5 s, as a client would
                keepalive.send(R.LeaseKeepAliveRequest(ID=lease))
            time.sleep(0.005)
        report("%s: puts after it took" % how, time.monotonic() - fault_at)
        if load is not None:
            load.stop()
            self.assertEqual(load.failures("read"), [])
            self.assertEqual(load.failures("serializable-read"), [])
        # Keep the lease alive past its TTL after the failure (the failover, up
        # to 3 s for SIGSTOP, is shorter than the TTL).
        while time.monotonic() < fault_at + 6.5:
            keepalive.send(R.LeaseKeepAliveRequest(ID=lease))
            time.sleep(0.5)
        answers = []
        while True:
            try:
                answers.append(keepalive.recv(timeout=1.0))
            except AssertionError:
                break
        self.assertIsNone(keepalive.error)
        self.assertTrue(answers and all(a.ID == lease and a.TTL > 0 for a in answers), answers[-3:])
        if moves:
            self.assertTrue(any(a.header.member_id != self.member_ids[used] for a in answers),
                            "no keep-alive answered by another member")
        ttl = writer.lease.LeaseTimeToLive(R.LeaseTimeToLiveRequest(ID=lease)).TTL
        self.assertGreater(ttl, 0, "the kept-alive lease expired")
        for i, s in enumerate(streams):
            seen = collections.defaultdict(list)
            deadline = time.monotonic() + 20
            while any(len(seen[w]) < len(revisions) for w in (0, 1)) and time.monotonic() < deadline:
                r = s.recv(timeout=max(0.1, deadline - time.monotonic()))
                self.assertFalse(r.canceled, "stream %d: watch %d canceled: %r" % (i, r.watch_id, r))
                self.assertFalse(r.created, "stream %d: a second 'created' for watch %d" % (i, r.watch_id))
                seen[r.watch_id] += [e.kv.mod_revision for e in r.events]
            self.assertEqual(sorted(seen), [0, 1])
            for watch_id in (0, 1):
                self.assertEqual(seen[watch_id], revisions, "stream %d watch %d" % (i, watch_id))
            self.assertIsNone(s.error)
        # At etcd, once all members run again: the two shared watchers once, and
        # the range cache's invalidation watcher on a stream of its own (the
        # proxy's fixed cost); only the latter once the clients are gone.
        self.restore_cluster()
        self.assertOpenAtEtcd({"watchers": 3, "Watch streams": 2, "LeaseKeepAlive streams": 1})
        for s in streams:
            s.close()
        keepalive.close()
        self.assertOpenAtEtcd({"watchers": 1, "Watch streams": 1, "LeaseKeepAlive streams": 0})

    def test_watch_resumed_at_a_compacted_revision_is_told_as_etcd_tells(self):
        """A watch whose next revision was compacted while its member was
        frozen gets etcd's own answer: canceled, with compact_revision."""
        proxy = self.proxy()
        stubs = self.stubs(proxy.address)
        used = self.used_member(stubs)
        self.move_leader((used + 1) % 3)
        writer = self.direct[(used + 2) % 3]
        key = self.key()
        watch = Stream(stubs.watch.Watch)
        self.addCleanup(watch.close)
        watch.send(R.WatchRequest(create_request=R.WatchCreateRequest(key=key)))
        self.assertTrue(watch.recv().created)
        first = writer.kv.Put(R.PutRequest(key=key, value=b"a")).header.revision
        self.assertEqual([e.kv.mod_revision for e in watch.recv().events], [first])
        self.etcd.pause(used)
        writer.kv.Put(R.PutRequest(key=key, value=b"b"))
        last = writer.kv.Put(R.PutRequest(key=key, value=b"c")).header.revision
        writer.kv.Compact(R.CompactionRequest(revision=last, physical=True))
        answer = watch.recv(timeout=10)  # after the health check notices the frozen member
        self.assertTrue(answer.canceled, answer)
        self.assertFalse(answer.created, answer)
        self.assertEqual(answer.compact_revision, last)
        self.assertEqual(list(answer.events), [])
        # etcd itself, asked for the same revision directly:
        direct = Stream(writer.watch.Watch)
        self.addCleanup(direct.close)
        direct.send(R.WatchRequest(create_request=R.WatchCreateRequest(key=key, start_revision=first + 1)))
        responses = [direct.recv(), direct.recv()]
        self.assertEqual([(r.created, r.canceled, r.compact_revision) for r in responses],
                         [(True, False, 0), (False, True, last)])

    # -- hasleader -----------------------------------------------------------------

    def test_hasleader_watch_ends_as_etcd_ends_it_when_the_cluster_has_no_leader(self):
        """With two members of three gone, a ``hasleader: true`` watch stream
        through the proxy ends as one opened directly on the survivor does
        (UNAVAILABLE "etcdserver: no leader"); a plain watch stream stays open."""
        proxy = self.proxy()
        stubs = self.stubs(proxy.address)
        used = self.used_member(stubs)
        key = self.key()
        hasleader = (("hasleader", "true"),)
        watches = {
            "proxied": Stream(stubs.watch.Watch, metadata=hasleader),
            "direct": Stream(self.direct[used].watch.Watch, metadata=hasleader),
            "plain": Stream(stubs.watch.Watch),
        }
        for s in watches.values():
            self.addCleanup(s.close)
            s.send(R.WatchRequest(create_request=R.WatchCreateRequest(key=key)))
            self.assertTrue(s.recv().created)
        for i in range(3):
            if i != used:
                self.etcd.kill(i)
        lost_at = time.monotonic()
        errors = {name: watches[name].wait_end(timeout=30) for name in ("direct", "proxied")}
        report("hasleader watch ended after", time.monotonic() - lost_at)
        self.assertEqual((errors["proxied"].code(), errors["proxied"].details()),
                         (errors["direct"].code(), errors["direct"].details()))
        self.assertEqual(errors["direct"].code(), grpc.StatusCode.UNAVAILABLE)
        self.assertEqual(errors["direct"].details(), "etcdserver: no leader")
        watches["plain"].expect_nothing(1.0)
        self.assertIsNone(watches["plain"].error)
