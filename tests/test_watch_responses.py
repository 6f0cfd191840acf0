"""Watch responses encoded once per batch (services/watch_responses.py): what a
client watcher receives parses to the response etcd would build for it."""

from twisted.trial import unittest

from etcdproxy.pb.etcdserverpb import rpc_pb2
from etcdproxy.pb.mvccpb import kv_pb2
from etcdproxy.services.watch_responses import EventBatch, watch_id_field

PUT, DELETE = kv_pb2.Event.PUT, kv_pb2.Event.DELETE


def event(kind, revision, value=b"v"):
    kv = kv_pb2.KeyValue(key=b"k", mod_revision=revision, create_revision=1, value=value)
    return kv_pb2.Event(type=kind, kv=kv)


def batch(*events):
    header = rpc_pb2.ResponseHeader(cluster_id=1, member_id=2, revision=events[-1].kv.mod_revision, raft_term=3)
    return EventBatch(header, list(events))


def received(watch_id, bodies):
    prefix = watch_id_field(watch_id)
    return [rpc_pb2.WatchResponse.FromString(prefix + body) for body in bodies]


def etcd_fragments(response, limit):
    """etcd 3.4's sendFragments (v3rpc/watch.go), transcribed."""
    if response.ByteSize() < limit or len(response.events) < 2:
        return [response]
    out, index, events = [], 0, list(response.events)
    while True:
        current = rpc_pb2.WatchResponse(header=response.header, watch_id=response.watch_id, fragment=True)
        for e in events[index:]:
            current.events.append(e)
            if len(current.events) > 1 and current.ByteSize() >= limit:
                del current.events[-1]
                break
            index += 1
        if index == len(events):
            current.fragment = False
        out.append(current)
        if not current.fragment:
            return out


class EventBatchTests(unittest.TestCase):
    def test_watch_id_and_shared_body_make_the_whole_response(self):
        b = batch(event(PUT, 10), event(DELETE, 11))
        for watch_id in (0, 1, 7, 2**40, -1):
            (response,) = received(watch_id, b.bodies(frozenset(), 0, len(watch_id_field(watch_id)), 0))
            self.assertEqual(response, rpc_pb2.WatchResponse(
                header=b.header, watch_id=watch_id, events=b.events))

    def test_filters_and_start_revision(self):
        b = batch(event(PUT, 10), event(DELETE, 11), event(PUT, 12))
        only_deletes = received(1, b.bodies(frozenset([PUT]), 0, 2, 0))
        self.assertEqual([e.kv.mod_revision for e in only_deletes[0].events], [11])
        from_11 = received(1, b.bodies(frozenset(), 11, 2, 0))
        self.assertEqual([e.kv.mod_revision for e in from_11[0].events], [11, 12])
        self.assertEqual(b.bodies(frozenset([PUT, DELETE]), 0, 2, 0), ())  # all filtered: nothing
        self.assertEqual(b.bodies(frozenset(), 13, 2, 0), ())  # all below the start

    def test_bodies_are_made_once_per_variant(self):
        b = batch(event(PUT, 10), event(PUT, 11))
        self.assertIs(b.bodies(frozenset(), 11, 2, 0), b.bodies(frozenset(), 11, 2, 0))

    def test_fragments_as_etcd_makes_them(self):
        events = [event(PUT, r, b"x" * size) for r, size in zip(range(10, 30), [300, 900, 50, 1200] * 5)]
        b = batch(*events)
        for limit in (100, 1000, 2000, 5000, 100000):
            for watch_id in (0, 300):
                want = etcd_fragments(rpc_pb2.WatchResponse(
                    header=b.header, watch_id=watch_id, events=events), limit)
                got = received(watch_id, b.bodies(frozenset(), 0, len(watch_id_field(watch_id)), limit))
                self.assertEqual(got, want, (limit, watch_id))
        # fragments of what a filter leaves
        got = received(0, b.bodies(frozenset([PUT]), 0, 0, 1000))
        self.assertEqual(got, [])
