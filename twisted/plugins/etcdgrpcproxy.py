# A drop-in only: options and service construction live in etcdproxy.tap, so that
# importing this file (as twistd's plugin scan does) imports no reactor.
from twisted.application.service import ServiceMaker

etcdgrpcproxy = ServiceMaker(
    "etcd gRPC proxy",
    "etcdproxy.tap",
    "An etcd v3 gRPC proxy: coalesces watches and lease keep-alives, caches reads.",
    "etcdgrpcproxy",
)
