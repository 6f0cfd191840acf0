"""HTTP/2 (gRPC) and HTTP/1.1 on one port, told apart by the connection's first bytes.

An HTTP/2 client starts with the fixed connection preface; anything else is
HTTP/1.1 (etcd serves /health and /metrics next to gRPC on its client port too).
The listener also bounds what a connection costs before it is anything: it
must say what it is within ``handshake_timeout`` seconds (TLS handshake
included), and at most ``max_connections`` may be open at once (0: no limit);
one more is closed at once.
"""

from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


class _Sniffer(Protocol):
    def __init__(self, factory, addr):
        self.factory = factory
        self.addr = addr
        self.inner = None
        self._buffer = b""
        self._timer = None

    def connectionMade(self):
        self.factory.open += 1
        self._timer = self.factory.reactor.callLater(self.factory.handshake_timeout, self._too_slow)

    def _too_slow(self):
        self._timer = None
        self.transport.abortConnection()

    def dataReceived(self, data):
        if self.inner is not None:
            self.inner.dataReceived(data)
            return
        self._buffer += data
        head = self._buffer[:len(PREFACE)]
        if head == PREFACE:
            chosen = self.factory.h2_factory
        elif PREFACE.startswith(head):
            return  # undecided yet
        else:
            chosen = self.factory.http1_factory
        self._cancel_timer()
        self.inner = chosen.buildProtocol(self.addr)
        if self.inner is None:
            self.transport.loseConnection()
            return
        self.inner.makeConnection(self.transport)
        data, self._buffer = self._buffer, b""
        self.inner.dataReceived(data)

    def _cancel_timer(self):
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def connectionLost(self, reason):
        self.factory.open -= 1
        self._cancel_timer()
        if self.inner is not None:
            self.inner.connectionLost(reason)


class SniffingFactory(Factory):
    _log = Logger()

    def __init__(self, h2_factory, http1_factory, reactor, handshake_timeout=10.0, max_connections=0):
        self.h2_factory = h2_factory
        self.http1_factory = http1_factory
        self.reactor = reactor
        self.handshake_timeout = handshake_timeout
        self.max_connections = max_connections
        self.open = 0
        self.refused = 0  # connections over max_connections

    def buildProtocol(self, addr):
        if self.max_connections and self.open >= self.max_connections:
            self.refused += 1
            if self.refused == 1 or self.refused % 1000 == 0:
                self._log.warn("{count} connection(s) refused: --max-connections {limit} reached",
                               count=self.refused, limit=self.max_connections)
            return None  # closed at once
        return _Sniffer(self, addr)
