"""Which handler serves each etcd method."""

from etcdproxy.services.catalog import METHOD_PATHS, unknown_method_error
from etcdproxy.services.forward import ForwardedCall


class ProxyRouter:
    def __init__(self, upstream):
        self.upstream = upstream

    def __call__(self, path):
        if path not in METHOD_PATHS:
            raise unknown_method_error(path)
        return ForwardedCall(self.upstream)
