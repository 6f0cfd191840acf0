"""A gRPC server as a Twisted service: listen on start, drain gracefully on stop."""

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger


class GRPCServerService(service.Service):
    _log = Logger()

    def __init__(self, endpoint, factory, drain_timeout=10.0, listen_factory=None):
        """``listen_factory``: what the endpoint listens with, when not
        ``factory`` itself (e.g. one that also serves HTTP/1.1)."""
        self.endpoint = endpoint
        self.factory = factory
        self.listen_factory = listen_factory or factory
        self.drain_timeout = drain_timeout
        self.port = None

    @defer.inlineCallbacks
    def startService(self):
        super().startService()
        self.port = yield self.endpoint.listen(self.listen_factory)
        self._log.info("serving gRPC on {address}", address=self.port.getHost())

    @defer.inlineCallbacks
    def stopService(self):
        super().stopService()
        if self.port is not None:
            yield self.port.stopListening()
            self.port = None
        yield self.factory.drain(self.drain_timeout)
