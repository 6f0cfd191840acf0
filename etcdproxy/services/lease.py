"""Client LeaseKeepAlive streams, served by the lease coalescer
(services/lease_coalescer.py), and LeaseRevoke, which stops its refreshes.

As etcd does, a stream answers its keep-alives in the order they came (an
answer from the cache waits behind an earlier one that waits for etcd), and
ends with OK once the client half-closed and every keep-alive is answered.
An upstream failover is invisible: the keep-alives waiting are answered once
the new upstream stream is up.
"""

import collections

from google.protobuf.message import DecodeError
from zope.interface import implementer

from etcdproxy.grpc.server import ICallHandler
from etcdproxy.grpc.status import GRPCError, StatusCode
from etcdproxy.pb.etcdserverpb import rpc_pb2
from etcdproxy.services.forward import ForwardedCall
from etcdproxy.upstream.monitor import NO_ENDPOINT

REVOKE_PATH = b"/etcdserverpb.Lease/LeaseRevoke"


class Slot:
    """One client keep-alive's answer, in its stream's order."""

    __slots__ = ("stream", "message")

    def __init__(self, stream):
        self.stream = stream
        self.message = None

    def fill(self, message):
        self.message = message
        self.stream.flush()


@implementer(ICallHandler)
class KeepAliveStream:
    def __init__(self, coalescer):
        self.coalescer = coalescer
        self.call = None
        self.session = None
        self.asked = set()  # LeaseStates it keeps alive through an answer from the cache
        self._slots = collections.deque()
        self._half_closed = False
        self._ended = False

    # -- ICallHandler -----------------------------------------------------------------

    def call_started(self, call):
        self.call = call
        if not self.coalescer.monitor.can_serve():
            self.end(StatusCode.UNAVAILABLE, NO_ENDPOINT)  # as an upstream call would at once
            return
        hasleader = dict(call.metadata).get(b"hasleader") == b"true"
        try:
            self.session = self.coalescer.join(self, hasleader)
        except GRPCError as e:
            self.end(e.code, e.message)

    def request_received(self, message):
        if self._ended:
            return
        try:
            request = rpc_pb2.LeaseKeepAliveRequest.FromString(message)
        except DecodeError as e:
            # What etcd (grpc-go) answers for a request it cannot parse.
            self.end(StatusCode.INTERNAL, f"grpc: failed to unmarshal the received message: {e}")
            return
        slot = Slot(self)
        self._slots.append(slot)
        self.session.ask(self, request.ID, slot)

    def half_closed(self):
        self._half_closed = True
        self.flush()

    def call_cancelled(self, error):
        if self._ended:
            return
        self._ended = True
        self._slots.clear()
        if self.session is not None:
            self.coalescer.left(self, self.session)

    def call_draining(self):
        self.end(StatusCode.UNAVAILABLE, "proxy shutting down")

    # -- answers ------------------------------------------------------------------------

    def flush(self):
        """Sends the answers ready, in order; ends the stream as etcd does
        once the client half-closed and nothing is left to answer."""
        if self._ended:
            return
        slots = self._slots
        while slots and slots[0].message is not None:
            self.call.send_message(slots.popleft().message)
        if self._half_closed and not slots:
            self.end(StatusCode.OK, "")

    def end(self, code, message):
        self.call_cancelled(None)
        self.call.finish(code, message)


class RevokeCall(ForwardedCall):
    """LeaseRevoke, passed through; the coalescer stops refreshing the lease
    as the request passes (if etcd refuses the revoke, the next client
    keep-alive simply asks etcd again)."""

    def __init__(self, upstream, coalescer):
        super().__init__(upstream)
        self.coalescer = coalescer

    def request_received(self, message):
        try:
            lease_id = rpc_pb2.LeaseRevokeRequest.FromString(message).ID
        except DecodeError:
            pass  # etcd gives its own answer
        else:
            self.coalescer.revoked(lease_id)
        super().request_received(message)
