"""Client Watch streams, served by the watch broadcaster (services/broadcast.py).

A stream's requests are served in order, one at a time, as etcd serves them:
clients (clientv3) match "created" responses to their creates by order. Watch
ids are the client's own per stream, given as etcd gives them. A client that
half-closes its side keeps its watches (etcd does; the Go proxy does not).

Isolation: the broadcaster never waits for a client. A stream that does not
read its responses is ended with RESOURCE_EXHAUSTED once more than
``send_buffer`` bytes wait for it (the unsent ones are dropped), so that the
proxy's memory stays bounded and no other client is slowed down.

Exact mode (``--watch-exact``, or metadata ``etcdproxy-watch-exact: true`` on the
stream): a watch with no start revision starts exactly at etcd's current
revision, as it would directly, still sharing the upstream watcher; it costs a
serializable Range (count only) at etcd per such create.
"""

import collections

from google.protobuf.message import DecodeError
from zope.interface import implementer

from etcdproxy.grpc.server import ICallHandler
from etcdproxy.grpc.status import GRPCError, StatusCode
from etcdproxy.pb.etcdserverpb import rpc_pb2
from etcdproxy.services import watch_responses
from etcdproxy.upstream.monitor import NO_ENDPOINT

EXACT_METADATA = b"etcdproxy-watch-exact"
RANGE_PATH = b"/etcdserverpb.KV/Range"
# Metadata that makes etcd treat a Watch stream differently: streams that
# differ in it do not share upstream watchers.
SESSION_METADATA = (b"token", b"hasleader")
DUPLICATE_ID = "mvcc: duplicate watch ID provided on the WatchStream"
EXACT_READ_TIMEOUT = 5.0


class ClientWatcher:
    __slots__ = (
        "stream", "create", "range", "watch_id", "prefix", "excluded", "progress_notify",
        "fragment", "start_revision", "min_revision", "seen_revision", "source", "counted",
        "session",
    )

    def __init__(self, stream, create):
        self.stream = stream
        self.create = create
        # etcd reads an empty key as "\0"; the range end is kept as sent.
        self.range = (create.key or b"\0", create.range_end, create.prev_kv)
        self.watch_id = None
        self.prefix = b""
        self.excluded = frozenset(create.filters)
        self.progress_notify = create.progress_notify
        self.fragment = create.fragment
        self.start_revision = create.start_revision
        self.min_revision = 0  # events below are not for this watcher
        self.seen_revision = 0  # etcd's revision when the create was read (exact mode)
        self.source = None  # the shared watcher feeding it, or that it waits on
        self.counted = False
        self.session = None


