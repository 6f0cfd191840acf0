"""--namespace: every key a client sends is prefixed on the way in, and the
prefix is stripped from every key on the way out, as etcd's Go client
namespace package (and etcd's proxy with --namespace) does; ranges, the whole
keyspace included, stay inside the namespace.

Election and Lock names are prefixed too (etcd's namespace client leaves them
out), and so are the leader keys clients pass back (Proclaim, Resign, Unlock),
so that proxies of different namespaces never contend for one lock or election.

`NamespacedCall` wraps the handler of a method with keys (KV, Watch,
LeaseTimeToLive, Election, Lock): request messages are rewritten before the handler sees
them, response messages as the handler sends them. The handlers themselves
(pass-through, range cache, watch broadcaster) never know.
"""

from google.protobuf.message import DecodeError

from etcdproxy.grpc.status import StatusCode
from etcdproxy.pb.etcdserverpb import rpc_pb2
from etcdproxy.pb.v3electionpb import v3election_pb2 as election_pb2
from etcdproxy.pb.v3lockpb import v3lock_pb2 as lock_pb2
from etcdproxy.services.catalog import unmarshal_error
from etcdproxy.services.keys import prefix_end
from etcdproxy.services.wrapper import WrappedCall

EMPTY_KEY = "etcdserver: key is not provided"


class EmptyKey(Exception):
    pass


def prefix_interval(prefix, key, end):
    """The namespaced [key, end) of a request (etcd's namespace/util.go)."""
    key = prefix + key
    if end == b"\0":  # to the end of the keyspace: to the end of the namespace
        return key, prefix_end(prefix)
    if end:
        return key, prefix + end
    return key, end


class Namespace:
    def __init__(self, prefix):
        self.prefix = prefix

    # -- requests ------------------------------------------------------------------

    def _interval(self, request):
        if not request.key:
            raise EmptyKey()
        request.key, request.range_end = prefix_interval(self.prefix, request.key, request.range_end)

    def _put(self, request):
        if not request.key:
            raise EmptyKey()
        request.key = self.prefix + request.key

    def _txn(self, request):
        for compare in request.compare:
            compare.key, compare.range_end = prefix_interval(self.prefix, compare.key, compare.range_end)
        for op in (*request.success, *request.failure):
            kind = op.WhichOneof("request")
            if kind == "request_put":
                self._put(op.request_put)
            elif kind == "request_txn":
                self._txn(op.request_txn)
            elif kind is not None:
                self._interval(getattr(op, kind))

    def _watch(self, request):
        if request.HasField("create_request"):
            create = request.create_request
            create.key, create.range_end = prefix_interval(self.prefix, create.key, create.range_end)

    def _named(self, request):  # Campaign, Leader, Observe, Lock
        request.name = self.prefix + request.name

    def _leader_key(self, request):  # Proclaim, Resign
        if request.HasField("leader"):  # else etcd refuses it as it is
            request.leader.name = self.prefix + request.leader.name
            request.leader.key = self.prefix + request.leader.key

    def _unlock(self, request):
        request.key = self.prefix + request.key

    # -- responses -----------------------------------------------------------------

    def _stripped(self, key):
        return key[len(self.prefix):] if key.startswith(self.prefix) else key

    def _strip(self, kv):
        kv.key = self._stripped(kv.key)

    def _range_response(self, response):
        for kv in response.kvs:
            self._strip(kv)

    def _put_response(self, response):
        if response.HasField("prev_kv"):
            self._strip(response.prev_kv)

    def _delete_response(self, response):
        for kv in response.prev_kvs:
            self._strip(kv)

    def _txn_response(self, response):
        for op in response.responses:
            kind = op.WhichOneof("response")
            if kind is not None:
                getattr(self, _TXN_RESPONSES[kind])(getattr(op, kind))

    def _watch_response(self, response):
        for event in response.events:
            self._strip(event.kv)
            if event.HasField("prev_kv"):
                self._strip(event.prev_kv)

    def _ttl_response(self, response):
        response.keys[:] = [self._stripped(k) for k in response.keys]

    def _campaign_response(self, response):
        if response.HasField("leader"):
            response.leader.name = self._stripped(response.leader.name)
            response.leader.key = self._stripped(response.leader.key)

    def _leader_response(self, response):  # Leader, Observe
        if response.HasField("kv"):
            self._strip(response.kv)

    def _lock_response(self, response):
        response.key = self._stripped(response.key)


