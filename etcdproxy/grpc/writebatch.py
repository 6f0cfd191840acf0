"""Writing each connection once per batch of work.

Work on one connection (a response arriving from etcd) queues output on
others (the client's); they are all written at the start of the next reactor
turn, after every read of this one.
"""

from twisted.logger import Logger

from etcdproxy.grpc.perreactor import PerReactor


class WriteBatch(PerReactor):
    """The connections with output pending on one reactor (``WriteBatch.of(reactor)``).

    A connection joins with `add` and is written by its ``_flush_now()``;
    `enter`/`leave` bracket a read.
    """

    _log = Logger()

    def __init__(self, reactor):
        super().__init__(reactor)
        self.depth = 0
        self.pending = []
        self._call = None

    def enter(self):
        self.depth += 1

    def leave(self):
        # Not written yet: the reactor may have more reads ready from this same
        # poll (64 clients' requests for one upstream connection). Everything
        # is written once they are all handled, at the start of the next
        # reactor turn: one write per connection per turn, not one per read.
        self.depth -= 1
        if self.depth == 0 and self.pending and self._call is None:
            self._call = self.reactor.callLater(0, self.write_all)

    def add(self, protocol):
        self.pending.append(protocol)
        if self.depth == 0 and self._call is None:
            self._call = self.reactor.callLater(0, self.write_all)

    def write_all(self):
        self._call = None
        pending = self.pending
        while pending:
            protocol = pending.pop()
            try:
                protocol._flush_now()
            except Exception:
                # A bug on one connection must not skip the others' writes nor
                # surface in whichever connection's read is running.
                self._log.failure("writing to {peer} failed; connection aborted",
                                  peer=protocol.transport.getPeer())
                protocol.transport.abortConnection()
