"""The lease coalescer's rules, with a fake clock and a fake etcd: when a
keep-alive is answered from the cache and with what TTL, when etcd is asked,
when refreshes stop, what a failover resends, how client streams end.
(tests/test_lease_coalescer.py checks the same against real etcd.)"""

from twisted.internet.task import Clock
from twisted.trial import unittest

from etcdproxy.grpc.status import GRPCError, StatusCode
from etcdproxy.pb.etcdserverpb import rpc_pb2
from etcdproxy.services.lease import KeepAliveStream, RevokeCall
from etcdproxy.services.lease_coalescer import KEEPALIVE_PATH, LeaseCoalescer
from etcdproxy.services.lease_state import LeaseState


class FakeUpstreamCall:
    def __init__(self, channel, method, metadata, listener):
        self.channel = channel
        self.method = method
        self.metadata = metadata
        self.listener = listener
        self.sent = []
        self.closed = False

    def send_message(self, message):
        self.sent.append(rpc_pb2.LeaseKeepAliveRequest.FromString(message).ID)

    def end(self):
        pass

    def cancel(self):
        self.closed = True

    def answer(self, lease_id, ttl, member=1):
        self.listener.response_received(rpc_pb2.LeaseKeepAliveResponse(
            header=rpc_pb2.ResponseHeader(member_id=member, revision=7), ID=lease_id, TTL=ttl,
        ).SerializeToString())

    def fail(self, code=StatusCode.UNAVAILABLE, message="connection lost"):
        self.closed = True
        self.listener.call_finished(GRPCError(code, message), [])


class FakeMonitor:
    def __init__(self):
        self.reactor = Clock()
        self.calls = []

    def pick(self, avoid=()):
        return self

    def can_serve(self):
        return True

    def start_call(self, method, metadata, listener, timeout=None):
        call = FakeUpstreamCall(self, method, metadata, listener)
        self.calls.append(call)
        return call


class FakeServerCall:
    def __init__(self, metadata=()):
        self.method = KEEPALIVE_PATH
        self.metadata = list(metadata)
        self.sent = []
        self.status = None

    def send_message(self, message):
        self.sent.append(rpc_pb2.LeaseKeepAliveResponse.FromString(message))

    def finish(self, code=StatusCode.OK, message="", metadata=()):
        self.status = (code, message)


class LeaseStateTests(unittest.TestCase):
    def test_cached_ttl(self):
        lease = LeaseState(1)
        self.assertIsNone(lease.cached_ttl(0.0))  # nothing known
        lease.inflight, lease.sent_at = True, 10.0
        lease.answered(6)
        self.assertEqual(lease.cached_ttl(10.0), 6)
        self.assertEqual(lease.cached_ttl(10.01), 5)  # rounded down, never longer
        self.assertEqual(lease.cached_ttl(11.99), 4)
        self.assertIsNone(lease.cached_ttl(12.0))  # TTL/3 passed: ask etcd
        lease.answered(0)
        self.assertIsNone(lease.cached_ttl(10.5))  # gone: ask etcd

    def test_a_lease_with_under_a_second_left_is_never_reported_as_ttl_0(self):
        lease = LeaseState(1)
        lease.sent_at = 0.0
        lease.answered(1)
        self.assertEqual(lease.cached_ttl(0.0), 1)
        self.assertIsNone(lease.cached_ttl(0.1))


