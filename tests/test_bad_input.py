"""Malformed and unusual input from raw sockets and a hand-driven HTTP/2
client (the ``h2`` library over a plain socket). After each case the proxy must
still serve a normal grpcio client on a new connection.

Where etcd itself answers the same request, its answer (grpc-status) is the
reference. The proxy under test is chosen by $ETCDPROXY_TEST_KIND.
"""
import random
import socket
import struct

import grpc

from tests.support import grpcio as svc
from tests.support.rawh2 import H2Client, IO_TIMEOUT, frame_types, grpc_frame, grpc_messages, read_until_closed
from tests.support import targets

R = svc.R
RANGE = "/etcdserverpb.KV/Range"
PUT = "/etcdserverpb.KV/Put"


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
            # Not the HTTP/2 preface: HTTP/1.1 (etcd serves /health there too), which
            # refuses the junk; or HTTP/2 frames
            self.assertTrue(data.startswith(b"HTTP/1.1 400 ") or data[:1] == b"\x00", data[:50])
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
