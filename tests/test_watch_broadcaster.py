"""The watch broadcaster against real etcd: client watchers share watchers at
etcd, and each still gets what etcd itself would send it.

Most tests open twin streams, one to etcd directly and one through the proxy,
send both the same requests, make the writes once, and compare the responses
field by field. The one relaxation allowed (documented in services/broadcast.py):
a "created" or client-cancel response through the proxy may carry an older
header revision than etcd's.
"""

import threading
import time


from etcdproxy.pb.mvccpb import kv_pb2 as KV
from tests.support.grpcio import GrpcioTestCase, R, Stubs, prefix_end
from tests.test_operations import get, samples

GAUGE = "etcd_debugging_mvcc_watcher_total"
EXACT = (("etcdproxy-watch-exact", "true"),)


def create(key, **kw):
    return R.WatchRequest(create_request=R.WatchCreateRequest(key=key, **kw))


def cancel(watch_id):
    return R.WatchRequest(cancel_request=R.WatchCancelRequest(watch_id=watch_id))


def progress():
    return R.WatchRequest(progress_request=R.WatchProgressRequest())


class Twin:
    """The same Watch stream, directly to etcd and through the proxy."""

    def __init__(self, case, metadata=None):
        self.case = case
        self.direct = case.stream(case.d.watch.Watch, metadata=metadata)
        self.proxied = case.stream(case.p.watch.Watch, metadata=metadata)

    def send(self, request):
        self.direct.send(request)
        self.proxied.send(request)

    def expect(self, n, timeout=10.0):
        """The next ``n`` responses of each side, compared."""
        direct = [self.direct.recv(timeout) for _ in range(n)]
        proxied = [self.proxied.recv(timeout) for _ in range(n)]
        for d, p in zip(direct, proxied):
            self.case.assertSameResponse(p, d)
        return direct

    def expect_nothing(self, wait=0.5):
        self.direct.expect_nothing(wait)
        self.proxied.expect_nothing(0.1)


