"""The endpoint monitor: the health of each etcd endpoint, and where new calls go.

One `Channel` per --endpoints member. A member leaves the pool of healthy members
when its channel reports a failure (connect refused or timed out, connection lost
or reset, GOAWAY, keepalive ping timeout) or when a health check fails: every
``check_interval`` seconds each member is asked Maintenance.Status, which must
answer within ``check_timeout``, and with a leader once the member has been
without one for NO_LEADER_GRACE seconds (an election is not a failure). A check
that times out means a hung member (e.g. SIGSTOP: its kernel still accepts
connections, nothing answers), so its connection is dropped and the calls on it
end at once.

A member out of the pool is probed with backoff (``probe_backoff_initial``
doubling up to ``probe_backoff_max``; back to the start once it has stayed
healthy for STABLE_AFTER seconds) and rejoins after ``rise`` consecutive passed
checks. `pick()` asks the policy (policy.py) for a pool member. With no healthy
member it returns the least recently failed member that is not known to be down
(no check since its connection failed, or its last check was answered, e.g.
without a leader: etcd then answers the call as it would without a proxy), so
that a cluster coming back is found by the next calls; with none, it fails at
once with UNAVAILABLE.
"""

import functools
import math
import random

from twisted.application import service
from twisted.internet import defer
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.logger import Logger

from etcdproxy.grpc.client import Channel
from etcdproxy.grpc.connection import Limits
from etcdproxy.grpc.status import GRPCError, StatusCode
from etcdproxy.pb.etcdserverpb import rpc_pb2

NO_ENDPOINT = "no healthy etcd endpoint"
# Seconds a member removed by a reload keeps its connection, for the calls on it.
LEAVE_GRACE = 5.0
from etcdproxy.upstream.policy import make_policy

STATUS = b"/etcdserverpb.Maintenance/Status"
STABLE_AFTER = 30.0
# Longer than an etcd election with the default election timeout (1 s, randomized
# up to 2 s): a member without a leader for longer is cut off from the cluster.
NO_LEADER_GRACE = 3.0


class Backoff:
    """Delays doubling from ``initial`` up to ``maximum``."""

    def __init__(self, initial, maximum):
        self.initial = initial
        self.maximum = maximum
        self._delay = initial

    def next(self):
        delay = self._delay
        self._delay = min(self._delay * 2, self.maximum)
        return delay

    def reset(self):
        self._delay = self.initial


class Member:
    """One etcd endpoint as the monitor sees it."""

    def __init__(self, endpoint, backoff):
        self.endpoint = endpoint
        self.channel = None
        self.backoff = backoff
        self.healthy = True  # in the pool; until a failure or check says otherwise
        self.down = False  # the last health check failed
        self.reason = None  # why it last left the pool
        self.failed_at = None  # when it last failed
        self.healthy_since = 0.0
        self.leaderless_since = None  # when checks started to show no leader
        self.failures = 0  # times it left the pool
        self.successes = 0  # consecutive passed checks while out of the pool
        self.check = None  # the health check in flight
        self.timer = None  # the next health check

    def __str__(self):
        return str(self.endpoint)

    def snapshot(self):
        return {
            "endpoint": str(self.endpoint),
            "weight": self.endpoint.weight,
            "healthy": self.healthy,
            "down": self.down,
            "failures": self.failures,
            "last_failure": self.reason,
            "last_failure_at": self.failed_at,
        }


