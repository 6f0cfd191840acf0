"""Floods and idle connections, each ended politely without hurting other
clients: HTTP/2 rapid reset (CVE-2023-44487), PING, SETTINGS and CONTINUATION
floods and oversized header lists (GOAWAY ENHANCE_YOUR_CALM), streams over
--max-concurrent-streams (REFUSED_STREAM, the connection goes on), a connection
that never says what it is (closed after --handshake-timeout), connections over
--max-connections (closed at once)."""

import socket
import time

from h2.errors import ErrorCodes
from hyperframe.frame import ContinuationFrame, DataFrame, HeadersFrame

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

    def header_block_start(self, raw):
        """A Range request's HEADERS frame without END_HEADERS: the block goes on."""
        sid = raw.conn.get_next_available_stream_id()
        frame = HeadersFrame(sid, flags=[])
        frame.data = raw.conn.encoder.encode([(":method", "POST"), (":scheme", "http"), (":path", RANGE),
                                              (":authority", self.proxied), ("content-type", "application/grpc")])
        return sid, frame.serialize()

    def test_continuation_flood(self):
        raw = H2Client(self.proxied)
        self.addCleanup(raw.close)
        sid, data = self.header_block_start(raw)
        try:
            raw.sock.sendall(data)
            for _ in range(1000):  # h2 alone would take 64 before it complains
                raw.sock.sendall(ContinuationFrame(sid, data=b"").serialize())
        except OSError:
            pass  # closed by the proxy meanwhile
        self.assertEqual(self.until_terminated(raw), ErrorCodes.ENHANCE_YOUR_CALM)
        self.assertServes()

    def test_oversized_header_list(self):
        for size in (20 * 1024, 100 * 1024):  # over the 16 KiB limit: decoded, or never ending
            raw = H2Client(self.proxied)
            self.addCleanup(raw.close)
            try:
                raw.request(RANGE, grpc_frame(R.RangeRequest(key=b"/floods/x").SerializeToString()),
                            extra_headers=[("x-big", "v" * size)])
            except OSError:
                pass
            self.assertEqual(self.until_terminated(raw), ErrorCodes.ENHANCE_YOUR_CALM, size)
        self.assertServes()

    def test_streams_over_the_limit_are_refused_and_the_connection_goes_on(self):
        proxy = ProxyProcess(self.etcd.endpoints, extra_args=["--max-concurrent-streams", "5"])
        proxy.start()
        self.addCleanup(proxy.stop)
        raw = H2Client(proxy.address)  # has not read the proxy's SETTINGS yet
        self.addCleanup(raw.close)
        create = grpc_frame(R.WatchRequest(create_request=R.WatchCreateRequest(
            key=b"/floods/w")).SerializeToString())
        watches = [raw.request(WATCH, create, end_stream=False) for _ in range(5)]
        # The refused requests carry a header that enters both HPACK tables.
        marked = [("x-marker", "refused-first")]
        get = grpc_frame(R.RangeRequest(key=b"/floods/x").SerializeToString())
        refused = [raw.request(RANGE, get, extra_headers=marked) for _ in range(3)]
        for sid in refused:
            self.assertEqual(raw.wait(sid).reset, ErrorCodes.REFUSED_STREAM, (raw.terminated, raw.eof, proxy.log()[-3000:]))
        deadline = time.monotonic() + 10
        while not all(raw.responses[sid].data for sid in watches) and time.monotonic() < deadline:
            raw._pump(0.2)
        created = [R.WatchResponse.FromString(raw.responses[sid].data[5:]).created for sid in watches]
        self.assertEqual(created, [True] * 5)
        # DATA still in flight on a refused stream (24 MiB: more than the
        # connection window) is discarded without starving the connection.
        chunk = DataFrame(refused[0], data=b"\0" * 16384).serialize()
        for _ in range(24 * 64):
            raw.sock.sendall(chunk)
        # One watch ends: a call fits again, on the same connection, and its
        # headers (encoded with the entry the refused ones added) decode as sent.
        raw.conn.reset_stream(watches[0], ErrorCodes.CANCEL)
        raw.flush()
        time.sleep(0.2)
        answer = raw.call(RANGE, get, extra_headers=marked)
        self.assertEqual(answer.status, (0, ""))
        self.assertIsNone(raw.terminated)

    def test_a_flooder_that_does_not_read_is_cut_off(self):
        """Ended for a flood while 24 MiB of answers wait for it: it is cut off
        after END_GRACE (5 s) instead of keeping the connection while they
        drain into a client that does not read."""
        writer = Stubs(self.direct)
        self.addCleanup(writer.close)
        for i in range(16):
            writer.kv.Put(R.PutRequest(key=b"/floods/big/%02d" % i, value=b"x" * (1500 * 1024)))
        raw = H2Client(self.proxied)
        self.addCleanup(raw.close)
        raw.conn.update_settings({0x4: 2**31 - 1})  # INITIAL_WINDOW_SIZE: the answer is all sent
        raw.request(RANGE, grpc_frame(R.RangeRequest(key=b"/floods/big/", range_end=b"/floods/big0")
                                      .SerializeToString()))
        time.sleep(2)  # the answer waits in the proxy's buffers: this client reads nothing
        try:
            for i in range(11000):
                raw.conn.ping(i.to_bytes(8, "big"))
            raw.flush()
        except OSError:
            pass
        time.sleep(5 + 2)
        closed, data = read_until_closed(raw.sock, 10)
        self.assertTrue(closed)
        self.assertLess(len(data), 20 * 1024 * 1024, "the whole answer was sent: not cut off")
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
