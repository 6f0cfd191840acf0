"""Fuzzing the proxy with hypothesis, over raw sockets, against a real proxy
process in front of a real etcd.

Each example opens a connection, sends a valid preface + SETTINGS, then the
example's bytes: random and mutated HTTP/2 frame sequences, gRPC length
prefixes (wrong lengths, compressed flag, truncated), random protobuf bodies to
etcd methods, odd and invalid header blocks (random names and values, missing
and duplicate pseudo-headers, huge values, invalid HPACK). Then, per example:

- the connection still answers a PING, or the proxy ended it (GOAWAY, close);
- every stream the example opened ends with a gRPC status (grpc-status in the
  trailers or a Trailers-Only answer) or an HTTP/2 error (RST_STREAM, GOAWAY,
  the close) within STREAM_TIMEOUT, once the client has half-closed it (Watch
  and LeaseKeepAlive streams may go on: they are long-lived; they are closed
  with the connection);
- the server never sends what HTTP/2 forbids it (DATA before HEADERS, an
  undecodable header block, PUSH_PROMISE, a frame inside a header block);
- the proxy process still runs and serves a Range on a fresh connection, and
  its log has no "Unhandled Error", "Traceback" or "Unhandled error in
  Deferred".

``test_memory_and_fds_return_to_baseline`` runs the same mixed examples twice
(the first run warms up the allocator and caches) and checks the proxy's RSS
and open file descriptors after the second one against those after the first.

Examples per test: $ETCDPROXY_FUZZ_EXAMPLES (default 50, about 10-20 s for the
whole file on 2 cores); ``make fuzz`` runs 2000. Runs are derandomized and use
no example database, so CI runs the same examples every time. Only APIs of
hypothesis 6.36 (Debian bookworm's python3-hypothesis) are used.
"""
import os
import struct
import time
import zlib

from hypothesis import HealthCheck, given, settings, strategies as st

from tests.support.fuzzh2 import (
    CONTINUATION, DATA, END_STREAM, GOAWAY, HEADERS, MAX_FRAME_SIZE, PING, PRIORITY,
    RST_STREAM, SETTINGS, WINDOW_UPDATE, FuzzConnection, complete_last_frame, data, frame,
    frames_in, goaway, grpc_message, header_block, headers_frames, hpack_int, hpack_literal,
    ping, request_headers, rst_stream, settings as settings_frame, window_update)
from tests.support.grpcio import R
from tests.support.rawh2 import H2Client, grpc_frame
from tests.support.targets import EtcdProxyTestCase

EXAMPLES = int(os.environ.get("ETCDPROXY_FUZZ_EXAMPLES", "50"))
STREAM_TIMEOUT = 5.0    # s for a stream to end once the client half-closed it
PING_TIMEOUT = 5.0      # s for the proxy to answer a PING (or end the connection)
# RSS growth allowed between the warm-up run and the measured run (same
# examples): Python's allocator keeps freed arenas and fragments, so a few MiB
# move either way without any leak; a leak of a few KiB per connection or
# stream over the run's thousands of streams would exceed it.
RSS_GROWTH_BOUND = 4 * 1024 * 1024
RACE_ATTEMPTS = int(os.environ.get("ETCDPROXY_FUZZ_RACE_ATTEMPTS", "40"))
ERROR_MARKERS = ("Unhandled Error", "Traceback", "Unhandled error in Deferred")

