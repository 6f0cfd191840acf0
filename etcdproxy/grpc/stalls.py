"""Streams whose data the peer's windows hold back, and for how long.

A stream with data queued and no window joins the blocked set; once it has
waited `Limits.send_stall_timeout` seconds, ``on_stalled(stream)`` is called
(again each timeout while it stays stalled). A window update moves every
blocked stream back to be flushed.
"""


class StallWatch:
    def __init__(self, reactor, timeout, on_stalled):
        self._reactor = reactor
        self._timeout = timeout  # 0: never stalled
        self._on_stalled = on_stalled
        self._blocked = set()
        self._check = None

    def blocked(self, stream):
        """``stream`` has data queued that the peer's windows hold back."""
        self._blocked.add(stream)
        if stream.blocked_since is None:
            stream.blocked_since = self._reactor.seconds()
        if self._timeout and self._check is None:
            self._check = self._reactor.callLater(self._timeout, self._check_stalls)

    def take_blocked(self):
        """The blocked streams, to be flushed again (the windows may have grown)."""
        blocked, self._blocked = self._blocked, set()
        return blocked

    def _check_stalls(self):
        self._check = None
        now = self._reactor.seconds()
        timeout = self._timeout
        for stream in list(self._blocked):
            if stream.blocked_since is not None and now - stream.blocked_since >= timeout:
                stream.blocked_since = now  # the next call, if any, one timeout later
                self._on_stalled(stream)
        waiting = [stream.blocked_since for stream in self._blocked if stream.blocked_since is not None]
        if waiting:
            self._check = self._reactor.callLater(max(0.1, min(waiting) + timeout - now), self._check_stalls)

    def stop(self):
        if self._check is not None and self._check.active():
            self._check.cancel()
        self._check = None
        self._blocked = set()
        self._on_stalled = None  # (a method of the connection: no cycle left behind)
