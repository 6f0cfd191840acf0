"""grpc.health.v1.Health, answered by the proxy from its own state, as etcd
answers it for itself (it sets the status of service "" only).

Service "" is SERVING while some etcd endpoint is healthy and the proxy is not
shutting down, NOT_SERVING otherwise. Any other name is unknown, as grpc-go's
health server answers for a name never set: Check fails with NOT_FOUND
"unknown service", Watch sends SERVICE_UNKNOWN. Watch sends the status at once
and again at each change; when the proxy shuts down it sends NOT_SERVING and
ends with UNAVAILABLE, so that the client moves to another proxy.
"""

from google.protobuf.message import DecodeError
from zope.interface import implementer

from etcdproxy.grpc.server import ICallHandler
from etcdproxy.grpc.status import StatusCode
from etcdproxy.pb.healthpb import health_pb2
from etcdproxy.services.catalog import unmarshal_error

CHECK_PATH = b"/grpc.health.v1.Health/Check"
WATCH_PATH = b"/grpc.health.v1.Health/Watch"

_Status = health_pb2.HealthCheckResponse
_ANSWERS = {status: _Status(status=status).SerializeToString()
            for status in (_Status.SERVING, _Status.NOT_SERVING, _Status.SERVICE_UNKNOWN)}


def _service(message):
    """The service a request asks about; raises DecodeError."""
    return health_pb2.HealthCheckRequest.FromString(message).service


@implementer(ICallHandler)
class _HealthCall:
    def __init__(self, monitor):
        self.monitor = monitor
        self.call = None

    def call_started(self, call):
        self.call = call

    def status(self):
        """The status of service "" now."""
        if self.monitor.healthy and not self.call.server_draining:
            return _Status.SERVING
        return _Status.NOT_SERVING

    def half_closed(self):
        pass

    def call_cancelled(self, error):
        pass

    def call_draining(self):
        pass


class HealthCheckCall(_HealthCall):
    _request = None

    def request_received(self, message):
        self._request = message

    def half_closed(self):
        # What etcd (grpc-go) answers for no request, or a malformed one.
        if self._request is None:
            self.call.finish(StatusCode.UNKNOWN, "EOF")
            return
        try:
            service = _service(self._request)
        except DecodeError as e:
            self.call.finish(StatusCode.INTERNAL, unmarshal_error(CHECK_PATH, e))
            return
        if service:
            self.call.finish(StatusCode.NOT_FOUND, "unknown service")
        else:
            self.call.send_message(_ANSWERS[self.status()])
            self.call.finish()


class HealthWatchCall(_HealthCall):
    _sent = None  # the status last sent
    _watching = False  # service "": its changes are sent

    def request_received(self, message):
        if self._sent is not None:
            return  # one request per call
        try:
            service = _service(message)
        except DecodeError as e:
            self.call.finish(StatusCode.INTERNAL, unmarshal_error(WATCH_PATH, e))
            return
        if service:
            self._send(_Status.SERVICE_UNKNOWN)  # and nothing more: no one sets it
        else:
            self._watching = True
            self._send(self.status())
            self.monitor.observe_health(self._changed)
            self.call.when_ended(lambda: self.monitor.ignore_health(self._changed))

    def half_closed(self):
        if self._sent is None:
            self.call.finish(StatusCode.UNKNOWN, "EOF")  # no request, as etcd answers

    def _changed(self, healthy):
        self._send(self.status())

    def _send(self, status):
        if status != self._sent:
            self._sent = status
            self.call.send_message(_ANSWERS[status])

    def call_draining(self):
        if self._watching:
            self._send(_Status.NOT_SERVING)
        self.call.finish(StatusCode.UNAVAILABLE, "proxy shutting down")
