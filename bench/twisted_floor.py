#!/usr/bin/env python3
"""The floor under any Twisted server's CPU per request: a Protocol that answers
each read with one write, nothing else (no HTTP/2, no gRPC), on the reactor the
proxy runs on, with 64 clients on their own loopback connections sending a
300-byte request and waiting for the 120-byte answer, as tools/benchmark does
at c=64 (one request per read, one answer per write, sent at once as the proxy
sends, `etcdproxy.grpc.directwrite`). What the proxy does per
call above this is its own; what is under it is Twisted's reactor and the
kernel's sockets.

    .venv/bin/python bench/twisted_floor.py [--requests 100000] [--conns 64] [--reps 3]

The server is a child process (its CPU alone is counted), stopped at the end.
"""

import argparse
import os
import selectors
import signal
import socket
import statistics
import subprocess
import sys
import time

SERVER = r"""
import sys
sys.path.insert(0, sys.argv[1])
from twisted.internet import epollreactor
epollreactor.install()
from twisted.internet import reactor, protocol
from etcdproxy.grpc.directwrite import DirectWriter

class Answer(protocol.Protocol):
    def connectionMade(self):
        self.transport.setTcpNoDelay(True)
        self.write = DirectWriter(self.transport).write  # as the proxy writes

    def dataReceived(self, data):
        self.write(b"a" * 120)

factory = protocol.Factory.forProtocol(Answer)
port = reactor.listenTCP(0, factory, interface="127.0.0.1")
print(port.getHost().port, flush=True)
reactor.run()
"""


def cpu_seconds(pid):
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_load(port, conns, requests):
    selector = selectors.DefaultSelector()
    socks = []
    try:
        for _ in range(conns):
            s = socket.create_connection(("127.0.0.1", port))
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.setblocking(False)
            selector.register(s, selectors.EVENT_READ)
            socks.append(s)
        request = b"q" * 300
        for s in socks:
            s.send(request)
        sent = conns
        deadline = time.monotonic() + 120
        while sent < requests and time.monotonic() < deadline:
            for key, _ in selector.select(1.0):
                if key.fileobj.recv(65536):
                    key.fileobj.send(request)
                    sent += 1
        return sent
    finally:
        for s in socks:
            s.close()
        selector.close()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=100000)
    ap.add_argument("--conns", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    server = subprocess.Popen([sys.executable, "-c", SERVER, root], stdout=subprocess.PIPE)
    try:
        port = int(server.stdout.readline())
        figures = []
        for _ in range(args.reps):
            before = cpu_seconds(server.pid)
            done = run_load(port, args.conns, args.requests)
            figures.append((cpu_seconds(server.pid) - before) / done * 1e6)
        print("Twisted server, one read and one write per request, %d connections: "
              "median %.1f us of CPU per request (runs: %s)"
              % (args.conns, statistics.median(figures), ", ".join("%.1f" % f for f in figures)))
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


if __name__ == "__main__":
    main()