RANGE = b"/etcdserverpb.KV/Range"
PUT = b"/etcdserverpb.KV/Put"
DELETE = b"/etcdserverpb.KV/DeleteRange"
TXN = b"/etcdserverpb.KV/Txn"
WATCH = b"/etcdserverpb.Watch/Watch"
KEEPALIVE = b"/etcdserverpb.Lease/LeaseKeepAlive"
GRANT = b"/etcdserverpb.Lease/LeaseGrant"
TTL = b"/etcdserverpb.Lease/LeaseTimeToLive"
STATUS = b"/etcdserverpb.Maintenance/Status"
# No Auth, Alarm, Defragment, Snapshot, MoveLeader or Member* methods: random
# bytes there could enable auth or raise a NOSPACE alarm in the test's etcd.
METHODS = [RANGE, PUT, DELETE, TXN, WATCH, KEEPALIVE, GRANT, TTL, STATUS]
LONG_LIVED = {WATCH, KEEPALIVE}
PREFIX = b"/fuzz/"

FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.filter_too_much, HealthCheck.large_base_example],
)


class Case(object):
    """What one example sends: byte chunks (each sent with its own send()),
    and the method each stream id was meant for."""

    def __init__(self, chunks, paths):
        self.chunks = [bytes(c) for c in chunks if c]
        self.paths = dict(paths)

    @property
    def raw(self):
        return b"".join(self.chunks)

    def __repr__(self):
        frames, missing = frames_in(self.raw)
        shown = ["%s/%#x/s%d/%dB" % (_TYPE_NAMES.get(t, t), f, sid, n) for t, f, sid, n, _ in frames]
        return "Case(paths=%r, frames=[%s]%s, raw=%r)" % (
            {k: v.decode() for k, v in self.paths.items()}, ", ".join(shown),
            " +%d missing" % missing if missing else "", self.raw[:600])


_TYPE_NAMES = {DATA: "DATA", HEADERS: "HEADERS", PRIORITY: "PRIORITY", RST_STREAM: "RST",
               SETTINGS: "SETTINGS", 5: "PUSH_PROMISE", PING: "PING", GOAWAY: "GOAWAY",
               WINDOW_UPDATE: "WU", CONTINUATION: "CONT"}


# -- strategies -------------------------------------------------------------

keys = st.one_of(st.binary(min_size=1, max_size=24).map(lambda b: PREFIX + b),
                 st.sampled_from([b"\0", b"", PREFIX, b"\xff" * 4]))


@st.composite
def structured_messages(draw, path):
    """A valid request message of ``path``'s type, with odd field values."""
    i64 = st.integers(min_value=-2**63, max_value=2**63 - 1)
    if path == RANGE:
        m = R.RangeRequest(key=draw(keys), range_end=draw(st.sampled_from([b"", b"\0", PREFIX + b"\xff"])),
                           limit=draw(i64), revision=draw(i64), serializable=draw(st.booleans()),
                           keys_only=draw(st.booleans()), count_only=draw(st.booleans()),
                           sort_order=draw(st.integers(0, 2)), sort_target=draw(st.integers(0, 4)))
    elif path == PUT:
        m = R.PutRequest(key=draw(keys), value=draw(st.binary(max_size=64)), lease=draw(i64),
                         prev_kv=draw(st.booleans()), ignore_value=draw(st.booleans()),
                         ignore_lease=draw(st.booleans()))
    elif path == DELETE:
        m = R.DeleteRangeRequest(key=draw(keys), range_end=draw(st.sampled_from([b"", PREFIX + b"\xff"])),
                                 prev_kv=draw(st.booleans()))
    elif path == TXN:
        m = R.TxnRequest(compare=[R.Compare(key=draw(keys), result=draw(st.integers(0, 3)),
                                            target=draw(st.integers(0, 4)), version=draw(i64))],
                         success=[R.RequestOp(request_range=R.RangeRequest(key=draw(keys)))],
                         failure=[R.RequestOp(request_put=R.PutRequest(key=draw(keys)))])
    elif path == WATCH:
        kind = draw(st.integers(0, 3))
        if kind == 0:
            m = R.WatchRequest(create_request=R.WatchCreateRequest(
                key=draw(keys), range_end=draw(st.sampled_from([b"", b"\0", PREFIX + b"\xff"])),
                start_revision=draw(i64), progress_notify=draw(st.booleans()),
                prev_kv=draw(st.booleans()), watch_id=draw(i64), fragment=draw(st.booleans()),
                filters=draw(st.lists(st.integers(0, 3), max_size=3))))
        elif kind == 1:
            m = R.WatchRequest(cancel_request=R.WatchCancelRequest(watch_id=draw(i64)))
        elif kind == 2:
            m = R.WatchRequest(progress_request=R.WatchProgressRequest())
        else:
            m = R.WatchRequest()
    elif path == KEEPALIVE:
        m = R.LeaseKeepAliveRequest(ID=draw(i64))
    elif path == GRANT:
        m = R.LeaseGrantRequest(TTL=draw(st.integers(-5, 30)), ID=draw(st.integers(-5, 5)))
    elif path == TTL:
        m = R.LeaseTimeToLiveRequest(ID=draw(i64), keys=draw(st.booleans()))
    else:
        m = R.StatusRequest()
    return m.SerializeToString()


