"""Per-client limits against abusive clients: calls per second (a token bucket
with a burst) and calls open at once, per connection, per peer address or per
auth token. A call over a limit ends at once with RESOURCE_EXHAUSTED and is
never sent to etcd. Every call counts (unary or stream, cached or not); the
messages on an open stream do not."""

from twisted.application import service

from etcdproxy.grpc.status import StatusCode
from etcdproxy.services.wrapper import WrappedCall

KEYS = ("peer", "connection", "token")
_PRUNE_EVERY = 10_000  # calls between sweeps of idle clients


class ClientLimits(service.Service):
    """The ``client-limits`` child of the service tree (for its stats)."""

    name = "client-limits"

    def __init__(self, reactor, rate=0.0, burst=0, concurrent=0, key="peer"):
        if key not in KEYS:
            raise ValueError(f"client limit key must be one of {', '.join(KEYS)}")
        self.reactor = reactor
        self.rate = rate  # calls per second, 0: no limit
        self.burst = burst or max(1, int(rate))
        self.concurrent = concurrent  # 0: no limit
        self.key = key
        self._buckets = {}  # client -> [tokens, time]
        self._open = {}  # client -> calls open
        self._calls = 0
        self.limited = 0

    @property
    def enabled(self):
        return self.rate > 0 or self.concurrent > 0

    def stats(self):
        return dict(limited=self.limited, clients=len(self._buckets | self._open))

    def client_of(self, call):
        if self.key == "connection":
            return call.protocol
        if self.key == "token":
            for name, value in call.metadata:
                if name == b"token":
                    return value
        peer = call.peer
        return getattr(peer, "host", peer)

    def admit(self, call):
        """None if ``call`` may go on (its end is then watched), else the
        message to refuse it with."""
        client = self.client_of(call)
        self._calls += 1
        if self._calls % _PRUNE_EVERY == 0:
            self._prune()
        if self.concurrent and self._open.get(client, 0) >= self.concurrent:
            self.limited += 1
            return (f"etcdproxy: too many concurrent calls from this client (limit "
                    f"{self.concurrent} per {self.key})")
        if self.rate:
            now = self.reactor.seconds()
            bucket = self._buckets.get(client)
            if bucket is None:
                bucket = self._buckets[client] = [float(self.burst), now]
            tokens = min(float(self.burst), bucket[0] + (now - bucket[1]) * self.rate)
            bucket[1] = now
            if tokens < 1.0:
                bucket[0] = tokens
                self.limited += 1
                return (f"etcdproxy: too many requests from this client (limit {self.rate:g}/s, "
                        f"burst {self.burst}, per {self.key})")
            bucket[0] = tokens - 1.0
        if self.concurrent:
            self._open[client] = self._open.get(client, 0) + 1
            call.when_ended(lambda: self._ended(client))
        return None

    def _ended(self, client):
        left = self._open[client] - 1
        if left:
            self._open[client] = left
        else:
            del self._open[client]

    def _prune(self):
        """Forgets clients whose bucket is full again."""
        now = self.reactor.seconds()
        full = [c for c, (tokens, t) in self._buckets.items()
                if tokens + (now - t) * self.rate >= self.burst and c not in self._open]
        for client in full:
            del self._buckets[client]


class LimitedCall(WrappedCall):
    """A handler that first asks the limits; a refused call ends at once."""

    def __init__(self, limits, handler):
        super().__init__(handler)
        self.limits = limits

    def call_started(self, call):
        refusal = self.limits.admit(call)
        if refusal is None:
            super().call_started(call)
            return
        self.refused = True  # the handler never saw the call
        call.finish(StatusCode.RESOURCE_EXHAUSTED, refusal)
