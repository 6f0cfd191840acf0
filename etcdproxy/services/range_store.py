"""The range cache's store: encoded Range answers, LRU-bounded by bytes and
entries, indexed by the keys they cover (pure logic: no I/O, no etcd).

An entry is one Range request (re-serialized with serializable=True, with the
auth token it came with) and the body of etcd's answer: the RangeResponse
without its header (field 1), which is made afresh for each hit. An entry read
at "now" (revision 0) goes when a key it covers changes; an entry read at a
fixed revision never changes, it goes when that revision is compacted.
"""

import collections
import sys

# Fixed cost counted per entry on top of its key and body (the objects, the
# index slots): the byte bound stays an honest bound on memory.
ENTRY_OVERHEAD = 256

INFINITY = None  # a span's end when it has none (range_end "\0")


def span(key, range_end):
    """etcd's (key, range_end) as (low, high): high is None for "every key from
    key on", and key + b"\\0" for a single key (so low <= k < high)."""
    if not range_end:
        return key, key + b"\0"
    if range_end == b"\0":
        return key, INFINITY
    return key, range_end


def overlaps(a, b):
    """Whether spans a and b share a key."""
    (alo, ahi), (blo, bhi) = a, b
    return (bhi is INFINITY or alo < bhi) and (ahi is INFINITY or blo < ahi) and \
        (ahi is INFINITY or alo < ahi) and (bhi is INFINITY or blo < bhi)


class Entry:
    __slots__ = ("cache_key", "span", "revision", "token", "body", "filled_at",
                 "expires", "size")

    def __init__(self, cache_key, span_, revision, token, body, filled_at, expires):
        self.cache_key = cache_key
        self.span = span_
        self.revision = revision  # the request's revision (0: now)
        self.token = token  # b"" without auth
        self.body = body  # the RangeResponse without header
        self.filled_at = filled_at  # the header revision of etcd's answer
        self.expires = expires  # reactor time, or None
        # A view of etcd's answer keeps the whole buffer it is in alive (with its
        # spare room, for one the proxy assembled): that is what it costs.
        held = sys.getsizeof(body.obj) if type(body) is memoryview else len(body)
        self.size = held + len(cache_key[1]) + len(token) + ENTRY_OVERHEAD


class RangeStore:
    def __init__(self, max_bytes, max_entries):
        self.max_bytes = max_bytes
        self.max_entries = max_entries
        self.entries = collections.OrderedDict()  # cache key -> Entry, least recent first
        self.bytes = 0
        self._single = {}  # key -> {cache keys} of "now" entries for that one key
        self._ranges = {}  # span -> {cache keys} of "now" entries for a range
        self.evictions = 0
        self.invalidations = 0

    def __len__(self):
        return len(self.entries)

    def get(self, cache_key, now):
        entry = self.entries.get(cache_key)
        if entry is None:
            return None
        if entry.expires is not None and now >= entry.expires:
            self._remove(entry)
            return None
        self.entries.move_to_end(cache_key)
        return entry

    def put(self, entry):
        """Stores ``entry`` (replacing one with the same key); returns whether
        it was kept (not when it alone exceeds an eighth of the byte bound)."""
        if entry.size > self.max_bytes // 8 or self.max_entries <= 0:
            return False
        old = self.entries.get(entry.cache_key)
        if old is not None:
            self._remove(old)
        self.entries[entry.cache_key] = entry
        self.bytes += entry.size
        if entry.revision == 0:
            low, high = entry.span
            if high == low + b"\0":
                self._single.setdefault(low, set()).add(entry.cache_key)
            else:
                self._ranges.setdefault(entry.span, set()).add(entry.cache_key)
        while self.bytes > self.max_bytes or len(self.entries) > self.max_entries:
            self._remove(next(iter(self.entries.values())))
            self.evictions += 1
        return True

    def _remove(self, entry):
        del self.entries[entry.cache_key]
        self.bytes -= entry.size
        if entry.revision == 0:
            low, high = entry.span
            index, slot = (self._single, low) if high == low + b"\0" else (self._ranges, entry.span)
            keys = index.get(slot)
            if keys is not None:
                keys.discard(entry.cache_key)
                if not keys:
                    del index[slot]

    def _drop(self, cache_keys):
        for cache_key in list(cache_keys):
            entry = self.entries.get(cache_key)
            if entry is not None:
                self._remove(entry)
                self.invalidations += 1

    # -- invalidation -----------------------------------------------------------------

    def invalidate_key(self, key):
        """A key changed: the "now" entries covering it go."""
        keys = self._single.get(key)
        if keys:
            self._drop(keys)
        if self._ranges:
            for span_ in [s for s in self._ranges if _contains(s, key)]:
                self._drop(self._ranges.get(span_, ()))

    def invalidate_span(self, span_):
        """Any key of ``span_`` may have changed."""
        low, high = span_
        if high == low + b"\0":
            self.invalidate_key(low)
            return
        for key in [k for k in self._single if _contains(span_, k)]:
            self._drop(self._single.get(key, ()))
        for other in [s for s in self._ranges if overlaps(s, span_)]:
            self._drop(self._ranges.get(other, ()))

    def compacted(self, revision):
        """Revisions below ``revision`` are compacted: entries read at them go."""
        self._drop([e.cache_key for e in self.entries.values() if 0 < e.revision < revision])

    def oldest_fixed(self, token=b""):
        """The lowest fixed revision of an entry with ``token``, or None."""
        revisions = [e.revision for e in self.entries.values() if e.revision > 0 and e.token == token]
        return min(revisions) if revisions else None

    def drop_tokens(self, with_token):
        """Drops the entries made with a token (``with_token``) or without one."""
        self._drop([e.cache_key for e in self.entries.values() if bool(e.token) == with_token])

    def clear(self):
        self.invalidations += len(self.entries)
        self.entries.clear()
        self._single.clear()
        self._ranges.clear()
        self.bytes = 0


def _contains(span_, key):
    low, high = span_
    return low <= key and (high is INFINITY or key < high)
