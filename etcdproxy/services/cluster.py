"""Cluster.MemberList through the proxy: etcd's own answer (header, member IDs,
names, peer URLs, learner flags), with the client URLs of every started member
replaced by the proxies' (the proxies registered under --resolver-prefix, else
this proxy's --advertise-client-url).

Clients that sync their endpoints from the member list (clientv3's
AutoSyncInterval, etcdctl's --endpoints discovery) thus stay behind the
proxies, while member IDs still agree with Status, alarms and member
add/remove/update/promote. etcd's Go proxy answers a fake member instead (ID 0,
no peer URLs, no learners). A member that has not started yet has no client
URLs at etcd and gets none here. --relay-member-list relays etcd's answer as
it is. Other Cluster methods are passed through."""

from google.protobuf.message import DecodeError
from twisted.internet import defer
from twisted.logger import Logger

from etcdproxy.grpc.status import StatusCode
from etcdproxy.pb.etcdserverpb import rpc_pb2
from etcdproxy.services.wrapper import WrappedCall

MEMBER_LIST_PATH = b"/etcdserverpb.Cluster/MemberList"
_log = Logger()


def with_client_urls(answer, urls):
    """A MemberListResponse (bytes) with the client URLs of its started members
    set to ``urls``; an answer that does not decode goes as it is."""
    try:
        response = rpc_pb2.MemberListResponse.FromString(answer)
    except DecodeError:
        return answer
    for member in response.members:
        if member.clientURLs:
            member.clientURLs[:] = urls
    return response.SerializeToString()


class MemberListCall(WrappedCall):
    """Wraps the pass-through of MemberList; ``client_urls()`` gives (a
    Deferred of) the URLs the members' are replaced by."""

    def __init__(self, handler, client_urls):
        super().__init__(handler)
        self.client_urls = client_urls

    def call_started(self, call):
        self.call = call
        self.handler.call_started(_RewrittenAnswer(call, self.client_urls))


class _RewrittenAnswer:
    """The `ServerCall` as the pass-through sees it: the answer is held until
    its status, then sent with the proxies' client URLs."""

    def __init__(self, call, client_urls):
        self._call = call
        self._client_urls = client_urls
        self._answer = None

    def send_message(self, message):
        self._answer = message

    @defer.inlineCallbacks
    def finish(self, code=StatusCode.OK, message="", metadata=()):
        if code == StatusCode.OK and self._answer is not None:
            try:
                urls = yield self._client_urls()
            except Exception:
                # etcd's own URLs never go out: clients would sync around the proxy.
                _log.failure("MemberList: the proxies' client URLs could not be had")
                self._call.finish(StatusCode.UNAVAILABLE, "etcdgrpcproxy: client URLs unavailable")
                return
            self._call.send_message(with_client_urls(self._answer, urls))
        self._call.finish(code, message, metadata)

    def __getattr__(self, name):
        return getattr(self._call, name)
