"""Watch responses for client watchers, encoded once per upstream batch.

A protobuf message's encoding is the concatenation of its fields' encodings,
in any order, and a field seen twice is merged. So the response a client
watcher gets is its own watch_id field (`watch_id_field`, made once per
watcher) followed by a body shared by every watcher that sees the same events:
the body (header, events) is serialized once per batch and per variant (event
filters, events cut below a watcher's start revision, fragments).

Fragments: a watcher created with fragment=true gets a large batch split the
way etcd 3.4 splits it (v3rpc/watch.go sendFragments), at ``fragment_size``
bytes.
"""

from etcdproxy.pb.etcdserverpb import rpc_pb2

# Where etcd splits fragmented responses: its --max-request-bytes (1.5 MiB by
# default) + 512 KiB of gRPC overhead (v3rpc/watch.go).
DEFAULT_FRAGMENT_SIZE = 1536 * 1024 + 512 * 1024

# WatchCreateRequest.FilterType NOPUT/NODELETE have the numbers of the event
# types they drop (mvccpb.Event PUT/DELETE): a watcher's filters are the set of
# event types it does not want.
_FRAGMENT_FIELD = rpc_pb2.WatchResponse(fragment=True).SerializeToString()


def watch_id_field(watch_id):
    return rpc_pb2.WatchResponse(watch_id=watch_id).SerializeToString()


def _varint_size(n):
    size = 1
    while n >= 0x80:
        n >>= 7
        size += 1
    return size


def _field_size(length):
    """Encoded size of a length-delimited field (tag < 16) of ``length`` bytes."""
    return 1 + _varint_size(length) + length


class EventBatch:
    """The events of one upstream response (fragments joined), as clients
    see them. ``events`` are in revision order."""

    __slots__ = ("header", "events", "first_revision", "last_revision", "_bodies", "_plain")

    def __init__(self, header, events, plain=None):
        self.header = header
        self.events = events
        self.first_revision = events[0].kv.mod_revision
        self.last_revision = events[-1].kv.mod_revision
        self._plain = plain  # the body of all events, when already at hand
        self._bodies = {}

    def bodies(self, excluded, min_revision, prefix_size, fragment_size):
        """The response bodies for a watcher that drops event types
        ``excluded``, wants no event below ``min_revision``, and (when
        ``fragment_size``) takes fragments; its watch_id field is
        ``prefix_size`` bytes long. Empty when no event is for it."""
        cut = 0
        if min_revision > self.first_revision:
            if min_revision > self.last_revision:
                return ()
            cut = next(i for i, e in enumerate(self.events) if e.kv.mod_revision >= min_revision)
        key = (excluded, cut, prefix_size, fragment_size) if fragment_size else (excluded, cut)
        bodies = self._bodies.get(key)
        if bodies is None:
            bodies = self._bodies[key] = self._make_bodies(excluded, cut, prefix_size, fragment_size)
        return bodies

    def _make_bodies(self, excluded, cut, prefix_size, fragment_size):
        events = self.events[cut:] if cut else self.events
        if excluded:
            events = [e for e in events if e.type not in excluded]
            if not events:
                return ()  # etcd sends nothing when every event is filtered out
        if not excluded and not cut and self._plain is not None:
            body = self._plain
        else:
            body = rpc_pb2.WatchResponse(header=self.header, events=events).SerializeToString()
        if not fragment_size or prefix_size + len(body) < fragment_size or len(events) < 2:
            return (body,)
        return tuple(self._fragments(events, prefix_size, fragment_size))

    def _fragments(self, events, prefix_size, fragment_size):
        """etcd's split: as many events as fit under the size, at least one
        each time, fragment=true on all but the last."""
        header = rpc_pb2.WatchResponse(header=self.header).SerializeToString()
        base = prefix_size + len(header) + len(_FRAGMENT_FIELD)
        chunk, size = [], base
        for event in events:
            event_size = _field_size(event.ByteSize())
            if chunk and size + event_size >= fragment_size:
                yield header + _FRAGMENT_FIELD + _encode_events(chunk)
                chunk, size = [], base
            chunk.append(event)
            size += event_size
        yield header + _encode_events(chunk)


def _encode_events(events):
    return rpc_pb2.WatchResponse(events=events).SerializeToString()


def created(header, watch_id):
    return rpc_pb2.WatchResponse(header=header, watch_id=watch_id, created=True).SerializeToString()


def refused(header, reason):
    """A create etcd refused (permission, empty range): etcd answers with
    watch_id -1, created and canceled."""
    return rpc_pb2.WatchResponse(
        header=header, watch_id=-1, created=True, canceled=True, cancel_reason=reason,
    ).SerializeToString()


def canceled(header, watch_id, compact_revision=0, reason=""):
    return rpc_pb2.WatchResponse(
        header=header, watch_id=watch_id, canceled=True,
        compact_revision=compact_revision, cancel_reason=reason,
    ).SerializeToString()


def progress(header, watch_id):
    """A progress notification (watch_id of a watcher) or the answer to a
    progress request (watch_id -1)."""
    return rpc_pb2.WatchResponse(header=header, watch_id=watch_id).SerializeToString()
