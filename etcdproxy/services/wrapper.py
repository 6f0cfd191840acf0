"""A handler in front of another one (client limits, namespaces): it passes
every event of the call on, until it refuses the call itself."""

from zope.interface import implementer

from etcdproxy.grpc.server import ICallHandler


@implementer(ICallHandler)
class WrappedCall:
    def __init__(self, handler):
        self.handler = handler
        self.call = None
        self.refused = False

    def refuse(self, code, message):
        """Ends the call with a status; the wrapped handler hears of nothing more
        (it is told the call is over if it had seen it start)."""
        self.refused = True
        if self.call is not None:
            self.handler.call_cancelled(None)
            self.call.finish(code, message)

    def call_started(self, call):
        self.call = call
        self.handler.call_started(call)

    def request_received(self, message):
        if not self.refused:
            self.handler.request_received(message)

    def half_closed(self):
        if not self.refused:
            self.handler.half_closed()

    def call_cancelled(self, error):
        if not self.refused:
            self.handler.call_cancelled(error)

    def call_draining(self):
        if not self.refused:
            self.handler.call_draining()
