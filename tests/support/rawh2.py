"""A minimal HTTP/2 gRPC client on a blocking socket (the h2 library driven
by hand), for tests that need to send what real clients never send or to stop
reading on purpose. Every wait is bounded."""
import socket
import struct
import time

import h2.config
import h2.connection
import h2.events

IO_TIMEOUT = 5.0


def grpc_frame(msg, compressed=False):
    return struct.pack(">BI", 1 if compressed else 0, len(msg)) + msg


def grpc_messages(data):
    """Splits a gRPC message stream; fails on a partial message."""
    out = []
    while data:
        assert len(data) >= 5, "partial gRPC frame header: %r" % data
        flag, n = struct.unpack(">BI", data[:5])
        assert flag == 0, "compressed response message"
        assert len(data) >= 5 + n, "partial gRPC message"
        out.append(data[5:5 + n])
        data = data[5 + n:]
    return out


class Response(object):
    def __init__(self):
        self.headers = None
        self.trailers = None
        self.data = bytearray()
        self.ended = False
        self.reset = None

    @property
    def done(self):
        return self.ended or self.reset is not None

    @property
    def trailers_only(self):
        return self.ended and self.trailers is None and not self.data and \
            self.headers is not None and "grpc-status" in self.headers

    @property
    def status(self):
        """(grpc-status as int, grpc-message) from the trailers, or from the
        headers of a Trailers-Only response; None if there is none (also when
        the stream was reset before it ended)."""
        if not self.ended:
            return None
        src = self.trailers if self.trailers is not None else self.headers
        if not src or "grpc-status" not in src:
            return None
        return int(src["grpc-status"]), src.get("grpc-message", "")

    def __repr__(self):
        return "<Response headers=%r trailers=%r data=%d bytes ended=%s reset=%r>" % (
            self.headers, self.trailers, len(self.data), self.ended, self.reset)


class H2Client(object):
    """A minimal HTTP/2 client on a blocking socket; every wait is bounded."""

    def __init__(self, address):
        host, port = address.rsplit(":", 1)
        self.address = address
        self.sock = socket.create_connection((host, int(port)), timeout=IO_TIMEOUT)
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=True, header_encoding="utf-8"))
        self.conn.initiate_connection()
        self.conn.increment_flow_control_window(16 * 1024 * 1024)
        self.responses = {}
        # Streams whose data is never acknowledged (a reader that stopped);
        # the connection window is still replenished.
        self.stalled = set()
        self.terminated = None
        self.eof = False
        self.ping_acks = []  # (payload, seconds since monotonic epoch) of each PING ACK
        self.flush()

    def flush(self):
        data = self.conn.data_to_send()
        if data:
            self.sock.sendall(data)

    def request(self, path, body=None, method="POST", content_type="application/grpc",
                end_stream=True, extra_headers=()):
        sid = self.conn.get_next_available_stream_id()
        headers = [(":method", method), (":scheme", "http"), (":path", path),
                   (":authority", self.address)]
        if content_type is not None:
            headers.append(("content-type", content_type))
        headers += [("te", "trailers")] + list(extra_headers)
        self.responses[sid] = Response()
        self.conn.send_headers(sid, headers, end_stream=(body is None and end_stream))
        if body is not None:
            self.conn.send_data(sid, body, end_stream=end_stream)
        self.flush()
        return sid

    def _pump(self, timeout):
        self.sock.settimeout(max(0.01, timeout))
        try:
            data = self.sock.recv(65536)
        except socket.timeout:
            return
        except ConnectionError:
            data = b""
        if not data:
            self.eof = True
            return
        for ev in self.conn.receive_data(data):
            r = self.responses.get(getattr(ev, "stream_id", None))
            if isinstance(ev, h2.events.ResponseReceived):
                r.headers = dict(ev.headers)
            elif isinstance(ev, h2.events.TrailersReceived):
                r.trailers = dict(ev.headers)
            elif isinstance(ev, h2.events.DataReceived):
                r.data += ev.data
                if ev.flow_controlled_length:
                    if ev.stream_id in self.stalled:
                        self.conn.increment_flow_control_window(ev.flow_controlled_length)
                    else:
                        self.conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, h2.events.StreamEnded):
                r.ended = True
            elif isinstance(ev, h2.events.StreamReset):
                if r is not None:
                    r.reset = ev.error_code
            elif isinstance(ev, h2.events.ConnectionTerminated):
                self.terminated = ev
            elif isinstance(ev, h2.events.PingAckReceived):
                self.ping_acks.append((ev.ping_data, time.monotonic()))
        try:
            self.flush()
        except OSError:
            pass

    def wait(self, sid, timeout=IO_TIMEOUT):
        r = self.responses[sid]
        deadline = time.monotonic() + timeout
        while not r.done and not self.eof and self.terminated is None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError("no complete answer on stream %d within %.1fs: %r"
                                     % (sid, timeout, r))
            self._pump(left)
        return r

    def call(self, path, body=None, timeout=IO_TIMEOUT, **kw):
        return self.wait(self.request(path, body, **kw), timeout)

    def close(self):
        try:
            self.conn.close_connection()
            self.flush()
        except Exception:
            pass
        self.sock.close()


def read_until_closed(sock, timeout):
    """Reads until EOF/reset; returns (closed, bytes)."""
    out = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            d = sock.recv(65536)
        except socket.timeout:
            continue
        except ConnectionError:
            return True, out
        if not d:
            return True, out
        out += d
    return False, out


def frame_types(data):
    """HTTP/2 frame types in ``data`` (as far as complete frames go)."""
    types = []
    while len(data) >= 9:
        n = int.from_bytes(data[:3], "big")
        types.append(data[3])
        data = data[9 + n:]
    return types
