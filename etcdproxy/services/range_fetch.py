"""One Range sent to etcd on behalf of any number of identical client requests
(in-flight coalescing), sent again elsewhere when its endpoint fails.

Each waiter is told ``answered(response_bytes)`` or ``failed(GRPCError)``; all
get the same. When the last waiter leaves, the upstream call is cancelled.
"""

from etcdproxy.grpc.status import GRPCError, StatusCode
from etcdproxy.services.forward import RETRY_DELAYS

RANGE_PATH = b"/etcdserverpb.KV/Range"


class RangeFetch:
    def __init__(self, monitor, request, metadata, timeout, on_done):
        self.monitor = monitor
        self.request = request  # bytes, as the first waiter sent it
        self.metadata = metadata
        self.timeout = timeout
        self.on_done = on_done  # on_done(fetch, response bytes or GRPCError)
        self.waiters = []
        self.detached = False  # new requests no longer join it
        self.started_at = None  # the cache's state when it was sent (see RangeCache)
        self._deferred = None
        self._channel = None
        self._attempt = 0
        self._timer = None
        self._done = False

    def start(self):
        if self.timeout is not None:
            self._deadline = self.monitor.reactor.seconds() + self.timeout
        self._send(())

    def leave(self, waiter):
        if waiter in self.waiters:
            self.waiters.remove(waiter)
        if not self.waiters and not self._done:
            self._done = True
            self.detached = True
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            if self._deferred is not None:
                deferred, self._deferred = self._deferred, None
                deferred.cancel()
            self.on_done(self, None)

    def _send(self, avoid):
        self._timer = None
        try:
            self._channel = self.monitor.pick(avoid)
        except GRPCError as e:
            self._finish(e)
            return
        timeout = None
        if self.timeout is not None:
            timeout = max(0.0, self._deadline - self.monitor.reactor.seconds())
        self._deferred = self._channel.unary_call(RANGE_PATH, self.request, self.metadata, timeout)
        self._deferred.addCallbacks(self._answered, self._error)

    def _answered(self, response):
        self._deferred = None
        self._finish(response)

    def _error(self, failure):
        self._deferred = None
        if self._done:
            return None  # cancelled: every waiter left
        error = failure.value
        if not isinstance(error, GRPCError):
            error = GRPCError(StatusCode.INTERNAL, str(error))
        if error.code == StatusCode.UNAVAILABLE and self._attempt < len(RETRY_DELAYS):
            # Range only reads: sending it again changes nothing in etcd.
            delay = RETRY_DELAYS[self._attempt]
            if self.timeout is None or self._deadline - self.monitor.reactor.seconds() > delay:
                self._attempt += 1
                self._timer = self.monitor.reactor.callLater(delay, self._send, (self._channel,))
                return None
        self._finish(error)
        return None

    def _finish(self, result):
        if self._done:
            return
        self._done = True
        self.detached = True
        self.on_done(self, result)
        waiters, self.waiters = self.waiters, []
        for waiter in waiters:
            if isinstance(result, GRPCError):
                waiter.failed(result)
            else:
                waiter.answered(result)
