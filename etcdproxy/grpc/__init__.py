"""gRPC over HTTP/2 on Twisted (h2), both sides; knows nothing of etcd."""
