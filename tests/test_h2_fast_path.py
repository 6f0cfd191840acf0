"""The HTTP/2 fast path (etcdproxy.grpc.h2fast) against plain h2, differentially.

The same actions, valid and hostile, go to two connections configured as the
proxy configures them: one `BoundedH2Connection` (h2's path for every frame) and
one `FastH2Connection`. Actions are the peer's bytes (frames of every type,
good and broken, cut into reads at random places) and the proxy's own sends
(HEADERS, DATA, END_STREAM, resets, window updates). After each action the two
must agree on everything the proxy can see: the events (all their fields), the
exception raised (type and text), the bytes to send, and h2's state (connection
and stream states, every window, the streams it holds, the highest ids).

Only the APIs of Debian bookworm's hypothesis (6.36) are used.
"""

import random
import re
import struct
import unittest

import h2
import hpack
from h2.errors import ErrorCodes
from h2.events import DataReceived
from hypothesis import HealthCheck, given, settings, strategies as st

from etcdproxy.grpc import h2fast, h2internals
from etcdproxy.grpc.connection import Limits, new_h2_connection
from etcdproxy.grpc.h2connection import BoundedH2Connection
from etcdproxy.grpc.h2fast import FastH2Connection

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
LIMITS = Limits()
MAX_FRAME = 16384


def frame(kind, flags, stream_id, payload=b"", length=None):
    size = len(payload) if length is None else length
    return struct.pack(">I", size)[1:] + bytes([kind & 0xFF, flags & 0xFF]) + \
        struct.pack(">I", stream_id & 0xFFFFFFFF) + payload


def literal_block(headers):
    """A header block of literals never indexed: valid whatever the HPACK state."""
    out = b""
    for name, value in headers:
        out += b"\x10" + bytes([len(name)]) + name + bytes([len(value)]) + value
    return out


