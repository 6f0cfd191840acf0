"""grpcio helpers for the end-to-end tests: stubs with deadlines, streams read
with timeouts, and a TestCase with stubs on the proxy (``self.p``) and on etcd
directly (``self.d``)."""
import queue
import threading
import time
import uuid

import grpc

from tests.support.etcd import EtcdCluster
from tests.support.stubs import load_stubs
from tests.support import targets

pb = load_stubs()
R = pb.rpc_pb2
KV = pb.kv_pb2
AUTH = pb.auth_pb2
EL = pb.v3election_pb2
LK = pb.v3lock_pb2
HEALTH = pb.health_pb2

UNARY_TIMEOUT = 10.0
STREAM_TIMEOUT = 60.0
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.enable_retries", 0),
]


def prefix_end(prefix):
    """etcd's range_end for "every key starting with prefix"."""
    b = bytearray(prefix)
    while b:
        if b[-1] < 0xFF:
            b[-1] += 1
            return bytes(b)
        b.pop()
    return b"\0"


class _TimeoutMethod(object):
    """A stub method that gets a deadline unless the caller gives one."""

    def __init__(self, method, timeout):
        self._method = method
        self._timeout = timeout

    def __call__(self, *args, **kw):
        kw.setdefault("timeout", self._timeout)
        return self._method(*args, **kw)

    def __getattr__(self, name):
        return getattr(self._method, name)


class _TimeoutStub(object):
    def __init__(self, stub, timeout):
        self._stub = stub
        self._timeout = timeout

    def __getattr__(self, name):
        return _TimeoutMethod(getattr(self._stub, name), self._timeout)


class Stubs(object):
    """All etcd service stubs (and the gRPC health service's) on one channel; every call gets a
    deadline (UNARY_TIMEOUT, or STREAM_TIMEOUT for streams) unless given."""

    def __init__(self, address, options=CHANNEL_OPTIONS):
        self.address = address
        self.channel = grpc.insecure_channel(address, options=list(options))

        def mk(cls):
            return _TimeoutStub(cls(self.channel), UNARY_TIMEOUT)

        self.kv = mk(pb.KVStub)
        self.lease = mk(pb.LeaseStub)
        self.cluster = mk(pb.ClusterStub)
        self.maint = mk(pb.MaintenanceStub)
        self.auth = mk(pb.AuthStub)
        self.election = mk(pb.ElectionStub)
        self.lock = mk(pb.LockStub)
        self.health = mk(pb.HealthStub)
        self.watch = _TimeoutStub(pb.WatchStub(self.channel), STREAM_TIMEOUT)
        # LeaseKeepAlive streams need the longer deadline
        self.lease_stream = _TimeoutStub(pb.LeaseStub(self.channel), STREAM_TIMEOUT)

    def close(self):
        self.channel.close()


def rpc_error(fn, *args, **kw):
    """Calls ``fn``; returns (code, details) of the RpcError it must raise."""
    try:
        resp = fn(*args, **kw)
    except grpc.RpcError as e:
        return e.code(), e.details()
    raise AssertionError("expected an RPC error from %s, got %r" % (fn, resp))


CONF_CHANGE_TIMEOUT = 3.0
CONF_CHANGE_TRIES = 4


def conf_change(fn, request):
    """Calls a membership change (MemberAdd/Remove/Update/Promote) ``fn``;
    returns its answer, or (code, details) of its RpcError.

    etcd's raft allows one conf change in flight: one proposed before raft has
    seen the previous one applied is silently replaced by an empty entry (etcd
    logs "ignoring conf change"), and the call waits for its deadline, directly
    as through a proxy. Such a call changed nothing, so it is tried again."""
    for _ in range(CONF_CHANGE_TRIES):
        try:
            return fn(request, timeout=CONF_CHANGE_TIMEOUT)
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                return e.code(), e.details()
    return grpc.StatusCode.DEADLINE_EXCEEDED, "no answer in %d tries" % CONF_CHANGE_TRIES


def rpc_error_or_none(fn, *args, **kw):
    """The grpc.RpcError that fn(*args, **kw) raises, or None."""
    try:
        fn(*args, **kw)
    except grpc.RpcError as e:
        return e
    return None


class Requests(object):
    """A request iterator for a client-streaming call that stays open (no
    half-close) until ``close()``; bounded by ``lifetime`` seconds."""

    _END = object()

    def __init__(self, lifetime=STREAM_TIMEOUT + 30):
        self._q = queue.Queue()
        self._deadline = time.monotonic() + lifetime

    def put(self, msg):
        self._q.put(msg)

    def close(self):
        self._q.put(self._END)

    def __iter__(self):
        return self

    def __next__(self):
        while True:
            left = self._deadline - time.monotonic()
            if left <= 0:
                raise StopIteration
            try:
                m = self._q.get(timeout=min(left, 1.0))
            except queue.Empty:
                continue
            if m is self._END:
                self._q.put(self._END)
                raise StopIteration
            return m


class StreamEnded(AssertionError):
    pass


