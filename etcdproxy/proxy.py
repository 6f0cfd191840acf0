"""Which handler serves each etcd method."""

from etcdproxy.services.catalog import METHOD_PATHS, unknown_method_error
from etcdproxy.services.forward import ForwardedCall
from etcdproxy.services.lease import KEEPALIVE_PATH, ResumableKeepAlive
from etcdproxy.services.watch import WATCH_PATH, ResumableWatch


class ProxyRouter:
    def __init__(self, upstream):
        self.upstream = upstream

    def __call__(self, path):
        if path not in METHOD_PATHS:
            raise unknown_method_error(path)
        if path == WATCH_PATH:
            return ResumableWatch(self.upstream)
        if path == KEEPALIVE_PATH:
            return ResumableKeepAlive(self.upstream)
        return ForwardedCall(self.upstream)
