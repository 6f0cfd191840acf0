"""Which handler serves each etcd method."""

from twisted.internet import defer

from etcdproxy.grpc.status import GRPCError, StatusCode
from etcdproxy.services.catalog import METHOD_PATHS, is_newer_etcd_method, unknown_method_error
from etcdproxy.services.namespace import Namespace, NamespacedCall, rewrites
from etcdproxy.services.cluster import MEMBER_LIST_PATH, MemberListCall
from etcdproxy.services import health
from etcdproxy.services.forward import ForwardedCall
from etcdproxy.services.lease import REVOKE_PATH, KeepAliveStream, RevokeCall
from etcdproxy.services.lease_coalescer import KEEPALIVE_PATH, LeaseCoalescer
from etcdproxy.services.broadcast import WATCH_PATH, WatchBroadcaster
from etcdproxy.services.watch import WatchStream
from etcdproxy.services.client_limits import LimitedCall
from etcdproxy.services.range_calls import (
    AUTH_WRITES, COMPACT_PATH, KV_WRITES, RANGE_PATH, InvalidatingCall, RangeCall)

_INVALIDATING = frozenset([*KV_WRITES, COMPACT_PATH, *AUTH_WRITES])


class ProxyRouter:
    def __init__(self, upstream, watches=None, leases=None, cache=None, client_limits=None,
                 advertise="127.0.0.1:23790", registration=None, namespace=None,
                 relay_member_list=False):
        self.upstream = upstream  # the EndpointMonitor
        # MemberList's client URLs: the registered proxies' (--resolver-prefix), or this one's
        if registration is not None:
            self._client_urls = registration.client_urls
        else:
            self._client_urls = lambda: defer.succeed([advertise])
        self.relay_member_list = relay_member_list
        self.namespace = Namespace(namespace) if namespace else None
        self.watches = watches or WatchBroadcaster(upstream)
        self.leases = leases or LeaseCoalescer(upstream)
        self.cache = cache  # a RangeCache, or None: Range is relayed as it is
        self.client_limits = client_limits if client_limits is not None and client_limits.enabled else None

    def __call__(self, path):
        handler = self._handler(path)
        if self.namespace is not None:
            handler = self._namespaced(path, handler)
        if self.client_limits is not None:
            return LimitedCall(self.client_limits, handler)
        return handler

    def _namespaced(self, path, handler):
        if is_newer_etcd_method(path):
            # Its keys, if it has any, would reach etcd outside the namespace.
            raise GRPCError(StatusCode.UNIMPLEMENTED,
                            f"etcdgrpcproxy: {path.decode('utf-8', 'replace')} is not available "
                            "with --namespace")
        fixes = rewrites(self.namespace, path)
        return NamespacedCall(handler, *fixes) if fixes else handler

    def _handler(self, path):
        if path not in METHOD_PATHS:
            if is_newer_etcd_method(path):
                return ForwardedCall(self.upstream)  # etcd answers it, or refuses it itself
            raise unknown_method_error(path)
        if path == WATCH_PATH:
            return WatchStream(self.watches)
        if path == KEEPALIVE_PATH:
            return KeepAliveStream(self.leases)
        if path == REVOKE_PATH:
            return RevokeCall(self.upstream, self.leases)
        if path == health.CHECK_PATH:
            return health.HealthCheckCall(self.upstream)
        if path == health.WATCH_PATH:
            return health.HealthWatchCall(self.upstream)
        if path == MEMBER_LIST_PATH and not self.relay_member_list:
            return MemberListCall(ForwardedCall(self.upstream), self._client_urls)
        if self.cache is not None:
            if path == RANGE_PATH:
                return RangeCall(self.cache, self.upstream)
            if path in _INVALIDATING:
                return InvalidatingCall(self.upstream, self.cache)
        return ForwardedCall(self.upstream)
