"""What an operator relies on: /metrics with the proxy's own figures, /health
and /proxy/health (on the listen port and on --metrics-addr), --debug."""

import json
import urllib.error
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from tests.support.grpcio import R, Stream, Stubs
from tests.support.ports import free_port
from tests.support.proxy import ProxyProcess
from tests.support.targets import EtcdProxyTestCase

WATCHERS = 30


def get(url):
    """(status, body) of an HTTP GET."""
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def samples(text):
    """{(name, frozenset(labels)): value} of a Prometheus text page."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


class OperationsTests(EtcdProxyTestCase):
    metrics_port = free_port()
    proxy_args = ("--metrics-addr", "127.0.0.1:%d" % metrics_port, "--debug")

    def bases(self):
        return ["http://" + self.proxied, "http://127.0.0.1:%d" % self.metrics_port]

    def test_metrics_count_the_workload(self):
        stubs = Stubs(self.proxied)
        self.addCleanup(stubs.close)
        key = b"/ops/metrics"
        before = samples(get(self.bases()[0] + "/metrics")[1])
        streams = []
        for _ in range(WATCHERS):
            s = Stream(stubs.watch.Watch)
            self.addCleanup(s.close)
            s.send(R.WatchRequest(create_request=R.WatchCreateRequest(key=key)))
            self.assertTrue(s.recv().created)
            streams.append(s)
        for i in range(7):
            stubs.kv.Put(R.PutRequest(key=key, value=b"%d" % i))
        for s in streams:
            self.assertEqual(sum(len(s.recv().events) for _ in range(7)), 7)
        for base in self.bases():
            status, text = get(base + "/metrics")
            self.assertEqual(status, 200)
            after = samples(text)
            put = ("grpc_server_handled_total", frozenset({
                "grpc_type": "unary", "grpc_service": "etcdserverpb.KV", "grpc_method": "Put",
                "grpc_code": "OK"}.items()))
            self.assertEqual(after[put] - before.get(put, 0), 7)
            self.assertEqual(after[("etcd_grpc_proxy_watchers_coalescing_total", frozenset())],
                             WATCHERS - 1)
            self.assertEqual(after[("etcdgrpcproxy_watch_broadcaster_shared_watchers", frozenset())], 1)
            events = ("etcd_grpc_proxy_events_coalescing_total", frozenset())
            self.assertEqual(after[events] - before.get(events, 0), 7 * (WATCHERS - 1))
            healthy = ("etcdgrpcproxy_endpoint_healthy", frozenset({"endpoint": self.direct}.items()))
            self.assertEqual(after[healthy], 1)
        self.assertIn("call /etcdserverpb.KV/Put: OK", self.proxy.log())  # --debug

    def test_health(self):
        for base in self.bases():
            for path in ("/health", "/proxy/health"):
                status, body = get(base + path)
                self.assertEqual((status, json.loads(body)), (200, {"health": "true", "reason": ""}))

    def test_health_when_etcd_is_down(self):
        proxy = ProxyProcess(["127.0.0.1:%d" % free_port()])  # nothing listens there
        proxy.start()
        self.addCleanup(proxy.stop)
        for path in ("/health", "/proxy/health"):
            status, body = get("http://" + proxy.address + path)
            answer = json.loads(body)
            self.assertEqual((status, answer["health"]), (503, "false"), body)
            self.assertTrue(answer["reason"], body)
