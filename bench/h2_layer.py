#!/usr/bin/env python3
"""CPU per proxied unary call spent in this proxy's gRPC layer, in memory.

One proxied call as the proxy runs it: a client's HEADERS + DATA arrive on a
`GRPCServerProtocol`, a relaying handler starts the upstream call on a
`GRPCClientProtocol`, the upstream answers (headers, message, trailers), the
answer goes back to the client, and the WINDOW_UPDATEs and PINGs of grpc-go
peers come and go. Both peers are plain h2 connections, and only the time spent
inside the proxy's two protocols is counted (their dataReceived and the batched
writes), so the figure is the gRPC layer's cost per call with no sockets, no
etcd and no noise from other processes.

    .venv/bin/python bench/h2_layer.py [--calls N] [--reps R] [--profile] [--plain]

--plain runs with the HTTP/2 fast path turned off (plain h2 for every frame), so
the two can be compared in one run; --profile prints cProfile's top functions.
"""

import argparse
import cProfile
import os
import pstats
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from h2.config import H2Configuration  # noqa: E402
from h2.connection import H2Connection  # noqa: E402
from h2.events import DataReceived, PingReceived, StreamEnded  # noqa: E402
from twisted.internet import defer, task  # noqa: E402
from twisted.internet.testing import StringTransport  # noqa: E402

from etcdproxy.grpc import h2fast, h2internals  # noqa: E402
from etcdproxy.grpc.client import NO_LISTENER, Channel  # noqa: E402
from etcdproxy.grpc.connection import Limits  # noqa: E402
from etcdproxy.grpc.framing import encode_message  # noqa: E402
from etcdproxy.grpc.server import GRPCServerFactory  # noqa: E402
from tests.support.relay import RelayHandler  # noqa: E402

METHOD = b"/etcdserverpb.KV/Put"
REQUEST = b"\x0a\x10" + b"k" * 16 + b"\x12" + bytes([0x80, 0x02]) + b"v" * 256  # a PutRequest's size
RESPONSE = b"\x0a\x1a" + b"h" * 26  # a PutResponse's size
CLIENT_HEADERS = [(b":method", b"POST"), (b":scheme", b"http"), (b":path", METHOD),
                  (b":authority", b"127.0.0.1:2379"), (b"content-type", b"application/grpc"),
                  (b"user-agent", b"grpc-go/1.26.0"), (b"te", b"trailers")]
UPSTREAM_HEADERS = [(b":status", b"200"), (b"content-type", b"application/grpc")]
UPSTREAM_TRAILERS = [(b"grpc-status", b"0"), (b"grpc-message", b"")]


def plain_h2(client_side):
    conn = H2Connection(H2Configuration(
        client_side=client_side, header_encoding=None, validate_inbound_headers=False,
        validate_outbound_headers=False, normalize_inbound_headers=False,
        normalize_outbound_headers=False))
    conn.initiate_connection()
    return conn


class MemoryEndpoint:
    def __init__(self, clock):
        self.transports = []

    def connect(self, factory):
        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        self.transports.append(transport)
        return defer.succeed(protocol)


class Setup:
    def __init__(self):
        self.clock = task.Clock()
        self.endpoint = MemoryEndpoint(self.clock)
        self.channel = Channel(self.clock, self.endpoint, b"127.0.0.1:2379", Limits(), keepalive_interval=0)
        factory = GRPCServerFactory(lambda path: RelayHandler(self.channel), self.clock, Limits())
        self.server = factory.buildProtocol(None)
        self.server_transport = StringTransport()
        self.server.makeConnection(self.server_transport)
        self.client_peer = plain_h2(True)
        self.upstream_peer = plain_h2(False)
        self.proxy_seconds = 0.0
        self.profiler = None  # profiles only the proxy's own work
        # Connection prefaces and settings.
        self._to_server(self.client_peer.data_to_send())
        self.client_peer.receive_data(self._take(self.server_transport))
        self._to_server(self.client_peer.data_to_send())
        self.channel.start_call(METHOD, (), NO_LISTENER).cancel()  # connects the upstream connection
        self.upstream = self.channel._protocol
        self.upstream_transport = self.endpoint.transports[0]
        self._exchange_upstream()

    @staticmethod
    def _take(transport):
        data = transport.value()
        transport.clear()
        return data

    def _timed(self, fn, data):
        profiler = self.profiler
        if profiler is not None:
            profiler.enable()
        t = time.perf_counter()
        fn(data)
        self.clock.advance(0)  # the batched writes
        self.proxy_seconds += time.perf_counter() - t
        if profiler is not None:
            profiler.disable()

    def _to_server(self, data):
        if data:
            self._timed(self.server.dataReceived, data)

    def _to_upstream_protocol(self, data):
        if data:
            self._timed(self.upstream.dataReceived, data)

    def _exchange_upstream(self):
        for _ in range(3):
            data = self._take(self.upstream_transport)
            if data:
                self._answer_upstream(self.upstream_peer.receive_data(data))
            self._to_upstream_protocol(self.upstream_peer.data_to_send())

    def _answer_upstream(self, events):
        peer = self.upstream_peer
        for event in events:
            if isinstance(event, DataReceived):
                # grpc-go: a WINDOW_UPDATE for the connection and a BDP ping.
                peer.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                peer.ping(b"\x00" * 8)
            if isinstance(event, StreamEnded):
                sid = event.stream_id
                peer.send_headers(sid, UPSTREAM_HEADERS)
                peer.send_data(sid, encode_message(RESPONSE))
                peer.send_headers(sid, UPSTREAM_TRAILERS, end_stream=True)

    def one_call(self):
        peer = self.client_peer
        sid = peer.get_next_available_stream_id()
        peer.send_headers(sid, CLIENT_HEADERS)
        peer.send_data(sid, encode_message(REQUEST), end_stream=True)
        self._to_server(peer.data_to_send())
        self._exchange_upstream()
        for event in peer.receive_data(self._take(self.server_transport)):
            if isinstance(event, DataReceived):
                peer.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                peer.ping(b"\x00" * 8)
            if isinstance(event, PingReceived):
                pass
        self._to_server(peer.data_to_send())
        self.clock.advance(0.1)  # held PING ACKs and batch timers
        self._exchange_upstream()
        peer.receive_data(self._take(self.server_transport))


def run(calls, profile=False):
    setup = Setup()
    for _ in range(200):  # warm-up: HPACK tables and caches filled
        setup.one_call()
    setup.proxy_seconds = 0.0
    setup.profiler = cProfile.Profile() if profile else None
    for _ in range(calls):
        setup.one_call()
    if setup.profiler:
        pstats.Stats(setup.profiler).sort_stats("tottime").print_stats(45)
    if setup.server.streams or setup.upstream.streams:
        raise SystemExit("calls left open: the exchange is broken")
    return setup.proxy_seconds / calls


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--plain", action="store_true", help="the fast path off")
    args = parser.parse_args()
    if args.plain:
        h2fast.FAST_PATH_ENABLED = False
    figures = [run(args.calls, args.profile) for _ in range(args.reps)]
    mode = "plain h2" if args.plain or not h2internals.supported() else "fast path"
    print(f"gRPC layer, one proxied unary call ({mode}): median {statistics.median(figures) * 1e6:.1f} us "
          f"(runs: {', '.join('%.1f' % (f * 1e6) for f in figures)})")


if __name__ == "__main__":
    main()
