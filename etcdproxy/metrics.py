"""The proxy's own metrics, in Prometheus' format (prometheus_client).

- gRPC server calls per method and code, with handling time (the names
  grpc-go's prometheus interceptors give etcd: grpc_server_started_total,
  grpc_server_handled_total, grpc_server_handling_seconds);
- etcd's grpc-proxy names for what the proxy saves etcd
  (etcd_grpc_proxy_watchers_coalescing_total, etcd_grpc_proxy_events_coalescing_total,
  etcd_grpc_proxy_cache_*), read from the services at scrape time;
- every figure of each service's ``stats()`` as etcdgrpcproxy_<service>_<figure>,
  and the endpoint monitor's state per endpoint.
"""

import bisect

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from twisted.logger import Logger
from zope.interface import implementer

from etcdproxy.grpc.server import ICallObserver
from etcdproxy.grpc.status import StatusCode
from etcdproxy.services.catalog import METHOD_KINDS

_CODE_NAMES = {code.value: code.name.title().replace("_", "") for code in StatusCode}
_CODE_NAMES[StatusCode.OK] = "OK"


def _labels(path):
    service, _, method = path.decode("ascii", "replace").lstrip("/").partition("/")
    return METHOD_KINDS.get(path, "unknown"), service, method


def _metric_path(path):
    """The path calls are counted under: methods these protos lack (relayed
    to etcd, any name a client makes up) share one per service, so that
    clients cannot add series without bound."""
    if path in METHOD_KINDS:
        return path
    return b"/%s/unknown" % path.lstrip(b"/").partition(b"/")[0]


# grpc-go prometheus' default buckets, in seconds.
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class _MethodFigures:
    __slots__ = ("labels", "started", "handled", "buckets", "seconds")

    def __init__(self, path):
        self.labels = _labels(path)
        self.started = 0
        self.handled = {}  # code -> count
        self.buckets = [0] * (len(BUCKETS) + 1)  # the last one: above every bound
        self.seconds = 0.0


@implementer(ICallObserver)
class CallMetrics:
    """gRPC server counters per method and code, and handling time: plain
    numbers per call (prometheus_client's own counters cost several
    microseconds a call), turned into metrics when scraped."""

    def __init__(self):
        self._methods = {}  # path -> _MethodFigures

    def _figures(self, path):
        figures = self._methods.get(path)
        if figures is None:
            path = _metric_path(path)
            figures = self._methods.get(path)
            if figures is None:
                figures = self._methods[path] = _MethodFigures(path)
        return figures

    def call_started(self, method):
        (self._methods.get(method) or self._figures(method)).started += 1

    def call_ended(self, method, code, seconds):
        figures = self._methods.get(method) or self._figures(method)
        figures.handled[code] = figures.handled.get(code, 0) + 1
        figures.buckets[bisect.bisect_left(BUCKETS, seconds)] += 1
        figures.seconds += seconds

    def collect(self):
        names = ["grpc_type", "grpc_service", "grpc_method"]
        started = CounterMetricFamily("grpc_server_started", "RPCs started on the server.", labels=names)
        handled = CounterMetricFamily("grpc_server_handled", "RPCs completed on the server, by code.",
                                      labels=names + ["grpc_code"])
        seconds = HistogramMetricFamily("grpc_server_handling_seconds",
                                        "Response latency of RPCs handled by the server.", labels=names)
        for figures in list(self._methods.values()):
            labels = list(figures.labels)
            started.add_metric(labels, figures.started)
            for code, count in figures.handled.items():
                handled.add_metric(labels + [_CODE_NAMES.get(code, str(code))], count)
            cumulative, total = [], 0
            for bound, count in zip([*map(str, BUCKETS), "+Inf"], figures.buckets):
                total += count
                cumulative.append((bound, total))
            seconds.add_metric(labels, cumulative, figures.seconds)
        yield started
        yield handled
        yield seconds


class ServiceCollector:
    """Figures read from the services when scraped."""

    def __init__(self, monitor, services):
        self.monitor = monitor
        self.services = services  # the service tree: children with stats() are read

    def collect(self):
        stats = {service.name.replace("-", "_"): service.stats()
                 for service in self.services if hasattr(service, "stats")}
        watches = stats.get("watch_broadcaster")
        if watches is not None:
            yield GaugeMetricFamily(
                "etcd_grpc_proxy_watchers_coalescing_total",
                "Client watchers served by another's watcher at etcd.",
                max(0, watches["client_watchers"] - watches["shared_watchers"]))
            yield CounterMetricFamily(
                "etcd_grpc_proxy_events_coalescing",
                "Events sent to client watchers beyond those etcd sent.",
                max(0, watches["events_sent"] - watches["events_received"]))
        cache = stats.get("range_cache")
        if cache is not None:
            for figure, kind in (("keys", GaugeMetricFamily), ("hits", CounterMetricFamily),
                                 ("misses", CounterMetricFamily)):
                if figure in cache:
                    name = f"etcd_grpc_proxy_cache_{figure}"
                    yield kind(name + ("_total" if kind is GaugeMetricFamily else ""),
                               f"Range cache {figure}.", cache[figure])
        for service, figures in stats.items():
            for figure, value in figures.items():
                if isinstance(value, (int, float)):
                    yield GaugeMetricFamily(f"etcdgrpcproxy_{service}_{figure}",
                                            f"{service}: {figure.replace('_', ' ')}.", value)
        yield from self._endpoints()

    def _endpoints(self):
        snapshot = self.monitor.snapshot()
        healthy = GaugeMetricFamily("etcdgrpcproxy_endpoint_healthy",
                                    "Whether the etcd endpoint is in the pool of healthy ones.",
                                    labels=["endpoint"])
        failures = CounterMetricFamily("etcdgrpcproxy_endpoint_failures",
                                       "Times the endpoint left the pool.", labels=["endpoint"])
        for endpoint in snapshot["endpoints"]:
            healthy.add_metric([endpoint["endpoint"]], 1 if endpoint["healthy"] else 0)
            failures.add_metric([endpoint["endpoint"]], endpoint["failures"])
        yield healthy
        yield failures
        yield CounterMetricFamily("etcdgrpcproxy_failovers", "Times an endpoint left the pool.",
                                  snapshot["failovers"])


@implementer(ICallObserver)
class CallLog:
    """--debug: a log line per call."""

    _log = Logger()

    def call_started(self, method):
        pass

    def call_ended(self, method, code, seconds):
        self._log.info("call {method}: {code} in {ms:.1f} ms", method=method.decode("ascii", "replace"),
                       code=_CODE_NAMES.get(code, code), ms=seconds * 1000)


def make_registry(monitor, services):
    """(registry, call observer) for a proxy with these services (its
    service tree)."""
    registry = CollectorRegistry()
    calls = CallMetrics()
    registry.register(calls)
    registry.register(ServiceCollector(monitor, services))
    return registry, calls