_TXN_RESPONSES = {
    "response_range": "_range_response",
    "response_put": "_put_response",
    "response_delete_range": "_delete_response",
    "response_txn": "_txn_response",
}

# method path -> (request type, request rewrite, response type, response rewrite)
_METHODS = {
    b"/etcdserverpb.KV/Range": (rpc_pb2.RangeRequest, "_interval", rpc_pb2.RangeResponse, "_range_response"),
    b"/etcdserverpb.KV/Put": (rpc_pb2.PutRequest, "_put", rpc_pb2.PutResponse, "_put_response"),
    b"/etcdserverpb.KV/DeleteRange": (rpc_pb2.DeleteRangeRequest, "_interval",
                                      rpc_pb2.DeleteRangeResponse, "_delete_response"),
    b"/etcdserverpb.KV/Txn": (rpc_pb2.TxnRequest, "_txn", rpc_pb2.TxnResponse, "_txn_response"),
    b"/etcdserverpb.Watch/Watch": (rpc_pb2.WatchRequest, "_watch", rpc_pb2.WatchResponse, "_watch_response"),
    b"/etcdserverpb.Lease/LeaseTimeToLive": (rpc_pb2.LeaseTimeToLiveRequest, None,
                                             rpc_pb2.LeaseTimeToLiveResponse, "_ttl_response"),
    b"/v3electionpb.Election/Campaign": (election_pb2.CampaignRequest, "_named",
                                         election_pb2.CampaignResponse, "_campaign_response"),
    b"/v3electionpb.Election/Proclaim": (election_pb2.ProclaimRequest, "_leader_key",
                                         election_pb2.ProclaimResponse, None),
    b"/v3electionpb.Election/Leader": (election_pb2.LeaderRequest, "_named",
                                       election_pb2.LeaderResponse, "_leader_response"),
    b"/v3electionpb.Election/Observe": (election_pb2.LeaderRequest, "_named",
                                        election_pb2.LeaderResponse, "_leader_response"),
    b"/v3electionpb.Election/Resign": (election_pb2.ResignRequest, "_leader_key",
                                       election_pb2.ResignResponse, None),
    b"/v3lockpb.Lock/Lock": (lock_pb2.LockRequest, "_named", lock_pb2.LockResponse, "_lock_response"),
    b"/v3lockpb.Lock/Unlock": (lock_pb2.UnlockRequest, "_unlock", lock_pb2.UnlockResponse, None),
}


def rewrites(namespace, path):
    """(request rewrite, response rewrite) for ``path``, each bytes -> bytes
    (None: unchanged), or None when the method has no keys."""
    spec = _METHODS.get(path)
    if spec is None:
        return None
    request_type, request_fix, response_type, response_fix = spec

    def rewrite(message_type, fix):
        if fix is None:
            return None
        fix = getattr(namespace, fix)

        def apply(message):
            decoded = message_type.FromString(message)
            fix(decoded)
            return decoded.SerializeToString()
        return apply

    return rewrite(request_type, request_fix), rewrite(response_type, response_fix)


class _RewritingCall:
    """The `ServerCall` as the wrapped handler sees it: its responses rewritten."""

    def __init__(self, call, rewrite):
        self._call = call
        self._rewrite = rewrite

    def send_message(self, message):
        try:
            message = self._rewrite(message)
        except DecodeError as e:
            # Never sent as it is (its keys carry the prefix); the call ends.
            self._call.abandon(StatusCode.INTERNAL, f"etcdgrpcproxy: etcd's answer did not decode: {e}")
            return
        self._call.send_message(message)

    def __getattr__(self, name):
        return getattr(self._call, name)


class NamespacedCall(WrappedCall):
    def __init__(self, handler, request_rewrite, response_rewrite):
        super().__init__(handler)
        self._request = request_rewrite
        self._response = response_rewrite

    def call_started(self, call):
        self.call = call
        self.handler.call_started(_RewritingCall(call, self._response) if self._response else call)

    def request_received(self, message):
        if self.refused:
            return
        if self._request is not None:
            try:
                message = self._request(message)
            except DecodeError as e:
                # Never passed on as it is: etcd may read what protobuf here
                # does not (e.g. a Txn nested deeper than its recursion limit),
                # keys outside the namespace included.
                self.refuse(StatusCode.INTERNAL, unmarshal_error(self.call.method, e))
                return
            except EmptyKey:
                self.refuse(StatusCode.INVALID_ARGUMENT, EMPTY_KEY)
                return
        self.handler.request_received(message)
