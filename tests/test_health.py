"""grpc.health.v1.Health through the proxy: answered as etcd answers it
(service "" SERVING, other names unknown), from the proxy's own state:
NOT_SERVING while no etcd endpoint is healthy or while the proxy shuts down,
and Watch streams see each change."""

import signal

import grpc

from tests.support.etcd import EtcdCluster
from tests.support.grpcio import HEALTH, GrpcioTestCase, Stream, Stubs, rpc_error
from tests.support.proxy import ProxyProcess
from tests.support.targets import ClassFixtureTestCase

SERVING = HEALTH.HealthCheckResponse.SERVING
NOT_SERVING = HEALTH.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = HEALTH.HealthCheckResponse.SERVICE_UNKNOWN


class HealthAnswersTests(GrpcioTestCase):
    """The same answers as etcd's."""

    kind = "python"

    def test_check(self):
        request = HEALTH.HealthCheckRequest()
        self.assertEqual(self.d.health.Check(request).status, SERVING)
        self.assertEqual(self.p.health.Check(request), self.d.health.Check(request))

    def test_check_of_an_unknown_service(self):
        request = HEALTH.HealthCheckRequest(service="etcdserverpb.KV")
        direct = rpc_error(self.d.health.Check, request)
        self.assertEqual(direct, (grpc.StatusCode.NOT_FOUND, "unknown service"))
        self.assertEqual(rpc_error(self.p.health.Check, request), direct)

    def test_watch(self):
        for service, expected in (("", SERVING), ("nope", SERVICE_UNKNOWN)):
            request = HEALTH.HealthCheckRequest(service=service)
            for stubs in (self.d, self.p):
                watch = Stream(stubs.health.Watch, request)
                self.addCleanup(watch.close)
                self.assertEqual(watch.recv(5).status, expected, (stubs.address, service))
                watch.expect_nothing(0.3)

    def test_malformed_request(self):
        for path, words in (("/grpc.health.v1.Health/Check", "grpc: error unmarshalling request: "),
                            ("/grpc.health.v1.Health/Watch", "grpc: failed to unmarshal the received message ")):
            for stubs in (self.d, self.p):
                if path.endswith("Check"):
                    code, details = rpc_error(stubs.channel.unary_unary(path), b"\xff", timeout=5)
                else:
                    method = stubs.channel.unary_stream(path)
                    code, details = rpc_error(lambda: list(method(b"\xff", timeout=5)))
                # grpc-go's words, then the decoder's own (Go's or Python's)
                self.assertEqual(code, grpc.StatusCode.INTERNAL, (stubs.address, details))
                self.assertTrue(details.startswith(words), (stubs.address, details))

    def test_a_method_the_service_lacks(self):
        def call(stubs):
            method = stubs.channel.unary_unary("/grpc.health.v1.Health/List")
            return rpc_error(method, b"", timeout=5)
        self.assertEqual(call(self.p), call(self.d))


class HealthStateTests(ClassFixtureTestCase):
    """The proxy's own state: its etcd endpoint going and coming back, its shutdown."""

    def setUp(self):
        self.etcd = EtcdCluster()
        self.etcd.start()
        self.addCleanup(self.etcd.stop)
        self.proxy = ProxyProcess(self.etcd.endpoints)
        self.proxy.start()
        self.addCleanup(self.proxy.stop)
        self.stubs = Stubs(self.proxy.address)
        self.addCleanup(self.stubs.close)

    def test_watch_follows_the_endpoints_health(self):
        watch = Stream(self.stubs.health.Watch, HEALTH.HealthCheckRequest())
        self.addCleanup(watch.close)
        self.assertEqual(watch.recv(5).status, SERVING)
        self.etcd.kill(0)
        self.assertEqual(watch.recv(10).status, NOT_SERVING)
        self.assertEqual(self.stubs.health.Check(HEALTH.HealthCheckRequest()).status, NOT_SERVING)
        self.etcd.restart(0)
        self.assertEqual(watch.recv(15).status, SERVING)
        self.assertEqual(self.stubs.health.Check(HEALTH.HealthCheckRequest()).status, SERVING)
        watch.expect_nothing(0.3)

    def test_shutdown_is_not_serving(self):
        watch = Stream(self.stubs.health.Watch, HEALTH.HealthCheckRequest())
        self.addCleanup(watch.close)
        self.assertEqual(watch.recv(5).status, SERVING)
        self.proxy.proc.send_signal(signal.SIGTERM)
        self.assertEqual(watch.recv(5).status, NOT_SERVING)
        error = watch.wait_end(5)
        self.assertIsNotNone(error, "the watch ended with OK")
        self.assertEqual(error.code(), grpc.StatusCode.UNAVAILABLE)
        self.proxy.proc.wait(timeout=10)
