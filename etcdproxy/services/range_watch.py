"""The range cache's invalidation watch: one watcher at etcd on the whole
keyspace, so that writes made anywhere (other clients, other proxies, lease
expiry) invalidate the cache.

It tells its cache (`RangeCache`):
- ``watch_up(revision)``: the watcher is created at etcd; it reports every
  change after ``revision``;
- ``keys_changed(keys, revision)``: these keys changed, up to ``revision``;
- ``watch_down()``: changes may be missed from now on (stream lost, watcher
  cancelled or refused): the cache must empty and stop filling.

A watcher is always created from "now" (the cache empties when it goes down, so
there is nothing to resume). Without ``credentials`` it is tokenless: with etcd
auth enabled, etcd refuses it, and the cache stays down (it is tried again every
few seconds). With ``credentials`` (user, password: a user who may read every
key), the proxy authenticates before each new stream and watches with that
token; if etcd says auth is not enabled, it watches tokenless.

It also answers ``probe_anonymous()``: a watch create on one key, tokenless, at
once cancelled; etcd refuses it when auth is enabled, which tells the cache
that answers cached without a token must go (``anonymous_allowed(bool)``).
"""

import collections

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from etcdproxy.grpc.status import GRPCError
from etcdproxy.pb.etcdserverpb import rpc_pb2
from etcdproxy.services.broadcast import WATCH_PATH
from etcdproxy.upstream.stream import IUpstreamStreamOwner, UpstreamStream

AUTHENTICATE_PATH = b"/etcdserverpb.Auth/Authenticate"
AUTH_NOT_ENABLED = "etcdserver: authentication is not enabled"
RECREATE_DELAY = 2.0  # after etcd refused or cancelled the watcher
RESTART_DELAY = 5.0  # after the stream failed for good
_PROBE_IDS = 1 << 40  # watch ids of probes start here


@implementer(IUpstreamStreamOwner)
class InvalidationWatch:
    _log = Logger()

    def __init__(self, monitor, cache, credentials=None):
        self.monitor = monitor
        self.cache = cache
        self.credentials = credentials
        self.with_token = False  # the stream carries the credentials' token
        self._authenticating = None
        self.stream = None
        self.watch_id = 0  # of the current watcher
        self.created = False
        self._next_id = 1
        self._next_probe = _PROBE_IDS
        self._timer = None
        self._creating = collections.deque()  # ids of the creates etcd has not answered, in order

    @property
    def healthy(self):
        """Whether every change is being seen now."""
        return self.created and self.stream is not None and self.stream.is_open

    def start(self):
        self._timer = None
        if self.credentials is None:
            self._open(())
            return
        user, password = self.credentials
        request = rpc_pb2.AuthenticateRequest(name=user, password=password).SerializeToString()
        try:
            channel = self.monitor.pick()
        except GRPCError as e:
            self._authenticated(Failure(e))
            return
        self._authenticating = channel.unary_call(AUTHENTICATE_PATH, request, (), 5.0)
        self._authenticating.addBoth(self._authenticated)

    def _authenticated(self, result):
        self._authenticating = None
        if isinstance(result, Failure):
            if result.check(defer.CancelledError):
                return None
            message = getattr(result.value, "message", str(result.value))
            if message == AUTH_NOT_ENABLED:
                self._open(())
                return None
            self._log.warn("range cache: cannot authenticate for the invalidation watch ({error}); "
                           "cache off", error=message)
            self._timer = self.monitor.reactor.callLater(RESTART_DELAY, self.start)
            return None
        token = rpc_pb2.AuthenticateResponse.FromString(result).token
        self._open(((b"token", token.encode()),))
        return None

    def _open(self, metadata):
        self.with_token = bool(metadata)
        if self.with_token:
            # etcd auth is on: answers without a token are never cached (etcd
            # refuses them anyway), and a probe on this stream would carry the token
            self.cache.anonymous_allowed(False)
        self.stream = UpstreamStream(self.monitor, WATCH_PATH, metadata, self)
        self.stream.open()

    def stop(self):
        if self._authenticating is not None:
            self._authenticating.cancel()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.stream is not None:
            self.stream.close()
            self.stream = None
        self._down()

    def probe_anonymous(self):
        if not self.healthy or self.with_token:
            return
        probe_id = self._next_probe
        self._next_probe += 1
        self._creating.append(probe_id)
        self.stream.send(rpc_pb2.WatchRequest(create_request=rpc_pb2.WatchCreateRequest(
            key=b"\0", watch_id=probe_id)).SerializeToString())

    # -- IUpstreamStreamOwner -----------------------------------------------------------

    def stream_opened(self, stream):
        self._creating.clear()
        self._down()  # a new stream: what happened while none was open is unknown
        self._create()

    def message_received(self, message):
        response = rpc_pb2.WatchResponse.FromString(message)
        if response.created and self._creating:
            # etcd answers creates in order; a refused one says watch id -1
            response.watch_id = self._creating.popleft()
        if response.watch_id >= _PROBE_IDS:
            self._probe_answered(response)
            return
        if response.watch_id != self.watch_id:
            return  # an older watcher, cancelled
        if response.canceled:
            self._log.info("range cache: invalidation watch ended by etcd ({reason}); cache off",
                           reason=response.cancel_reason or f"compacted at {response.compact_revision}")
            self._down()
            if self.credentials is not None:  # e.g. auth enabled since, or the token expired
                self.stream.close()
                self.stream = None
                self._timer = self.monitor.reactor.callLater(RECREATE_DELAY, self.start)
                return
            self._timer = self.monitor.reactor.callLater(
                0 if response.compact_revision else RECREATE_DELAY, self._create)
            return
        if response.created:
            self.created = True
            self.cache.watch_up(response.header)
            return
        if response.events:
            self.cache.keys_changed([event.kv.key for event in response.events],
                                    response.events[-1].kv.mod_revision, response.header)

    def stream_failed(self, error):
        self._log.info("range cache: invalidation watch lost ({error}); cache off", error=error.message)
        self.stream = None
        self._down()
        self._timer = self.monitor.reactor.callLater(RESTART_DELAY, self.start)

    # -- internals ----------------------------------------------------------------------

    def _create(self):
        self._timer = None
        if self.stream is None or not self.stream.is_open:
            return  # stream_opened creates it
        self.watch_id = self._next_id
        self._next_id += 1
        self._creating.append(self.watch_id)
        self.stream.send(rpc_pb2.WatchRequest(create_request=rpc_pb2.WatchCreateRequest(
            key=b"\0", range_end=b"\0", watch_id=self.watch_id)).SerializeToString())

    def _down(self):
        self.created = False
        self.cache.watch_down()

    def _probe_answered(self, response):
        if response.created and not response.canceled:
            self.stream.send(rpc_pb2.WatchRequest(cancel_request=rpc_pb2.WatchCancelRequest(
                watch_id=response.watch_id)).SerializeToString())
            self.cache.anonymous_allowed(True)
        elif response.canceled and response.created:
            self.cache.anonymous_allowed(False)
