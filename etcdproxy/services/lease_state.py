"""What the lease coalescer knows of one lease, and the rules for answering a
client's keep-alive from it (no I/O: the session does that).

etcd renews a lease on each keep-alive and answers its full TTL. After a
refresh sent at ``refreshed_at`` that etcd answered with ``ttl``, the lease lives
at etcd until at least ``refreshed_at + ttl`` (etcd renewed it after the request
left). So a client's keep-alive within a third of the TTL of that refresh is
answered at once with what is left of it, rounded down: never longer than what
etcd still holds the lease for. Later ones (or with no usable answer yet) are
sent to etcd, and whoever asks meanwhile gets that fresh answer: at most one
refresh per lease every TTL/3, however many clients ask and however often.

A client that got an answer from the cache still wants the lease to live as if
it had asked etcd itself; those clients are the lease's ``askers``. When the
refresh falls due (TTL/3 after the last one) and someone asked since, the
proxy refreshes the lease; if nobody did, it stops: the lease then expires at
etcd within TTL + TTL/3 of the last client keep-alive.
"""


class LeaseState:
    __slots__ = (
        "id", "ttl", "refreshed_at", "sent_at", "inflight", "waiters", "askers", "timer",
        "forgotten",
    )

    def __init__(self, lease_id):
        self.id = lease_id
        self.ttl = 0  # etcd's last answer (0: none usable)
        self.refreshed_at = None  # when the refresh etcd last answered was sent
        self.sent_at = None  # when the refresh in flight was sent
        self.inflight = False  # a refresh is sent (or waits for a stream)
        self.waiters = []  # client answers (`Slot`s) waiting for etcd's
        self.askers = set()  # client streams answered from the cache since the last refresh
        self.timer = None  # the refresh due TTL/3 after the last one
        self.forgotten = False  # revoked, expired or idle: no longer refreshed

    def cached_ttl(self, now):
        """The TTL to answer a keep-alive with at ``now`` without asking etcd,
        or None when etcd must be asked (nothing known yet, lease gone, or
        the next refresh is due)."""
        if self.refreshed_at is None or self.ttl <= 0:
            return None
        elapsed = now - self.refreshed_at
        if elapsed >= self.ttl / 3.0:
            return None
        remaining = int(self.ttl - max(elapsed, 0.0))  # rounded down
        return remaining if remaining >= 1 else None

    def refresh_due(self):
        """When the next refresh falls due (the lease has ``2/3 ttl`` left at
        etcd, at least)."""
        return self.refreshed_at + self.ttl / 3.0

    def answered(self, ttl):
        """etcd answered the refresh in flight."""
        self.inflight = False
        self.ttl = ttl
        self.refreshed_at = self.sent_at if ttl > 0 else None
