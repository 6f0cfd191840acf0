"""The range cache: serializable Range answered from encoded answers, coherent
with etcd (the ``range-cache`` child of the service tree).

- A hit is served only while the invalidation watch (`range_watch`) is up; it
  gets a fresh header: etcd's revision as far as the watch has seen (no key it
  covers changed since, so etcd would give the same answer at that revision).
- Linearizable reads always go to etcd; their answers may fill the cache.
  Identical serializable misses at the same moment share one upstream Range.
- Fill rule: the watch has seen every change up to W; an answer with header
  revision R may be stored only if R >= W and R >= every write revision seen
  through this proxy (later changes will arrive and invalidate it).
- Writes through this proxy invalidate what they touch when they complete
  (`range_calls`); writes elsewhere arrive as watch events.
- Entries read at a fixed revision are dropped on Compact through the proxy,
  and by a periodic probe (a count Range at the oldest such revision) for
  compactions made elsewhere.
- Auth: entries are per token. Auth changes through the proxy drop the entries
  with a token (AuthEnable/AuthDisable: all); changes made elsewhere cannot be
  seen, so an entry with a token lives at most ``token_max_age`` seconds.
  Entries without a token go once etcd refuses a tokenless watch create
  (probed every ``check_interval``): auth was enabled elsewhere.
"""

from google.protobuf.message import DecodeError
from twisted.application import service
from twisted.logger import Logger

from etcdproxy.grpc.status import GRPCError
from etcdproxy.pb.etcdserverpb import rpc_pb2
from etcdproxy.services.range_fetch import RANGE_PATH, RangeFetch
from etcdproxy.services.range_store import Entry, RangeStore, overlaps, span
from etcdproxy.services.range_watch import InvalidationWatch

DEFAULT_MAX_BYTES = 64 * 1024 * 1024
DEFAULT_MAX_ENTRIES = 100_000


def _varint(n):
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def split_header(answer):
    """(ResponseHeader, a view of the other fields' bytes as they are) of an
    encoded RangeResponse whose header is its first field, as etcd writes it; None for
    any other (then decoded whole). Spares decoding and encoding the kvs of a
    large answer to store it."""
    if answer[:1] != b"\n":
        return None
    length, shift, position = 0, 0, 1
    while position < len(answer) and shift < 35:
        byte = answer[position]
        position += 1
        length |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            end = position + length
            if end > len(answer):
                return None
            try:
                header = rpc_pb2.ResponseHeader.FromString(answer[position:end])
            except DecodeError:
                return None
            return header, memoryview(answer)[end:]  # (not copied: the answer is bytes or a read-only view)
    return None


def metadata_value(metadata, name):
    for key, value in metadata:
        if key == name:
            return value
    return None


