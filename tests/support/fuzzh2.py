"""Raw HTTP/2 bytes for fuzzing (tests/test_fuzz.py): frames and HPACK header
blocks built by hand (so that they can be wrong in every way), and a client
that sends a case's bytes after a valid preface + SETTINGS, then checks what
the server did with every stream it opened. Every wait is bounded.

The client reads the server's frames itself (no h2 state machine: the bytes
sent are not h2's) and decodes the server's header blocks with hpack.
"""
import select
import socket
import struct
import time

import hpack

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, \
    WINDOW_UPDATE, CONTINUATION = range(10)
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY_FLAG = 0x1, 0x1, 0x4, 0x8, 0x20

MAX_FRAME_SIZE = 16384          # the proxy's SETTINGS_MAX_FRAME_SIZE (h2's default)
CONNECTION_WINDOW = 16 * 1024 * 1024


def frame(ftype, flags, stream_id, payload=b""):
    return struct.pack(">I", len(payload))[1:] + bytes([ftype & 0xFF, flags & 0xFF]) + \
        struct.pack(">I", stream_id & 0xFFFFFFFF) + payload


def settings(pairs=(), ack=False):
    return frame(SETTINGS, ACK if ack else 0, 0, b"".join(struct.pack(">HI", k, v) for k, v in pairs))


def ping(payload, ack=False):
    return frame(PING, ACK if ack else 0, 0, payload)


def window_update(stream_id, increment):
    return frame(WINDOW_UPDATE, 0, stream_id, struct.pack(">I", increment & 0xFFFFFFFF))


def rst_stream(stream_id, code=0x8):
    return frame(RST_STREAM, 0, stream_id, struct.pack(">I", code))


def goaway(last_stream_id, code=0, debug=b""):
    return frame(GOAWAY, 0, 0, struct.pack(">II", last_stream_id, code) + debug)


def data(stream_id, payload, end_stream=False, pad=None):
    flags = END_STREAM if end_stream else 0
    if pad is not None:
        flags |= PADDED
        payload = bytes([pad]) + payload + b"\0" * pad
    return frame(DATA, flags, stream_id, payload)


# -- HPACK, by hand: literals never indexed, so that every block stands alone --

