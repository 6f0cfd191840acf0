"""Keepalive pings toward etcd stay within etcd's policy (no GOAWAY
"too_many_pings") over a long-lived watch stream."""

import time

from tests.support.grpcio import R, GrpcioTestCase


class UpstreamKeepaliveTests(GrpcioTestCase):
    kind = "python"  # the flag is ours
    proxy_args = ("--upstream-keepalive-interval=5",)

    def test_long_watch_survives_pings_at_etcds_minimum_interval(self):
        key = self.key("k")
        watch = self.stream(self.p.watch.Watch)
        watch.send(R.WatchRequest(create_request=R.WatchCreateRequest(key=key)))
        self.assertTrue(watch.recv().created)
        # Three ping intervals with the stream open, then the stream still works.
        time.sleep(16)
        self.p.kv.Put(R.PutRequest(key=key, value=b"v"))
        event = watch.recv().events[0]
        self.assertEqual((event.kv.key, event.kv.value), (key, b"v"))
        log = self.proxy.log()
        self.assertNotIn("GOAWAY", log)
        self.assertNotIn("missed a keepalive ping", log)
