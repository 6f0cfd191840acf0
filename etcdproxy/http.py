"""HTTP/1.1 endpoints: /metrics, /health and /proxy/health (as etcd's proxy serves them).

- /health: a Get of the key "health" through an etcd endpoint, within 1 s;
  healthy also when etcd refuses it for lack of permission (auth on), as etcd says.
- /proxy/health: the proxy checks itself through its own listen address, a Get
  and a watch, as etcd 3.5's proxy does.
Both answer {"health": "true"|"false", "reason": ...}, with 503 when not healthy.
"""

import json

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from twisted.internet import defer
from twisted.web import resource, server

from etcdproxy.grpc.status import GRPCError, StatusCode
from etcdproxy.pb.etcdserverpb import rpc_pb2

RANGE = b"/etcdserverpb.KV/Range"
WATCH = b"/etcdserverpb.Watch/Watch"
CHECK_TIMEOUT = 1.0
IDLE_TIMEOUT = 60  # seconds an idle HTTP/1.1 connection stays open


class MetricsResource(resource.Resource):
    isLeaf = True

    def __init__(self, registry):
        super().__init__()
        self.registry = registry

    def render_GET(self, request):
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode())
        return generate_latest(self.registry)


class HealthResource(resource.Resource):
    """Answers with what ``check()`` (a Deferred firing with None when healthy,
    else a reason) finds."""

    isLeaf = True

    def __init__(self, check):
        super().__init__()
        self.check = check

    def render_GET(self, request):
        d = defer.maybeDeferred(self.check)
        d.addErrback(lambda failure: failure.getErrorMessage() or repr(failure.value))
        d.addCallback(self._answer, request)
        return server.NOT_DONE_YET

    def _answer(self, reason, request):
        if request._disconnected:
            return
        request.setResponseCode(200 if reason is None else 503)
        request.setHeader(b"content-type", b"application/json")
        request.write(json.dumps({"health": "true" if reason is None else "false",
                                  "reason": reason or ""}).encode())
        request.finish()


def _get(channel, metadata=()):
    request = rpc_pb2.RangeRequest(key=b"health").SerializeToString()
    return channel.unary_call(RANGE, request, metadata, CHECK_TIMEOUT)


def _refused_for_permission(failure):
    failure.trap(GRPCError)
    if failure.value.code == StatusCode.PERMISSION_DENIED:
        return None  # etcd answered: healthy
    return failure


def check_upstream(monitor):
    try:
        channel = monitor.pick()
    except GRPCError as e:
        return defer.succeed(e.message)
    d = _get(channel)
    d.addCallback(lambda _: None)
    d.addErrback(_refused_for_permission)
    return d


class _FirstWatchResponse:
    """Listens to a Watch call until its "created" answer."""

    def __init__(self):
        self.deferred = defer.Deferred()

    def headers_received(self, metadata):
        pass

    def response_received(self, message):
        if not self.deferred.called:
            self.deferred.callback(rpc_pb2.WatchResponse.FromString(message))

    def call_finished(self, error, metadata):
        if not self.deferred.called:
            self.deferred.errback(error or GRPCError(StatusCode.UNKNOWN, "watch ended"))


@defer.inlineCallbacks
def check_proxy(channel):
    """A Get and a watch through the proxy's own listen address (``channel``)."""
    try:
        yield _get(channel).addErrback(_refused_for_permission)
        listener = _FirstWatchResponse()
        call = channel.start_call(WATCH, (), listener, CHECK_TIMEOUT)
        call.send_message(rpc_pb2.WatchRequest(
            create_request=rpc_pb2.WatchCreateRequest(key=b"health")).SerializeToString())
        try:
            answer = yield listener.deferred
        finally:
            call.cancel()
        if not answer.created:  # (refused by etcd, e.g. auth on: etcd answered all the same)
            return "watch: no created answer"
    except GRPCError as e:
        return f"{e.code.name}: {e.message}"
    return None


def make_site(registry, monitor, self_channel, access_log=False):
    """The HTTP/1.1 site; ``access_log`` (--debug) logs each request."""
    root = resource.Resource()
    root.putChild(b"metrics", MetricsResource(registry))
    root.putChild(b"health", HealthResource(lambda: check_upstream(monitor)))
    proxy = resource.Resource()
    proxy.putChild(b"health", HealthResource(lambda: check_proxy(self_channel)))
    root.putChild(b"proxy", proxy)
    site = server.Site(root, timeout=IDLE_TIMEOUT)
    site.noisy = False
    if not access_log:
        site.log = lambda request: None
    return site
