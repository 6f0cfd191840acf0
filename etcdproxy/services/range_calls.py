"""The calls the range cache looks into: Range (served by the cache), and the
writes that invalidate it (KV Put/DeleteRange/Txn/Compact, Auth changes),
relayed as they are and decoded on the side."""

from google.protobuf.message import DecodeError
from zope.interface import implementer

from etcdproxy.grpc.server import ICallHandler
from etcdproxy.grpc.status import StatusCode
from etcdproxy.pb.etcdserverpb import rpc_pb2
from etcdproxy.services.forward import ForwardedCall
from etcdproxy.services.range_store import span

RANGE_PATH = b"/etcdserverpb.KV/Range"
KV_WRITES = {
    b"/etcdserverpb.KV/Put": (rpc_pb2.PutRequest, rpc_pb2.PutResponse),
    b"/etcdserverpb.KV/DeleteRange": (rpc_pb2.DeleteRangeRequest, rpc_pb2.DeleteRangeResponse),
    b"/etcdserverpb.KV/Txn": (rpc_pb2.TxnRequest, rpc_pb2.TxnResponse),
}
COMPACT_PATH = b"/etcdserverpb.KV/Compact"
# Auth changes: the first two change who may read without a token too.
AUTH_SWITCHES = frozenset([b"/etcdserverpb.Auth/AuthEnable", b"/etcdserverpb.Auth/AuthDisable"])
AUTH_WRITES = AUTH_SWITCHES | frozenset(
    b"/etcdserverpb.Auth/" + name for name in (
        b"UserAdd", b"UserDelete", b"UserChangePassword", b"UserGrantRole", b"UserRevokeRole",
        b"RoleAdd", b"RoleDelete", b"RoleGrantPermission", b"RoleRevokePermission"))


def write_spans(request):
    """The spans (see `range_store.span`) a Put, DeleteRange or Txn request may
    change; a Txn's ops in both branches, nested Txns included."""
    if isinstance(request, rpc_pb2.PutRequest):
        return [span(request.key, b"")]
    if isinstance(request, rpc_pb2.DeleteRangeRequest):
        return [span(request.key, request.range_end)]
    spans = []
    for op in (*request.success, *request.failure):
        kind = op.WhichOneof("request")
        if kind == "request_put":
            spans.extend(write_spans(op.request_put))
        elif kind == "request_delete_range":
            spans.extend(write_spans(op.request_delete_range))
        elif kind == "request_txn":
            spans.extend(write_spans(op.request_txn))
    return spans


@implementer(ICallHandler)
class RangeCall:
    """A client's Range: from the cache, or from etcd through it."""

    def __init__(self, cache, upstream):
        self.cache = cache
        self.upstream = upstream
        self.call = None
        self._request = None
        self._fetch = None
        self._forward = None  # what etcd must answer itself (bad input)

    def call_started(self, call):
        self.call = call

    def request_received(self, message):
        if self._forward is not None:
            self._forward.request_received(message)
        elif self._request is None:
            self._request = message
        else:  # a second message on a unary call: etcd says what it says
            self._forward_all(message)

    def half_closed(self):
        if self._forward is not None:
            self._forward.half_closed()
            return
        if self._request is None:
            self._forward_all()
            self._forward.half_closed()
            return
        try:
            self._fetch = self.cache.serve(self, self._request, self.call.metadata,
                                           self.call.time_remaining())
        except DecodeError:
            self._forward_all()
            self._forward.half_closed()

    def call_cancelled(self, error):
        if self._forward is not None:
            self._forward.call_cancelled(error)
        fetch, self._fetch = self._fetch, None
        if fetch is not None:
            fetch.leave(self)

    def call_draining(self):
        pass  # a unary call completes

    # RangeFetch waiter
    def answered(self, response):
        self._fetch = None
        self.call.send_message(response)
        self.call.finish(StatusCode.OK)

    def failed(self, error):
        self._fetch = None
        self.call.finish(error.code, error.message, error.metadata)

    def _forward_all(self, *more):
        self._forward = ForwardedCall(self.upstream)
        self._forward.call_started(self.call)
        for message in (self._request, *more):
            if message is not None:
                self._forward.request_received(message)


class InvalidatingCall(ForwardedCall):
    """A write relayed as it is; when the client's call ends, however it ends
    (before the client sees its status), the cache forgets what the write may
    have changed: a failed or cancelled write may still apply."""

    def __init__(self, upstream, cache):
        super().__init__(upstream)
        self.cache = cache
        self._write = None
        self._response = None

    def call_started(self, call):
        if call.method in AUTH_WRITES:
            self.cache.auth_change_started()
            call.when_ended(lambda: self.cache.auth_change_ended(call.method in AUTH_SWITCHES))
        else:
            call.when_ended(self._invalidate)
        super().call_started(call)

    def request_received(self, message):
        if self._write is None:
            self._write = message
        super().request_received(message)

    def response_received(self, message):
        self._response = message
        super().response_received(message)

    def _invalidate(self):
        method = self.call.method
        if self._write is None:
            return
        try:
            if method == COMPACT_PATH:
                if self._response is not None:
                    self.cache.compacted(rpc_pb2.CompactionRequest.FromString(self._write).revision)
                return
            request_type, response_type = KV_WRITES[method]
            spans = write_spans(request_type.FromString(self._write))
            revision = 0
            if self._response is not None:
                revision = response_type.FromString(self._response).header.revision
            self.cache.written(spans, revision)
        except DecodeError:
            self.cache.forget_all()  # cannot tell what it touched: start over