def message_bodies(path):
    """A protobuf body for ``path``: random bytes or an odd valid message."""
    return st.one_of(st.binary(max_size=200), structured_messages(path))


def split_data(stream_id, body, cuts, end_stream):
    """``body`` as DATA frames cut at ``cuts`` (END_STREAM on the last)."""
    points = sorted({c % (len(body) + 1) for c in cuts} | {0, len(body)})
    pieces = [body[a:b] for a, b in zip(points, points[1:])] or [b""]
    return [data(stream_id, p, end_stream=end_stream and i == len(pieces) - 1)
            for i, p in enumerate(pieces)]


@st.composite
def protobuf_cases(draw):
    """Streams to etcd methods whose bodies are random or odd protobuf."""
    chunks, paths = [], {}
    for i in range(draw(st.integers(1, 3))):
        sid = 2 * i + 1
        path = draw(st.sampled_from(METHODS))
        paths[sid] = path
        msgs = draw(st.lists(message_bodies(path), min_size=1,
                             max_size=3 if path in LONG_LIVED else 1))
        body = b"".join(grpc_message(m) for m in msgs)
        chunks.append(headers_frames(sid, header_block(request_headers(path))))
        chunks += split_data(sid, body, draw(st.lists(st.integers(0, 1000), max_size=3)),
                             draw(st.booleans()) or path not in LONG_LIVED)
    return Case(chunks, paths)


@st.composite
def grpc_bodies(draw, path):
    """A request body with wrong gRPC length prefixes, compressed flags, truncations."""
    parts = []
    for _ in range(draw(st.integers(1, 3))):
        body = draw(message_bodies(path))
        kind = draw(st.sampled_from(["ok", "length", "huge", "flag", "gzip", "deflate",
                                     "badzip", "bomb", "truncated", "empty"]))
        if kind == "ok":
            parts.append(grpc_message(body))
        elif kind == "length":
            parts.append(grpc_message(body, length=max(0, len(body) + draw(st.integers(-10, 10)))))
        elif kind == "huge":
            parts.append(grpc_message(body, length=draw(st.sampled_from(
                [4 * 1024 * 1024, 4 * 1024 * 1024 + 1, 2**31 - 1, 2**32 - 1]))))
        elif kind == "flag":
            parts.append(grpc_message(body, flag=draw(st.integers(1, 255))))
        elif kind == "gzip":
            z = zlib.compressobj(wbits=16 + zlib.MAX_WBITS)
            parts.append(grpc_message(z.compress(body) + z.flush(), flag=1))
        elif kind == "deflate":
            parts.append(grpc_message(zlib.compress(body), flag=1))
        elif kind == "badzip":
            parts.append(grpc_message(draw(st.binary(max_size=40)), flag=1))
        elif kind == "bomb":  # inflates past --max-recv-bytes
            z = zlib.compressobj(wbits=16 + zlib.MAX_WBITS)
            parts.append(grpc_message(z.compress(b"\0" * (5 * 1024 * 1024)) + z.flush(), flag=1))
        elif kind == "truncated":
            whole = grpc_message(body)
            parts.append(whole[:draw(st.integers(0, len(whole) - 1))])
        else:
            parts.append(b"")
    return b"".join(parts)


