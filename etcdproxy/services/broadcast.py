"""The watch broadcaster: client watchers on one key or range share one watcher at etcd.

Words: a *client watcher* is one watch a client created on its Watch stream; a
*shared watcher* is one watcher the proxy holds at etcd, feeding any number of
client watchers. Client streams are grouped into *sessions* by what etcd would
treat differently (the auth token, ``hasleader``); a session is one upstream
Watch stream holding the shared watchers of its clients (see `UpstreamStream`:
it moves to another endpoint when its own fails).

Per range (key, range_end, prev_kv), the *primary* shared watcher is the one new
client watchers join. A shared watcher has delivered every event up to its
``position``. A client watcher that wants events from revision W:
- joins the primary when W > position, skipping events below W (a watcher with
  no start revision wants W = the latest revision the session has seen + 1: it
  may start slightly behind etcd's current revision, the relaxation the Go
  proxy's design allows; `exact` mode reads etcd's revision first);
- else gets a shared watcher of its own, started at W (a *catch-up*), which
  merges into the primary as soon as it has reached the primary's position.
A primary that started in the past may still be getting history from etcd, in
batches out of step with the stream's other watchers; a client watcher from now
does not join it (it would not see the events of the stream's watchers in
revision order, as etcd keeps them for a watcher from now): it gets a new
primary from now, and the old one becomes a catch-up.

Upstream shared watchers ask for progress notifications and fragments always;
client watchers get each as they asked (`watch_responses`). Nothing here pauses
the upstream stream: a slow client is bounded on its own (services/watch.py).
"""

import collections

from twisted.application import service
from twisted.logger import Logger

from etcdproxy.pb.etcdserverpb import rpc_pb2
from etcdproxy.services import watch_responses
from etcdproxy.upstream.stream import UpstreamStream

WATCH_PATH = b"/etcdserverpb.Watch/Watch"


class SharedWatcher:
    __slots__ = (
        "upstream_id", "range", "create", "start_revision", "members", "waiting",
        "created", "position", "fragments", "resumed", "abandoned", "catching_up",
    )

    def __init__(self, upstream_id, range_, create, start_revision):
        self.upstream_id = upstream_id
        self.range = range_
        self.create = create  # the client's create request it was made for
        self.start_revision = start_revision
        self.members = set()  # client watchers fed by it
        self.waiting = []  # client watchers to attach once etcd confirms it
        self.created = False
        self.position = 0  # every event up to this revision is delivered
        self.fragments = []  # events of a fragmented response, until its last part
        self.resumed = False  # created again on a new upstream stream
        self.abandoned = False  # no client left before etcd confirmed it
        # Started in the past: etcd may still be sending it history, in batches
        # out of step with the stream's other watchers, until it is synced.
        self.catching_up = False

    @property
    def idle(self):
        return not self.members and not self.waiting