class RangeCache(service.Service):
    name = "range-cache"
    _log = Logger()

    def __init__(self, monitor, max_bytes=DEFAULT_MAX_BYTES, max_entries=DEFAULT_MAX_ENTRIES,
                 token_max_age=1.0, check_interval=1.0, credentials=None):
        self.monitor = monitor
        self.reactor = monitor.reactor
        self.store = RangeStore(max_bytes, max_entries)
        self.token_max_age = token_max_age
        self.check_interval = check_interval
        self.watch = InvalidationWatch(monitor, self, credentials)
        self.inflight = {}  # coalescing key -> RangeFetch
        self.up = False
        self.watched = 0  # every change up to this revision was seen
        self.floor = 0  # the highest revision of a write through this proxy
        self.header = rpc_pb2.ResponseHeader()  # the latest seen
        self._header_cache = (None, b"")
        self.anonymous = True  # tokenless reads allowed (auth off), as last probed
        self.auth_epoch = 0
        self.auth_writes = 0  # auth changes through the proxy in flight
        self._generation = 0  # bumped each time the watch goes down
        self._check_timer = None
        self._probing = False
        self.counts = dict(hits=0, misses=0, coalesced=0, fills=0, fills_refused=0)

    # -- service --------------------------------------------------------------------------

    def startService(self):
        super().startService()
        self.watch.start()
        self._check_timer = self.reactor.callLater(self.check_interval, self._check)

    def stopService(self):
        super().stopService()
        if self._check_timer is not None and self._check_timer.active():
            self._check_timer.cancel()
        self._check_timer = None
        self.watch.stop()

    def stats(self):
        return dict(self.counts, entries=len(self.store), keys=len(self.store), bytes=self.store.bytes,
                    invalidations=self.store.invalidations, evictions=self.store.evictions,
                    inflight=len(self.inflight), up=int(self.up))

    # -- client requests ------------------------------------------------------------------

    def serve(self, waiter, message, metadata, timeout):
        """Answers a client's Range (``message``, bytes): ``waiter.answered(bytes)``
        or ``waiter.failed(GRPCError)``, now or later. Returns the RangeFetch the
        waiter waits for (to `leave` it), or None."""
        request = rpc_pb2.RangeRequest.FromString(message)  # DecodeError: the caller forwards
        serializable = request.serializable
        request.serializable = True
        token = metadata_value(metadata, b"token") or b""
        cache_key = (token, request.SerializeToString(deterministic=True))
        hasleader = metadata_value(metadata, b"hasleader") is not None
        if serializable and not hasleader and self._available():
            entry = self.store.get(cache_key, self.reactor.seconds())
            if entry is not None:
                self.counts["hits"] += 1
                waiter.answered(self._encode_hit(entry))
                return None
        self.counts["misses"] += 1
        if serializable:
            coalescing_key = (cache_key[1], tuple(sorted(metadata)))
            fetch = self.inflight.get(coalescing_key)
            if fetch is not None and not fetch.detached:
                self.counts["coalesced"] += 1
                fetch.waiters.append(waiter)
                return fetch
        else:
            coalescing_key = None  # a linearizable read never joins an earlier one
        fetch = RangeFetch(self.monitor, message, metadata, timeout, self._fetched)
        fetch.cache_key = cache_key
        fetch.coalescing_key = coalescing_key
        fetch.span = span(request.key, request.range_end)
        fetch.revision = request.revision
        fetch.started_at = (self._generation, self.auth_epoch)
        fetch.waiters.append(waiter)
        if coalescing_key is not None:
            self.inflight[coalescing_key] = fetch
        fetch.start()
        return fetch

    def _fetched(self, fetch, result):
        if self.inflight.get(fetch.coalescing_key) is fetch:
            del self.inflight[fetch.coalescing_key]
        if result is None or isinstance(result, GRPCError):
            return
        split = split_header(result)
        if split is not None:
            header, body = split
        else:
            response = rpc_pb2.RangeResponse.FromString(result)
            header = response.header
            response.ClearField("header")
            body = None  # encoded only if stored
        if header.revision >= self.header.revision:
            self.header = header
        if self._may_fill(fetch, header.revision):
            if body is None:
                body = response.SerializeToString()
            token = fetch.cache_key[0]
            expires = self.reactor.seconds() + self.token_max_age if token else None
            entry = Entry(fetch.cache_key, fetch.span, fetch.revision, token,
                          body, header.revision, expires)
            if self.store.put(entry):
                self.counts["fills"] += 1
        else:
            self.counts["fills_refused"] += 1

    def _may_fill(self, fetch, revision):
        generation, auth_epoch = fetch.started_at
        if not self._available() or generation != self._generation:
            return False
        if fetch.revision == 0 and revision < max(self.watched, self.floor):
            return False
        if fetch.cache_key[0]:
            return auth_epoch == self.auth_epoch and not self.auth_writes
        return self.anonymous

    def _available(self):
        if self.up and not self.watch.healthy:
            self.watch_down()
        return self.up

    def _encode_hit(self, entry):
        revision = max(entry.filled_at, self.watched)
        cached_revision, header = self._header_cache
        if cached_revision != revision:
            h = self.header
            header = rpc_pb2.ResponseHeader(cluster_id=h.cluster_id, member_id=h.member_id,
                                            revision=revision, raft_term=h.raft_term).SerializeToString()
            header = b"\n" + _varint(len(header)) + header
            self._header_cache = (revision, header)
        return header + entry.body

    # -- the invalidation watch -------------------------------------------------------------

    def watch_up(self, header):
        self.up = True
        self.watched = header.revision
        if header.revision >= self.header.revision:
            self.header = header
        self._header_cache = (None, b"")

    def watch_down(self):
        self.up = False
        self.forget_all()

    def forget_all(self):
        """Drops every entry; answers in flight will not be stored."""
        self._generation += 1
        self.store.clear()
        for fetch in self.inflight.values():
            fetch.detached = True

    def keys_changed(self, keys, revision, header):
        store = self.store
        for key in keys:
            store.invalidate_key(key)
        if self.inflight:
            for key in keys:
                self._detach(span(key, b""))
        if revision > self.watched:
            self.watched = revision
        if header.revision >= self.header.revision:
            self.header = header

    def anonymous_allowed(self, allowed):
        if not allowed and self.anonymous:
            self._log.info("range cache: etcd refuses tokenless reads (auth enabled): "
                           "entries without a token dropped")
        self.anonymous = allowed
        if not allowed:
            self.store.drop_tokens(with_token=False)

    # -- writes through this proxy (range_calls) ---------------------------------------------

    def written(self, spans, revision):
        """A write touching ``spans`` completed (at ``revision``, 0 if unknown)."""
        for span_ in spans:
            self.store.invalidate_span(span_)
            self._detach(span_)
        if revision > self.floor:
            self.floor = revision

    def compacted(self, revision):
        self.store.compacted(revision)

    def auth_change_started(self):
        self.auth_writes += 1
        self.auth_epoch += 1
        self.store.drop_tokens(with_token=True)

    def auth_change_ended(self, everything):
        self.auth_writes -= 1
        self.auth_epoch += 1
        self.store.drop_tokens(with_token=True)
        if everything:  # AuthEnable/AuthDisable: who may read without a token changed
            self.store.drop_tokens(with_token=False)
            self.anonymous = False
            self.watch.probe_anonymous()  # allowed again once it passes (auth off)

    def _detach(self, span_):
        for fetch in self.inflight.values():
            if fetch.revision == 0 and overlaps(fetch.span, span_):
                fetch.detached = True

    # -- periodic checks: compaction and auth made elsewhere -------------------------------------

    def _check(self):
        self._check_timer = self.reactor.callLater(self.check_interval, self._check)
        if not self._available():
            return
        self.watch.probe_anonymous()
        self._probe_compaction()

    def _probe_compaction(self):
        revision = self.store.oldest_fixed()
        if revision is None or self._probing:
            return
        self._probing = True
        request = rpc_pb2.RangeRequest(key=b"\0", revision=revision, serializable=True,
                                       count_only=True).SerializeToString()
        try:
            channel = self.monitor.pick()
        except GRPCError:
            self._probing = False
            return
        d = channel.unary_call(RANGE_PATH, request, (), self.check_interval)

        def answered(_):
            self._probing = False

        def failed(failure):
            self._probing = False
            error = failure.value
            if isinstance(error, GRPCError) and "compacted" in error.message:
                self.store.compacted(revision + 1)
                self._probe_compaction()  # the next oldest, at once

        d.addCallbacks(answered, failed)
