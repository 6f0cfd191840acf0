"""Malformed and unusual input from raw sockets and a hand-driven HTTP/2
client (the ``h2`` library over a plain socket). After each case the proxy must
still serve a normal grpcio client on a new connection.

Where etcd itself answers the same request, its answer (grpc-status) is the
reference. The proxy under test is chosen by $ETCDPROXY_TEST_KIND.
"""
import random
import socket
import struct
import time

import grpc
import h2.config
import h2.connection
import h2.events

from tests.support import grpcio as svc
from tests.support import targets

R = svc.R
RANGE = "/etcdserverpb.KV/Range"
PUT = "/etcdserverpb.KV/Put"
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
        self.data = b""
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
        self.terminated = None
        self.eof = False
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
                    self.conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, h2.events.StreamEnded):
                r.ended = True
            elif isinstance(ev, h2.events.StreamReset):
                if r is not None:
                    r.reset = ev.error_code
            elif isinstance(ev, h2.events.ConnectionTerminated):
                self.terminated = ev
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


GOAWAY = 0x7


class _RawTestCase(targets.EtcdProxyTestCase):

    def client(self, address=None):
        c = H2Client(address or self.proxied)
        self.addCleanup(c.close)
        return c

    def raw_socket(self):
        host, port = self.proxied.rsplit(":", 1)
        s = socket.create_connection((host, int(port)), timeout=IO_TIMEOUT)
        self.addCleanup(s.close)
        return s

    def assertServesGrpcio(self, address=None):
        """A new grpcio connection still gets normal answers."""
        s = svc.Stubs(address or self.proxied)
        try:
            k = b"/bad-input/ok/%d" % random.randrange(1 << 30)
            r = s.kv.Put(R.PutRequest(key=k, value=b"fine"), timeout=10)
            got = s.kv.Range(R.RangeRequest(key=k), timeout=10)
            self.assertEqual([(kv.key, kv.value, kv.mod_revision) for kv in got.kvs],
                             [(k, b"fine", r.header.revision)])
        finally:
            s.close()

    def assertGrpcOk(self, resp, msg_type=R.RangeResponse):
        self.assertEqual(resp.headers.get(":status"), "200", resp)
        self.assertEqual(resp.status, (0, resp.status[1] if resp.status else ""), resp)
        msgs = grpc_messages(resp.data)
        self.assertEqual(len(msgs), 1, resp)
        return msg_type.FromString(msgs[0])

    def assertGrpcError(self, resp):
        # (RST_STREAM after the status is fine: it ends a stream the client
        # had not finished sending)
        self.assertIsNotNone(resp.headers, "stream reset instead of a gRPC status: %r" % resp)
        self.assertEqual(resp.headers.get(":status"), "200", resp)
        self.assertTrue(resp.headers.get("content-type", "").startswith("application/grpc"), resp)
        self.assertIsNotNone(resp.status, "no grpc-status: %r" % resp)
        self.assertNotEqual(resp.status[0], 0, resp)
        return resp.status

    def direct_status(self, path, body, **kw):
        c = self.client(self.direct)
        return c.call(path, body, **kw).status


