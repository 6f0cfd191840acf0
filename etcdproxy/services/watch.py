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

from etcdproxy.grpc.status import StatusCode
from etcdproxy.pb.etcdserverpb import rpc_pb2
from etcdproxy.services.resumable import ResumableStream

WATCH_PATH = b"/etcdserverpb.Watch/Watch"


class _Watch:
    __slots__ = ("create", "last_revision")

    def __init__(self, create, last_revision):
        self.create = create
        self.last_revision = last_revision


class ResumableWatch(ResumableStream):
    def __init__(self, upstream):
        super().__init__(upstream)
        self._watches = {}  # watch_id -> _Watch, once etcd confirmed the create
        self._creating = collections.deque()  # create requests awaiting their "created"
        self._resumed = set()  # watch ids created again, whose "created" the client must not see

    def request_received(self, message):
        try:
            request = rpc_pb2.WatchRequest.FromString(message)
        except DecodeError as e:
            # What etcd (grpc-go) answers for a request it cannot parse.
            self.end(StatusCode.INTERNAL, f"grpc: failed to unmarshal the received message: {e}")
            return
        if request.HasField("create_request"):
            self._creating.append(request.create_request)
        # While a new upstream stream is being opened, the create is sent there
        # from _creating, and cancel/progress requests for the old one are moot.
        self.send_upstream(message)

    def response_received(self, message):
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
        super().response_received(message)

    def reopened(self):
        pending = list(self._creating)
        self._creating.clear()
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

    def _send_create(self, create):
        self._creating.append(create)
        self.upstream_call.send_message(
            rpc_pb2.WatchRequest(create_request=create).SerializeToString())