@st.composite
def grpc_prefix_cases(draw):
    chunks, paths = [], {}
    for i in range(draw(st.integers(1, 2))):
        sid = 2 * i + 1
        path = draw(st.sampled_from([RANGE, PUT, WATCH, KEEPALIVE]))
        paths[sid] = path
        extra = []
        enc = draw(st.sampled_from([None, b"gzip", b"deflate", b"identity", b"snappy", b""]))
        if enc is not None:
            extra.append((b"grpc-encoding", enc))
        chunks.append(headers_frames(sid, header_block(request_headers(path, extra=extra))))
        body = draw(grpc_bodies(path))
        chunks += split_data(sid, body, draw(st.lists(st.integers(0, 10**7), max_size=4)),
                             draw(st.booleans()) or path not in LONG_LIVED)
    return Case(chunks, paths)


INTERESTING_NAMES = [b":method", b":path", b":scheme", b":authority", b":status", b":protocol",
                     b":foo", b"content-type", b"te", b"grpc-timeout", b"grpc-encoding",
                     b"grpc-accept-encoding", b"token", b"hasleader", b"user-agent",
                     b"connection", b"host", b"x-bin", b"Upper-Case", b"", b"a b", b"\0",
                     b"content-length", b"transfer-encoding", b"grpc-status", b"grpc-message"]
INTERESTING_VALUES = [b"", b"POST", b"GET", b"application/grpc", b"application/grpc+proto",
                      b"application/grpcx", b"text/plain", b"trailers", b"0S", b"1n", b"99999999H",
                      b"100000000S", b"1x", b"-1S", b"1S\n", b"gzip", b"identity", b"br",
                      b"true", b"\r\n", b"\0", b"\xff\xfe", RANGE, WATCH, b"/", b"*",
                      b"/etcdserverpb.KV/Nope", b"AAAA"]
header_names = st.one_of(st.sampled_from(INTERESTING_NAMES), st.binary(max_size=20))
header_values = st.one_of(st.sampled_from(INTERESTING_VALUES), st.binary(max_size=40),
                          st.integers(1000, 20000).map(lambda n: b"v" * n))


@st.composite
def hpack_garbage(draw):
    """Header block bytes that are not valid HPACK (or barely are)."""
    return draw(st.one_of(
        st.binary(min_size=1, max_size=60),
        st.sampled_from([
            b"\xff\xff\xff\xff\xff\xff\xff\xff\x0f",        # index overflow
            b"\xbe",                                        # dynamic index not in the table
            b"\x80",                                        # index 0
            b"\x3f\xe1\xff\x03",                            # table size update above the limit
            b"\x82\x20",                                    # table size update after a field
            b"\x00\x85\xff\xff\xff\xff\xff\x01a",           # bad Huffman name
            b"\x00\x01a\x7f\xff\xff\xff\xff\x0f",           # value length overflow
            b"\x00\x01a\x05ab",                             # truncated value
            b"\x40",                                        # truncated literal
            hpack_int(2**40, 7, 0x80),                      # huge index
        ]),
        st.tuples(st.binary(max_size=20), st.binary(max_size=20)).map(
            lambda t: t[0] + hpack_literal(b":path", RANGE) + t[1]),
    ))


