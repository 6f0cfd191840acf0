"""The lease coalescer: every client LeaseKeepAlive stream is served from one
upstream LeaseKeepAlive stream, and each lease is refreshed at etcd about every
TTL/3 while clients keep it alive, however many they are and however often they
send (the rules: services/lease_state.py).

Client streams are grouped into *sessions* by what etcd treats differently on
a keep-alive stream. etcd 3.4 checks no auth token on keep-alives (LeaseRenew
looks at no credentials), so tokens do not matter; ``hasleader: true`` does:
etcd refuses such a stream when its cluster has no leader and ends it when the
leader is gone for a while. So there are at most two sessions, each one
upstream stream (`UpstreamStream`: moved to another endpoint when its own
fails), and a ``hasleader`` session's clients end as etcd ends the stream.

etcd answers the keep-alives of a stream one after another, in order: the
session matches each answer to the oldest refresh in flight.
"""

import collections

from google.protobuf.message import DecodeError
from twisted.application import service
from twisted.logger import Logger

from etcdproxy.pb.etcdserverpb import rpc_pb2
from etcdproxy.services.lease_state import LeaseState
from etcdproxy.upstream.stream import UpstreamStream

KEEPALIVE_PATH = b"/etcdserverpb.Lease/LeaseKeepAlive"
HASLEADER = (b"hasleader", b"true")


class KeepAliveSession:
    """One upstream LeaseKeepAlive stream, the leases refreshed on it and the
    client streams it serves (an `IUpstreamStreamOwner`)."""

    _log = Logger()

    def __init__(self, coalescer, key, metadata):
        self.coalescer = coalescer
        self.clock = coalescer.monitor.reactor
        self.key = key
        self.leases = {}  # lease id -> LeaseState, for the leases being kept alive
        self.clients = set()  # client streams (services/lease.py KeepAliveStream)
        self.sent = collections.deque()  # LeaseStates whose refresh is on the stream, in order
        self.unsent = []  # refreshes waiting for a stream to open
        self.header = rpc_pb2.ResponseHeader()  # the latest one etcd sent
        self.stream = UpstreamStream(coalescer.monitor, KEEPALIVE_PATH, metadata, self)
        self.error = None  # why the upstream stream is over, once it is
        self._opened = False

    # -- what client streams ask ------------------------------------------------

    def ask(self, client, lease_id, slot):
        """``client`` sent a keep-alive for ``lease_id``: ``slot.fill(bytes)``
        gets the answer, at once from what etcd last said, or etcd's own."""
        lease = self.leases.get(lease_id)
        if lease is None:
            lease = self.leases[lease_id] = LeaseState(lease_id)
        if lease.inflight:
            lease.waiters.append(slot)
            return
        ttl = lease.cached_ttl(self.clock.seconds())
        if ttl is not None:
            lease.askers.add(client)
            client.asked.add(lease)
            self.coalescer.answered_from_cache += 1
            slot.fill(rpc_pb2.LeaseKeepAliveResponse(header=self.header, ID=lease_id, TTL=ttl)
                      .SerializeToString())
            return
        lease.waiters.append(slot)
        self._refresh(lease)

    def leave(self, client):
        """A client stream ended: it keeps no lease alive any more."""
        self.clients.discard(client)
        for lease in client.asked:
            lease.askers.discard(client)
        client.asked.clear()
        self._close_if_idle()

    def forget(self, lease_id):
        """The lease is being revoked: no more refreshes (a refresh in flight
        still answers its clients)."""
        lease = self.leases.get(lease_id)
        if lease is not None:
            self._forget(lease)
            self._close_if_idle()

    # -- refreshes ---------------------------------------------------------------

    def _refresh(self, lease):
        if lease.timer is not None:
            lease.timer.cancel()
            lease.timer = None
        self._clear_askers(lease)
        lease.inflight = True
        if self.stream.is_open:
            self._send(lease)
        else:
            self.unsent.append(lease)

    def _send(self, lease):
        lease.sent_at = self.clock.seconds()
        self.sent.append(lease)
        self.coalescer.upstream_sent += 1
        self.stream.send(rpc_pb2.LeaseKeepAliveRequest(ID=lease.id).SerializeToString())

    def _due(self, lease):
        lease.timer = None
        if lease.askers:  # a client still keeps it alive
            self._refresh(lease)
        else:
            self._forget(lease)
            self._close_if_idle()

    def _forget(self, lease):
        lease.forgotten = True
        if lease.timer is not None:
            lease.timer.cancel()
            lease.timer = None
        self._clear_askers(lease)
        if self.leases.get(lease.id) is lease:
            del self.leases[lease.id]

    @staticmethod
    def _clear_askers(lease):
        for client in lease.askers:
            client.asked.discard(lease)
        lease.askers.clear()

    # -- IUpstreamStreamOwner ----------------------------------------------------

    def stream_opened(self, stream):
        """A new stream: what was in flight on the old one is sent again; after
        a failover every lease kept alive is refreshed at once, on the new
        endpoint (its clients then also see the new member's header)."""
        again = list(self.sent) + self.unsent
        self.sent.clear()
        self.unsent = []
        if self._opened:
            again += [lease for lease in self.leases.values() if not lease.inflight]
        self._opened = True
        for lease in again:
            if lease.forgotten and not lease.waiters:
                lease.inflight = False
                continue
            if lease.timer is not None:
                lease.timer.cancel()
                lease.timer = None
            self._clear_askers(lease)
            lease.inflight = True
            self._send(lease)

    def message_received(self, message):
        self.coalescer.upstream_received += 1
        try:
            response = rpc_pb2.LeaseKeepAliveResponse.FromString(message)
        except DecodeError:
            self._log.error("undecodable LeaseKeepAlive response from etcd: {message!r}", message=message)
            return
        if response.HasField("header"):
            self.header = response.header
        lease = self.sent.popleft() if self.sent else None
        if lease is None or lease.id != response.ID:
            self._log.error("LeaseKeepAlive answer for lease {id} out of order", id=response.ID)
            return
        lease.answered(response.TTL)
        waiters, lease.waiters = lease.waiters, []
        self.coalescer.answered_from_etcd += len(waiters)
        for slot in waiters:
            slot.fill(message)  # etcd's own answer, as it sent it
        if lease.forgotten:
            return
        if response.TTL <= 0:  # gone: the next keep-alive asks etcd again
            self._forget(lease)
            self._close_if_idle()
            return
        lease.timer = self.clock.callLater(
            max(0.0, lease.refresh_due() - self.clock.seconds()), self._due, lease)

    def stream_failed(self, error):
        """Over for good (e.g. "etcdserver: no leader" on a hasleader stream):
        each client stream ends with etcd's error, as it would directly."""
        self.error = error
        self.coalescer.session_ended(self)
        for lease in list(self.leases.values()):
            self._forget(lease)
        self.sent.clear()
        self.unsent = []
        for client in list(self.clients):
            client.end(error.code, error.message)

    # -- lifetime ------------------------------------------------------------------

    def _close_if_idle(self):
        if not self.clients and not self.leases and not self.stream.closed:
            self.close()

    def close(self):
        self.stream.close()
        self.coalescer.session_ended(self)
        for lease in list(self.leases.values()):
            self._forget(lease)