class BadInputTests(_RawTestCase):

    def test_random_bytes_instead_of_preface(self):
        rnd = random.Random(1)
        junk = bytes(rnd.getrandbits(8) for _ in range(256)) + b"\r\n\r\n"
        self.assertFalse(junk.startswith(b"PRI"))
        s = self.raw_socket()
        try:
            s.sendall(junk)
        except ConnectionError:
            pass
        closed, data = read_until_closed(s, 5)
        self.assertTrue(closed, "connection still open 5 s after a bogus preface (got %r)" % data[:100])
        if data:
            # whatever came back must be HTTP/2 frames, not some other protocol
            self.assertEqual(data[:1], b"\x00", data[:50])
        self.assertServesGrpcio()

    def test_garbage_after_valid_preface(self):
        rnd = random.Random(3)
        s = self.raw_socket()
        s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes(rnd.getrandbits(8) for _ in range(300)))
        closed, data = read_until_closed(s, 5)
        self.assertTrue(closed, "connection still open 5 s after garbage frames")
        types = frame_types(data)
        self.assertTrue(types and types[0] == 0x4, "the server's first frame must be SETTINGS: %r" % data[:40])
        self.assertServesGrpcio()

    def test_truncated_message(self):
        body = b"\x00" + struct.pack(">I", 100) + b"x" * 10
        c = self.client()
        r = c.call(RANGE, body)
        code, _ = self.assertGrpcError(r)
        ref = self.direct_status(RANGE, body)
        self.assertIsNotNone(ref)
        self.assertEqual(code, ref[0], "proxy: %r, etcd directly: %r" % (r.status, ref))
        # the same connection still works
        ok = self.assertGrpcOk(c.call(RANGE, grpc_frame(R.RangeRequest(key=b"a").SerializeToString())))
        self.assertGreater(ok.header.revision, 0)
        self.assertServesGrpcio()

    def test_unary_call_without_message(self):
        c = self.client()
        r = c.call(RANGE, b"")
        code, _ = self.assertGrpcError(r)
        ref = self.direct_status(RANGE, b"")
        self.assertEqual(code, ref[0], "proxy: %r, etcd directly: %r" % (r.status, ref))
        self.assertServesGrpcio()

    def test_invalid_protobuf(self):
        bad = grpc_frame(b"\xff\xff\xff\xff")
        c = self.client()
        for path in (RANGE, PUT, "/etcdserverpb.Watch/Watch", "/etcdserverpb.Lease/LeaseKeepAlive",
                     "/v3lockpb.Lock/Lock"):
            r = c.call(path, bad)
            code, _ = self.assertGrpcError(r)
            ref = self.direct_status(path, bad)
            self.assertEqual(code, ref[0], "%s: proxy %r, etcd directly %r" % (path, r.status, ref))
            self.assertEqual(code, 13, "%s: %r" % (path, r.status))
        self.assertServesGrpcio()

    def test_compressed_flag_without_encoding(self):
        body = grpc_frame(R.RangeRequest(key=b"a").SerializeToString(), compressed=True)
        r = self.client().call(RANGE, body)
        code, _ = self.assertGrpcError(r)
        ref = self.direct_status(RANGE, body)
        self.assertEqual(code, ref[0], "proxy %r, etcd directly %r" % (r.status, ref))
        self.assertServesGrpcio()

    def test_unknown_methods(self):
        body = grpc_frame(R.RangeRequest(key=b"a").SerializeToString())
        c = self.client()
        for path in ("/etcdserverpb.KV/Nope", "/foo.Bar/Baz"):
            r = c.call(path, body)
            self.assertIsNone(r.reset, "%s: reset: %r" % (path, r))
            self.assertTrue(r.trailers_only, "%s: not a Trailers-Only response: %r" % (path, r))
            self.assertEqual(r.headers.get(":status"), "200", r)
            self.assertTrue(r.headers.get("content-type", "").startswith("application/grpc"), r)
            self.assertEqual(r.status[0], 12, "%s: %r" % (path, r))
            self.assertEqual(self.direct_status(path, body)[0], 12)
        # the same connection still serves a known method
        self.assertGrpcOk(c.call(RANGE, body))
        # and so does grpcio, which sees UNIMPLEMENTED
        s = svc.Stubs(self.proxied)
        self.addCleanup(s.close)
        nope = s.channel.unary_unary("/etcdserverpb.KV/Nope")
        self.assertEqual(svc.rpc_error(nope, b"", timeout=10)[0], grpc.StatusCode.UNIMPLEMENTED)
        self.assertServesGrpcio()

    def test_wrong_content_type(self):
        body = grpc_frame(R.RangeRequest(key=b"a").SerializeToString())
        c = self.client()
        r = c.call(RANGE, body, content_type="text/plain")
        self.assertIsNotNone(r.headers, "no response headers (stream reset?): %r" % r)
        self.assertEqual(r.headers.get(":status"), "415", r)
        self.assertTrue(r.done)
        self.assertGrpcOk(c.call(RANGE, body))
        self.assertServesGrpcio()

    def test_grpc_proto_content_type_accepted(self):
        body = grpc_frame(R.RangeRequest(key=b"a").SerializeToString())
        r = self.client().call(RANGE, body, content_type="application/grpc+proto")
        self.assertGrpcOk(r)

    def test_get_request(self):
        c = self.client()
        r = c.call(RANGE, None, method="GET", content_type="application/grpc")
        self.assertIsNotNone(r.headers, "no response headers (stream reset?): %r" % r)
        self.assertEqual(r.headers.get(":status"), "405", r)
        self.assertTrue(r.done)
        self.assertGrpcOk(c.call(RANGE, grpc_frame(R.RangeRequest(key=b"a").SerializeToString())))
        self.assertServesGrpcio()


class MessageLimitTests(_RawTestCase):
    """A proxy started with --max-recv-bytes 1024."""

    # etcd's Go proxy refuses a receive limit below its send limit
    proxy_args = ("--max-recv-bytes", "1024") + (
        ("--max-send-bytes", "1000") if targets.proxy_kind() == "go" else ())

    def put_body(self, size):
        return grpc_frame(R.PutRequest(key=b"/limit/k", value=b"v" * size).SerializeToString())

    def test_oversize_message(self):
        c = self.client()
        body = self.put_body(2000)
        self.assertGreater(len(body), 2000)
        r = c.call(PUT, body)
        code, _ = self.assertGrpcError(r)
        self.assertEqual(code, 8, r)    # RESOURCE_EXHAUSTED
        # the connection stays usable: a small call on it works
        ok = self.assertGrpcOk(c.call(PUT, self.put_body(10)), R.PutResponse)
        self.assertGreater(ok.header.revision, 0)
        self.assertGrpcOk(c.call(RANGE, grpc_frame(R.RangeRequest(key=b"/limit/k").SerializeToString())))
        # grpcio sees the same
        s = svc.Stubs(self.proxied)
        self.addCleanup(s.close)
        err = svc.rpc_error(s.kv.Put, R.PutRequest(key=b"/limit/k", value=b"v" * 2000))
        self.assertEqual(err[0], grpc.StatusCode.RESOURCE_EXHAUSTED, err)
        self.assertServesGrpcio()
        # nothing of the refused message reached etcd
        d = svc.Stubs(self.direct)
        self.addCleanup(d.close)
        self.assertEqual(d.kv.Range(R.RangeRequest(key=b"/limit/k"), timeout=10).kvs[0].value, b"v" * 10)

    def test_oversize_declared_length_refused_before_body(self):
        c = self.client()
        # declare 10 MB, send only a little, keep the stream open
        sid = c.request(PUT, b"\x00" + struct.pack(">I", 10 * 1024 * 1024) + b"x" * 100,
                        end_stream=False)
        r = c.wait(sid, timeout=3)
        code, _ = self.assertGrpcError(r)
        self.assertEqual(code, 8, r)
        self.assertGrpcOk(c.call(RANGE, grpc_frame(R.RangeRequest(key=b"a").SerializeToString())))
        self.assertServesGrpcio()
