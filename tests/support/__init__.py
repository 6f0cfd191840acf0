"""Test support: real etcd clusters (etcd.py), the proxy under test
(proxy.py), etcdctl (etcdctl.py), grpcio stubs (stubs.py), free ports
(ports.py) and shared test-case bases (targets.py)."""
