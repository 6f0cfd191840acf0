"""Floods and idle connections, each ended politely without hurting other
clients: HTTP/2 rapid reset (CVE-2023-44487), PING and SETTINGS floods
(GOAWAY ENHANCE_YOUR_CALM), a connection that never says what it is (closed
after --handshake-timeout), connections over --max-connections (closed at once)."""

import socket
import time

from h2.errors import ErrorCodes

from tests.support.grpcio import R, Stubs
from tests.support.proxy import ProxyProcess
from tests.support.rawh2 import H2Client, grpc_frame, read_until_closed
from tests.support.targets import EtcdProxyTestCase

WATCH = "/etcdserverpb.Watch/Watch"
RANGE = "/etcdserverpb.KV/Range"


class FloodTests(EtcdProxyTestCase):
    proxy_args = ("--handshake-timeout", "1")

    def assertServes(self, address=None):
        stubs = Stubs(address or self.proxied)
        try:
            self.assertEqual(stubs.kv.Range(R.RangeRequest(key=b"/floods/x")).count, 0)
        finally:
            stubs.close()

    def until_terminated(self, raw, timeout=10):
        deadline = time.monotonic() + timeout
        while raw.terminated is None and not raw.eof and time.monotonic() < deadline:
            raw._pump(0.2)
        self.assertIsNotNone(raw.terminated, "no GOAWAY")
        return raw.terminated.error_code

    def test_rapid_reset(self):
        raw = H2Client(self.proxied)
        self.addCleanup(raw.close)
        for _ in range(1500):  # open and reset at once, as the attack does
            sid = raw.conn.get_next_available_stream_id()
            raw.conn.send_headers(sid, [(":method", "POST"), (":scheme", "http"), (":path", WATCH),
                                        (":authority", self.proxied), ("content-type", "application/grpc")])
            raw.conn.reset_stream(sid)
        try:
            raw.flush()
        except OSError:
            pass
        self.assertEqual(self.until_terminated(raw), ErrorCodes.ENHANCE_YOUR_CALM)
        self.assertServes()

    def test_ping_flood(self):
        raw = H2Client(self.proxied)
        self.addCleanup(raw.close)
        try:
            for _ in range(12):
                for i in range(1000):
                    raw.conn.ping(i.to_bytes(8, "big"))
                raw.flush()
        except OSError:
            pass  # closed by the proxy meanwhile
        self.assertEqual(self.until_terminated(raw), ErrorCodes.ENHANCE_YOUR_CALM)
        self.assertServes()

    def test_ping_is_answered_at_once_when_nothing_else_goes(self):
        # The proxy lets PING ACKs wait up to 50 ms for other output to go with.
        raw = H2Client(self.proxied)
        self.addCleanup(raw.close)
        raw.flush()
        raw._pump(0.2)
        start = time.monotonic()
        raw.conn.ping(b"12345678")
        raw.flush()
        deadline = start + 5
        while not raw.ping_acks and time.monotonic() < deadline:
            raw._pump(deadline - time.monotonic())
        self.assertEqual([p for p, _ in raw.ping_acks], [b"12345678"])
        self.assertLess(raw.ping_acks[0][1] - start, 0.5)

    def test_ping_ack_goes_no_later_than_the_answer_to_a_call(self):
        raw = H2Client(self.proxied)
        self.addCleanup(raw.close)
        raw.conn.ping(b"abcdefgh")
        r = raw.call(RANGE, grpc_frame(R.RangeRequest(key=b"/floods/y").SerializeToString()))
        self.assertEqual(r.status[0], 0)
        deadline = time.monotonic() + 5
        while not raw.ping_acks and time.monotonic() < deadline:
            raw._pump(deadline - time.monotonic())
        self.assertEqual([p for p, _ in raw.ping_acks], [b"abcdefgh"])

    def test_settings_flood(self):
        raw = H2Client(self.proxied)
        self.addCleanup(raw.close)
        try:
            for i in range(300):
                raw.conn.update_settings({0x4: 65535 + i})  # INITIAL_WINDOW_SIZE
            raw.flush()
        except OSError:
            pass
        self.assertEqual(self.until_terminated(raw), ErrorCodes.ENHANCE_YOUR_CALM)
        self.assertServes()

    def test_silent_connection_is_closed_after_the_handshake_timeout(self):
        host, port = self.proxied.rsplit(":", 1)
        s = socket.create_connection((host, int(port)), timeout=5)
        self.addCleanup(s.close)
        started = time.monotonic()
        closed, data = read_until_closed(s, 5)
        self.assertTrue(closed)
        self.assertEqual(data, b"")
        self.assertLess(time.monotonic() - started, 3)
        self.assertServes()

    def test_connections_over_the_limit_are_closed_at_once(self):
        proxy = ProxyProcess(self.etcd.endpoints, extra_args=["--max-connections", "4"])
        proxy.start()
        self.addCleanup(proxy.stop)
        time.sleep(0.5)  # the start-up probe's connection is closed
        clients = []
        for _ in range(4):  # four served connections
            c = H2Client(proxy.address)
            self.addCleanup(c.close)
            r = c.call(RANGE, grpc_frame(R.RangeRequest(key=b"/floods/x").SerializeToString()))
            self.assertEqual(r.status, (0, ""))
            clients.append(c)
        host, port = proxy.address.rsplit(":", 1)
        extra = socket.create_connection((host, int(port)), timeout=5)
        self.addCleanup(extra.close)
        started = time.monotonic()
        closed, _ = read_until_closed(extra, 3)
        self.assertTrue(closed, "a fifth connection stayed open")
        self.assertLess(time.monotonic() - started, 1)
        for c in clients[:2]:
            c.close()
        time.sleep(0.3)
        self.assertServes(proxy.address)
        self.assertIn("--max-connections 4 reached", proxy.log())