@st.composite
def header_cases(draw):
    """One request whose header block is odd or invalid, then a valid body."""
    path = draw(st.sampled_from([RANGE, PUT, STATUS]))
    headers = request_headers(path)
    for _ in range(draw(st.integers(0, 4))):
        op = draw(st.sampled_from(["drop", "dup", "add", "move", "replace"]))
        idx = draw(st.integers(0, 100))
        if op == "drop" and headers:
            del headers[idx % len(headers)]
        elif op == "dup" and headers:
            headers.insert(draw(st.integers(0, len(headers))), headers[idx % len(headers)])
        elif op == "add":
            headers.insert(draw(st.integers(0, len(headers))), (draw(header_names), draw(header_values)))
        elif op == "move" and headers:  # e.g. a pseudo-header after regular ones
            headers.append(headers.pop(idx % len(headers)))
        elif op == "replace" and headers:
            name = headers[idx % len(headers)][0]
            headers[idx % len(headers)] = (name, draw(header_values))
    block = header_block(headers)
    if draw(st.integers(0, 3)) == 0:
        garbage = draw(hpack_garbage())
        where = draw(st.sampled_from(["append", "prepend", "replace"]))
        block = {"append": block + garbage, "prepend": garbage + block, "replace": garbage}[where]
    split = draw(st.sampled_from([MAX_FRAME_SIZE, MAX_FRAME_SIZE, 1, 7, 100, 4096]))
    pad = draw(st.one_of(st.none(), st.integers(0, 255)))
    prio = draw(st.one_of(st.none(), st.tuples(st.sampled_from([0, 1, 3, 2**31 | 1]), st.integers(0, 255))))
    end = draw(st.booleans())
    chunks = [headers_frames(1, block, end_stream=end, split=split, pad=pad, priority=prio)]
    if not end:
        chunks.append(data(1, grpc_frame(R.RangeRequest(key=PREFIX + b"h").SerializeToString()),
                           end_stream=True))
    return Case(chunks, {1: path})


# Frames that are valid but odd, and random ones, for the sequences below.
def _odd_frames(sid):
    """Strategies of single frames that HTTP/2 allows (mostly) around stream ``sid``."""
    ids = st.sampled_from([0, sid, sid + 2, sid - 2 if sid > 2 else 2, 2, 2**31 - 1])
    return st.one_of(
        st.binary(min_size=8, max_size=8).map(ping),
        st.lists(st.tuples(st.sampled_from([1, 2, 3, 4, 5, 6, 8, 9, 0xFF, 0xFFFF]),
                           st.sampled_from([0, 1, 100, 16384, 65535, 16777215, 2**31 - 1, 2**32 - 1])),
                 max_size=3).map(settings_frame),
        st.just(settings_frame(ack=True)),
        st.tuples(ids, st.sampled_from([1, 1000, 2**31 - 1, 0])).map(lambda t: window_update(*t)),
        st.tuples(ids, st.sampled_from([0, sid, 1, 2**31 | sid]), st.integers(0, 255)).map(
            lambda t: frame(PRIORITY, 0, t[0], struct.pack(">IB", t[1], t[2]))),
        st.tuples(ids, st.integers(0, 14)).map(lambda t: rst_stream(*t)),
        st.tuples(st.sampled_from([0, sid, 2**31 - 1]), st.integers(0, 14), st.binary(max_size=8)).map(
            lambda t: goaway(*t)),
        st.tuples(st.binary(max_size=20), st.integers(0, 255)).map(
            lambda t: data(sid, t[0], pad=t[1])),
        st.just(data(sid, b"")),
        st.tuples(st.integers(10, 255), st.integers(0, 255), ids, st.binary(max_size=30)).map(
            lambda t: frame(*t)),  # unknown frame types: to be ignored
    )


def _random_frame(sid):
    return st.tuples(st.integers(0, 12), st.integers(0, 255),
                     st.sampled_from([0, sid, sid + 2, 2, 2**31 - 1, 2**32 - 1]),
                     st.binary(max_size=40)).map(lambda t: frame(*t))


