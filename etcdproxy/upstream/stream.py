"""A long-lived stream toward etcd owned by the proxy itself (not by one
client call): the watch broadcaster's and the lease coalescer's shared streams.

When the stream fails in a way another endpoint may not (UNAVAILABLE: the
endpoint died, hung or went away), it is opened again, on another endpoint when
there is one, after a short pause that grows with each failed attempt; the owner
is told (`stream_opened`) so that it can bring the new stream up to date. Any
other end, or too many failed attempts in a row, is final (`stream_failed`).
"""

from zope.interface import Interface, implementer

from etcdproxy.grpc.client import IClientCallListener
from etcdproxy.grpc.status import GRPCError, StatusCode

# Pauses before each attempt to open the stream again (the first one at once);
# the count starts over once a message arrives on a new stream.
RESUME_DELAYS = (0.0, 0.1, 0.25, 0.5, 1.0, 1.0, 2.0, 2.0, 3.0, 3.0, 5.0, 5.0)

# etcd ends "hasleader" streams with this when its cluster has no leader: the
# clients of such streams asked to be told, so it is final.
NO_LEADER = "etcdserver: no leader"


class IUpstreamStreamOwner(Interface):
    def stream_opened(stream):
        """A (new) upstream stream is open: send it what it must know."""

    def message_received(message):
        """One response message (bytes)."""

    def stream_failed(error):
        """The stream is over for good (a `GRPCError`); it is closed."""


@implementer(IClientCallListener)
class UpstreamStream:
    def __init__(self, monitor, method, metadata, owner):
        self.monitor = monitor
        self.method = method
        self.metadata = metadata
        self.owner = owner
        self.channel = None  # where the stream is (or was last) open
        self._call = None
        self._attempts = 0
        self._timer = None
        self.closed = False

    @property
    def is_open(self):
        return self._call is not None

    def open(self):
        """Opens the stream; when no endpoint can take it now, fails at once
        (`stream_failed`), as a call to etcd would."""
        self._open((), first=True)

    def send(self, message):
        """Sends a request message; dropped while no stream is open (the
        owner's `stream_opened` resends what still matters)."""
        if self._call is not None:
            self._call.send_message(message)

    def close(self):
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        call, self._call = self._call, None
        if call is not None:
            call.cancel()

    def _open(self, avoid, first=False):
        try:
            self.channel = self.monitor.pick(avoid)
        except GRPCError as e:
            self._failed(e, (), retry=not first)
            return
        call = self.channel.start_call(self.method, self.metadata, self)
        if not call.closed:  # else refused at once: call_finished has run
            self._call = call
            self.owner.stream_opened(self)

    def _failed(self, error, avoid, retry):
        if retry and self._attempts < len(RESUME_DELAYS):
            delay = RESUME_DELAYS[self._attempts]
            self._attempts += 1
            self._timer = self.monitor.reactor.callLater(delay, self._resume, avoid)
            return
        self.close()
        self.owner.stream_failed(error)

    def _resume(self, avoid):
        self._timer = None
        self._open(avoid)

    # IClientCallListener
    def headers_received(self, metadata):
        pass

    def response_received(self, message):
        self._attempts = 0
        self.owner.message_received(message)

    def call_finished(self, error, metadata):
        self._call = None
        if self.closed:
            return
        if error is None:  # etcd ended it (e.g. going away): open another
            error = GRPCError(StatusCode.UNAVAILABLE, "upstream stream ended")
        retry = error.code == StatusCode.UNAVAILABLE and error.message != NO_LEADER
        self._failed(error, (self.channel,), retry)