class EndpointMonitor(service.Service):
    name = "endpoint-monitor"
    _log = Logger()

    def __init__(
        self,
        reactor,
        endpoints,
        policy="sticky",
        limits=Limits(),
        keepalive_interval=10.0,
        keepalive_timeout=10.0,
        connect_timeout=2.0,
        check_interval=1.0,
        check_timeout=2.0,
        probe_backoff_initial=0.5,
        probe_backoff_max=3.0,
        rise=2,
        rng=None,
        channel_factory=None,
        client_tls=None,
    ):
        """``channel_factory(endpoint)`` makes each member's `Channel` (tests
        give fakes); by default a real one with ``limits``, keepalive and a
        connect timeout, over TLS (``client_tls``, an `etcdproxy.tls.ClientTLS`)
        for https:// endpoints."""
        self.client_tls = client_tls
        self.reactor = reactor
        self.check_interval = check_interval
        self.check_timeout = check_timeout
        self.rise = rise
        self._rng = rng or random.Random()
        if channel_factory is None:
            channel_factory = functools.partial(
                self._make_channel, limits, keepalive_interval, keepalive_timeout, connect_timeout)
        self._channel_factory = channel_factory
        self._backoff = (probe_backoff_initial, probe_backoff_max)
        self.members = [self._new_member(endpoint) for endpoint in endpoints]
        self.policy = make_policy(policy, {m: m.endpoint.weight for m in self.members}, self._rng)
        self._pool = list(self.members)  # the healthy members, in --endpoints order
        self._health_observers = set()
        self.failovers = 0  # times a member left the pool

    def _new_member(self, endpoint):
        member = Member(endpoint, Backoff(*self._backoff))
        member.channel = self._channel_factory(endpoint)
        member.channel.on_failure = functools.partial(self._connection_failed, member)
        return member

    def set_endpoints(self, endpoints, grace=LEAVE_GRACE):
        """A new endpoint list (reload): endpoints no longer listed leave the
        pool at once, their connection closed ``grace`` s later (calls in
        flight finish; the proxy's own streams on it then move elsewhere);
        new ones join it once their health checks pass, as a member that
        comes back does."""
        wanted = {(e.host, e.port): e for e in endpoints}
        kept = []
        for member in self.members:
            if (member.endpoint.host, member.endpoint.port) in wanted:
                kept.append(member)
            else:
                self._stop_checks(member)
                self.reactor.callLater(grace, member.channel.close)
        known = {(m.endpoint.host, m.endpoint.port) for m in kept}
        for key, endpoint in wanted.items():
            if key not in known:
                member = self._new_member(endpoint)
                member.healthy = False
                kept.append(member)
                if self.running:
                    self._schedule(member, 0)
        self.members = kept
        self._update_pool()
        self.policy.set_weights({m: m.endpoint.weight for m in self.members})
        self._log.info("etcd endpoints now {endpoints}: {pick}",
                       endpoints=", ".join(str(m) for m in self.members), pick=self._describe_pick())

    def _stop_checks(self, member):
        if member.timer is not None and member.timer.active():
            member.timer.cancel()
        member.timer = None
        if member.check is not None:
            member.check.cancel()

    def _make_channel(self, limits, keepalive_interval, keepalive_timeout, connect_timeout, endpoint):
        connector = HostnameEndpoint(self.reactor, endpoint.host, endpoint.port, timeout=connect_timeout)
        if endpoint.tls:
            connector = wrapClientTLS(self.client_tls.creator(endpoint.host), connector)
        return Channel(
            self.reactor,
            connector,
            endpoint.authority.encode("ascii"),
            limits,
            keepalive_interval=keepalive_interval,
            keepalive_timeout=keepalive_timeout,
            tls=endpoint.tls,
        )

    # -- where calls go -----------------------------------------------------------

    def pick(self, avoid=()):
        """The channel for a new call, avoiding the channels in ``avoid`` (where
        a retried call just failed) when another one will do. Raises
        `GRPCError` UNAVAILABLE when no endpoint can take the call."""
        pool = self._pool
        if pool:
            member = self.policy.choose(pool)
            if member.channel in avoid:
                others = [m for m in pool if m.channel not in avoid]
                if others:
                    member = self._rng.choice(others)
            return member.channel
        candidates = [m for m in self.members if not m.down and m.channel not in avoid]
        if not candidates:
            raise GRPCError(StatusCode.UNAVAILABLE, NO_ENDPOINT)
        # The least recently failed; one that never failed (just added) first.
        return min(candidates, key=lambda m: -math.inf if m.failed_at is None else m.failed_at).channel

    @property
    def healthy(self):
        """Whether some endpoint is healthy (in the pool)."""
        return bool(self._pool)

    def observe_health(self, observer):
        """Calls ``observer(healthy)`` each time `healthy` changes, until
        `ignore_health` is called with it."""
        self._health_observers.add(observer)

    def ignore_health(self, observer):
        self._health_observers.discard(observer)

    def _update_pool(self):
        was_healthy = self.healthy
        self._pool = [m for m in self.members if m.healthy]
        if self.healthy != was_healthy:
            for observer in list(self._health_observers):
                observer(self.healthy)

    def can_serve(self):
        """Whether `pick` would find an endpoint now."""
        return bool(self._pool) or any(not m.down for m in self.members)

    def snapshot(self):
        """The monitor's state, for the metrics and health endpoints."""
        current = getattr(self.policy, "current", None)
        return {
            "policy": self.policy.name,
            "current": str(current) if current is not None else None,
            "failovers": self.failovers,
            "endpoints": [m.snapshot() for m in self.members],
        }

    # -- service ------------------------------------------------------------------

    def startService(self):
        super().startService()
        self._log.info(
            "etcd endpoints {endpoints}, policy {policy}: {pick}",
            endpoints=", ".join(str(m) for m in self.members),
            policy=self.policy.name, pick=self._describe_pick(),
        )
        for member in self.members:
            self._schedule(member, 0)

    def stopService(self):
        super().stopService()
        for member in self.members:
            self._stop_checks(member)
            member.channel.close()

    # -- health -------------------------------------------------------------------

    def _schedule(self, member, delay):
        if member.timer is not None and member.timer.active():
            member.timer.cancel()
        member.timer = None
        if self.running:
            member.timer = self.reactor.callLater(delay, self._check, member)

    def _check(self, member):
        member.timer = None
        member.check = d = member.channel.unary_call(STATUS, b"", timeout=self.check_timeout)
        d.addCallbacks(self._check_answered, self._check_error, (member,), None, (member,))

    def _check_answered(self, response, member):
        member.check = None
        try:
            leader = rpc_pb2.StatusResponse.FromString(response).leader
        except Exception:
            self._failed(member, "health check: malformed Status answer", down=True)
            return
        now = self.reactor.seconds()
        if leader:
            member.leaderless_since = None
            self._passed(member)
            return
        if member.leaderless_since is None:
            member.leaderless_since = now
        if member.healthy and now - member.leaderless_since < NO_LEADER_GRACE:
            self._schedule(member, self.check_interval)  # maybe an election
        else:
            # It answers, so it stays a last resort: while the cluster has no
            # leader, calls wait in etcd and get its answer, as without a proxy.
            self._failed(member, "health check: no leader", down=False)

    def _check_error(self, failure, member):
        member.check = None
        if failure.check(defer.CancelledError):
            return  # stopping
        error = failure.value
        if isinstance(error, GRPCError) and error.code == StatusCode.DEADLINE_EXCEEDED:
            self._failed(member, f"health check timed out after {self.check_timeout:g} s", down=True)
            # A hung member: the calls on it would wait for their deadlines.
            member.channel.disconnect()
        else:
            self._failed(member, f"health check failed: {failure.getErrorMessage()}", down=True)

    def _passed(self, member):
        now = self.reactor.seconds()
        member.down = False
        if member.healthy:
            if now - member.healthy_since >= STABLE_AFTER:
                member.backoff.reset()
        else:
            member.successes += 1
            if member.successes >= self.rise or not self._pool:
                member.healthy = True
                member.healthy_since = now
                self._update_pool()
                self._log.info("etcd endpoint {endpoint} is healthy again and back in the pool; {pick}",
                               endpoint=str(member), pick=self._describe_pick())
        self._schedule(member, self.check_interval)

    def _connection_failed(self, member, reason):
        self._failed(member, reason)

    def _failed(self, member, reason, down=None):
        """``down``: whether a health check got no answer at all; None when a
        connection failed (the next check tells whether the member is down)."""
        member.failed_at = self.reactor.seconds()
        member.successes = 0
        if down is not None:
            member.down = down
        if member.healthy:
            member.healthy = False
            member.reason = reason
            member.failures += 1
            self.failovers += 1
            self._update_pool()
            self._log.warn("etcd endpoint {endpoint} failed ({reason}); {pick}",
                           endpoint=str(member), reason=reason, pick=self._describe_pick())
            if member.check is None:
                self._schedule(member, member.backoff.next())  # instead of the periodic check
        elif member.check is None and member.timer is None:
            self._schedule(member, member.backoff.next())

    def _describe_pick(self):
        if not self._pool:
            return "no healthy etcd endpoint left"
        if self.policy.name == "sticky":
            return f"using {self.policy.choose(self._pool)}"
        return f"{self.policy.name} over {', '.join(str(m) for m in self._pool)}"
