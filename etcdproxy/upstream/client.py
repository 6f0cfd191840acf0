"""The upstream etcd client: calls go to the etcd endpoint in use.

For now the first of --endpoints serves every call; choosing among several and
failing over belongs to the endpoint monitor.
"""

from twisted.application import service
from twisted.internet.endpoints import HostnameEndpoint

from etcdproxy.grpc.client import Channel
from etcdproxy.grpc.connection import Limits


class UpstreamClient(service.Service):
    name = "upstream"

    def __init__(self, reactor, endpoints, max_receive_message, keepalive_interval, keepalive_timeout):
        self.reactor = reactor
        self.endpoints = endpoints
        self.limits = Limits(max_receive_message=max_receive_message)
        endpoint = endpoints[0]
        self.channel = Channel(
            reactor,
            HostnameEndpoint(reactor, endpoint.host, endpoint.port),
            endpoint.authority.encode("ascii"),
            self.limits,
            keepalive_interval=keepalive_interval,
            keepalive_timeout=keepalive_timeout,
        )

    def start_call(self, method, metadata, listener, timeout=None):
        return self.channel.start_call(method, metadata, listener, timeout)

    def unary_call(self, method, request, metadata=(), timeout=None):
        return self.channel.unary_call(method, request, metadata, timeout)

    def stopService(self):
        super().stopService()
        self.channel.close()