class LeaseCoalescer(service.Service):
    """The sessions and the counters (for the metrics)."""

    name = "lease-coalescer"

    def __init__(self, monitor):
        self.monitor = monitor  # the EndpointMonitor
        self.sessions = {}  # hasleader (bool) -> KeepAliveSession
        self.client_streams = 0
        self.upstream_sent = 0  # keep-alives sent to etcd
        self.upstream_received = 0  # ... and etcd's answers
        self.answered_from_etcd = 0  # client keep-alives answered with etcd's own answer
        self.answered_from_cache = 0  # ... at once, from the last one

    def join(self, client, hasleader):
        """The session for a new client stream (raises `GRPCError` when a new
        one cannot be opened: no etcd endpoint can take it)."""
        session = self.sessions.get(hasleader)
        if session is None:
            metadata = (HASLEADER,) if hasleader else ()
            session = self.sessions[hasleader] = KeepAliveSession(self, hasleader, metadata)
            session.stream.open()
            if session.error is not None:
                raise session.error
        session.clients.add(client)
        self.client_streams += 1
        return session

    def left(self, client, session):
        self.client_streams -= 1
        session.leave(client)

    def revoked(self, lease_id):
        """A LeaseRevoke for ``lease_id`` went through the proxy."""
        for session in list(self.sessions.values()):
            session.forget(lease_id)

    def session_ended(self, session):
        if self.sessions.get(session.key) is session:
            del self.sessions[session.key]

    def stats(self):
        return {
            "sessions": len(self.sessions),
            "client_streams": self.client_streams,
            "leases": sum(len(s.leases) for s in self.sessions.values()),
            "upstream_sent": self.upstream_sent,
            "upstream_received": self.upstream_received,
            "answered_from_etcd": self.answered_from_etcd,
            "answered_from_cache": self.answered_from_cache,
        }

    def stopService(self):
        super().stopService()
        for session in list(self.sessions.values()):
            session.close()
        self.sessions.clear()
