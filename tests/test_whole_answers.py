"""Acceptance: every byte etcd sends reaches the client before the status.

Relayed streams and large unary answers through the proxy are compared with
etcd's own answers, byte for byte: snapshots of a multi-MB database (etcdctl,
and grpcio with a reader that reads slowly), an Election Observe stream of many
large messages a client reads only later, and a Range answer over 6 MiB.
Nothing is written between the answers compared, so etcd's own are identical.
"""
import hashlib
import os
import shutil
import tempfile
import time

from tests.support.etcdctl import etcdctl
from tests.support.grpcio import EL, R, GrpcioTestCase, prefix_end

VALUE_SIZE = 2048
KEYS = 3300  # 3300 values of 2 KiB: a Range answer of 6.6 MiB, a database of about 9 MB
PUTS_PER_TXN = 100


class WholeAnswerTests(GrpcioTestCase):

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.prefix = b"/whole/"
        for first in range(0, KEYS, PUTS_PER_TXN):
            puts = [R.RequestOp(request_put=R.PutRequest(
                key=cls.prefix + b"%05d" % i, value=(b"%05d" % i) * (VALUE_SIZE // 5)))
                for i in range(first, min(KEYS, first + PUTS_PER_TXN))]
            cls.d.kv.Txn(R.TxnRequest(success=puts))

    def direct_snapshot(self):
        data = b"".join(m.blob for m in self.d.maint.Snapshot(R.SnapshotRequest(), timeout=60))
        self.assertEqual(hashlib.sha256(data[:-32]).digest(), data[-32:])
        self.assertGreater(len(data), 8 * 1024 * 1024)
        return data

    def test_etcdctl_snapshots_are_etcds(self):
        """20 snapshots in a row through the proxy, each the same file as etcd's."""
        tmp = tempfile.mkdtemp(prefix="etcdproxy-test-whole-")
        self.addCleanup(shutil.rmtree, tmp, True)
        direct = os.path.join(tmp, "direct.db")
        etcdctl(self.direct, "snapshot", "save", direct, timeout=60)
        with open(direct, "rb") as f:
            expected = f.read()
        self.assertGreater(len(expected), 8 * 1024 * 1024)
        failures = []
        for attempt in range(20):
            path = os.path.join(tmp, "proxy%d.db" % attempt)
            cp = etcdctl(self.proxied, "snapshot", "save", path, timeout=60, check=False)
            if cp.returncode != 0:
                failures.append((attempt, cp.stderr.strip().splitlines()[-1:]))
                continue
            with open(path, "rb") as f:
                if f.read() != expected:
                    failures.append((attempt, "file differs from etcd's snapshot"))
            os.unlink(path)
        self.assertEqual(failures, [])

    def test_grpcio_snapshot_read_slowly_is_etcds(self):
        expected = self.direct_snapshot()
        for pause in (0, 0.002):
            blobs = []
            for i, m in enumerate(self.p.maint.Snapshot(R.SnapshotRequest(), timeout=60)):
                blobs.append(m.blob)
                if pause and i % 4 == 0:
                    time.sleep(pause)  # about 8 s for the whole snapshot
            self.assertEqual(b"".join(blobs), expected, "pause %s" % pause)

    def test_large_range_is_etcds(self):
        request = R.RangeRequest(key=self.prefix, range_end=prefix_end(self.prefix))
        direct = self.d.kv.Range(request)
        self.assertEqual(len(direct.kvs), KEYS)
        self.assertGreater(direct.ByteSize(), 6 * 1024 * 1024)
        for _ in range(3):
            self.assertEqual(self.p.kv.Range(request).SerializeToString(), direct.SerializeToString())

    def test_observe_stream_read_late_is_etcds(self):
        """Proclamations of 16 KiB pile up at an observer that does not read;
        once it reads, it gets every one, as a direct observer does."""
        name = b"/whole-election/" + os.urandom(4).hex().encode()
        lease = self.d.lease.LeaseGrant(R.LeaseGrantRequest(TTL=60)).ID
        self.addCleanup(lambda: self.d.lease.LeaseRevoke(R.LeaseRevokeRequest(ID=lease)))
        leader = self.d.election.Campaign(EL.CampaignRequest(name=name, lease=lease, value=b"v0")).leader
        # Read straight from grpcio's call (no reader thread): what no one reads
        # backs up through the client's flow-control window into the proxy.
        observers = {"direct": self.d.election.Observe(EL.LeaderRequest(name=name), timeout=60),
                     "proxy": self.p.election.Observe(EL.LeaderRequest(name=name), timeout=60)}
        for call in observers.values():
            self.addCleanup(call.cancel)
            self.assertEqual(next(call).kv.value, b"v0")
        values = [b"%04d" % i * 4096 for i in range(1, 301)]  # 4.8 MB in all
        for value in values:
            self.d.election.Proclaim(EL.ProclaimRequest(leader=leader, value=value))
        got = {}
        for side, call in observers.items():
            got[side] = [(m.kv.value, m.kv.mod_revision) for _, m in zip(values, call)]
        self.assertEqual([v for v, _ in got["direct"]], values)
        self.assertEqual(got["proxy"], got["direct"])
