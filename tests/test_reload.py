"""SIGHUP: a changed endpoint list (--endpoints-file) and renewed TLS
certificates take effect, with no client error and no client connection dropped."""

import os
import shutil
import signal
import socket
import ssl
import tempfile
import threading
import time

import grpc

from tests.support.certs import PKI
from tests.support.etcd import EtcdCluster
from tests.support.grpcio import R, Stream, Stubs
from tests.support.proxy import ProxyProcess
from tests.support.stubs import load_stubs
from tests.support.targets import ClassFixtureTestCase


class ReloadTests(ClassFixtureTestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(prefix="etcdproxy-test-reload-")
        cls.addClassCleanup(shutil.rmtree, cls.tmp, True)
        cls.etcd = EtcdCluster(size=3)
        cls.etcd.start()
        cls.addClassCleanup(cls.etcd.stop)
        cls.member_ids = []
        for endpoint in cls.etcd.endpoints:
            stubs = Stubs(endpoint)
            cls.member_ids.append(stubs.maint.Status(R.StatusRequest()).header.member_id)
            stubs.close()

    def proxy(self, *args):
        proxy = ProxyProcess([], extra_args=args)
        proxy.start()
        self.addCleanup(proxy.stop)
        return proxy

    def test_endpoint_list_switches_without_client_error(self):
        path = os.path.join(self.tmp, "endpoints")
        with open(path, "w") as f:
            f.write("# the proxy's etcd\n%s\n" % self.etcd.endpoints[0])
        proxy = self.proxy("--endpoints-file", path)
        stubs = Stubs(proxy.address)
        self.addCleanup(stubs.close)
        key = b"/reload/k"
        watch = Stream(stubs.watch.Watch)
        self.addCleanup(watch.close)
        watch.send(R.WatchRequest(create_request=R.WatchCreateRequest(key=key)))
        self.assertTrue(watch.recv().created)
        answered_by, errors, stop = [], [], threading.Event()

        def reads():
            while not stop.is_set():
                try:
                    answered_by.append(stubs.kv.Range(R.RangeRequest(key=key)).header.member_id)
                except grpc.RpcError as e:
                    errors.append((e.code(), e.details()))
                time.sleep(0.005)

        reader = threading.Thread(target=reads, daemon=True)
        reader.start()
        self.addCleanup(stop.set)
        time.sleep(0.5)
        with open(path, "w") as f:
            f.write("%s, %s\n" % (self.etcd.endpoints[1], self.etcd.endpoints[2]))
        reloaded = len(answered_by)
        os.kill(proxy.proc.pid, signal.SIGHUP)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and (
                len(answered_by) <= reloaded + 50 or answered_by[-1] == self.member_ids[0]):
            time.sleep(0.1)
        stop.set()
        reader.join(10)
        self.assertEqual(errors, [], proxy.log()[-5000:])
        self.assertEqual(set(answered_by[:reloaded]), {self.member_ids[0]})
        self.assertIn(answered_by[-1], self.member_ids[1:], "still on the old member")
        # The watch went on too (its upstream stream moved once the old
        # member's connection closed, 5 s after the reload).
        time.sleep(6)
        revision = Stubs(self.etcd.endpoints[1]).kv.Put(R.PutRequest(key=key, value=b"v")).header.revision
        self.assertEqual([e.kv.mod_revision for e in watch.recv(10).events], [revision])
        self.assertIsNone(watch.error)
        self.assertIn("etcd endpoints reloaded", proxy.log())

    def test_tls_certificate_renewed(self):
        pki = PKI(os.path.join(self.tmp, "pki"))
        ca = pki.ca("ca")
        old, new = (pki.issue(ca, name, ["127.0.0.1"]) for name in ("old", "new"))
        cert, key = os.path.join(self.tmp, "cert.pem"), os.path.join(self.tmp, "key.pem")
        shutil.copy(old.cert, cert)
        shutil.copy(old.key, key)
        proxy = self.proxy("--endpoints", self.etcd.endpoints[0], "--cert-file", cert, "--key-file", key)
        with open(ca.cert, "rb") as f:
            credentials = grpc.ssl_channel_credentials(f.read())
        channel = grpc.secure_channel(proxy.address, credentials)
        self.addCleanup(channel.close)
        kv = load_stubs().KVStub(channel)
        kv.Range(R.RangeRequest(key=b"/reload/tls"), timeout=10)
        self.assertEqual(self.served_serial(proxy, ca), old.certificate.serial_number)
        shutil.copy(new.cert, cert)
        shutil.copy(new.key, key)
        os.kill(proxy.proc.pid, signal.SIGHUP)
        deadline = time.monotonic() + 10
        while self.served_serial(proxy, ca) != new.certificate.serial_number:
            self.assertLess(time.monotonic(), deadline, "the new certificate is not served")
            time.sleep(0.1)
        kv.Range(R.RangeRequest(key=b"/reload/tls"), timeout=10)  # the old connection still works

    @staticmethod
    def served_serial(proxy, ca):
        from cryptography import x509

        host, port = proxy.address.rsplit(":", 1)
        context = ssl.create_default_context(cafile=ca.cert)
        context.set_alpn_protocols(["h2"])
        with socket.create_connection((host, int(port)), timeout=5) as raw:
            with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                return x509.load_der_x509_certificate(tls.getpeercert(binary_form=True)).serial_number