class WatchSession:
    """One upstream Watch stream and the shared watchers on it (an
    `IUpstreamStreamOwner`)."""

    _log = Logger()

    def __init__(self, broadcaster, key, metadata):
        self.broadcaster = broadcaster
        self.key = key
        self.stream = UpstreamStream(broadcaster.monitor, WATCH_PATH, metadata, self)
        self.primaries = {}  # range -> the shared watcher new client watchers join
        self.catchups = collections.defaultdict(set)  # range -> catch-ups
        self.watchers = {}  # upstream watch id -> SharedWatcher
        self.creating = collections.deque()  # shared watchers awaiting etcd's "created"
        self.header = rpc_pb2.ResponseHeader()  # the latest one seen
        self.progress_waiting = []  # client streams waiting for a progress answer
        self.progress_next = []  # ... that asked after the request in flight was sent
        self._next_id = 1
        self.error = None  # why the upstream stream is over, once it is

    @property
    def revision(self):
        return self.header.revision

    def header_at(self, revision):
        header = rpc_pb2.ResponseHeader()
        header.CopyFrom(self.header)
        header.revision = revision
        return header

    # -- what client streams ask ------------------------------------------------

    def add_watcher(self, watcher, start_revision):
        """Makes ``watcher`` (a client watcher) see its range from
        ``start_revision`` (0: from now); its stream is told
        `watcher_created` or `watcher_refused`."""
        watcher.start_revision = start_revision
        primary = self.primaries.get(watcher.range)
        if primary is not None and primary.catching_up and (
                start_revision == 0 or start_revision > self.revision):
            # A watcher from now gets a watcher etcd keeps in step with the
            # stream's others, as etcd would give it; the one catching up
            # merges into it once it has caught up.
            self.catchups[watcher.range].add(primary)
            primary = None
        if primary is None:
            primary = self.primaries[watcher.range] = self._new_shared(watcher, start_revision)
        if primary.created:
            self._attach(primary, watcher)
        else:
            primary.waiting.append(watcher)
            watcher.source = primary

    def remove_watcher(self, watcher):
        shared, watcher.source = watcher.source, None
        if shared is None:
            return
        shared.members.discard(watcher)
        if watcher in shared.waiting:
            shared.waiting.remove(watcher)
        self._uncount(watcher)
        if shared.idle:
            self._drop_shared(shared)
        self._close_if_idle()

    def request_progress(self, client):
        """``client.progress_answered(header)`` follows, once etcd said which
        revision every shared watcher of this stream has reached."""
        if self.progress_waiting:
            self.progress_next.append(client)
            return
        self.progress_waiting.append(client)
        self._send_progress_request()

    def forget_client(self, client):
        for waiting in (self.progress_waiting, self.progress_next):
            while client in waiting:
                waiting.remove(client)
        self._close_if_idle()

    # -- shared watchers ----------------------------------------------------------

    def _new_shared(self, watcher, start_revision):
        upstream_id = self._next_id
        self._next_id += 1
        shared = SharedWatcher(upstream_id, watcher.range, watcher.create, start_revision)
        shared.catching_up = start_revision > 0  # past or future: etcd's "created" tells
        self.watchers[upstream_id] = shared
        self.broadcaster.shared_watchers += 1
        self._send_create(shared, start_revision)
        return shared

    def _send_create(self, shared, start_revision):
        create = shared.create
        self.creating.append(shared)
        self.stream.send(rpc_pb2.WatchRequest(create_request=rpc_pb2.WatchCreateRequest(
            key=create.key, range_end=create.range_end, start_revision=start_revision,
            prev_kv=create.prev_kv, progress_notify=True, fragment=True, watch_id=shared.upstream_id,
        )).SerializeToString())

    def _send_cancel(self, shared):
        self.stream.send(rpc_pb2.WatchRequest(
            cancel_request=rpc_pb2.WatchCancelRequest(watch_id=shared.upstream_id)
        ).SerializeToString())

    def _attach(self, shared, watcher):
        want = watcher.start_revision or self.revision + 1
        if want > shared.position:
            watcher.min_revision = want
            watcher.source = shared
            shared.members.add(watcher)
            if not watcher.counted:
                watcher.counted = True
                self.broadcaster.client_watchers += 1
            revision = max(self.revision, watcher.seen_revision)
            watcher.stream.watcher_created(watcher, self.header_at(revision))
        else:
            watcher.start_revision = want
            catchup = self._new_shared(watcher, want)
            self.catchups[watcher.range].add(catchup)
            catchup.waiting.append(watcher)
            watcher.source = catchup

    def _drop_shared(self, shared, cancel_upstream=True):
        """No client watcher left: the shared watcher goes, at etcd too."""
        del self.watchers[shared.upstream_id]
        self.broadcaster.shared_watchers -= 1
        if cancel_upstream:
            if shared.created:
                self._send_cancel(shared)
            else:
                shared.abandoned = True  # cancelled once etcd has created it
        catchups = self.catchups.get(shared.range)
        if catchups is not None:
            catchups.discard(shared)
        if self.primaries.get(shared.range) is shared:
            del self.primaries[shared.range]
            if catchups:
                # The most advanced catch-up is the one new watchers join now.
                successor = max(catchups, key=lambda s: (s.created, s.position))
                catchups.discard(successor)
                self.primaries[shared.range] = successor
        if catchups is not None and not catchups:
            del self.catchups[shared.range]

    def _merge_catchups(self, range_):
        """Catch-ups that reached the primary's position join it."""
        primary = self.primaries.get(range_)
        catchups = self.catchups.get(range_)
        if primary is None or not primary.created or not catchups:
            return
        for catchup in [c for c in catchups if c.created and c.position >= primary.position]:
            for watcher in catchup.members:
                watcher.min_revision = max(watcher.min_revision, catchup.position + 1)
                watcher.source = primary
                primary.members.add(watcher)
            catchup.members.clear()
            self._drop_shared(catchup)

    # -- IUpstreamStreamOwner -------------------------------------------------------

    def stream_opened(self, stream):
        """A new upstream stream after a failure: every shared watcher is
        created again from where it is (the first stream gets the creates as
        they come)."""
        if not self.creating and not self.watchers and not self.progress_waiting:
            return
        self.creating.clear()
        for shared in sorted(self.watchers.values(), key=lambda s: s.upstream_id):
            shared.fragments = []
            if shared.created:
                shared.resumed = True
                self._send_create(shared, shared.position + 1)
            else:
                self._send_create(shared, shared.start_revision)
        if self.progress_waiting:
            self._send_progress_request()

    def message_received(self, message):
        response = rpc_pb2.WatchResponse.FromString(message)
        if response.header.revision >= self.header.revision:
            self.header = response.header
        if response.created:
            self._created(response)
        elif response.watch_id == -1:
            self._progress_answered(response)
        else:
            shared = self.watchers.get(response.watch_id)
            if shared is None or not shared.created:
                return  # cancelled here meanwhile
            if response.canceled:
                self._canceled(shared, response)
            elif response.fragment:
                shared.fragments.extend(response.events)
            elif response.events or shared.fragments:
                self._events(shared, response)
            else:
                self._progress_notified(shared, response)
        self._close_if_idle()

    def stream_failed(self, error):
        self.error = error
        self.broadcaster.session_ended(self)
        clients = set()
        for shared in self.watchers.values():
            for watcher in (*shared.members, *shared.waiting):
                watcher.source = None
                self._uncount(watcher)
                clients.add(watcher.stream)
        clients.update(self.progress_waiting, self.progress_next)
        self.broadcaster.shared_watchers -= len(self.watchers)
        self.watchers.clear()
        self.primaries.clear()
        self.catchups.clear()
        self.creating.clear()
        self.progress_waiting, self.progress_next = [], []
        for client in clients:
            client.session_failed(error)

    # -- what etcd says --------------------------------------------------------------

    def _created(self, response):
        if not self.creating:
            self._log.warn("etcd confirmed a watch create the proxy did not send")
            return
        shared = self.creating.popleft()
        if response.canceled:
            # Refused (permission denied, empty range...): each client watcher
            # is told as etcd would tell it.
            waiting, shared.waiting = shared.waiting, []
            members = list(shared.members)
            shared.members.clear()
            if shared.upstream_id in self.watchers:
                self._drop_shared(shared, cancel_upstream=False)
            for watcher in waiting:
                watcher.source = None
                watcher.stream.watcher_refused(watcher, response.header, response.cancel_reason)
            for watcher in members:
                self._end_watcher(watcher, response)
            return
        if shared.abandoned:
            self._send_cancel(shared)
            return
        if shared.resumed:
            shared.resumed = False
            shared.catching_up = shared.position < response.header.revision  # from position + 1
            return  # its clients saw it created long ago
        shared.created = True
        start = shared.start_revision
        shared.position = start - 1 if start > 0 else response.header.revision
        shared.catching_up = 0 < start <= response.header.revision
        waiting, shared.waiting = shared.waiting, []
        for watcher in waiting:
            self._attach(shared, watcher)
        self._merge_catchups(shared.range)

    def _events(self, shared, response):
        events = response.events
        plain = None
        if shared.fragments:
            events = [*shared.fragments, *events]
            shared.fragments = []
        else:
            response.watch_id = 0
            plain = response.SerializeToString()
        batch = watch_responses.EventBatch(response.header, events, plain)
        shared.position = max(shared.position, batch.last_revision)
        if batch.last_revision >= response.header.revision:
            shared.catching_up = False  # it has reached etcd's revision: synced
        broadcaster = self.broadcaster
        broadcaster.events_received += len(events)
        broadcaster.events_sent += len(events) * len(shared.members)  # before filters
        fragment_size = broadcaster.fragment_size
        for watcher in list(shared.members):
            watcher.stream.deliver(watcher, batch.bodies(
                watcher.excluded, watcher.min_revision, len(watcher.prefix),
                fragment_size if watcher.fragment else 0))
        self._merge_catchups(shared.range)

    def _progress_notified(self, shared, response):
        shared.position = max(shared.position, response.header.revision)
        shared.catching_up = False  # etcd notifies synced watchers only
        for watcher in list(shared.members):
            if watcher.progress_notify:
                watcher.stream.send_response(
                    watch_responses.progress(response.header, watcher.watch_id))
        self._merge_catchups(shared.range)

    def _canceled(self, shared, response):
        """etcd ended a shared watcher (its revision was compacted, or the
        server cancelled it): each client watcher is told, as etcd would."""
        members = list(shared.members)
        shared.members.clear()
        self._drop_shared(shared)
        for watcher in members:
            self._end_watcher(watcher, response)

    def _end_watcher(self, watcher, response):
        watcher.source = None
        self._uncount(watcher)
        watcher.stream.watcher_canceled(watcher, response)

    def _uncount(self, watcher):
        if watcher.counted:
            watcher.counted = False
            self.broadcaster.client_watchers -= 1

    def _send_progress_request(self):
        self.stream.send(rpc_pb2.WatchRequest(
            progress_request=rpc_pb2.WatchProgressRequest()).SerializeToString())

    def _progress_answered(self, response):
        answered, self.progress_waiting = self.progress_waiting, self.progress_next
        self.progress_next = []
        if self.progress_waiting:
            self._send_progress_request()
        for client in answered:
            client.progress_answered(response.header)

    def _close_if_idle(self):
        if not self.watchers and not self.progress_waiting and not self.stream.closed:
            self.stream.close()
            self.broadcaster.session_ended(self)

    def close(self):
        self.stream.close()


