"""Graceful shutdown (SIGTERM): a unary call in flight finishes normally, open
watch and keep-alive streams end with UNAVAILABLE at once (clients reconnect
elsewhere), and the proxy exits."""

import signal
import threading
import time

import grpc

from tests.support import targets
from tests.support.grpcio import LK, R, Stubs, Stream


class GracefulShutdownTests(targets.EtcdProxyTestCase):
    kind = "python"

    def test_sigterm_lets_unary_calls_finish_and_ends_streams(self):
        direct, proxied = Stubs(self.direct), Stubs(self.proxied)
        self.addCleanup(direct.close)
        self.addCleanup(proxied.close)
        # A lock held by a direct client, so that a Lock through the proxy blocks.
        holder_lease = direct.lease.LeaseGrant(R.LeaseGrantRequest(TTL=30)).ID
        held = direct.lock.Lock(LK.LockRequest(name=b"shutdown-lock", lease=holder_lease)).key
        waiter_lease = proxied.lease.LeaseGrant(R.LeaseGrantRequest(TTL=30)).ID
        result = {}

        def wait_for_lock():
            try:
                result["key"] = proxied.lock.Lock(
                    LK.LockRequest(name=b"shutdown-lock", lease=waiter_lease), timeout=20).key
            except grpc.RpcError as e:
                result["error"] = (e.code(), e.details())

        waiter = threading.Thread(target=wait_for_lock, daemon=True)
        waiter.start()
        watch = Stream(proxied.watch.Watch)
        self.addCleanup(watch.close)
        watch.send(R.WatchRequest(create_request=R.WatchCreateRequest(key=b"shutdown-watch")))
        self.assertTrue(watch.recv().created)
        keepalive = Stream(proxied.lease_stream.LeaseKeepAlive)
        self.addCleanup(keepalive.close)
        keepalive.send(R.LeaseKeepAliveRequest(ID=waiter_lease))
        self.assertEqual(keepalive.recv().ID, waiter_lease)
        time.sleep(0.5)

        self.proxy.proc.send_signal(signal.SIGTERM)
        for stream in (watch, keepalive):
            error = stream.wait_end(timeout=3)
            self.assertIsNotNone(error, "a stream ended with OK")
            self.assertEqual(error.code(), grpc.StatusCode.UNAVAILABLE)
        time.sleep(0.5)
        self.assertTrue(waiter.is_alive(), "the Lock call ended before the lock was free: %r" % result)
        direct.lock.Unlock(LK.UnlockRequest(key=held))
        waiter.join(10)
        self.assertNotIn("error", result)
        self.assertTrue(result["key"].startswith(b"shutdown-lock/"))
        self.proxy.proc.wait(timeout=10)