@st.composite
def frame_sequences(draw):
    """Requests mixed with odd and random frames, then mutated: lengths,
    types, flags, stream ids, padding, truncation, dropped or repeated frames."""
    frames, paths = [], {}
    sid = 1
    for _ in range(draw(st.integers(1, 8))):
        kind = draw(st.sampled_from(["request", "request", "odd", "odd", "random"]))
        if kind == "request":
            path = draw(st.sampled_from(METHODS))
            paths[sid] = path
            frames.append(headers_frames(sid, header_block(request_headers(path))))
            end = draw(st.booleans()) or path not in LONG_LIVED
            frames.append(data(sid, grpc_message(draw(message_bodies(path))), end_stream=end))
            sid += 2
        elif kind == "odd":
            frames.append(draw(_odd_frames(max(1, sid - 2))))
        else:
            frames.append(draw(_random_frame(max(1, sid - 2))))
    for _ in range(draw(st.integers(0, 3))):
        i = draw(st.integers(0, len(frames) - 1))
        f = bytearray(frames[i])
        op = draw(st.sampled_from(["length", "type", "flags", "sid", "truncate", "drop",
                                   "repeat", "swap", "byte", "padlen"]))
        if op in ("length", "type", "flags", "sid") and len(f) < 9:
            pass    # dropped or truncated by an earlier mutation
        elif op == "length":
            n = int.from_bytes(f[:3], "big")
            n = draw(st.one_of(st.integers(max(0, n - 8), n + 8), st.integers(0, 2**24 - 1)))
            f[:3] = n.to_bytes(3, "big")
        elif op == "type":
            f[3] = draw(st.integers(0, 255))
        elif op == "flags":
            f[4] = draw(st.integers(0, 255))
        elif op == "sid":
            f[5:9] = struct.pack(">I", draw(st.sampled_from([0, 1, 2, 3, 5, 2**31 - 1, 2**31 + 1, 2**32 - 1])))
        elif op == "truncate":
            f = f[:draw(st.integers(0, len(f)))]
        elif op == "drop":
            f = bytearray()
        elif op == "repeat":
            f = f + f
        elif op == "swap" and i + 1 < len(frames):
            frames[i + 1], f = bytes(f), bytearray(frames[i + 1])
        elif op == "byte" and len(f) > 9:
            j = draw(st.integers(9, len(f) - 1))
            f[j] = draw(st.integers(0, 255))
        elif op == "padlen" and len(f) > 9:
            f[4] |= 0x8     # PADDED, with the first payload byte as the pad length
            f[9] = draw(st.integers(0, 255))
        frames[i] = bytes(f)
    return Case(frames, paths)


all_cases = st.one_of(frame_sequences(), grpc_prefix_cases(), protobuf_cases(), header_cases())


# -- the proxy's state ------------------------------------------------------

def proc_status(pid, field):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # kB
    raise AssertionError("no %s in /proc/%d/status" % (field, pid))


def open_fds(pid):
    return len(os.listdir("/proc/%d/fd" % pid))


