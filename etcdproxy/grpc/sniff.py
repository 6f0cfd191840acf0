"""HTTP/2 (gRPC) and HTTP/1.1 on one port, told apart by the connection's first bytes.

An HTTP/2 client starts with the fixed connection preface; anything else is
HTTP/1.1 (etcd serves /health and /metrics next to gRPC on its client port too).
"""

from twisted.internet.protocol import Factory, Protocol

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


class _Sniffer(Protocol):
    def __init__(self, factory, addr):
        self.factory = factory
        self.addr = addr
        self.inner = None
        self._buffer = b""

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
        self.inner = chosen.buildProtocol(self.addr)
        if self.inner is None:
            self.transport.loseConnection()
            return
        self.transport.protocol = self.inner  # transports that keep one talk to it directly
        self.inner.makeConnection(self.transport)
        data, self._buffer = self._buffer, b""
        self.inner.dataReceived(data)

    def connectionLost(self, reason):
        if self.inner is not None:
            self.inner.connectionLost(reason)


class SniffingFactory(Factory):
    def __init__(self, h2_factory, http1_factory):
        self.h2_factory = h2_factory
        self.http1_factory = http1_factory

    def buildProtocol(self, addr):
        return _Sniffer(self, addr)
