"""Registration of the proxy in etcd (--resolver-prefix, --resolver-ttl,
--advertise-client-url), in the format etcd's Go client naming package reads.

The proxy puts ``<prefix>/<advertised address>`` with the value
``{"Op": 0, "Addr": <address>, "Metadata": "{\\"name\\": <hostname>}"}``, under a
lease of --resolver-ttl seconds that it keeps alive every TTL/3 on its own
keep-alive stream. If the lease is lost (etcd unreachable past the TTL), the
proxy registers again as soon as it can. On shutdown it revokes the lease, so
its entry goes at once; a proxy that dies leaves it for at most the TTL.
"""

import json
import socket

from google.protobuf.message import DecodeError
from twisted.application import service
from twisted.internet import defer, task
from twisted.logger import Logger

from etcdproxy.grpc.status import GRPCError
from etcdproxy.pb.etcdserverpb import rpc_pb2
from etcdproxy.services.keys import prefix_end
from etcdproxy.upstream.stream import UpstreamStream

GRANT = b"/etcdserverpb.Lease/LeaseGrant"
REVOKE = b"/etcdserverpb.Lease/LeaseRevoke"
KEEPALIVE = b"/etcdserverpb.Lease/LeaseKeepAlive"
PUT = b"/etcdserverpb.KV/Put"
RANGE = b"/etcdserverpb.KV/Range"
CALL_TIMEOUT = 5.0
RETRY_DELAY = 1.0


def hostname():
    return socket.gethostname()


def entry(address):
    """The value etcd's naming package stores for an address (grpc naming.Update)."""
    return json.dumps({"Op": 0, "Addr": address, "Metadata": json.dumps({"name": hostname()})},
                      separators=(",", ":"))


class Registration(service.Service):
    name = "registration"
    _log = Logger()

    def __init__(self, monitor, prefix, address, ttl):
        self.monitor = monitor
        self.prefix = prefix.rstrip("/")
        self.address = address
        self.ttl = ttl
        self.lease = None
        self._stream = None
        self._refresher = task.LoopingCall(self._keep_alive)
        self._refresher.clock = monitor.reactor
        self._retry = None

    @property
    def key(self):
        return f"{self.prefix}/{self.address}".encode()

    def startService(self):
        super().startService()
        self._stream = UpstreamStream(self.monitor, KEEPALIVE, (), self)
        self._register()

    @defer.inlineCallbacks
    def _register(self):
        self._retry = None
        try:
            grant = yield self._call(GRANT, rpc_pb2.LeaseGrantRequest(TTL=self.ttl), rpc_pb2.LeaseGrantResponse)
            yield self._call(PUT, rpc_pb2.PutRequest(key=self.key, value=entry(self.address).encode(),
                                                     lease=grant.ID), rpc_pb2.PutResponse)
        except GRPCError as e:
            if self.running:
                self._log.warn("registration under {prefix} failed ({error}); trying again",
                               prefix=self.prefix, error=e.message)
                self._retry = self.monitor.reactor.callLater(RETRY_DELAY, self._register)
            return
        if not self.running:
            return
        self.lease = grant.ID
        self._log.info("registered as {address} under {prefix} (lease {lease:x}, TTL {ttl} s)",
                       address=self.address, prefix=self.prefix, lease=self.lease, ttl=self.ttl)
        if not self._stream.is_open and not self._stream.closed:
            self._stream.open()
        if not self._refresher.running:
            self._refresher.start(self.ttl / 3.0, now=False)

    def _call(self, method, request, response_type):
        channel = self.monitor.pick()
        d = channel.unary_call(method, request.SerializeToString(), (), CALL_TIMEOUT)
        return d.addCallback(response_type.FromString)

    def _keep_alive(self):
        if self.lease is not None:
            self._stream.send(rpc_pb2.LeaseKeepAliveRequest(ID=self.lease).SerializeToString())

    # IUpstreamStreamOwner
    def stream_opened(self, stream):
        self._keep_alive()

    def message_received(self, message):
        answer = rpc_pb2.LeaseKeepAliveResponse.FromString(message)
        if answer.ID == self.lease and answer.TTL <= 0 and self.running and self._retry is None:
            self._log.warn("registration lease {lease:x} lost; registering again", lease=self.lease)
            self.lease = None
            self._register()

    def stream_failed(self, error):
        self._stream = UpstreamStream(self.monitor, KEEPALIVE, (), self)
        if self.running:
            self._retry = self.monitor.reactor.callLater(RETRY_DELAY, self._reopen)

    def _reopen(self):
        self._retry = None
        self._stream.open()

    @defer.inlineCallbacks
    def stopService(self):
        super().stopService()
        if self._refresher.running:
            self._refresher.stop()
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._stream.close()
        if self.lease is not None:
            lease, self.lease = self.lease, None
            try:  # deregister: the entry goes with the lease
                yield self._call(REVOKE, rpc_pb2.LeaseRevokeRequest(ID=lease), rpc_pb2.LeaseRevokeResponse)
            except GRPCError as e:
                self._log.warn("could not revoke registration lease: {error}", error=e.message)

    @defer.inlineCallbacks
    def client_urls(self):
        """The addresses of the proxies registered under the prefix, this one's
        when none is (yet): a Deferred list of strings."""
        prefix = (self.prefix + "/").encode()
        try:
            answer = yield self._call(RANGE, rpc_pb2.RangeRequest(key=prefix, range_end=prefix_end(prefix)),
                                      rpc_pb2.RangeResponse)
        except (GRPCError, DecodeError) as e:
            self._log.warn("registered proxies could not be read ({error}): answering this one",
                           error=getattr(e, "message", e))
            return [self.address]
        urls = []
        for kv in answer.kvs:
            try:
                urls.append(str(json.loads(kv.value)["Addr"]))
            except (ValueError, KeyError, TypeError):
                continue  # not an entry of this format
        return urls or [self.address]
