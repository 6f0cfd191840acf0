"""Registration of proxies in etcd (--resolver-prefix): MemberList through any
of them lists the live ones, in the format etcd's Go client reads; a proxy
that dies leaves within the TTL, one that stops leaves at once."""

import json
import socket
import time

from tests.support.etcd import EtcdCluster
from tests.support.etcdctl import etcdctl
from tests.support.grpcio import R, Stubs
from tests.support.proxy import ProxyProcess
from tests.support.targets import ClassFixtureTestCase

PREFIX = "/etcdgrpcproxy-test/proxies"
TTL = 3


class RegistrationTests(ClassFixtureTestCase):
    @classmethod
    def setUpClass(cls):
        cls.etcd = EtcdCluster()
        cls.etcd.start()
        cls.addClassCleanup(cls.etcd.stop)

    def listed(self, proxy):
        stubs = Stubs(proxy.address)
        try:
            members = stubs.cluster.MemberList(R.MemberListRequest()).members
        finally:
            stubs.close()
        return sorted(url for m in members for url in m.clientURLs)

    def wait_listed(self, proxy, addresses, timeout):
        deadline = time.monotonic() + timeout
        while self.listed(proxy) != sorted(addresses):
            self.assertLess(time.monotonic(), deadline, "listed: %s" % self.listed(proxy))
            time.sleep(0.2)
        return time.monotonic()

    def test_live_proxies_are_listed(self):
        proxies = []
        for _ in range(3):
            p = ProxyProcess(self.etcd.endpoints, extra_args=[
                "--resolver-prefix", PREFIX, "--resolver-ttl", str(TTL)])
            p.start()
            self.addCleanup(p.stop)
            proxies.append(p)
        addresses = [p.address for p in proxies]
        self.wait_listed(proxies[0], addresses, 10)
        # etcd's own naming format, read by a Go client through a proxy
        stored = Stubs(self.etcd.endpoint).kv.Range(R.RangeRequest(key=(PREFIX + "/" + addresses[0]).encode()))
        self.assertEqual(json.loads(stored.kvs[0].value),
                         {"Op": 0, "Addr": addresses[0], "Metadata": json.dumps({"name": socket.gethostname()})})
        # etcd's one member, its client URLs the registered proxies'
        text = etcdctl(proxies[1].address, "member", "list").stdout
        direct = etcdctl(self.etcd.endpoint, "member", "list").stdout
        self.assertEqual(len(text.splitlines()), 1)
        self.assertEqual(text.split(", ")[:4], direct.split(", ")[:4])
        self.assertEqual(sorted(text.split(", ")[4].split(",")), sorted(addresses))
        # one dies: gone within the TTL
        proxies[2].proc.kill()
        killed = time.monotonic()
        gone = self.wait_listed(proxies[0], addresses[:2], TTL + 3)
        print("\n[registration] a killed proxy left MemberList after %.1f s (TTL %d s)" % (gone - killed, TTL))
        self.assertLessEqual(gone - killed, TTL + 1.5)
        # one stops: gone at once (its lease revoked)
        proxies[1].stop()
        self.assertEqual(self.listed(proxies[0]), addresses[:1])
