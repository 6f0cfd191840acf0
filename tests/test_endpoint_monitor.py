"""The endpoint monitor's logic without network or etcd: pick policies, --endpoints
weights, and the monitor's health state driven by a fake clock and fake channels."""

import collections
import random

from twisted.internet import defer, task
from twisted.trial import unittest

from etcdproxy.grpc.status import GRPCError, StatusCode
from etcdproxy.pb.etcdserverpb import rpc_pb2
from etcdproxy.upstream.endpoints import Endpoint, parse_endpoint, parse_endpoints
from etcdproxy.upstream.monitor import NO_LEADER_GRACE, STABLE_AFTER, STATUS, Backoff, EndpointMonitor
from etcdproxy.upstream.policy import RoundRobin, StickyRandom, WeightedRoundRobin, make_policy


class PolicyTests(unittest.TestCase):
    def test_sticky_stays_until_its_member_leaves_and_does_not_move_back(self):
        policy = StickyRandom(random.Random(1))
        pool = ["a", "b", "c"]
        first = policy.choose(pool)
        self.assertEqual({policy.choose(pool) for _ in range(50)}, {first})
        rest = [m for m in pool if m != first]
        second = policy.choose(rest)
        self.assertIn(second, rest)
        self.assertEqual({policy.choose(rest) for _ in range(50)}, {second})
        self.assertEqual(policy.choose(pool), second)  # the first one is back: no move

    def test_sticky_spreads_instances(self):
        picks = collections.Counter(StickyRandom(random.Random(seed)).choose(["a", "b", "c"])
                                    for seed in range(300))
        self.assertEqual(set(picks), {"a", "b", "c"})
        self.assertGreater(min(picks.values()), 60)

    def test_round_robin_cycles_over_the_pool(self):
        policy = RoundRobin()
        self.assertEqual([policy.choose(["a", "b", "c"]) for _ in range(6)], list("abcabc"))
        picks = collections.Counter(policy.choose(["a", "c"]) for _ in range(10))
        self.assertEqual(picks, {"a": 5, "c": 5})

    def test_weighted_gives_exact_shares_interleaved(self):
        policy = WeightedRoundRobin({"a": 3, "b": 2, "c": 1})
        picks = [policy.choose(["a", "b", "c"]) for _ in range(60)]
        self.assertEqual(collections.Counter(picks), {"a": 30, "b": 20, "c": 10})
        for start in range(0, 60, 6):  # every run of sum-of-weights calls
            self.assertEqual(collections.Counter(picks[start:start + 6]), {"a": 3, "b": 2, "c": 1})
        # smooth: the heavy member's calls are spread out, not in a burst
        policy = WeightedRoundRobin({"a": 5, "b": 1, "c": 1})
        self.assertEqual("".join(policy.choose(["a", "b", "c"]) for _ in range(7)), "aabacaa")

    def test_weighted_over_what_remains_of_the_pool(self):
        policy = WeightedRoundRobin({"a": 3, "b": 2, "c": 1})
        picks = collections.Counter(policy.choose(["b", "c"]) for _ in range(30))
        self.assertEqual(picks, {"b": 20, "c": 10})

    def test_make_policy(self):
        self.assertIsInstance(make_policy("sticky", {}), StickyRandom)
        self.assertIsInstance(make_policy("round-robin", {}), RoundRobin)
        self.assertIsInstance(make_policy("weighted", {"a": 1}), WeightedRoundRobin)
        self.assertRaises(ValueError, make_policy, "random", {})


class EndpointParsingTests(unittest.TestCase):
    def test_weights(self):
        self.assertEqual(parse_endpoint("127.0.0.1:2379=3"), Endpoint("127.0.0.1", 2379, False, 3))
        self.assertEqual(parse_endpoint("http://[::1]:2379=2"), Endpoint("::1", 2379, False, 2))
        self.assertEqual(parse_endpoint("h:1").weight, 1)
        self.assertEqual([e.weight for e in parse_endpoints("a:1=5, b:2")], [5, 1])
        for bad in ["a:1=0", "a:1=x", "a:1=-2", "a:1="]:
            self.assertRaises(ValueError, parse_endpoint, bad)
        self.assertRaises(ValueError, parse_endpoints, "a:1,http://a:1=2")


class FakeChannel:
    """Answers health checks as ``mode`` says: ok, noleader, refused, hang."""

    def __init__(self, clock, endpoint):
        self.clock = clock
        self.endpoint = endpoint
        self.mode = "ok"
        self.on_failure = None
        self.checks = []  # times of the health checks
        self.disconnects = 0
        self.closed = False

    def unary_call(self, method, request, metadata=(), timeout=None):
        assert method == STATUS and request == b""
        self.checks.append(self.clock.seconds())
        if self.mode == "ok":
            return defer.succeed(rpc_pb2.StatusResponse(leader=7).SerializeToString())
        if self.mode == "noleader":
            return defer.succeed(rpc_pb2.StatusResponse(leader=0).SerializeToString())
        d = defer.Deferred()
        if self.mode == "refused":  # as a Channel does: the owner hears first
            def refuse():
                self.on_failure("connection error: refused")
                d.errback(GRPCError(StatusCode.UNAVAILABLE, "connection error: refused", unprocessed=True))
            self.clock.callLater(0, refuse)
            return d
        self.clock.callLater(timeout, d.errback, GRPCError(StatusCode.DEADLINE_EXCEEDED, "deadline"))
        return d

    def disconnect(self):
        self.disconnects += 1

    def close(self):
        self.closed = True