class WatchSemanticsTests(GrpcioTestCase):
    # etcd sends progress notifications every second (default 10 min).
    etcd_args = ("--experimental-watch-progress-notify-interval=1s",)

    def assertSameResponse(self, proxied, direct):
        p, d = R.WatchResponse(), R.WatchResponse()
        p.CopyFrom(proxied)
        d.CopyFrom(direct)
        if (d.created and not d.canceled) or (d.canceled and not d.compact_revision and not d.created):
            # The relaxation: the proxy's idea of the current revision may be older.
            self.assertLessEqual(p.header.revision, d.header.revision, (p, d))
            p.header.revision = d.header.revision
        self.assertEqual(p, d)

    def gauge(self):
        return self.etcd.metric(GAUGE)

    def settled_gauge(self, quiet=0.5, timeout=10.0):
        """The gauge once it has not moved for ``quiet`` seconds: watchers of
        earlier tests (their streams and the twins' direct ones) leave etcd
        after their test has ended."""
        deadline = time.monotonic() + timeout
        value, since = self.gauge(), time.monotonic()
        while time.monotonic() < deadline:
            time.sleep(0.05)
            now = self.gauge()
            if now != value:
                value, since = now, time.monotonic()
            elif time.monotonic() - since >= quiet:
                break
        return value

    def test_filters_prev_kv_and_watch_ids(self):
        key = self.key("k")
        twin = Twin(self)
        twin.send(create(key))
        twin.send(create(key, filters=[R.WatchCreateRequest.NOPUT]))
        twin.send(create(key, filters=[R.WatchCreateRequest.NODELETE], prev_kv=True))
        twin.send(create(self.key(), range_end=prefix_end(self.key()), watch_id=7))
        twin.send(create(key, watch_id=7))  # duplicate id: refused, as etcd refuses it
        twin.send(create(key, prev_kv=True))  # automatic id: the lowest free one
        created = twin.expect(6)
        self.assertEqual([r.watch_id for r in created], [0, 1, 2, 7, -1, 3])
        self.assertEqual(created[4].cancel_reason, "mvcc: duplicate watch ID provided on the WatchStream")
        self.put(key, b"a")
        self.put(key, b"b")
        self.p.kv.DeleteRange(R.DeleteRangeRequest(key=key))
        # per put: ids 0, 2, 7, 3; the delete: ids 0, 1, 7, 3 (arrival order varies)
        responses = self._by_watch_id(twin, 12)
        self.assertEqual(sorted(responses), [0, 1, 2, 3, 7])
        self.assertEqual([e.type for e in responses[1]], [KV.Event.DELETE])
        self.assertEqual([e.type for e in responses[2]], [KV.Event.PUT, KV.Event.PUT])
        self.assertEqual(responses[2][1].prev_kv.value, b"a")
        twin.expect_nothing()

    def _by_watch_id(self, twin, n):
        """``n`` responses of each side, compared per watch id (etcd does not
        order responses of different watchers)."""
        sides = []
        for stream in (twin.direct, twin.proxied):
            by_id = {}
            for _ in range(n):
                r = stream.recv(10)
                by_id.setdefault(r.watch_id, []).append(r)
            sides.append(by_id)
        direct, proxied = sides
        self.assertEqual(sorted(proxied), sorted(direct))
        for watch_id in direct:
            self.assertEqual(len(proxied[watch_id]), len(direct[watch_id]), watch_id)
            for p, d in zip(proxied[watch_id], direct[watch_id]):
                self.assertSameResponse(p, d)
        return {w: [e for r in rs for e in r.events] for w, rs in direct.items()}

    def test_start_revisions_past_present_and_future(self):
        key = self.key("k")
        first = self.put(key, b"0").header.revision
        for i in range(1, 5):
            self.put(key, b"%d" % i)
        # A watcher that joins at once, then one from the past (a catch-up on
        # its own, merged into the shared one), one from the future.
        twin = Twin(self)
        twin.send(create(key))
        twin.send(create(key, start_revision=first + 1))
        twin.send(create(key, start_revision=first + 7))
        # three "created" and the catch-up's events, which etcd may send first
        events = self._by_watch_id(twin, 4)
        self.assertEqual([e.kv.mod_revision for e in events[1]], list(range(first + 1, first + 5)))
        for i in range(5, 10):
            self.put(key, b"%d" % i)
        events = self._by_watch_id(twin, 5 + 5 + 3)
        self.assertEqual([e.kv.mod_revision for e in events[0]], list(range(first + 5, first + 10)))
        self.assertEqual([e.kv.mod_revision for e in events[1]], list(range(first + 5, first + 10)))
        self.assertEqual([e.kv.mod_revision for e in events[2]], list(range(first + 7, first + 10)))

    def test_catch_up_merges_into_the_shared_watcher(self):
        key = self.key("k")
        before = self.settled_gauge()
        live = self.stream(self.p.watch.Watch)
        live.send(create(key))
        self.assertTrue(live.recv().created)
        first = self.put(key, b"0").header.revision
        self.assertEqual(live.recv().events[0].kv.mod_revision, first)
        late = self.stream(self.p.watch.Watch)
        late.send(create(key, start_revision=first))
        self.assertTrue(late.recv().created)
        self.assertEqual(late.recv().events[0].kv.mod_revision, first)
        revisions = [self.put(key, b"%d" % i).header.revision for i in range(20)]
        got = []
        while len(got) < 20:
            got += [e.kv.mod_revision for e in late.recv().events]
        self.assertEqual(got, revisions)
        self.assertEqual([e.kv.mod_revision for _ in range(20) for e in live.recv().events], revisions)
        deadline = time.monotonic() + 5
        while self.gauge() != before + 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        self.assertEqual(self.gauge(), before + 1, "the catch-up watcher was not merged")

    def test_cancel(self):
        key = self.key("k")
        twin = Twin(self)
        twin.send(create(key))
        twin.send(create(key))
        twin.expect(2)
        twin.send(cancel(0))
        twin.expect(1)  # canceled
        twin.send(cancel(42))  # unknown: no answer, from etcd either
        self.put(key, b"a")
        twin.expect(1)  # watch 1 only
        twin.expect_nothing()

    def test_progress_request_and_notifications(self):
        key = self.key("k")
        twin = Twin(self)
        twin.send(create(key, progress_notify=True))
        twin.expect(1)
        self.put(self.key("other"), b"x")
        twin.send(progress())
        answer = twin.expect(1)[0]
        self.assertEqual(answer.watch_id, -1)
        current = self.get(key).header.revision
        self.assertEqual(answer.header.revision, current)
        # etcd's periodic notification (every second here), through the proxy too
        for stream in (twin.direct, twin.proxied):
            notification = stream.recv(5)
            self.assertEqual((notification.watch_id, list(notification.events)), (0, []))
            self.assertEqual(notification.header.revision, current)

    def test_compacted_start_revision_and_a_fresh_watcher_after_it(self):
        key = self.key("k")
        first = self.put(key, b"a").header.revision
        last = self.put(key, b"b").header.revision
        self.p.kv.Compact(R.CompactionRequest(revision=last, physical=True))
        twins = [Twin(self), Twin(self)]
        for twin in twins:
            twin.send(create(key, start_revision=first))
        for twin in twins:
            created, canceled = twin.expect(2)
            self.assertTrue(created.created)
            self.assertEqual((canceled.canceled, canceled.compact_revision), (True, last))
        # No dead shared watcher left behind: a new watcher gets events.
        twin = Twin(self)
        twin.send(create(key))
        twin.expect(1)
        self.put(key, b"c")
        self.assertEqual(len(twin.expect(1)[0].events), 1)

    def test_half_close_keeps_the_watches(self):
        key = self.key("k")
        twin = Twin(self)
        twin.send(create(key))
        twin.expect(1)
        twin.direct.requests.close()
        twin.proxied.requests.close()
        time.sleep(0.2)
        self.put(key, b"a")
        self.assertEqual(len(twin.expect(1)[0].events), 1)

    def test_shared_watcher_leaves_etcd_with_its_last_client(self):
        key = self.key("k")
        before = self.settled_gauge()
        streams = []
        for _ in range(5):
            s = self.stream(self.p.watch.Watch)
            for _ in range(3):
                s.send(create(key))
                self.assertTrue(s.recv().created)
            streams.append(s)
        self.assertEqual(self.gauge(), before + 1)
        streams[0].send(cancel(0))
        self.assertTrue(streams[0].recv().canceled)
        for s in streams[1:]:
            s.call.cancel()  # RST_STREAM
        self.put(key, b"a")
        self.assertEqual(len(streams[0].recv().events), 1)  # watches 1 and 2 still there
        self.assertEqual(self.gauge(), before + 1)
        streams[0].call.cancel()
        deadline = time.monotonic() + 5
        while self.gauge() != before and time.monotonic() < deadline:
            time.sleep(0.05)
        self.assertEqual(self.gauge(), before)

    def test_exact_mode_starts_at_etcds_revision(self):
        key = self.key("k")
        first = self.stream(self.p.watch.Watch)
        first.send(create(key))
        self.assertTrue(first.recv().created)
        for i in range(5):  # writes the shared watcher does not see
            self.put(self.key("other"), b"%d" % i)
        current = self.get(key).header.revision
        relaxed = self.stream(self.p.watch.Watch)
        relaxed.send(create(key))
        exact = self.stream(self.p.watch.Watch, metadata=EXACT)
        exact.send(create(key))
        self.assertEqual(exact.recv().header.revision, current)
        self.assertLess(relaxed.recv().header.revision, current)
        revision = self.put(key, b"a").header.revision
        for s in (first, relaxed, exact):
            self.assertEqual([e.kv.mod_revision for e in s.recv().events], [revision])

    def test_fragments_split_as_etcd_splits_them(self):
        prefix = self.key()
        value = b"v" * (100 * 1024)
        first = self.put(prefix + b"0", value).header.revision
        for i in range(1, 30):  # 30 events of 100 KiB: over etcd's 2 MiB
            self.put(prefix + b"%d" % i, value)
        shapes = []
        for stubs in (self.d, self.p):
            s = self.stream(stubs.watch.Watch)
            s.send(create(prefix, range_end=prefix_end(prefix), start_revision=first, fragment=True))
            self.assertTrue(s.recv().created)
            shape = []
            while sum(shape) < 30:
                r = s.recv()
                shape.append(len(r.events))
                self.assertEqual(r.fragment, sum(shape) < 30)
            shapes.append(shape)
        self.assertEqual(shapes[1], shapes[0])
        self.assertGreater(len(shapes[0]), 1)


