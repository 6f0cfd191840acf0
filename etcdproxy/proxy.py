"""Which handler serves each etcd method."""

from etcdproxy.services.catalog import METHOD_PATHS, unknown_method_error
from etcdproxy.services.forward import ForwardedCall
from etcdproxy.services.lease import KEEPALIVE_PATH, ResumableKeepAlive
from etcdproxy.services.broadcast import WATCH_PATH, WatchBroadcaster
from etcdproxy.services.watch import WatchStream


class ProxyRouter:
    def __init__(self, upstream, watches=None):
        self.upstream = upstream  # the EndpointMonitor
        self.watches = watches or WatchBroadcaster(upstream)

    def __call__(self, path):
        if path not in METHOD_PATHS:
            raise unknown_method_error(path)
        if path == WATCH_PATH:
            return WatchStream(self.watches)
        if path == KEEPALIVE_PATH:
            return ResumableKeepAlive(self.upstream)
        return ForwardedCall(self.upstream)
