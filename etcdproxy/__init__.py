"""etcdgrpcproxy: an etcd v3 gRPC proxy on Twisted."""

__version__ = "0.1.0"