class MonitorTests(unittest.TestCase):
    def make(self, n=3, policy="sticky", seed=0, **kw):
        self.clock = task.Clock()
        endpoints = [Endpoint("127.0.0.1", 2379 + i) for i in range(n)]
        self.channels = {}

        def factory(endpoint):
            self.channels[endpoint.port - 2379] = ch = FakeChannel(self.clock, endpoint)
            return ch

        monitor = EndpointMonitor(self.clock, endpoints, policy=policy, rng=random.Random(seed),
                                  channel_factory=factory, **kw)
        monitor.startService()
        self.addCleanup(monitor.stopService)
        self.clock.advance(0)
        return monitor

    def index(self, channel):
        return channel.endpoint.port - 2379

    def advance(self, seconds, step=0.125):  # a binary fraction: exact times
        for _ in range(int(round(seconds / step))):
            self.clock.advance(step)

    def test_backoff_doubles_up_to_its_maximum(self):
        b = Backoff(0.5, 3.0)
        self.assertEqual([b.next() for _ in range(6)], [0.5, 1.0, 2.0, 3.0, 3.0, 3.0])
        b.reset()
        self.assertEqual(b.next(), 0.5)

    def test_sticky_pick_is_stable_and_switches_on_a_connection_failure(self):
        m = self.make()
        first = m.pick()
        self.assertEqual({m.pick() for _ in range(20)}, {first})
        first.on_failure("connection lost: reset")
        second = m.pick()
        self.assertIsNot(second, first)
        self.assertEqual({m.pick() for _ in range(20)}, {second})
        state = m.snapshot()
        self.assertEqual(state["failovers"], 1)
        self.assertEqual(state["current"], str(second.endpoint))
        failed = state["endpoints"][self.index(first)]
        self.assertEqual((failed["healthy"], failed["failures"], failed["last_failure"]),
                         (False, 1, "connection lost: reset"))

    def test_checks_every_interval_while_healthy(self):
        m = self.make(check_interval=1.0)
        self.advance(3.0)
        for ch in self.channels.values():
            self.assertEqual(ch.checks, [0.0, 1.0, 2.0, 3.0])
        self.assertEqual(m.failovers, 0)

    def test_hung_member_is_left_within_interval_plus_timeout_and_disconnected(self):
        m = self.make(check_interval=1.0, check_timeout=2.0)
        current = m.pick()
        self.advance(0.5)
        current.mode = "hang"  # frozen just after a check
        for _ in range(40):
            self.clock.advance(0.125)
            if m.pick() is not current:
                break
        self.assertLessEqual(self.clock.seconds() - 0.5, 1.0 + 2.0 + 0.01)
        self.assertEqual(current.disconnects, 1)
        self.assertIn("timed out", m.snapshot()["endpoints"][self.index(current)]["last_failure"])

    def test_failed_member_is_probed_with_backoff_and_rejoins_after_two_checks(self):
        m = self.make(policy="round-robin", check_interval=1.0, probe_backoff_initial=0.5,
                      probe_backoff_max=3.0)
        ch = self.channels[1]
        ch.mode = "refused"
        ch.on_failure("connection lost")  # at t=0
        ch.checks = []
        self.advance(10.0)
        self.assertEqual(ch.checks, [0.5, 1.5, 3.5, 6.5, 9.5])
        self.assertEqual({self.index(m.pick()) for _ in range(6)}, {0, 2})
        ch.mode = "ok"
        self.advance(3.0)  # probe at 12.5 passes, at 13.5 rejoins
        self.assertEqual(ch.checks[-1], 12.5)
        self.assertNotIn(1, {self.index(m.pick()) for _ in range(6)})
        self.advance(1.0)
        self.assertEqual({self.index(m.pick()) for _ in range(6)}, {0, 1, 2})
        self.assertEqual(m.snapshot()["endpoints"][1]["healthy"], True)

    def test_backoff_starts_again_only_after_a_stable_period(self):
        self.make(check_interval=1.0)
        ch = self.channels[0]
        for _ in range(3):  # flapping: the probe delay keeps growing
            ch.on_failure("connection lost")
            self.advance(10.0)
        ch.checks = []
        ch.on_failure("connection lost")
        start = self.clock.seconds()
        self.advance(4.0)
        self.assertEqual(ch.checks[0] - start, 3.0)
        self.advance(STABLE_AFTER + 2)
        ch.checks = []
        ch.on_failure("connection lost")
        start = self.clock.seconds()
        self.advance(1.0)
        self.assertEqual(ch.checks[0] - start, 0.5)

    def test_sticky_does_not_move_back_when_a_member_returns(self):
        m = self.make(check_interval=1.0)
        first = m.pick()
        first.on_failure("GOAWAY")
        second = m.pick()
        self.advance(10.0)
        self.assertTrue(m.snapshot()["endpoints"][self.index(first)]["healthy"])
        self.assertIs(m.pick(), second)

    def test_no_leader_for_longer_than_an_election_leaves_the_pool(self):
        m = self.make(check_interval=1.0)
        current = m.pick()
        current.mode = "noleader"
        self.advance(1.0 + NO_LEADER_GRACE - 1.0)  # an election: no change
        self.assertIs(m.pick(), current)
        current.mode = "ok"
        self.advance(1.0)
        current.mode = "noleader"  # the grace starts again
        self.advance(1.0 + NO_LEADER_GRACE - 1.0)
        self.assertIs(m.pick(), current)
        self.advance(1.0)
        self.assertIsNot(m.pick(), current)
        self.assertEqual(current.disconnects, 0)
        self.assertIn("no leader", m.snapshot()["endpoints"][self.index(current)]["last_failure"])

    def test_nothing_healthy_tries_the_least_recently_failed_member_not_known_down(self):
        m = self.make(check_interval=1.0)
        for i in (2, 0, 1):
            self.channels[i].on_failure("connection lost")
            self.clock.advance(0.125)
        self.assertIs(m.pick(), self.channels[2])
        self.assertIs(m.pick(avoid=(self.channels[2],)), self.channels[0])
        for ch in self.channels.values():
            ch.mode = "refused"
        self.advance(1.0)  # every probe is refused: known down
        with self.assertRaises(GRPCError) as e:
            m.pick()
        self.assertEqual(e.exception.code, StatusCode.UNAVAILABLE)
        self.assertEqual(e.exception.message, "no healthy etcd endpoint")

    def test_members_without_leader_are_a_last_resort(self):
        m = self.make(check_interval=1.0)
        for ch in self.channels.values():
            ch.mode = "noleader"
        self.advance(1.0 + NO_LEADER_GRACE)
        self.assertEqual(m.snapshot()["failovers"], 3)
        self.assertIn(m.pick(), list(self.channels.values()))

    def test_all_down_then_back(self):
        m = self.make(check_interval=1.0, probe_backoff_max=3.0)
        for ch in self.channels.values():
            ch.mode = "refused"
            ch.on_failure("connection lost")
        self.advance(1.0)
        self.assertRaises(GRPCError, m.pick)
        self.advance(20.0)
        self.assertRaises(GRPCError, m.pick)
        for ch in self.channels.values():
            ch.mode = "ok"
        # the next probe (at most probe_backoff_max away) rejoins at once: the pool is empty
        self.advance(3.0)
        self.assertIn(m.pick(), list(self.channels.values()))

    def test_weighted_policy_through_the_monitor(self):
        m = self.make(n=3, policy="weighted")
        # equal weights by default
        picks = collections.Counter(self.index(m.pick()) for _ in range(30))
        self.assertEqual(picks, {0: 10, 1: 10, 2: 10})

    def test_pick_avoids_the_failed_channel_when_it_can(self):
        m = self.make()
        current = m.pick()
        other = m.pick(avoid=(current,))
        self.assertIsNot(other, current)
        self.assertIs(m.pick(), current)  # a retry elsewhere does not move the sticky pick

    def test_stop_closes_channels_and_stops_checking(self):
        m = self.make()
        m.stopService()
        self.assertTrue(all(ch.closed for ch in self.channels.values()))
        before = [len(ch.checks) for ch in self.channels.values()]
        self.advance(5.0)
        self.assertEqual([len(ch.checks) for ch in self.channels.values()], before)

    def test_reload_replaces_members(self):
        m = self.make(n=1)
        old = self.channels[0]
        self.assertIs(m.pick(), old)
        m.set_endpoints([Endpoint("127.0.0.1", 2380), Endpoint("127.0.0.1", 2381)], grace=5.0)
        # the old member is out at once; the new ones serve before their checks pass
        self.assertIn(m.pick(), (self.channels[1], self.channels[2]))
        self.assertFalse(old.closed)
        self.advance(5.0)
        self.assertTrue(old.closed)  # its connection closes after the grace
        self.assertIn(self.index(m.pick()), (1, 2))
        self.assertEqual({str(e["endpoint"]) for e in m.snapshot()["endpoints"]},
                         {"127.0.0.1:2380", "127.0.0.1:2381"})
        self.assertTrue(all(e["healthy"] for e in m.snapshot()["endpoints"]))  # checks passed
        before = len(old.checks)
        self.advance(3.0)
        self.assertEqual(len(old.checks), before)  # no more checks of the old one
