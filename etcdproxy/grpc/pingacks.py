"""PING ACKs held back to go with the next write on their connection.

grpc-go pings after each DATA frame it receives while no ping of its is
unanswered (its bandwidth estimator, with a WINDOW_UPDATE before each ping);
answering at once costs a write of its own (a send and two epoll_ctl) per call.
The ACKs ride along with the next write on the connection instead, or go on
their own after `CONTROL_DELAY`.
"""

from twisted.logger import Logger

from etcdproxy.grpc.perreactor import PerReactor

# Longer than most calls take, so that the answer to the next call carries them.
CONTROL_DELAY = 0.05


def only_ping_acks(data):
    """Whether ``data`` (whole HTTP/2 frames) is nothing but PING ACKs."""
    if len(data) % 17:  # a PING frame: 9-byte header, 8 bytes of payload
        return False
    for i in range(0, len(data), 17):
        if data[i + 3] != 0x6 or not data[i + 4] & 0x1 or data[i + 2] != 8:
            return False
    return True


class _Releases(PerReactor):
    """One timer per reactor for the ACKs every connection holds: a timer of
    their own per connection, armed on most calls under grpc-go's pings, cost
    a third of a timed call per proxied call (the reactor's heap of timers)."""

    _log = Logger()

    def __init__(self, reactor):
        super().__init__(reactor)
        self._waiting = {}  # HeldAcks -> None, in the order they came
        self._call = None

    def add(self, held):
        self._waiting[held] = None
        if self._call is None or not self._call.active():  # (a test's reactor may cancel it)
            self._call = self.reactor.callLater(CONTROL_DELAY, self._run)

    def remove(self, held):
        """``held`` is gone; no timer is left behind for nothing."""
        self._waiting.pop(held, None)
        if not self._waiting and self._call is not None:
            if self._call.active():
                self._call.cancel()
            self._call = None

    def _run(self):
        self._call = None
        waiting, self._waiting = self._waiting, {}
        for held in waiting:
            try:
                held.expired()
            except Exception:
                # (one connection's failed write must not strand the others' ACKs)
                self._log.failure("releasing held PING ACKs failed")


class HeldAcks:
    """The held output of one connection; ``release()`` is called within
    `CONTROL_DELAY` when nothing else carried it."""

    def __init__(self, reactor, release):
        self._releases = _Releases.of(reactor)
        self._release = release
        self._held = []
        self._waiting = False  # in the releases' list

    def hold(self, data):
        self._held.append(data)
        if not self._waiting:
            self._waiting = True
            self._releases.add(self)

    def with_output(self, data, after):
        """``data`` with the held ACKs, after it (``after``) or before it."""
        if not self._held:
            return data
        if after:
            # A grpc-go peer that reads a DATA frame while its ping is still
            # unanswered sends no new ping (with the ACKs first, it pings again
            # for that DATA frame).
            self._held.insert(0, data)
        else:
            # What is written now may end the connection (GOAWAY).
            self._held.append(data)
        data = b"".join(self._held)
        self._held = []  # (still in the releases' list: it finds nothing then)
        return data

    def expired(self):
        self._waiting = False
        if self._held and self._release is not None:
            self._release()

    def stop(self):
        self._held = []
        self._release = None  # (a method of the connection: no cycle left behind)
        if self._waiting:
            self._waiting = False
            self._releases.remove(self)