class Stream(object):
    """A bidi (or server-streaming) call read by a background thread, so that
    every receive has a timeout. ``method`` is a stub method; ``request`` is
    given for server-streaming calls, else a Requests iterator is used."""

    def __init__(self, method, request=None, metadata=None, timeout=STREAM_TIMEOUT):
        self.requests = None
        if request is None:
            self.requests = Requests()
            request = self.requests
        self.call = method(request, metadata=metadata, timeout=timeout)
        self._q = queue.Queue()
        self.error = None
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self):
        try:
            for m in self.call:
                self._q.put(("msg", m))
            self._q.put(("end", None))
        except grpc.RpcError as e:
            self.error = e
            self._q.put(("error", e))
        except Exception as e:  # pragma: no cover - unexpected
            self._q.put(("error", e))

    def send(self, msg):
        self.requests.put(msg)

    def recv(self, timeout=5.0):
        try:
            kind, v = self._q.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError("no message on the stream within %.1fs" % timeout)
        if kind == "msg":
            return v
        self._q.put((kind, v))     # keep the end visible for later calls
        if kind == "end":
            raise StreamEnded("stream ended (status OK) instead of a message")
        if isinstance(v, grpc.RpcError):
            raise StreamEnded("stream failed instead of a message: %s %r"
                              % (v.code(), v.details()))
        raise StreamEnded("stream reader failed: %r" % (v,))

    def expect_nothing(self, wait=0.5):
        try:
            kind, v = self._q.get(timeout=wait)
        except queue.Empty:
            return
        raise AssertionError("expected nothing on the stream, got %s %r" % (kind, v))

    def wait_end(self, timeout=5.0):
        """Waits for the end of the stream; returns the RpcError or None."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError("stream did not end within %.1fs" % timeout)
            try:
                kind, v = self._q.get(timeout=left)
            except queue.Empty:
                continue
            if kind != "msg":
                return v

    def close(self):
        if self.requests is not None:
            self.requests.close()
        self.call.cancel()
        self._thread.join(10)


class GrpcioTestCase(targets.EtcdProxyTestCase):
    """One etcd + one proxy per class; ``self.p`` are stubs on a channel to
    the proxy, ``self.d`` stubs on a channel to etcd directly."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.p = Stubs(cls.proxied)
        cls.d = Stubs(cls.direct)

    @classmethod
    def tearDownClass(cls):
        try:
            for s in (getattr(cls, "p", None), getattr(cls, "d", None)):
                if s is not None:
                    s.close()
        finally:
            super().tearDownClass()

    def key(self, suffix=""):
        """A key prefix unique to this test."""
        if not hasattr(self, "_key_prefix"):
            self._key_prefix = ("/t/%s/%s/" % (self._testMethodName, uuid.uuid4().hex[:8])).encode()
        return self._key_prefix + (suffix.encode() if isinstance(suffix, str) else suffix)

    def stream(self, method, request=None, metadata=None, timeout=STREAM_TIMEOUT):
        s = Stream(method, request, metadata=metadata, timeout=timeout)
        self.addCleanup(s.close)
        return s

    def assertSameError(self, proxied, direct, code=None, details=None):
        """``proxied``/``direct`` are (code, details) pairs; the proxy must
        relay etcd's status unchanged."""
        self.assertEqual(proxied, direct,
                         "proxy relayed %s %r, etcd directly says %s %r"
                         % (proxied[0], proxied[1], direct[0], direct[1]))
        if code is not None:
            self.assertEqual(direct[0], code, "etcd itself answered %s %r" % direct)
        if details is not None:
            self.assertEqual(direct[1], details, "etcd itself answered %s %r" % direct)

    def both_errors(self, stub_name, method, request, code=None, details=None, **kw):
        """Calls ``method`` through the proxy and directly; both must fail with
        the same code and details."""
        pe = rpc_error(getattr(getattr(self.p, stub_name), method), request, **kw)
        de = rpc_error(getattr(getattr(self.d, stub_name), method), request, **kw)
        self.assertSameError(pe, de, code, details)
        return pe

    def both_conf_change_errors(self, method, request, code, details):
        """``both_errors`` for a Cluster membership change (see conf_change)."""
        pe = conf_change(getattr(self.p.cluster, method), request)
        de = conf_change(getattr(self.d.cluster, method), request)
        for e in (pe, de):
            if not isinstance(e, tuple):
                raise AssertionError("expected an RPC error from %s, got %r" % (method, e))
        self.assertSameError(pe, de, code, details)
        return pe

    def put(self, key, value, **kw):
        return self.p.kv.Put(R.PutRequest(key=key, value=value, **kw))

    def get(self, key, **kw):
        return self.p.kv.Range(R.RangeRequest(key=key, **kw))


def events_until(stream, n, watch_id=None, timeout=5.0):
    """Reads responses until ``n`` events arrived; returns (events, responses)."""
    events, resps = [], []
    deadline = time.monotonic() + timeout
    while len(events) < n:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError("got %d of %d events: %r" % (len(events), n, resps))
        r = stream.recv(left)
        resps.append(r)
        if watch_id is not None and r.events:
            assert r.watch_id == watch_id, "events for watch %d, expected %d" % (r.watch_id, watch_id)
        events.extend(r.events)
    return events, resps


class ClusterTestCase(targets.ClassFixtureTestCase):
    """A 3-member etcd cluster per class (``cls.etcd``), stubs straight to each
    member (``cls.direct``) and their member ids; ``restore_cluster()`` brings
    every member back (resumed, or restarted) for the next test."""

    @classmethod
    def setUpClass(cls):
        cls.etcd = EtcdCluster(size=3)
        cls.etcd.start()
        try:
            cls.direct = [Stubs(ep) for ep in cls.etcd.endpoints]
            cls.member_ids = [s.maint.Status(R.StatusRequest()).header.member_id for s in cls.direct]
        except BaseException:
            cls.etcd.stop()
            raise

    @classmethod
    def tearDownClass(cls):
        for s in getattr(cls, "direct", ()):
            s.close()
        cls.etcd.stop()

    def restore_cluster(self):
        for i in range(self.etcd.size):
            if self.etcd.is_running(i):
                self.etcd.resume(i)
            else:
                self.etcd.restart(i, wait=False)
        self.etcd.wait_healthy()
