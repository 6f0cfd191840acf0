"""Watch streams that survive the loss of their etcd endpoint.

A client's Watch stream is relayed to one upstream Watch stream, message bytes
unchanged. The proxy reads along (requests and responses are decoded, never
re-encoded) to know, per watch, its create request and the last revision the
client has fully received. When the upstream stream fails with UNAVAILABLE (its
endpoint died, hung or went away), a new upstream stream is opened on another
endpoint and every watch is created again there with the same watch_id and
start_revision = last revision + 1, so the client sees no error and every event
exactly once, in order. If that revision was compacted meanwhile, etcd answers
the new create with compact_revision and canceled, which reaches the client as
etcd itself would tell it.
"""

import collections

from google.protobuf.message import DecodeError
from zope.interface import implementer

from etcdproxy.grpc.client import IClientCallListener
from etcdproxy.grpc.server import ICallHandler
from etcdproxy.grpc.status import GRPCError, StatusCode
from etcdproxy.pb.etcdserverpb import rpc_pb2
from etcdproxy.services.relay import open_upstream

WATCH_PATH = b"/etcdserverpb.Watch/Watch"
# Pauses before each attempt to open the stream again (the first one at once).
RESUME_DELAYS = (0.0, 0.1, 0.25, 0.5, 1.0, 1.0, 2.0, 2.0, 3.0, 3.0, 5.0, 5.0)


class _Watch:
    __slots__ = ("create", "last_revision")

    def __init__(self, create, last_revision):
        self.create = create
        self.last_revision = last_revision


@implementer(ICallHandler, IClientCallListener)
class ResumableWatch:
    def __init__(self, upstream):
        self.upstream = upstream  # the EndpointMonitor
        self.call = None
        self.upstream_call = None
        self._channel = None
        self._watches = {}  # watch_id -> _Watch, once etcd confirmed the create
        self._creating = collections.deque()  # create requests awaiting their "created"
        self._resumed = set()  # watch ids created again, whose "created" the client must not see
        self._attempts = 0
        self._timer = None
        self._half_closed = False
        self._ended = False

    # Client side.
    def call_started(self, call):
        self.call = call
        self._open_upstream(())

    def request_received(self, message):
        try:
            request = rpc_pb2.WatchRequest.FromString(message)
        except DecodeError as e:
            # What etcd (grpc-go) answers for a request it cannot parse.
            self.call_cancelled(None)
            self.call.finish(StatusCode.INTERNAL, f"grpc: failed to unmarshal the received message: {e}")
            return
        if request.HasField("create_request"):
            self._creating.append(request.create_request)
        if self.upstream_call is not None:
            self.upstream_call.send_message(message)
        # else: a new upstream stream is being opened; the create is sent there
        # from _creating, and cancel/progress requests for the old stream are moot.

    def half_closed(self):
        self._half_closed = True
        if self.upstream_call is not None:
            self.upstream_call.end()

    def call_cancelled(self, error):
        self._ended = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.upstream_call is not None:
            self.upstream_call.cancel()
            self.upstream_call = None

    def call_draining(self):
        self.call_cancelled(None)
        self.call.finish(StatusCode.UNAVAILABLE, "proxy shutting down")

    # Upstream side.
    def headers_received(self, metadata):
        self.call.send_headers(metadata)

    def response_received(self, message):
        self._attempts = 0
        response = rpc_pb2.WatchResponse.FromString(message)
        watch_id = response.watch_id
        if response.created:
            create = self._creating.popleft() if self._creating else None
            resumed = watch_id in self._resumed
            self._resumed.discard(watch_id)
            if not response.canceled and create is not None:
                start = create.start_revision
                self._watches[watch_id] = _Watch(
                    create, start - 1 if start > 0 else response.header.revision)
            if resumed and not response.canceled:
                return  # the client saw this watch created long ago
            if resumed:
                # Created again but refused (compacted): etcd's cancel, without
                # the "created" the client already had.
                response.created = False
                message = response.SerializeToString()
        elif response.canceled:
            self._watches.pop(watch_id, None)
        else:
            watch = self._watches.get(watch_id)
            if watch is not None:
                if response.events:
                    if not response.fragment:  # a revision is complete only at its last fragment
                        watch.last_revision = response.events[-1].kv.mod_revision
                elif response.header.revision > watch.last_revision:
                    watch.last_revision = response.header.revision  # progress notification
        self.call.send_message(message)

    def call_finished(self, error, metadata):
        self.upstream_call = None
        if self._ended:
            return
        if error is None:
            self.call.finish(StatusCode.OK, "", metadata)
        elif error.code == StatusCode.UNAVAILABLE and self._attempts < len(RESUME_DELAYS):
            self._timer = self.upstream.reactor.callLater(RESUME_DELAYS[self._attempts], self._resume)
            self._attempts += 1
        else:
            self.call.finish(error.code, error.message, error.metadata)

    # Resumption.
    def _open_upstream(self, avoid):
        try:
            self._channel, self.upstream_call = open_upstream(self.upstream, self.call, self, avoid)
        except GRPCError as e:  # no endpoint can take it: say so at once
            self._ended = True
            self.call.finish(e.code, e.message)
            return False
        return self.upstream_call is not None

    def _resume(self):
        self._timer = None
        pending = list(self._creating)
        self._creating.clear()
        if not self._open_upstream((self._channel,)):
            self._creating.extend(pending)
            return
        for watch_id, watch in sorted(self._watches.items()):
            create = rpc_pb2.WatchCreateRequest()
            create.CopyFrom(watch.create)
            create.watch_id = watch_id
            create.start_revision = watch.last_revision + 1
            self._resumed.add(watch_id)
            self._send_create(create)
        self._watches.clear()
        for create in pending:
            self._send_create(create)
        if self._half_closed:
            self.upstream_call.end()

    def _send_create(self, create):
        self._creating.append(create)
        self.upstream_call.send_message(
            rpc_pb2.WatchRequest(create_request=create).SerializeToString())
