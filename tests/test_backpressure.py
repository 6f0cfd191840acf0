"""A client that stops reading its watch stream: the proxy's memory stays
bounded (the stream is ended once --watch-send-buffer bytes wait for it),
other streams on the same connection and other clients keep being served, and
once the reader resumes it gets the events that were on their way, in order,
then a clear RESOURCE_EXHAUSTED status. A client that asks for large ranges and
reads none of them: flow control leaves the answers at etcd's side, not in the
proxy's memory; others are served meanwhile."""

import time

from h2.errors import ErrorCodes

from tests.support import targets
from tests.support.grpcio import R, Stubs, Stream
from tests.support.rawh2 import H2Client, grpc_frame, grpc_messages

WATCH = "/etcdserverpb.Watch/Watch"
RANGE = "/etcdserverpb.KV/Range"
PUTS = 300
VALUE = b"v" * (100 * 1024)  # 300 x 100 KiB = 30 MiB of events


def rss_bytes(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS for %d" % pid)


class StalledWatchReaderTests(targets.EtcdProxyTestCase):

    def test_stalled_reader_is_bounded_and_isolated(self):
        key = b"/backpressure/k"
        raw = H2Client(self.proxied)
        self.addCleanup(raw.close)
        create = R.WatchRequest(create_request=R.WatchCreateRequest(key=key))
        sid = raw.request(WATCH, grpc_frame(create.SerializeToString()), end_stream=False)
        raw.stalled.add(sid)
        deadline = time.monotonic() + 5
        while not raw.responses[sid].data and time.monotonic() < deadline:
            raw._pump(0.1)
        self.assertTrue(raw.responses[sid].data, "no created response")

        observer_stubs = Stubs(self.proxied)
        self.addCleanup(observer_stubs.close)
        observer = Stream(observer_stubs.watch.Watch)
        self.addCleanup(observer.close)
        observer.send(create)
        self.assertTrue(observer.recv().created)

        writer = Stubs(self.direct)
        self.addCleanup(writer.close)
        rss_before = rss_bytes(self.proxy.proc.pid)
        first = None
        for i in range(PUTS):
            rev = writer.kv.Put(R.PutRequest(key=key, value=VALUE)).header.revision
            first = first or rev
            if i % 20 == 0:
                raw._pump(0.01)  # keep the connection serviced, but never ack the stream

        # Another client is not held back by the stalled one: it gets every event.
        seen = []
        while len(seen) < PUTS:
            seen += [e.kv.mod_revision for e in observer.recv(timeout=20).events]
        self.assertEqual(seen, list(range(first, first + PUTS)))

        # Another stream on the stalled client's own connection still works.
        r = raw.call(RANGE, grpc_frame(R.RangeRequest(key=key, count_only=True).SerializeToString()))
        self.assertEqual(r.status, (0, ""))
        self.assertEqual(R.RangeResponse.FromString(grpc_messages(r.data)[0]).count, 1)

        # The proxy held back rather than buffering the 30 MiB.
        growth = rss_bytes(self.proxy.proc.pid) - rss_before
        print("proxy RSS growth with a stalled reader: %d bytes" % growth)
        self.assertLess(growth, 8 * 1024 * 1024, "proxy RSS grew by %d bytes" % growth)
        self.assertLess(len(raw.responses[sid].data), 2 * 1024 * 1024)

        # The reader resumes: the events that were on their way arrive in
        # order, none twice, then the status that says why the stream ended.
        raw.stalled.discard(sid)
        pending = len(raw.responses[sid].data)
        raw.conn.acknowledge_received_data(pending, sid)
        raw.flush()
        raw.wait(sid, timeout=30)
        messages, _ = _complete_messages(raw.responses[sid].data, 0)
        revisions = [e.kv.mod_revision for m in messages
                     for e in R.WatchResponse.FromString(m).events]
        self.assertEqual(revisions, list(range(first, first + len(revisions))))
        self.assertLess(len(revisions), PUTS)
        code, message = raw.responses[sid].status
        self.assertEqual(code, 8, message)  # RESOURCE_EXHAUSTED
        self.assertIn("watch stream not read", message)


class StalledRangeReaderTests(targets.EtcdProxyTestCase):
    proxy_args = ("--send-stall-timeout", "3")

    def test_unread_large_ranges_end_after_the_stall_timeout(self):
        writer = Stubs(self.direct)
        self.addCleanup(writer.close)
        for i in range(6):  # one Range answer: 3.6 MiB
            writer.kv.Put(R.PutRequest(key=b"/backpressure/big/%d" % i, value=b"x" * (600 * 1024)))
        get = grpc_frame(R.RangeRequest(key=b"/backpressure/big/", range_end=b"/backpressure/big0")
                         .SerializeToString())
        rss_before = rss_bytes(self.proxy.proc.pid)
        raw = H2Client(self.proxied)
        self.addCleanup(raw.close)
        stalled = []
        for _ in range(60):  # 216 MiB of answers, never read
            stalled.append(raw.request(RANGE, get))
            raw.stalled.add(stalled[-1])
        time.sleep(1)
        other = Stubs(self.proxied)
        self.addCleanup(other.close)
        started = time.monotonic()
        self.assertEqual(other.kv.Range(R.RangeRequest(key=b"/backpressure/big/0"), timeout=5).count, 1)
        self.assertLess(time.monotonic() - started, 2)
        # After --send-stall-timeout, each stalled answer (its status queued
        # behind the unread data) is reset: the proxy holds none of it.
        deadline = time.monotonic() + 3 + 5
        while not all(raw.responses[sid].reset is not None for sid in stalled):
            self.assertLess(time.monotonic(), deadline, "unread calls not ended after the stall timeout")
            raw._pump(0.2)
        self.assertEqual({raw.responses[sid].reset for sid in stalled}, {ErrorCodes.CANCEL})
        self.assertIsNone(raw.terminated)
        time.sleep(0.5)
        growth = rss_bytes(self.proxy.proc.pid) - rss_before
        print("proxy RSS growth after 60 unread 3.6 MiB ranges ended: %d bytes" % growth)
        self.assertLess(growth, 32 * 1024 * 1024, "proxy RSS grew by %d bytes" % growth)
        # The connection still serves calls it reads.
        r = raw.call(RANGE, grpc_frame(R.RangeRequest(key=b"/backpressure/big/0", keys_only=True)
                                       .SerializeToString()))
        self.assertEqual(r.status, (0, ""))


def _complete_messages(data, offset):
    """The complete gRPC messages in ``data`` from ``offset``, and the offset after them."""
    out = []
    while len(data) - offset >= 5:
        n = int.from_bytes(data[offset + 1:offset + 5], "big")
        if len(data) - offset < 5 + n:
            break
        out.append(data[offset + 5:offset + 5 + n])
        offset += 5 + n
    return out, offset