class CoalescerTests(unittest.TestCase):
    def setUp(self):
        self.monitor = FakeMonitor()
        self.clock = self.monitor.reactor
        self.coalescer = LeaseCoalescer(self.monitor)

    def client(self, metadata=()):
        stream = KeepAliveStream(self.coalescer)
        stream.call = call = FakeServerCall(metadata)
        stream.call_started(call)
        return stream, call

    def keepalive(self, stream, lease_id):
        stream.request_received(rpc_pb2.LeaseKeepAliveRequest(ID=lease_id).SerializeToString())

    @property
    def upstream(self):
        return self.monitor.calls[-1]

    def test_first_keepalive_asks_etcd_and_relays_its_answer(self):
        s, call = self.client()
        self.keepalive(s, 5)
        self.assertEqual(self.upstream.sent, [5])
        self.assertEqual(call.sent, [])
        self.upstream.answer(5, 30)
        self.assertEqual([(r.ID, r.TTL, r.header.member_id) for r in call.sent], [(5, 30, 1)])

    def test_many_clients_one_lease_one_refresh_per_third_of_ttl(self):
        clients = [self.client() for _ in range(100)]
        for s, _ in clients:
            self.keepalive(s, 5)
        self.assertEqual(self.upstream.sent, [5])  # one in flight, all wait for it
        self.upstream.answer(5, 30)
        self.assertTrue(all([r.TTL for r in c.sent] == [30] for _, c in clients))
        # Every client sends every second for a minute: a refresh every 10 s.
        answered = 1
        for _ in range(60):
            self.clock.advance(1)
            for s, _ in clients:
                self.keepalive(s, 5)
            for _ in self.upstream.sent[answered:]:
                self.upstream.answer(5, 30)
                answered += 1
        self.assertIn(len(self.upstream.sent), (6, 7))
        ttls = {r.TTL for _, c in clients for r in c.sent}
        self.assertTrue(ttls <= set(range(20, 31)), ttls)
        self.assertEqual(sum(len(c.sent) for _, c in clients), 6100)
        self.assertEqual(self.coalescer.stats()["client_streams"], 100)
        self.assertEqual(self.coalescer.stats()["leases"], 1)

    def test_refreshes_stop_when_clients_stop(self):
        s, call = self.client()
        self.keepalive(s, 5)
        self.upstream.answer(5, 9)  # refresh due every 3 s
        self.clock.advance(1)
        self.keepalive(s, 5)  # from the cache: 8 s left
        self.assertEqual(call.sent[-1].TTL, 8)
        self.assertEqual(self.upstream.sent, [5])
        self.clock.advance(2)  # due, and a client asked since: refreshed
        self.assertEqual(self.upstream.sent, [5, 5])
        self.upstream.answer(5, 9)
        self.clock.advance(3)  # due, nobody asked since: no refresh, forgotten
        self.assertEqual(self.upstream.sent, [5, 5])
        self.assertEqual(self.coalescer.stats()["leases"], 0)
        self.clock.advance(30)
        self.assertEqual(self.upstream.sent, [5, 5])
        # The last client keep-alive was at 1 s; etcd holds the lease until 3 + 9 s.
        self.keepalive(s, 5)  # asks etcd again
        self.assertEqual(self.upstream.sent, [5, 5, 5])

    def test_a_client_that_leaves_stops_keeping_the_lease_alive(self):
        s, _ = self.client()
        other, _ = self.client()
        self.keepalive(s, 5)
        self.upstream.answer(5, 9)
        self.clock.advance(1)
        self.keepalive(s, 5)  # from the cache
        s.call_cancelled(None)
        self.clock.advance(2)
        self.assertEqual(self.upstream.sent, [5])  # nobody left to keep it alive
        self.assertEqual(self.coalescer.stats()["client_streams"], 1)

    def test_missing_lease_ttl_0_is_never_cached(self):
        s, call = self.client()
        self.keepalive(s, 5)
        self.upstream.answer(5, 0)
        self.assertEqual(call.sent[-1].TTL, 0)
        self.assertEqual(self.coalescer.stats()["leases"], 0)
        self.keepalive(s, 5)  # etcd is asked again (a lease may be granted with that id)
        self.assertEqual(self.upstream.sent, [5, 5])

    def test_revoke_stops_refreshes_at_once(self):
        s, call = self.client()
        self.keepalive(s, 5)
        self.upstream.answer(5, 9)
        self.clock.advance(1)
        self.keepalive(s, 5)
        revoke = RevokeCall(self.monitor, self.coalescer)
        revoke.upstream_call = None  # not started: only the request is seen here
        revoke.request_received(rpc_pb2.LeaseRevokeRequest(ID=5).SerializeToString())
        self.clock.advance(10)
        self.assertEqual(self.upstream.sent, [5])
        self.keepalive(s, 5)  # not from the cache: etcd says
        self.assertEqual(self.upstream.sent, [5, 5])

    def test_answers_keep_the_order_of_the_requests(self):
        s, call = self.client()
        self.keepalive(s, 1)
        self.upstream.answer(1, 30)
        self.keepalive(s, 2)  # waits for etcd
        self.keepalive(s, 1)  # ready at once, sent after 2's
        self.assertEqual([r.ID for r in call.sent], [1])
        self.upstream.answer(2, 30)
        self.assertEqual([r.ID for r in call.sent], [1, 2, 1])

    def test_half_close_ends_the_stream_once_all_is_answered(self):
        s, call = self.client()
        self.keepalive(s, 1)
        s.half_closed()
        self.assertIsNone(call.status)
        self.upstream.answer(1, 30)
        self.assertEqual(call.status, (StatusCode.OK, ""))
        self.assertEqual(self.coalescer.stats()["client_streams"], 0)

    def test_undecodable_request(self):
        s, call = self.client()
        s.request_received(b"\xff\xff\xff\xff")
        self.assertEqual(call.status[0], StatusCode.INTERNAL)
        self.assertTrue(call.status[1].startswith("grpc: failed to unmarshal the received message: "))

    def test_draining_ends_streams_unavailable(self):
        s, call = self.client()
        s.call_draining()
        self.assertEqual(call.status, (StatusCode.UNAVAILABLE, "proxy shutting down"))

    def test_failover_resends_what_was_in_flight_and_refreshes_every_lease(self):
        s, call = self.client()
        self.keepalive(s, 1)
        self.upstream.answer(1, 30)
        self.keepalive(s, 2)  # in flight when the stream fails
        first = self.upstream
        first.fail()
        self.assertEqual(len(self.monitor.calls), 1)
        self.clock.advance(0)  # reopened at once (UpstreamStream)
        second = self.upstream
        self.assertIsNot(second, first)
        self.assertEqual(sorted(second.sent), [1, 2])
        self.keepalive(s, 1)  # waits for the refresh on the new stream
        second.answer(second.sent[0], 30, member=2)
        second.answer(second.sent[1], 30, member=2)
        self.assertEqual([(r.ID, r.header.member_id) for r in call.sent], [(1, 1), (2, 2), (1, 2)])

    def test_timer_refresh_during_failover_is_sent_once_a_stream_opens(self):
        s, _ = self.client()
        self.keepalive(s, 1)
        self.upstream.answer(1, 3)
        self.clock.advance(0.5)
        self.keepalive(s, 1)  # from the cache: it wants the lease kept alive
        first = self.upstream
        first.fail()
        self.monitor.start_call = lambda *a, **k: self.fail("opened too early")
        # The stream's own attempts are refused for a while (no endpoint).
        stream = self.coalescer.sessions[False].stream
        stream._timer.cancel()
        stream._timer = None
        self.clock.advance(1)  # refresh due while no stream is open
        del self.monitor.start_call
        stream._resume(())
        self.assertEqual(self.upstream.sent, [1])

    def test_hasleader_streams_have_their_own_upstream_stream_and_end_with_it(self):
        plain, plain_call = self.client()
        hl, hl_call = self.client([(b"hasleader", b"true")])
        self.assertEqual(len(self.monitor.calls), 2)
        self.assertEqual(self.monitor.calls[1].metadata, ((b"hasleader", b"true"),))
        self.assertEqual(self.monitor.calls[0].metadata, ())
        self.monitor.calls[1].fail(StatusCode.UNAVAILABLE, "etcdserver: no leader")
        self.assertEqual(hl_call.status, (StatusCode.UNAVAILABLE, "etcdserver: no leader"))
        self.assertIsNone(plain_call.status)
        self.assertEqual(self.coalescer.stats()["sessions"], 1)

    def test_session_closes_when_idle(self):
        s, call = self.client()
        self.keepalive(s, 1)
        self.upstream.answer(1, 3)
        s.call_cancelled(None)
        self.assertFalse(self.upstream.closed)  # the lease is still tracked
        self.clock.advance(1)
        self.assertTrue(self.upstream.closed)
        self.assertEqual(self.coalescer.stats()["sessions"], 0)
