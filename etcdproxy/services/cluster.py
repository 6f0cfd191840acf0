"""Cluster.MemberList through the proxy, answered as etcd's proxy answers it:
the proxies registered under --resolver-prefix, else this proxy itself (its
--advertise-client-url). Clients that sync their endpoints from the member
list (clientv3's AutoSyncInterval) thus stay on the proxies instead of going
around them to the etcd members. Other Cluster methods are passed through."""

from twisted.internet import defer
from zope.interface import implementer

from etcdproxy.grpc.server import ICallHandler
from etcdproxy.grpc.status import GRPCError, StatusCode
from etcdproxy.pb.etcdserverpb import rpc_pb2
from etcdproxy.services.registration import hostname

MEMBER_LIST_PATH = b"/etcdserverpb.Cluster/MemberList"


@implementer(ICallHandler)
class MemberListCall:
    def __init__(self, advertise, registration=None):
        self.advertise = advertise
        self.registration = registration
        self.call = None
        self._done = False

    def call_started(self, call):
        self.call = call

    def request_received(self, message):
        pass  # MemberListRequest has nothing that changes the answer

    @defer.inlineCallbacks
    def half_closed(self):
        members = []
        if self.registration is not None:
            try:
                members = yield self.registration.members()
            except GRPCError as e:
                self._finish(e.code, e.message)
                return
        if not members:  # no proxy registered yet: this one
            members = [rpc_pb2.Member(name=hostname(), clientURLs=[self.advertise])]
        if not self._done:
            self.call.send_message(rpc_pb2.MemberListResponse(members=members).SerializeToString())
            self._finish(StatusCode.OK, "")

    def _finish(self, code, message):
        if not self._done:
            self._done = True
            self.call.finish(code, message)

    def call_cancelled(self, error):
        self._done = True

    def call_draining(self):
        pass  # answered soon