REQUEST = literal_block([(b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/etcdserverpb.KV/Put"),
                         (b":authority", b"127.0.0.1:2379"), (b"content-type", b"application/grpc"),
                         (b"te", b"trailers")])
RESPONSE = literal_block([(b":status", b"200"), (b"content-type", b"application/grpc")])
TRAILERS = literal_block([(b"grpc-status", b"0"), (b"grpc-message", b"")])
INFORMATIONAL = literal_block([(b":status", b"100")])
INDEXED = b"\x83\x86\x84"  # static-table references (method POST, scheme http, path /)

STREAM_IDS = [0, 1, 2, 3, 4, 5, 7, 9, 11, 0x80000001, 0x7FFFFFFF]
BLOCKS = [REQUEST, RESPONSE, TRAILERS, INFORMATIONAL, INDEXED, b"", b"\xff\xff\xff", b"\x3f\xe1\x1f",
          literal_block([(b"content-length", b"3")])]


@st.composite
def frames(draw):
    """One frame as a peer might send it: mostly the fast path's, some not, some broken."""
    kind = draw(st.sampled_from(["data", "data", "data", "headers", "headers", "window", "window",
                                 "rst", "ping", "settings", "priority", "goaway", "continuation",
                                 "unknown", "oversize", "short_window", "push"]))
    sid = draw(st.sampled_from(STREAM_IDS))
    if kind == "data":
        size = draw(st.sampled_from([0, 1, 5, 40, 300, 4000, MAX_FRAME, 70000]))
        size = min(size, MAX_FRAME)
        flags = draw(st.sampled_from([0, 0, 1, 1, 0x8, 0x9, 0x20, 0xFF]))
        payload = bytes([size % 251]) * size
        if flags & 0x8 and payload:
            payload = bytes([draw(st.integers(0, 255))]) + payload[1:]
        return frame(DATA, flags, sid, payload)
    if kind in ("headers", "continuation", "push"):
        block = draw(st.sampled_from(BLOCKS))
        flags = draw(st.sampled_from([0x4, 0x4, 0x5, 0x5, 0x0, 0x1, 0xC, 0x24, 0x25, 0xFF]))
        if kind == "continuation":
            return frame(CONTINUATION, draw(st.sampled_from([0, 4])), sid, block)
        if kind == "push":
            return frame(PUSH_PROMISE, 4, sid, b"\x00\x00\x00\x02" + block)
        if flags & 0x20:
            block = b"\x00\x00\x00\x03\x10" + block
        if flags & 0x8:
            block = b"\x02" + block + b"\x00\x00"
        return frame(HEADERS, flags, sid, block)
    if kind == "window":
        increment = draw(st.sampled_from([0, 1, 100, 65535, 2**20, 2**31 - 1, 2**31, 2**32 - 1]))
        return frame(WINDOW_UPDATE, draw(st.sampled_from([0, 0, 1])), draw(st.sampled_from([0, 0] + STREAM_IDS)),
                     struct.pack(">I", increment))
    if kind == "short_window":
        return frame(WINDOW_UPDATE, 0, sid, b"\x00\x01")
    if kind == "rst":
        return frame(RST_STREAM, 0, sid, struct.pack(">I", draw(st.sampled_from([0, 2, 8]))))
    if kind == "ping":
        return frame(PING, draw(st.sampled_from([0, 1, 0x81])), draw(st.sampled_from([0, 0, 1])),
                     draw(st.sampled_from([b"12345678", b"12345678", b"1234", b"123456789"])))
    if kind == "settings":
        pairs = draw(st.sampled_from([[], [(4, 1024)], [(4, 2**20)], [(5, 32768)], [(3, 2)], [(4, 2**31)]]))
        ack = draw(st.sampled_from([0, 0, 1]))
        return frame(SETTINGS, ack, 0, b"" if ack else b"".join(struct.pack(">HI", k, v) for k, v in pairs))
    if kind == "priority":
        return frame(PRIORITY, 0, sid, b"\x00\x00\x00\x00\x10")
    if kind == "goaway":
        return frame(GOAWAY, 0, 0, struct.pack(">II", draw(st.sampled_from([0, 1, 5, 101])), 0))
    if kind == "unknown":
        return frame(0x42, 0, sid, b"xyz")
    return frame(DATA, 0, 1, b"", length=MAX_FRAME + 1)  # oversize: only its header


SEND_HEADERS = {
    "request": [(b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/etcdserverpb.KV/Range"),
                (b":authority", b"127.0.0.1:2379"), (b"content-type", b"application/grpc"), (b"te", b"trailers")],
    "response": [(b":status", b"200"), (b"content-type", b"application/grpc")],
    "trailers": [(b"grpc-status", b"0")],
    "informational": [(b":status", b"100")],
    "big": [(b"x-big", b"v" * 20000)],
    "empty": [],
    "text": [(":status", "200")],
}


@st.composite
def actions(draw, client_side):
    chunks = []
    count = draw(st.integers(1, 25))
    for _ in range(count):
        choice = draw(st.sampled_from(["recv"] * 5 + ["send_headers", "send_headers", "send_data", "send_data",
                                                      "end_stream", "reset", "ack", "window", "forget"]))
        sid = draw(st.sampled_from([1, 1, 3, 3, 5, 2, 4]))
        if choice == "recv":
            data = b"".join(draw(st.lists(frames(), min_size=1, max_size=6)))
            if draw(st.booleans()):
                cut = draw(st.integers(0, len(data)))
                chunks.append(("recv", data[:cut]))
                data = data[cut:]
            chunks.append(("recv", data))
        elif choice == "send_headers":
            chunks.append(("send_headers", sid, draw(st.sampled_from(sorted(SEND_HEADERS))), draw(st.booleans())))
        elif choice == "send_data":
            chunks.append(("send_data", sid, draw(st.sampled_from([0, 10, 1000, 16384, 16385, 70000])),
                           draw(st.booleans())))
        elif choice == "end_stream":
            chunks.append(("end_stream", sid))
        elif choice in ("reset", "forget"):
            chunks.append((choice, sid))
        elif choice == "ack":
            chunks.append(("ack", sid, draw(st.sampled_from([1, 100, 70000]))))
        else:
            chunks.append(("window", draw(st.sampled_from([0, sid])), draw(st.sampled_from([1, 2**30, 2**31 - 1]))))
    return chunks


def event_fields(event):
    fields = {name: getattr(event, name) for name in dir(event)
              if not name.startswith("_") and not callable(getattr(event, name))}
    return type(event).__name__, sorted((k, repr(v)) for k, v in fields.items())


def h2_state(conn):
    # A closed stream h2 still holds and one it has moved to _closed_streams
    # (which it does lazily, when it next counts open streams) are the same to
    # h2 (its _stream_closed_by reads either); compared as the latter.
    closed = dict(conn._closed_streams)
    streams = []
    for sid, stream in sorted(conn.streams.items()):
        if stream.closed:
            closed[sid] = stream.closed_by
            continue
        streams.append((sid, stream.state_machine.state, stream.outbound_flow_control_window,
                        stream._inbound_window_manager.current_window_size, stream.closed_by,
                        stream._authority, stream.request_method, stream.state_machine.client,
                        stream._expected_content_length, stream._actual_content_length,
                        stream.state_machine.headers_sent, stream.state_machine.trailers_sent,
                        stream.state_machine.headers_received, stream.state_machine.trailers_received,
                        sorted(vars(stream)), getattr(stream, "max_inbound_frame_size", None)))
    return (conn.state_machine.state, conn.outbound_flow_control_window,
            conn._inbound_flow_control_window_manager.current_window_size,
            conn.highest_inbound_stream_id, conn.highest_outbound_stream_id,
            sorted(closed.items()), streams, conn.max_outbound_frame_size,
            len(conn.encoder.header_table.dynamic_entries), len(conn.decoder.header_table.dynamic_entries))


def apply(conn, action):
    """Runs one action; returns what the proxy would see of it."""
    try:
        kind = action[0]
        if kind == "recv":
            events = conn.receive_data(action[1])
            result = [event_fields(e) for e in events]
            result += [e.data for e in events if isinstance(e, DataReceived)]
        elif kind == "send_headers":
            _, sid, name, end = action
            result = conn.send_headers(sid, list(SEND_HEADERS[name]), end_stream=end)
        elif kind == "send_data":
            _, sid, size, end = action
            payload = b"d" * size
            # MessageStream sends large messages as views of them.
            result = conn.send_data(sid, memoryview(payload) if size >= 16384 else payload, end_stream=end)
        elif kind == "end_stream":
            result = conn.end_stream(action[1])
        elif kind == "reset":
            result = conn.reset_stream(action[1], ErrorCodes.CANCEL)
        elif kind == "forget":
            # What the proxy does once it is done with a stream: h2's own purge
            # of a closed stream (as when it counts streams), sooner.
            result = conn.forget_closed_stream(action[1])
        elif kind == "ack":
            result = conn.acknowledge_received_data(action[2], action[1])
        else:
            result = conn.increment_flow_control_window(action[2], action[1] or None)
        outcome = ("ok", result)
    except Exception as e:  # the two must fail alike
        # (h2 quotes a memoryview of the block in some errors: its address differs)
        outcome = ("error", type(e).__name__, re.sub(r" at 0x[0-9a-f]+", "", str(e)))
    return outcome, conn.data_to_send(), h2_state(conn)


def pair(client_side):
    plain = new_h2_connection(client_side, LIMITS, BoundedH2Connection)
    fast = new_h2_connection(client_side, LIMITS, FastH2Connection)
    assert fast.fast_path_active
    opening = plain.data_to_send()
    assert opening == fast.data_to_send()
    plain.opening = fast.opening = opening
    return plain, fast


def opened(client_side):
    """Both connections past the preface and the SETTINGS exchange."""
    plain, fast = pair(client_side)
    peer_settings = frame(SETTINGS, 0, 0) + frame(SETTINGS, 1, 0)
    start = (b"" if client_side else PREFACE) + peer_settings
    for conn in (plain, fast):
        conn.receive_data(start)
        conn.data_to_send()
    return plain, fast


class Counting:
    """Counts the frames that went the fast path's way on a connection."""

    def __init__(self, conn):
        self.count = 0
        self.lean_header_blocks = 0  # header blocks taken the short way to the end
        # Each kind of frame cut out goes to its own method (h2's frame handler
        # only for the uncommon cases).
        for name in ("_receive_data_block", "_receive_header_block", "_receive_ping", "_receive_window_update"):
            setattr(conn, name, self._wrap(getattr(conn, name)))
        lean, by_h2 = conn._stream_received_headers, conn._stream_headers_by_h2

        def counted_lean(*args):
            self.lean_header_blocks += 1
            return lean(*args)

        def counted_by_h2(*args):
            self.lean_header_blocks -= 1  # handed back to h2's own H2Stream.receive_headers
            return by_h2(*args)
        conn._stream_received_headers = counted_lean
        conn._stream_headers_by_h2 = counted_by_h2

    def _wrap(self, handler):
        def counted(*args):
            self.count += 1
            return handler(*args)
        return counted


class DifferentialTests(unittest.TestCase):
    def check(self, plain, fast, sequence):
        for step, action in enumerate(sequence):
            expected = apply(plain, action)
            got = apply(fast, action)
            self.assertEqual(expected, got, f"step {step}: {action!r}")

    @settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(actions(client_side=False), st.booleans())
    def test_server_side(self, sequence, preface_split):
        plain, fast = pair(False)
        opening = PREFACE + frame(SETTINGS, 0, 0)
        cut = 10 if preface_split else len(opening)
        self.check(plain, fast, [("recv", opening[:cut]), ("recv", opening[cut:])] + sequence)

    @settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(actions(client_side=True))
    def test_client_side(self, sequence):
        plain, fast = pair(True)
        self.check(plain, fast, [("send_headers", 1, "request", False), ("send_headers", 3, "request", True),
                                 ("recv", frame(SETTINGS, 0, 0))] + sequence)

    @settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.lists(st.binary(max_size=64), max_size=8), st.booleans())
    def test_garbage(self, reads, client_side):
        plain, fast = opened(client_side)
        self.check(plain, fast, [("recv", data) for data in reads])


class QueuedOutputTests(unittest.TestCase):
    """Large payloads wait beside h2's output buffer: the bytes come out in
    order, whole or in the amounts asked for, and a GOAWAY received drops them."""

    def sent(self, conn, amounts):
        conn.send_headers(1, list(SEND_HEADERS["request"]))
        conn.send_data(1, b"a" * 5000)
        conn.ping(b"12345678")
        conn.send_data(1, memoryview(b"b" * 9000))
        conn.send_data(1, b"c" * 10, end_stream=True)
        self.queued = bool(getattr(conn, "_queued_output", None))
        return [conn.data_to_send(amount) for amount in amounts]

    def test_in_order_whole_and_in_pieces(self):
        for amounts in ([None], [3, 100, 5000, None], [20000, 0, None]):
            plain, fast = opened(True)
            expected = self.sent(plain, amounts)
            self.assertEqual(self.sent(fast, amounts), expected, amounts)
            self.assertTrue(self.queued, "the large payloads were copied into h2's buffer")

    def test_goaway_drops_what_waits(self):
        plain, fast = opened(True)
        for conn in (plain, fast):
            conn.send_headers(1, list(SEND_HEADERS["request"]))
            conn.send_data(1, b"a" * 5000)
        self.assertTrue(fast._queued_output)
        goaway = frame(GOAWAY, 0, 0, struct.pack(">II", 1, 0))
        self.assertEqual(apply(plain, ("recv", goaway)), apply(fast, ("recv", goaway)))


class UnaryTrafficTests(unittest.TestCase):
    """Real exchanges between plain h2 peers and the two connections: every byte
    each writes and every event each sees is the same, and the fast path is taken."""

    def exchange(self, client_side, calls, read_size):
        rng = random.Random(calls * 7 + read_size)
        plain, fast = pair(client_side)
        counting = Counting(fast)
        peers = [new_h2_connection(not client_side, LIMITS, BoundedH2Connection) for _ in range(2)]
        for conn, peer in zip((plain, fast), peers):
            peer.receive_data(conn.opening)
            conn.receive_data(peer.data_to_send())
            peer.receive_data(conn.data_to_send())
        message = b"\x00\x00\x00\x01\x10" + bytes(range(256)) * 16
        for call in range(calls):
            sid = 2 * call + 1
            size = rng.randint(5, len(message))
            outcomes = []
            for conn, peer in zip((plain, fast), peers):
                seen = []
                if client_side:
                    conn.send_headers(sid, list(SEND_HEADERS["request"]))
                    conn.send_data(sid, message[:size], end_stream=True)
                    wire = conn.data_to_send()
                    for event in peer.receive_data(wire):
                        if isinstance(event, DataReceived):
                            peer.acknowledge_received_data(event.flow_controlled_length, sid)
                    peer.send_headers(sid, SEND_HEADERS["response"])
                    peer.send_data(sid, message)
                    peer.send_headers(sid, SEND_HEADERS["trailers"], end_stream=True)
                else:
                    peer.send_headers(sid, SEND_HEADERS["request"])
                    peer.send_data(sid, message, end_stream=True)
                incoming = peer.data_to_send()
                for start in range(0, len(incoming), read_size):
                    for event in conn.receive_data(incoming[start:start + read_size]):
                        seen.append(event_fields(event))
                        if isinstance(event, DataReceived):
                            conn.acknowledge_received_data(event.flow_controlled_length, sid)
                if not client_side:
                    conn.send_headers(sid, list(SEND_HEADERS["response"]))
                    conn.send_data(sid, message)
                    conn.send_headers(sid, list(SEND_HEADERS["trailers"]), end_stream=True)
                wire = conn.data_to_send()
                peer.receive_data(wire)
                conn.receive_data(peer.data_to_send())
                outcomes.append((seen, wire, h2_state(conn)))
            self.assertEqual(outcomes[0], outcomes[1], f"call {call}")
        self.assertGreater(counting.count, calls * 2, "the fast path was not taken")
        # every call's response headers and trailers (client side), every request
        # but the first, whose HEADERS move h2's connection from IDLE (server side)
        self.assertEqual(counting.lean_header_blocks, 2 * calls if client_side else calls - 1,
                         "header blocks missed the lean path")

    def test_server_side_whole_reads(self):
        self.exchange(False, 50, 1 << 20)

    def test_server_side_small_reads(self):
        self.exchange(False, 30, 7)

    def test_client_side_whole_reads(self):
        self.exchange(True, 50, 1 << 20)

    def test_client_side_odd_reads(self):
        self.exchange(True, 30, 1000)


class FastPathOnTests(unittest.TestCase):
    """The fast path must not turn itself off unnoticed."""

    def test_supported_on_the_installed_h2(self):
        self.assertTrue(h2.__version__.startswith(h2internals.TESTED_H2),
                        f"h2 {h2.__version__} is outside the range the fast path is tested on")
        self.assertTrue(h2internals.supported(), "the fast path turned itself off on this h2")

    def test_the_proxy_connections_use_it(self):
        for client_side in (False, True):
            conn = new_h2_connection(client_side, LIMITS)
            self.assertIsInstance(conn, FastH2Connection)
            self.assertTrue(conn.fast_path_active)

    def test_hpack_encoder_shared_state_not_cut(self):
        # A header block that changes the HPACK table (indexed literals) must
        # reach the wire identically on both paths, call after call.
        plain, fast = opened(False)
        decoder = hpack.Decoder()
        for sid in (1, 3, 5):
            block = hpack.Encoder().encode(SEND_HEADERS["request"])
            for conn in (plain, fast):
                conn.receive_data(frame(HEADERS, 0x5, sid, block))
            headers = [(b":status", b"200"), (b"x-call", b"%d" % sid)]
            wires = []
            for conn in (plain, fast):
                conn.send_headers(sid, list(headers), end_stream=True)
                wires.append(conn.data_to_send())
            self.assertEqual(wires[0], wires[1])
            self.assertEqual(decoder.decode(wires[1][9:], raw=True), headers)


class MisuseTests(unittest.TestCase):
    """Inputs the proxy never gives, found by review: plain h2's outcome still."""

    def check(self, plain, fast, sequence):
        DifferentialTests.check(self, plain, fast, sequence)

    def test_local_max_frame_size_change_within_a_read(self):
        for size in (32768, 16384):
            plain, fast = pair(False)
            for conn in (plain, fast):
                if size == 16384:  # down again: first up, acknowledged
                    conn.update_settings({h2fast.SettingCodes.MAX_FRAME_SIZE: 32768})
                    conn.receive_data(PREFACE + frame(SETTINGS, 0, 0) + frame(SETTINGS, 1, 0))
                else:
                    conn.receive_data(PREFACE + frame(SETTINGS, 0, 0))
                conn.update_settings({h2fast.SettingCodes.MAX_FRAME_SIZE: size})
                conn.data_to_send()
            read = frame(SETTINGS, 1, 0) + frame(PING, 0, 0, b"12345678") + frame(0x42, 0, 1, b"x" * 20000)
            self.check(plain, fast, [("recv", read), ("recv", frame(0x42, 0, 1, b"x" * 20000))])
            self.assertFalse(fast.fast_path_active)

    def test_odd_header_tuples_and_stream_ids(self):
        for headers in ([(b":method", b"POST", True)], [(b":method",)], [(b"x", "text")]):
            for sid in (3, 2**31 + 1):
                plain, fast = opened(True)
                outcomes = []
                for conn in (plain, fast):
                    SEND_HEADERS["odd"] = headers
                    try:
                        outcomes.append(apply(conn, ("send_headers", sid, "odd", False)))
                    finally:
                        del SEND_HEADERS["odd"]
                self.assertEqual(outcomes[0], outcomes[1], (headers, sid))

    def test_next_stream_id_up_to_the_last(self):
        for client_side in (True, False):
            plain, fast = opened(client_side)
            ids = []
            for conn in (plain, fast):
                first = conn.get_next_available_stream_id()
                conn.send_headers(first, list(SEND_HEADERS["request" if client_side else "response"]))
                second = conn.get_next_available_stream_id()
                conn.highest_outbound_stream_id = conn.HIGHEST_ALLOWED_STREAM_ID - (2 if client_side else 3)
                last = conn.get_next_available_stream_id()
                conn.highest_outbound_stream_id = last
                try:
                    conn.get_next_available_stream_id()
                    past = None
                except Exception as e:
                    past = (type(e).__name__, str(e))
                ids.append((first, second, last, past))
            self.assertEqual(ids[0], ids[1])
            self.assertEqual(ids[1][3][0], "NoAvailableStreamIDError")

    def test_wide_memoryview_and_non_bytes_reads(self):
        plain, fast = opened(False)
        block = REQUEST
        for conn in (plain, fast):
            conn.receive_data(frame(HEADERS, 0x4, 1, block))
            conn.data_to_send()
        outcomes = []
        for conn in (plain, fast):
            try:
                conn.send_data(1, memoryview(b"abcdefgh").cast("I"))
                outcomes.append(("ok", conn.data_to_send(), h2_state(conn)))
            except Exception as e:
                outcomes.append(("error", type(e).__name__))
        self.assertEqual(outcomes[0], outcomes[1])
        for bad in (9, [0, 0, 0, 4, 0, 0, 0, 0, 0]):
            self.assertEqual(apply(plain, ("recv", bad))[0][:2], apply(fast, ("recv", bad))[0][:2])