class ManyWatchersTests(GrpcioTestCase):
    CONNECTIONS = 10
    STREAMS = 100  # 10 per connection
    WATCHERS = 1000  # 10 per stream
    PUTS = 100

    def settled_watchers(self):
        """etcd's watcher count once the proxy's own (the range cache's
        invalidation watch, made as the proxy starts) is there and stays."""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if samples(get("http://" + self.proxied + "/metrics")[1]).get(
                    ("etcdgrpcproxy_range_cache_up", frozenset())) == 1:
                break
            time.sleep(0.1)
        last = None
        while time.monotonic() < deadline:
            current = self.etcd.metric(GAUGE)
            if current == last:
                return current
            last = current
            time.sleep(0.3)
        return last

    def test_one_watcher_at_etcd_for_a_thousand(self):
        key = self.key("k")
        before = self.settled_watchers()
        channels = [Stubs(self.proxied) for _ in range(self.CONNECTIONS)]
        for c in channels:
            self.addCleanup(c.close)
        streams = []
        for i in range(self.STREAMS):
            s = self.stream(channels[i % self.CONNECTIONS].watch.Watch)
            for _ in range(self.WATCHERS // self.STREAMS):
                s.send(create(key))
            streams.append(s)
        for s in streams:
            for _ in range(self.WATCHERS // self.STREAMS):
                self.assertTrue(s.recv().created)
        self.assertEqual(self.etcd.metric(GAUGE), before + 1)
        revisions = [self.d.kv.Put(R.PutRequest(key=key, value=b"%d" % n)).header.revision
                     for n in range(self.PUTS)]
        failures = []

        def check(s):
            seen = {}
            try:
                while sum(len(v) for v in seen.values()) < self.PUTS * 10:
                    r = s.recv(20)
                    seen.setdefault(r.watch_id, []).extend(e.kv.mod_revision for e in r.events)
                if sorted(seen) != list(range(10)) or any(v != revisions for v in seen.values()):
                    failures.append({w: v[:5] for w, v in seen.items()})
            except AssertionError as e:
                failures.append(str(e))

        threads = [threading.Thread(target=check, args=(s,)) for s in streams]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        self.assertEqual(failures, [])
        self.assertEqual(self.etcd.metric(GAUGE), before + 1)


class StreamOrderTests(GrpcioTestCase):
    """etcd sends the events of one stream's caught-up watchers in revision
    order across all of them; through the proxy too, whichever shared watchers
    feed the stream (its own, or ones another stream made)."""

    KEYS = 40
    ROUNDS = 25
    WRITERS = 4

    def test_revision_order_across_watchers_of_one_stream(self):
        keys = [self.key("k%02d" % i) for i in range(self.KEYS)]
        # Another stream's watchers on half of the keys: the stream under test
        # shares their watchers at etcd for those keys, has its own for the rest.
        other = self.stream(self.p.watch.Watch)
        for key in keys[::2]:
            other.send(create(key))
        for _ in keys[::2]:
            self.assertTrue(other.recv().created)
        streams = {"direct": self.stream(self.d.watch.Watch), "proxy": self.stream(self.p.watch.Watch)}
        for s in streams.values():
            for key in keys:
                s.send(create(key))
            for _ in keys:
                self.assertTrue(s.recv().created)
        rng = __import__("random").Random(16)
        order = [k for _ in range(self.ROUNDS) for k in rng.sample(keys, len(keys))]

        def write(part):
            stubs = Stubs(self.direct)
            try:
                for key in order[part::self.WRITERS]:
                    stubs.kv.Put(R.PutRequest(key=key, value=b"v"))
            finally:
                stubs.close()

        writers = [threading.Thread(target=write, args=(i,)) for i in range(self.WRITERS)]
        for t in writers:
            t.start()
        for t in writers:
            t.join(60)
        seen = {}
        for side, s in streams.items():
            seen[side] = []
            while len(seen[side]) < len(order):
                r = s.recv(10)
                seen[side].extend((e.kv.mod_revision, r.watch_id, e.kv.key) for e in r.events)
        self.assertEqual(len(seen["direct"]), len(order))
        revisions = [rev for rev, _, _ in seen["proxy"]]
        self.assertEqual(revisions, sorted(set(revisions)), "events out of revision order")
        self.assertEqual(seen["proxy"], seen["direct"])

    def test_order_when_a_shared_watcher_is_still_catching_up(self):
        """A watcher from now on a range whose shared watcher etcd is still
        sending a long history (another stream's watcher from the past) is
        kept in revision order with the stream's other watchers, as etcd
        keeps a watcher created from now."""
        hot, cold = self.key("hot"), self.key("cold")
        # 3000 revisions of history: etcd sends them to a watcher from the past
        # in batches of 1000 revisions, 100 ms apart, before it syncs it.
        first = self.d.kv.Put(R.PutRequest(key=hot, value=b"h")).header.revision
        for _ in range(2999):
            self.d.kv.Put(R.PutRequest(key=hot, value=b"h"))
        past = self.stream(self.p.watch.Watch)
        past.send(create(hot, start_revision=first))
        self.assertTrue(past.recv().created)
        now = self.stream(self.p.watch.Watch)
        now.send(create(hot))
        now.send(create(cold))
        self.assertTrue(now.recv().created)
        self.assertTrue(now.recv().created)
        revisions = [self.d.kv.Put(R.PutRequest(key=(hot, cold)[i % 2], value=b"n")).header.revision
                     for i in range(40)]
        got = []
        while len(got) < len(revisions):
            got += [e.kv.mod_revision for e in now.recv(10).events]
        self.assertEqual(got, revisions)
