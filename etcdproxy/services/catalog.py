"""Every method of the etcd v3 API that the proxy serves, read from the protos
(etcd's own services, and the gRPC health service etcd serves beside them)."""

from etcdproxy.grpc.status import GRPCError, StatusCode
from etcdproxy.pb.etcdserverpb import rpc_pb2
from etcdproxy.pb.healthpb import health_pb2
from etcdproxy.pb.v3electionpb import v3election_pb2
from etcdproxy.pb.v3lockpb import v3lock_pb2

_FILES = (rpc_pb2, v3election_pb2, v3lock_pb2, health_pb2)

# {b"etcdserverpb.KV": {b"Range", b"Put", ...}, ...}
SERVICES = {
    service.full_name.encode(): frozenset(m.name.encode() for m in service.methods)
    for module in _FILES
    for service in module.DESCRIPTOR.services_by_name.values()
}


def _kind(method):
    if method.client_streaming and method.server_streaming:
        return "bidi_stream"
    if method.client_streaming:
        return "client_stream"
    if method.server_streaming:
        return "server_stream"
    return "unary"


# Each method's cardinality, as grpc-go's metrics name it.
METHOD_KINDS = {
    b"/%s/%s" % (service.full_name.encode(), method.name.encode()): _kind(method)
    for module in _FILES
    for service in module.DESCRIPTOR.services_by_name.values()
    for method in service.methods
}

METHOD_PATHS = frozenset(METHOD_KINDS)


# The services etcd defines itself: a method of one that the proxy does not know
# (one of a newer etcd, e.g. Maintenance/Downgrade in 3.5) is relayed to etcd as
# bytes, so that etcd answers it. The health service is the proxy's own.
ETCD_SERVICES = frozenset(name for name in SERVICES if not name.startswith(b"grpc."))


def is_newer_etcd_method(path):
    """Whether ``path`` is a method of one of etcd's services that these protos
    lack: "/<service>/<method>" exactly (a path of another shape could reach a
    known method at etcd around the proxy's handling of it)."""
    parts = path.split(b"/")
    return (len(parts) == 3 and not parts[0] and parts[1] in ETCD_SERVICES and bool(parts[2])
            and path not in METHOD_PATHS)


def unmarshal_error(path, error):
    """What etcd (grpc-go) answers for a request message it cannot decode."""
    if path in UNARY_PATHS:
        return f"grpc: error unmarshalling request: {error}"
    return f"grpc: failed to unmarshal the received message {error}"


def unknown_method_error(path):
    """The UNIMPLEMENTED error etcd (grpc-go) gives for a path it does not serve."""
    service, _, method = path.lstrip(b"/").partition(b"/")
    service_name = service.decode("utf-8", "replace")
    if service not in SERVICES or not method:
        return GRPCError(StatusCode.UNIMPLEMENTED, f"unknown service {service_name}")
    return GRPCError(
        StatusCode.UNIMPLEMENTED,
        f"unknown method {method.decode('utf-8', 'replace')} for service {service_name}",
    )


# Paths of the methods with one request and one response message.
UNARY_PATHS = frozenset(path for path, kind in METHOD_KINDS.items() if kind == "unary")

# Unary methods that only read: repeating one changes nothing in etcd, so a
# call whose outcome is unknown may be sent again.
READ_ONLY_PATHS = frozenset([
    b"/etcdserverpb.KV/Range",
    b"/etcdserverpb.Maintenance/Status",
    b"/etcdserverpb.Maintenance/Hash",
    b"/etcdserverpb.Maintenance/HashKV",
    b"/etcdserverpb.Cluster/MemberList",
    b"/etcdserverpb.Lease/LeaseTimeToLive",
    b"/etcdserverpb.Lease/LeaseLeases",
    b"/etcdserverpb.Auth/UserGet",
    b"/etcdserverpb.Auth/UserList",
    b"/etcdserverpb.Auth/RoleGet",
    b"/etcdserverpb.Auth/RoleList",
    b"/v3electionpb.Election/Leader",
])
assert READ_ONLY_PATHS <= UNARY_PATHS
