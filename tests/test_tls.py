"""TLS on both sides, with certificates made in the test setup.

etcd serves its clients over TLS and requires client certificates; the proxy
reaches it with --cacert/--cert/--key, and serves its own clients over TLS with
client certificates required (--trusted-ca-file) and a CRL. etcdctl and grpcio
connect to the proxy over TLS; what must be refused is refused.
"""

import os
import shutil
import socket
import ssl
import tempfile
import threading

import grpc

from tests.support.certs import PKI
from tests.support.etcd import EtcdCluster
from tests.support.etcdctl import etcdctl
from tests.support.grpcio import R, Stream, rpc_error
from tests.support.proxy import ProxyProcess
from tests.support.stubs import load_stubs
from tests.support.targets import ClassFixtureTestCase

CALL_TIMEOUT = 10


def secure_stubs(address, ca, identity=None, options=()):
    pb2_grpc = load_stubs()
    chain = identity.pem() if identity else (None, None)
    with open(ca.cert, "rb") as f:
        root = f.read()
    credentials = grpc.ssl_channel_credentials(root, chain[1], chain[0])
    channel = grpc.secure_channel(address, credentials, options=options)
    return channel, pb2_grpc.KVStub(channel), pb2_grpc.WatchStub(channel)


class TLSTests(ClassFixtureTestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(prefix="etcdproxy-test-tls-")
        cls.addClassCleanup(shutil.rmtree, cls.tmp, True)
        pki = cls.pki = PKI(cls.tmp)
        cls.ca = pki.ca("ca")
        cls.other_ca = pki.ca("other-ca")
        cls.etcd_server = pki.issue(cls.ca, "etcd-server", ["127.0.0.1"])
        cls.proxy_server = pki.issue(cls.ca, "proxy-server", ["127.0.0.1", "localhost"])
        cls.proxy_client = pki.issue(cls.ca, "proxy-client", [], client=True)
        cls.client = pki.issue(cls.ca, "client", [], client=True)
        cls.revoked = pki.issue(cls.ca, "revoked", [], client=True)
        cls.stranger = pki.issue(cls.other_ca, "stranger", [], client=True)
        cls.crl = pki.crl(cls.ca, [cls.revoked])
        cls.etcd = EtcdCluster(tls=(cls.ca.cert, cls.etcd_server.cert, cls.etcd_server.key))
        cls.etcd.start()
        cls.addClassCleanup(cls.etcd.stop)
        cls.proxy = cls.start_proxy(
            "--cert-file", cls.proxy_server.cert, "--key-file", cls.proxy_server.key,
            "--trusted-ca-file", cls.ca.cert, "--client-crl-file", cls.crl)

    @classmethod
    def start_proxy(cls, *args, endpoints=None):
        endpoints = endpoints or ["https://" + e for e in cls.etcd.tls_endpoints]
        proxy = ProxyProcess(endpoints, extra_args=[
            "--cacert", cls.ca.cert, "--cert", cls.proxy_client.cert, "--key", cls.proxy_client.key,
            *args])
        proxy.start()
        cls.addClassCleanup(proxy.stop)
        return proxy

    def stubs(self, identity, address=None, ca=None):
        channel, kv, watch = secure_stubs(address or self.proxy.address, ca or self.ca, identity)
        self.addCleanup(channel.close)
        return kv, watch

    def test_grpcio_and_a_watch_over_tls_both_sides(self):
        kv, watch = self.stubs(self.client)
        key = b"/tls/grpcio"
        stream = Stream(watch.Watch)
        self.addCleanup(stream.close)
        stream.send(R.WatchRequest(create_request=R.WatchCreateRequest(key=key)))
        self.assertTrue(stream.recv(CALL_TIMEOUT).created)
        revision = kv.Put(R.PutRequest(key=key, value=b"v"), timeout=CALL_TIMEOUT).header.revision
        self.assertEqual(kv.Range(R.RangeRequest(key=key), timeout=CALL_TIMEOUT).kvs[0].value, b"v")
        self.assertEqual([e.kv.mod_revision for e in stream.recv(CALL_TIMEOUT).events], [revision])

    def test_etcdctl_over_tls(self):
        tls = ["--cacert", self.ca.cert, "--cert", self.client.cert, "--key", self.client.key]
        endpoint = "https://" + self.proxy.address
        etcdctl(endpoint, *tls, "put", "/tls/etcdctl", "hello")
        out = etcdctl(endpoint, *tls, "get", "/tls/etcdctl", "--print-value-only").stdout
        self.assertEqual(out.strip(), "hello")

    def assertEtcdRefused(self, proxy, mismatch):
        """Calls through ``proxy`` get UNAVAILABLE: it refused etcd's certificate."""
        channel = grpc.insecure_channel(proxy.address)
        self.addCleanup(channel.close)
        kv = load_stubs().KVStub(channel)
        code, details = rpc_error(kv.Range, R.RangeRequest(key=b"/tls/x"), timeout=5)
        self.assertEqual(code, grpc.StatusCode.UNAVAILABLE, details)
        self.assertIn(mismatch, proxy.log())

    def refused(self, identity, ca=None, address=None):
        kv, _ = self.stubs(identity, address=address, ca=ca)
        return rpc_error(kv.Range, R.RangeRequest(key=b"/tls/x"), timeout=5)

    def test_client_certificates_are_required_and_checked(self):
        for who in (None, self.stranger, self.revoked):
            code, details = self.refused(who)
            self.assertEqual(code, grpc.StatusCode.UNAVAILABLE, (who and who.name, details))
        code, details = self.refused(self.client, ca=self.other_ca)  # the proxy is not trusted
        self.assertEqual(code, grpc.StatusCode.UNAVAILABLE, details)

    def test_plaintext_to_the_tls_port_is_refused(self):
        channel = grpc.insecure_channel(self.proxy.address)
        self.addCleanup(channel.close)
        kv = load_stubs().KVStub(channel)
        code, _ = rpc_error(kv.Range, R.RangeRequest(key=b"/tls/x"), timeout=5)
        self.assertEqual(code, grpc.StatusCode.UNAVAILABLE)

    def test_tls_below_the_minimum_version_is_refused(self):
        host, port = self.proxy.address.rsplit(":", 1)
        context = ssl.create_default_context(cafile=self.ca.cert)
        context.load_cert_chain(self.client.cert, self.client.key)
        context.minimum_version = ssl.TLSVersion.TLSv1
        context.maximum_version = ssl.TLSVersion.TLSv1_1
        context.set_ciphers("ALL:@SECLEVEL=0")
        with socket.create_connection((host, int(port)), timeout=5) as raw:
            with self.assertRaises(ssl.SSLError):
                context.wrap_socket(raw, server_hostname="127.0.0.1").do_handshake()
        # and TLS 1.2 with ALPN h2 is what it speaks
        context.minimum_version = context.maximum_version = ssl.TLSVersion.TLSv1_2
        context.set_alpn_protocols(["h2"])
        with socket.create_connection((host, int(port)), timeout=5) as raw:
            with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                self.assertEqual(tls.selected_alpn_protocol(), "h2")

    def test_etcd_whose_certificate_does_not_match_the_endpoint_is_refused(self):
        # "localhost" is not in etcd's certificate (127.0.0.1 is)
        port = self.etcd.tls_endpoints[0].rsplit(":", 1)[1]
        proxy = self.start_proxy(endpoints=["https://localhost:" + port])
        self.assertEtcdRefused(proxy, "DNSMismatch")
        # unless told not to check
        proxy = self.start_proxy("--insecure-skip-tls-verify", endpoints=["https://localhost:" + port])
        channel = grpc.insecure_channel(proxy.address)
        self.addCleanup(channel.close)
        kv = load_stubs().KVStub(channel)
        self.assertEqual(kv.Range(R.RangeRequest(key=b"/tls/none"), timeout=CALL_TIMEOUT).count, 0)

    def test_auto_tls(self):
        data_dir = os.path.join(self.tmp, "auto")
        proxy = self.start_proxy("--auto-tls", "--data-dir", data_dir)
        generated = os.path.join(data_dir, "fixtures", "proxy", "cert.pem")
        self.assertTrue(os.path.exists(generated))

        class Generated:
            cert = generated
        kv, _ = self.stubs(None, address=proxy.address, ca=Generated)
        self.assertEqual(kv.Range(R.RangeRequest(key=b"/tls/none"), timeout=CALL_TIMEOUT).count, 0)

    def test_cipher_suites_and_maximum_version(self):
        proxy = self.start_proxy(
            "--cert-file", self.proxy_server.cert, "--key-file", self.proxy_server.key,
            "--listen-cipher-suites", "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384",
            "--tls-max-version", "TLS1.2")
        host, port = proxy.address.rsplit(":", 1)

        def handshake(cipher=None, version=ssl.TLSVersion.TLSv1_2):
            context = ssl.create_default_context(cafile=self.ca.cert)
            context.minimum_version = context.maximum_version = version
            if cipher:
                context.set_ciphers(cipher)
            with socket.create_connection((host, int(port)), timeout=5) as raw:
                with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                    return tls.cipher()[0]

        self.assertEqual(handshake(), "ECDHE-ECDSA-AES256-GCM-SHA384")
        with self.assertRaises(ssl.SSLError):
            handshake("ECDHE-ECDSA-AES128-GCM-SHA256")
        with self.assertRaises(ssl.SSLError):
            handshake(version=ssl.TLSVersion.TLSv1_3)

    def test_etcd_whose_certificate_lacks_the_endpoints_ip_is_refused(self):
        """A TLS server at 127.0.0.1 whose certificate names 10.0.0.1 only."""
        wrong = self.pki.issue(self.ca, "wrong-ip", ["10.0.0.1"])
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(wrong.cert, wrong.key)
        context.set_alpn_protocols(["h2"])
        listener = socket.create_server(("127.0.0.1", 0))
        self.addCleanup(listener.close)
        listener.settimeout(10)

        def serve():  # a few handshakes (the proxy's health checks and the call)
            try:
                for _ in range(3):
                    connection, _ = listener.accept()
                    with connection:
                        try:
                            context.wrap_socket(connection, server_side=True).close()
                        except (ssl.SSLError, OSError):
                            pass  # the proxy refuses the certificate
            except OSError:
                pass  # listener closed or timed out

        server = threading.Thread(target=serve, daemon=True)
        server.start()
        port = listener.getsockname()[1]
        proxy = self.start_proxy(endpoints=["https://127.0.0.1:%d" % port])
        self.assertEtcdRefused(proxy, "IPAddressMismatch")
