"""PING ACKs held back to go with the next write on their connection.

grpc-go pings after each DATA frame it receives while no ping of its is
unanswered (its bandwidth estimator, with a WINDOW_UPDATE before each ping);
answering at once costs a write of its own (a send and two epoll_ctl) per call.
The ACKs ride along with the next write on the connection instead, or go on
their own after `CONTROL_DELAY`.
"""

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


class HeldAcks:
    """The held output of one connection; ``release()`` is called after
    `CONTROL_DELAY` when nothing else carried it."""

    def __init__(self, reactor, release):
        self._reactor = reactor
        self._release = release
        self._held = []
        self._timer = None

    def hold(self, data):
        self._held.append(data)
        if self._timer is None:
            self._timer = self._reactor.callLater(CONTROL_DELAY, self._expired)

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
        # The timer is left to run out (it then finds nothing held): cancelling
        # and re-arming it would cost a call of its own on every answer.
        self._held = []
        return data

    def _expired(self):
        self._timer = None
        self._release()

    def stop(self):
        self._held = []
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._release = None  # (a method of the connection: no cycle left behind)