@implementer(ICallHandler)
class WatchStream:
    def __init__(self, broadcaster):
        self.broadcaster = broadcaster
        self.call = None
        self.watchers = {}  # client watch id -> ClientWatcher
        self._next_id = 0
        self._requests = collections.deque()
        self._pending = None  # the request being served: a ClientWatcher, or a session (progress)
        self._serving = False
        self._ended = False

    # -- ICallHandler -----------------------------------------------------------------

    def call_started(self, call):
        self.call = call
        metadata = dict(call.metadata)
        self._session_key = tuple(metadata.get(name) for name in SESSION_METADATA)
        self._upstream_metadata = tuple((k, v) for k, v in call.metadata if k in SESSION_METADATA)
        self._exact = self.broadcaster.exact or metadata.get(EXACT_METADATA) == b"true"
        if not self.broadcaster.monitor.can_serve():
            self._end(StatusCode.UNAVAILABLE, NO_ENDPOINT)  # as an upstream call would at once

    def request_received(self, message):
        try:
            request = rpc_pb2.WatchRequest.FromString(message)
        except DecodeError as e:
            # What etcd (grpc-go) answers for a request it cannot parse.
            self._end(StatusCode.INTERNAL, f"grpc: failed to unmarshal the received message: {e}")
            return
        self._requests.append(request)
        self._serve()

    def half_closed(self):
        pass  # the watches go on, as with etcd

    def call_cancelled(self, error):
        self._ended = True
        self._requests.clear()
        pending, self._pending = self._pending, None
        if isinstance(pending, ClientWatcher):
            if pending.session is not None:
                pending.session.remove_watcher(pending)
        elif pending is not None:
            pending.forget_client(self)
        watchers, self.watchers = self.watchers, {}
        for watcher in watchers.values():
            watcher.session.remove_watcher(watcher)

    def call_draining(self):
        self._end(StatusCode.UNAVAILABLE, "proxy shutting down")

    # -- requests, in order ------------------------------------------------------------

    def _serve(self):
        if self._serving:
            return
        self._serving = True
        try:
            while self._pending is None and self._requests and not self._ended:
                request = self._requests.popleft()
                kind = request.WhichOneof("request_union")
                if kind == "create_request":
                    self._create(request.create_request)
                elif kind == "cancel_request":
                    self._cancel(request.cancel_request.watch_id)
                elif kind == "progress_request":
                    self._request_progress()
                # else: etcd ignores a request it does not know
        finally:
            self._serving = False
        if self._ended:
            return
        # Requests wait while one is served; bound them by not reading more.
        if self._pending is not None and self._requests:
            self.call.pause_receiving()
        else:
            self.call.resume_receiving()

    def _session(self):
        try:
            return self.broadcaster.session(self._session_key, self._upstream_metadata)
        except GRPCError as e:  # no etcd endpoint can take a stream now
            self._end(e.code, e.message)
            return None

    def _create(self, create):
        if create.watch_id and create.watch_id in self.watchers:
            session = self._session()
            if session is not None:
                self.send_response(watch_responses.refused(session.header, DUPLICATE_ID))
            return
        watcher = ClientWatcher(self, create)
        self._pending = watcher
        if self._exact and create.start_revision == 0:
            self._read_revision(watcher)
        else:
            self._join(watcher, create.start_revision)

    def _join(self, watcher, start_revision):
        session = self._session()
        if session is not None:
            watcher.session = session
            session.add_watcher(watcher, start_revision)

    def _read_revision(self, watcher):
        """Exact mode: etcd's current revision, from a serializable count of
        the watched range (what etcd's own create would start from)."""
        try:
            channel = self.broadcaster.monitor.pick()
        except GRPCError as e:
            self._end(e.code, e.message)
            return
        create = watcher.create
        request = rpc_pb2.RangeRequest(
            key=create.key, range_end=create.range_end, count_only=True, serializable=True)
        d = channel.unary_call(RANGE_PATH, request.SerializeToString(), self._upstream_metadata,
                               EXACT_READ_TIMEOUT)
        d.addCallback(lambda answer: rpc_pb2.RangeResponse.FromString(answer).header.revision)
        # Refused (e.g. permission): the create itself gets etcd's answer.
        d.addErrback(lambda failure: 0)
        d.addCallback(self._revision_read, watcher)

    def _revision_read(self, revision, watcher):
        if self._pending is not watcher:
            return  # the stream ended meanwhile
        watcher.seen_revision = revision
        self._join(watcher, revision + 1 if revision else 0)

    def _cancel(self, watch_id):
        watcher = self.watchers.pop(watch_id, None)
        if watcher is None:
            return  # etcd answers nothing either
        session = watcher.session
        session.remove_watcher(watcher)
        self.send_response(watch_responses.canceled(session.header, watch_id))

    def _request_progress(self):
        session = self._session()
        if session is not None:
            self._pending = session
            session.request_progress(self)

    # -- what the broadcaster tells -------------------------------------------------------

    def watcher_created(self, watcher, header):
        watch_id = watcher.create.watch_id
        if not watch_id:  # etcd's choice: the lowest free id from where it stopped
            while self._next_id in self.watchers:
                self._next_id += 1
            watch_id = self._next_id
            self._next_id += 1
        watcher.watch_id = watch_id
        watcher.prefix = watch_responses.watch_id_field(watch_id)
        self.watchers[watch_id] = watcher
        self._pending = None
        self.send_response(watch_responses.created(header, watch_id))
        self._serve()

    def watcher_refused(self, watcher, header, reason):
        self._pending = None
        self.send_response(watch_responses.refused(header, reason))
        self._serve()

    def watcher_canceled(self, watcher, response):
        """etcd ended the shared watcher (compaction, server cancel)."""
        if self.watchers.pop(watcher.watch_id, None) is watcher:
            self.send_response(watch_responses.canceled(
                response.header, watcher.watch_id, response.compact_revision, response.cancel_reason))

    def progress_answered(self, header):
        self._pending = None
        self.send_response(watch_responses.progress(header, -1))
        self._serve()

    def deliver(self, watcher, bodies):
        prefix = watcher.prefix
        for body in bodies:
            self.send_response(prefix + body)

    def send_response(self, message):
        if self._ended:
            return
        call = self.call
        call.send_message(message)
        if call.queued_bytes > self.broadcaster.send_buffer:
            self._ended = True  # before the call tells call_cancelled
            self.call_cancelled(None)
            call.abandon(
                StatusCode.RESOURCE_EXHAUSTED,
                f"etcdgrpcproxy: watch stream not read: {call.queued_bytes} bytes wait to be "
                f"sent, over the limit of {self.broadcaster.send_buffer}")

    def session_failed(self, error):
        """The upstream stream is gone for good (e.g. etcd has no leader and
        this is a ``hasleader`` stream)."""
        self._end(error.code, error.message)

    def _end(self, code, message):
        if self._ended:
            return
        self.call_cancelled(None)
        self.call.finish(code, message)