class FuzzTests(EtcdProxyTestCase):
    # The range cache is bounded small, so that what the fuzz puts in it stays
    # far under the RSS bound (the memory test looks for leaks, not caching).
    proxy_args = ("--cache-max-bytes", "262144")

    def setUp(self):
        self.checked_log = self.error_lines()
        self.examples = 0

    def error_lines(self):
        return [line for line in self.proxy.log().splitlines()
                if any(m in line for m in ERROR_MARKERS)]

    def assertNoNewErrors(self, case=None):
        lines = self.error_lines()
        new = lines[len(self.checked_log):]
        self.checked_log = lines  # each error fails one example, not every later one too
        if new:
            log = self.proxy.log()
            first = log.find(new[0])
            self.fail("unhandled error in the proxy's log%s:\n%s" % (
                " after %r" % (case,) if case is not None else "", log[max(0, first - 2000):first + 6000]))

    def assertServes(self):
        self.assertTrue(self.proxy.is_running(), "the proxy exited:\n%s" % self.proxy.log()[-4000:])
        c = H2Client(self.proxied)
        try:
            r = c.call(RANGE.decode(), grpc_frame(R.RangeRequest(key=PREFIX + b"alive").SerializeToString()),
                       timeout=10)
            self.assertEqual(r.status, (0, ""), r)
        finally:
            c.close()

    def exercise(self, case):
        """Sends ``case``, checks what became of each of its streams, then
        that the proxy still serves and logged no unhandled error."""
        self.examples += 1
        raw = case.raw
        pad = complete_last_frame(raw)
        frames, _ = frames_in(raw + (pad or b""))
        opened, ours_ended, ours_reset = [], set(), set()
        for ftype, flags, sid, _, _ in frames:
            if ftype == HEADERS and sid % 2 == 1 and sid not in opened:
                opened.append(sid)
            if ftype in (DATA, HEADERS) and flags & END_STREAM:
                ours_ended.add(sid)
            if ftype == RST_STREAM:
                ours_reset.add(sid)
        c = FuzzConnection(self.proxied)
        try:
            for chunk in case.chunks:
                c.send(chunk)
            if pad is None:
                # A frame longer than SETTINGS_MAX_FRAME_SIZE: the proxy must end
                # the connection on its header, without waiting for its payload.
                c.until(lambda: c.closed, PING_TIMEOUT)
                self.assertTrue(c.closed, "connection still open after an oversized frame header")
            else:
                c.send(pad)
                if c.ping_answered(b"fuzzping", PING_TIMEOUT):
                    # Half-close every stream the case left open (and give back
                    # any stream window it took), as a client finishing would.
                    c.send(settings_frame([(0x4, 65535)]) + b"".join(
                        data(sid, b"", end_stream=True) for sid in opened
                        if sid not in ours_ended and sid not in ours_reset))
                    c.ping_answered(b"fuzz-end", PING_TIMEOUT)
            must_end = [sid for sid in opened
                        if sid not in ours_reset and case.paths.get(sid) not in LONG_LIVED]
            c.until(lambda: all(c.stream_done(sid) for sid in must_end), STREAM_TIMEOUT)
            problems = list(c.violations)
            problems += ["stream %d (%s) neither ended nor reset within %.0f s: %r"
                         % (sid, case.paths.get(sid), STREAM_TIMEOUT, c.streams.get(sid))
                         for sid in must_end if not c.stream_done(sid)]
            problems += ["stream %d ended without grpc-status: %r" % (sid, s)
                         for sid, s in sorted(c.streams.items()) if s.ended and s.grpc_status is None]
            self.assertEqual(problems, [], case)
        finally:
            c.close()
        self.assertServes()
        self.assertNoNewErrors(case)

    def tearDown(self):
        self.assertNoNewErrors()

    # -- the fuzz tests -------------------------------------------------------

    @FUZZ_SETTINGS
    @given(case=frame_sequences())
    def test_frame_sequences(self, case):
        self.exercise(case)

    @FUZZ_SETTINGS
    @given(case=grpc_prefix_cases())
    def test_grpc_length_prefixes(self, case):
        self.exercise(case)

    @FUZZ_SETTINGS
    @given(case=protobuf_cases())
    def test_protobuf_bodies(self, case):
        self.exercise(case)

    @FUZZ_SETTINGS
    @given(case=header_cases())
    def test_header_blocks(self, case):
        self.exercise(case)

    def test_refused_request_reset_in_the_same_read(self):
        """Regression (found by this fuzzing): a request the proxy refuses at
        once (wrong method, unknown path, malformed grpc-timeout) whose stream
        the client resets in the same TCP read made h2 raise StreamClosedError
        out of dataReceived: "Unhandled Error" and the connection dropped."""
        def request(path, method=b"POST", extra=()):
            return header_block([(b":method", method), (b":scheme", b"http"), (b":path", path),
                                 (b":authority", b"fuzz"), (b"content-type", b"application/grpc")]
                                + list(extra))
        blocks = [request(RANGE, b"GET"), request(b"/etcdserverpb.KV/Nope"),
                  request(RANGE, extra=[(b"grpc-timeout", b"1x")])]
        for block in blocks:
            c = FuzzConnection(self.proxied)
            try:
                c.send(headers_frames(1, block, end_stream=True) + rst_stream(1))
                self.assertTrue(c.ping_answered(b"reset!!!", PING_TIMEOUT),
                                "connection ended: %r" % (c.goaway,))
                # and the connection still serves calls
                c.send(headers_frames(3, header_block(request_headers(RANGE)))
                       + data(3, grpc_frame(R.RangeRequest(key=PREFIX + b"r").SerializeToString()),
                              end_stream=True))
                c.until(lambda: c.stream_done(3), STREAM_TIMEOUT)
                self.assertEqual(c.streams[3].grpc_status, b"0", c.streams.get(3))
            finally:
                c.close()
            self.assertNoNewErrors()

    def test_connection_ended_by_the_proxy_while_calls_are_upstream(self):
        """Regression (found by this fuzzing): when the proxy ended a client's
        connection for a protocol error (here a connection window overflow)
        while calls of it were at etcd, etcd's answers, arriving before
        Twisted reported the client connection lost, were sent into h2's
        closed connection: ProtocolError raised in the *upstream* connection's
        dataReceived, which dropped the shared connection to etcd ("etcd
        endpoint failed", every other client's calls on it failed). A race:
        about one in 40 attempts hit it."""
        put = grpc_message(R.PutRequest(key=PREFIX + b"race", value=b"v").SerializeToString())
        requests = b"".join(headers_frames(sid, header_block(request_headers(PUT)))
                            + data(sid, put, end_stream=True) for sid in range(1, 81, 2))
        for i in range(RACE_ATTEMPTS):
            c = FuzzConnection(self.proxied)
            try:
                c.send(requests)
                # once the first answer is in, etcd's others are arriving
                c.until(lambda: any(s.headers is not None for s in c.streams.values()), PING_TIMEOUT)
                c.send(window_update(0, 2**31 - 1))  # FLOW_CONTROL_ERROR: GOAWAY
                c.until(lambda: c.closed, PING_TIMEOUT)
                self.assertTrue(c.closed)
            finally:
                c.close()
        self.assertServes()
        self.assertNoNewErrors()
        self.assertNotIn("failed (connection lost", self.proxy.log())

    def test_memory_and_fds_return_to_baseline(self):
        pid = self.proxy.pid

        @FUZZ_SETTINGS
        @given(case=all_cases)
        def run(case):
            self.exercise(case)

        def settled(fds_at_most):
            deadline = time.monotonic() + 10
            while open_fds(pid) > fds_at_most and time.monotonic() < deadline:
                time.sleep(0.1)
            time.sleep(0.5)
            return proc_status(pid, "VmRSS"), open_fds(pid)

        fds_before = open_fds(pid)
        run()   # warm-up: the same examples as below
        rss_base, fds_base = settled(fds_before)
        run()
        rss_after, fds_after = settled(fds_base)
        print("\nfuzz memory: %d examples x2; RSS %.1f MiB after the warm-up, %.1f MiB after "
              "(%+.2f MiB); open fds %d before, %d after the warm-up, %d after"
              % (self.examples // 2, rss_base / 2**20, rss_after / 2**20,
                 (rss_after - rss_base) / 2**20, fds_before, fds_base, fds_after))
        self.assertLessEqual(fds_base, fds_before, "file descriptors left open by the warm-up run")
        self.assertLessEqual(fds_after, fds_base, "file descriptors left open by the fuzz run")
        self.assertLess(rss_after - rss_base, RSS_GROWTH_BOUND,
                        "the proxy's RSS grew by %.1f MiB over the same examples run again"
                        % ((rss_after - rss_base) / 2**20))
