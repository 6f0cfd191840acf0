"""A TCP relay on loopback whose connections a test can reset (RST) at will:
an upstream connection broken mid-stream while the server itself stays up."""

import select
import socket
import struct
import threading

from tests.support.ports import free_port


class TCPRelay:
    """Forwards 127.0.0.1:<port> to ``target`` ("host:port"), a thread per
    connection; stop() ends them all."""

    def __init__(self, target):
        host, port = target.rsplit(":", 1)
        self.target = (host, int(port))
        self.port = free_port()
        self.address = "127.0.0.1:%d" % self.port
        self.accepted = 0
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", self.port))
        self._listener.listen(64)
        self._pairs = []
        self._lock = threading.Lock()
        self._stopped = False
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def _accept(self):
        while not self._stopped:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self.accepted += 1
                self._pairs.append((client, server))
            t = threading.Thread(target=self._pump, args=(client, server), daemon=True)
            t.start()
            self._threads.append(t)

    def _pump(self, a, b):
        peer = {a: b, b: a}
        try:
            while not self._stopped:
                ready, _, _ = select.select([a, b], [], [], 0.5)
                for s in ready:
                    data = s.recv(65536)
                    if not data:
                        return
                    peer[s].sendall(data)
        except (OSError, ValueError):
            pass
        finally:
            self._close((a, b), reset=False)

    def _close(self, pair, reset):
        with self._lock:
            if pair in self._pairs:
                self._pairs.remove(pair)
        for s in pair:
            try:
                if reset:  # SO_LINGER 0: close() sends RST, not FIN
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                s.close()
            except OSError:
                pass

    @property
    def connections(self):
        """How many connections it relays now."""
        with self._lock:
            return len(self._pairs)

    def reset_all(self):
        """Resets every relayed connection, both ways; returns how many."""
        with self._lock:
            pairs = list(self._pairs)
        for pair in pairs:
            self._close(pair, reset=True)
        return len(pairs)

    def stop(self):
        self._stopped = True
        self._listener.close()
        self.reset_all()
        for t in self._threads:
            t.join(2)