def hpack_int(value, prefix_bits, first=0):
    """RFC 7541 5.1 integer; ``first`` holds the bits above the prefix."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([first | value])
    out = bytearray([first | limit])
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def hpack_literal(name, value):
    """A literal header field without indexing, new name, no Huffman."""
    return b"\x00" + hpack_int(len(name), 7) + name + hpack_int(len(value), 7) + value


def header_block(headers):
    return b"".join(hpack_literal(n, v) for n, v in headers)


def request_headers(path, authority=b"fuzz", extra=()):
    return [(b":method", b"POST"), (b":scheme", b"http"), (b":path", path),
            (b":authority", authority), (b"content-type", b"application/grpc"),
            (b"te", b"trailers")] + list(extra)


def headers_frames(stream_id, block, end_stream=False, split=MAX_FRAME_SIZE, pad=None,
                   priority=None):
    """HEADERS (+ CONTINUATIONs when the block is longer than ``split``)."""
    first, rest = block[:split], block[split:]
    flags = (END_STREAM if end_stream else 0) | (0 if rest else END_HEADERS)
    if priority is not None:
        flags |= PRIORITY_FLAG
        first = struct.pack(">IB", priority[0] & 0xFFFFFFFF, priority[1] & 0xFF) + first
    if pad is not None:
        flags |= PADDED
        first = bytes([pad]) + first + b"\0" * pad
    out = [frame(HEADERS, flags, stream_id, first)]
    while rest:
        chunk, rest = rest[:split], rest[split:]
        out.append(frame(CONTINUATION, 0 if rest else END_HEADERS, stream_id, chunk))
    return b"".join(out)


def grpc_message(body, flag=0, length=None):
    return struct.pack(">BI", flag, len(body) if length is None else length) + body


def frames_in(raw):
    """(type, flags, stream id, declared length, offset) of each frame header
    in ``raw`` as a server reads them, and how many bytes the last frame
    still lacks (0: ``raw`` ends on a frame boundary)."""
    out = []
    pos = 0
    while pos < len(raw):
        if len(raw) - pos < 9:
            return out, 9 - (len(raw) - pos)
        n = int.from_bytes(raw[pos:pos + 3], "big")
        ftype, flags = raw[pos + 3], raw[pos + 4]
        sid = int.from_bytes(raw[pos + 5:pos + 9], "big") & 0x7FFFFFFF
        out.append((ftype, flags, sid, n, pos))
        if len(raw) - pos - 9 < n:
            return out, n - (len(raw) - pos - 9)
        pos += 9 + n
    return out, 0


def complete_last_frame(raw):
    """Bytes to append so that ``raw`` ends on a frame boundary as the server
    reads it (zeros: a partial frame header is completed first, and may then
    declare a payload of its own), or None when its last frame is longer than
    the server accepts (it ends the connection on the frame header alone)."""
    pad = b""
    while True:
        frames, missing = frames_in(raw + pad)
        if not missing:
            return pad
        if frames and frames[-1][4] + 9 <= len(raw) + len(pad) and frames[-1][3] > MAX_FRAME_SIZE:
            return None
        pad += b"\0" * missing


class StreamState(object):
    __slots__ = ("headers", "trailers", "data", "ended", "reset", "block", "block_end")

    def __init__(self):
        self.headers = None
        self.trailers = None
        self.data = 0
        self.ended = False
        self.reset = None
        self.block = None       # header block being received (HEADERS + CONTINUATION)
        self.block_end = False  # END_STREAM on the HEADERS frame of that block

    @property
    def grpc_status(self):
        src = self.trailers if self.trailers is not None else self.headers
        if src is None:
            return None
        return src.get(b"grpc-status")

    def __repr__(self):
        return "<stream headers=%r trailers=%r data=%d ended=%s reset=%r>" % (
            self.headers, self.trailers, self.data, self.ended, self.reset)


class FuzzConnection(object):
    """One connection to the server: a valid preface + SETTINGS + a large
    connection window, then whatever bytes the case sends."""

    def __init__(self, address, timeout=5.0):
        host, port = address.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.decoder = hpack.Decoder()
        self.decoder.max_allowed_table_size = 1 << 32
        self.decoder.max_header_list_size = 1 << 24
        self.inbuf = bytearray()
        self.streams = {}
        self.goaway = None              # (last stream id, error code)
        self.eof = False
        self.send_failed = False
        self.ping_acks = set()
        self.violations = []            # what the server must never do
        self.continuation_sid = None
        self.send(PREFACE + settings() + window_update(0, CONNECTION_WINDOW - 65535))

    @property
    def closed(self):
        return self.eof or self.send_failed

    def send(self, raw):
        if self.closed:
            return False
        try:
            self.sock.sendall(raw)
            return True
        except OSError:
            self.send_failed = True
            return False

    def stream(self, sid):
        s = self.streams.get(sid)
        if s is None:
            s = self.streams[sid] = StreamState()
        return s

    def pump(self, timeout):
        """Reads what arrives within ``timeout`` s (at least one read attempt)."""
        if self.eof:
            return
        try:
            ready, _, _ = select.select([self.sock], [], [], max(0.0, timeout))
        except (OSError, ValueError):
            self.eof = True
            return
        if not ready:
            return
        try:
            chunk = self.sock.recv(1 << 20)
        except (socket.timeout, BlockingIOError):
            return
        except OSError:
            chunk = b""
        if not chunk:
            self.eof = True
            return
        self.inbuf += chunk
        self._parse()

    def until(self, predicate, timeout):
        """Pumps until ``predicate()`` or the connection closes; returns predicate()."""
        deadline = time.monotonic() + timeout
        while not predicate() and not self.eof:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self.pump(min(left, 0.5))
        return predicate()

    def _parse(self):
        buf = self.inbuf
        pos = 0
        replies = []
        while len(buf) - pos >= 9:
            n = int.from_bytes(buf[pos:pos + 3], "big")
            if len(buf) - pos - 9 < n:
                break
            ftype, flags = buf[pos + 3], buf[pos + 4]
            sid = int.from_bytes(buf[pos + 5:pos + 9], "big") & 0x7FFFFFFF
            payload = bytes(buf[pos + 9:pos + 9 + n])
            pos += 9 + n
            self._frame(ftype, flags, sid, payload, replies)
        del buf[:pos]
        if replies and not self.closed:
            self.send(b"".join(replies))

    def _frame(self, ftype, flags, sid, payload, replies):
        if self.continuation_sid is not None and ftype != CONTINUATION:
            self.violations.append("frame type %d inside a header block" % ftype)
        if ftype == DATA:
            s = self.stream(sid)
            if payload:  # a client's window updates, so that flow control never stalls a case
                replies.append(window_update(0, len(payload)))
                if not flags & END_STREAM:
                    replies.append(window_update(sid, len(payload)))
            if flags & PADDED:
                payload = payload[1:len(payload) - payload[0]] if payload else b""
            s.data += len(payload)
            if s.headers is None:
                self.violations.append("DATA before HEADERS on stream %d" % sid)
            if flags & END_STREAM:
                s.ended = True
        elif ftype in (HEADERS, CONTINUATION):
            s = self.stream(sid)
            if ftype == HEADERS:
                if flags & PADDED:
                    payload = payload[1:len(payload) - payload[0]]
                if flags & PRIORITY_FLAG:
                    payload = payload[5:]
                s.block = payload
                s.block_end = bool(flags & END_STREAM)
            else:
                if s.block is None:
                    self.violations.append("CONTINUATION without HEADERS on stream %d" % sid)
                    return
                s.block += payload
            if not flags & END_HEADERS:
                self.continuation_sid = sid
                return
            self.continuation_sid = None
            try:
                decoded = dict(self.decoder.decode(s.block, raw=True))
            except Exception as e:  # the server's HPACK must always decode
                self.violations.append("undecodable header block on stream %d: %r" % (sid, e))
                decoded = {}
            s.block = None
            if s.headers is None:
                s.headers = decoded
            else:
                s.trailers = decoded
            if s.block_end:
                s.ended = True
        elif ftype == RST_STREAM:
            if len(payload) == 4:
                self.stream(sid).reset = int.from_bytes(payload, "big")
        elif ftype == SETTINGS:
            if not flags & ACK:
                replies.append(settings(ack=True))
        elif ftype == PING:
            if flags & ACK:
                self.ping_acks.add(payload)
            else:
                replies.append(ping(payload, ack=True))
        elif ftype == GOAWAY:
            if len(payload) >= 8:
                last, code = struct.unpack(">II", payload[:8])
                self.goaway = (last & 0x7FFFFFFF, code)
        elif ftype == PUSH_PROMISE:
            self.violations.append("PUSH_PROMISE from the server")

    def ping_answered(self, payload, timeout):
        """Sends PING(payload); True once acknowledged, False if the
        connection closed first; raises AssertionError if neither comes
        within ``timeout`` (the server hangs)."""
        if not self.send(ping(payload)):
            return False
        if self.until(lambda: payload in self.ping_acks, timeout):
            return True
        if self.closed:
            return False
        # A GOAWAY that is not followed by the close yet counts as an answer.
        if self.goaway is not None:
            return False
        raise AssertionError("no PING ACK and no close within %.1f s" % timeout)

    def stream_done(self, sid):
        """The stream got its end from the server: END_STREAM, RST_STREAM, a
        GOAWAY that leaves it out (or that ends the connection), or the close."""
        s = self.streams.get(sid)
        if s is not None and (s.ended or s.reset is not None):
            return True
        if self.goaway is not None and (sid > self.goaway[0] or self.goaway[1] != 0):
            return True
        return self.closed

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass
