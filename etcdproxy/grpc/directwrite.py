"""Writing to a TCP connection at once, when nothing waits before it.

Twisted's ``transport.write`` never sends: it buffers, asks the reactor to
watch the socket for writability (an epoll_ctl), sends on the next poll, and
stops watching once its buffer is empty (another epoll_ctl). A unary call
through the proxy writes once to its client, so this is two system calls and
one more poll event per call: a tenth of the proxy's CPU under load (measured
with strace: 2.1 epoll_ctl per proxied Put).

`DirectWriter` sends what the socket takes now, with Twisted's own
``writeSomeData``, when the transport's buffer is empty (so bytes stay in
order), and hands the rest to ``transport.write`` as before: a peer that does
not read fills Twisted's buffer, which pauses the producers as it always did.
Errors are left to Twisted (the data goes to ``transport.write``, and the
reactor finds the broken socket). Data over what Twisted sends in one go
(``SEND_LIMIT``, 128 KiB) goes to ``transport.write`` whole: sending its start
here would leave a copy of the rest for Twisted's buffer (a 5 MB answer: a
copy of 4.9 MB), where Twisted sends from the object it is given. Only plain TCP transports of the releases
it was written against take it: TLS (the proxy's, wrapped around the transport,
or one started on it) goes through Twisted's own path.
"""

from twisted.internet import tcp

_PLAIN_TCP = (tcp.Server, tcp.Client)
_NEEDED = ("writeSomeData", "SEND_LIMIT", "dataBuffer", "offset", "_tempDataLen", "connected", "disconnecting",
           "_writeDisconnected", "_aborting", "TLS")


def _direct_possible(transport):
    return type(transport) in _PLAIN_TCP and all(hasattr(transport, name) for name in _NEEDED)


class DirectWriter:
    """``write(data)`` for one transport: sent at once when possible."""

    __slots__ = ("transport", "direct_bytes", "_direct")

    def __init__(self, transport):
        self.transport = transport
        self.direct_bytes = 0  # sent without Twisted's buffer (tests, and a look with a debugger)
        self._direct = _direct_possible(transport)

    def write(self, data):
        transport = self.transport
        if not self._direct:
            transport.write(data)
            return
        # (TLS started on the transport itself encrypts in its write: not here)
        # (an aborted connection stays "connected" until its connectionLost: Twisted
        # would drop what is written meanwhile, so it gets it)
        if (transport.connected and not transport.disconnecting and not transport._writeDisconnected
                and not transport._aborting and not transport.TLS and not transport._tempDataLen
                and len(transport.dataBuffer) == transport.offset and len(data) <= transport.SEND_LIMIT):
            sent = transport.writeSomeData(data)
            if type(sent) is int and sent > 0:
                self.direct_bytes += sent
                if sent == len(data):
                    return
                data = data[sent:]
        transport.write(data)
