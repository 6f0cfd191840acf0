"""grpcio stubs for etcd's services, for tests.

Only the ``*_pb2_grpc.py`` modules are generated (at first use, into a
temporary dir); the message modules are the committed ``etcdproxy.pb.*`` ones,
since registering the same .proto file twice in protobuf's default pool fails.
"""
import os
import re
import shutil
import sys
import tempfile
import threading
import types

from tests.support.proxy import REPO_ROOT

__all__ = ["load_stubs", "STUB_NAMES"]

PROTO_DIR = os.path.join(REPO_ROOT, "protos")
PROTOS = [
    "etcdserverpb/rpc.proto",
    "mvccpb/kv.proto",
    "authpb/auth.proto",
    "v3lockpb/v3lock.proto",
    "v3electionpb/v3election.proto",
    "healthpb/health.proto",
]
PACKAGES = ("etcdserverpb", "mvccpb", "authpb", "v3lockpb", "v3electionpb", "healthpb")
STUB_NAMES = ("KVStub", "WatchStub", "LeaseStub", "ClusterStub", "MaintenanceStub",
              "AuthStub", "ElectionStub", "LockStub", "HealthStub")
_IMPORT = re.compile(r"^from (%s) import " % "|".join(PACKAGES), re.M)

_lock = threading.Lock()
_cached = None


def _generate(outdir):
    from grpc_tools import protoc
    args = ["grpc_tools.protoc", "-I" + PROTO_DIR, "--grpc_python_out=" + outdir] + \
        [os.path.join(PROTO_DIR, p) for p in PROTOS]
    rc = protoc.main(args)
    if rc != 0:
        raise RuntimeError("grpc_tools.protoc failed (%s): %s" % (rc, args))


def _load(path, modname):
    with open(path) as f:
        src = f.read()
    src = _IMPORT.sub(lambda m: "from etcdproxy.pb.%s import " % m.group(1), src)
    mod = types.ModuleType(modname)
    mod.__file__ = path
    sys.modules[modname] = mod
    exec(compile(src, path, "exec"), mod.__dict__)
    return mod


def load_stubs():
    """A namespace with the nine ``*Stub`` classes (also servicers and
    ``add_*Servicer_to_server``), the grpc modules (``rpc_pb2_grpc``,
    ``v3election_pb2_grpc``, ``v3lock_pb2_grpc``) and the message modules
    (``rpc_pb2``, ``kv_pb2``, ``auth_pb2``, ``v3election_pb2``, ``v3lock_pb2``,
    ``health_pb2``).
    Cached per process."""
    global _cached
    with _lock:
        if _cached is not None:
            return _cached
        from etcdproxy.pb.etcdserverpb import rpc_pb2
        from etcdproxy.pb.mvccpb import kv_pb2
        from etcdproxy.pb.authpb import auth_pb2
        from etcdproxy.pb.v3electionpb import v3election_pb2
        from etcdproxy.pb.v3lockpb import v3lock_pb2
        from etcdproxy.pb.healthpb import health_pb2
        ns = types.SimpleNamespace(rpc_pb2=rpc_pb2, kv_pb2=kv_pb2, auth_pb2=auth_pb2,
                                   v3election_pb2=v3election_pb2, v3lock_pb2=v3lock_pb2,
                                   health_pb2=health_pb2)
        tmp = tempfile.mkdtemp(prefix="etcdproxy-test-stubs-")
        try:
            _generate(tmp)
            for pkg, name in (("etcdserverpb", "rpc"), ("v3electionpb", "v3election"),
                              ("v3lockpb", "v3lock"), ("healthpb", "health")):
                mod = _load(os.path.join(tmp, pkg, name + "_pb2_grpc.py"),
                            "tests.support._generated.%s.%s_pb2_grpc" % (pkg, name))
                setattr(ns, name + "_pb2_grpc", mod)
                for attr, val in vars(mod).items():
                    if attr.endswith(("Stub", "Servicer")) or (
                            attr.startswith("add_") and attr.endswith("_to_server")):
                        setattr(ns, attr, val)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        missing = [n for n in STUB_NAMES if not hasattr(ns, n)]
        if missing:
            raise RuntimeError("stubs missing after generation: %s" % missing)
        _cached = ns
        return ns