class WatchBroadcaster(service.Service):
    """The sessions, by what etcd would treat differently, and the counters."""

    name = "watch-broadcaster"

    def __init__(self, monitor, exact=False, send_buffer=4 * 1024 * 1024,
                 fragment_size=watch_responses.DEFAULT_FRAGMENT_SIZE):
        self.monitor = monitor
        self.exact = exact
        self.send_buffer = send_buffer
        self.fragment_size = fragment_size
        self.sessions = {}
        self.shared_watchers = 0
        self.client_watchers = 0
        self.events_received = 0  # events etcd sent the shared watchers
        self.events_sent = 0  # events fanned out to client watchers

    def session(self, key, metadata):
        """The session of client streams with this key (raises `GRPCError`
        when a new one cannot be opened: no etcd endpoint can take it)."""
        session = self.sessions.get(key)
        if session is None:
            session = self.sessions[key] = WatchSession(self, key, metadata)
            session.stream.open()
            if session.error is not None:
                raise session.error
        return session

    def session_ended(self, session):
        if self.sessions.get(session.key) is session:
            del self.sessions[session.key]

    def stats(self):
        return {
            "sessions": len(self.sessions),
            "shared_watchers": self.shared_watchers,
            "client_watchers": self.client_watchers,
            "events_received": self.events_received,
            "events_sent": self.events_sent,
        }

    def stopService(self):
        super().stopService()
        for session in list(self.sessions.values()):
            session.close()
        self.sessions.clear()
