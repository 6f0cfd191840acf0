"""LeaseKeepAlive streams that survive the loss of their etcd endpoint.

Each keep-alive request stands alone (a lease ID), so a new upstream stream
needs only the last request sent again, for a prompt answer: a lease is kept
alive through an endpoint failure and the client sees no error.
"""

from etcdproxy.services.resumable import ResumableStream

KEEPALIVE_PATH = b"/etcdserverpb.Lease/LeaseKeepAlive"


class ResumableKeepAlive(ResumableStream):
    def __init__(self, upstream):
        super().__init__(upstream)
        self._last_request = None

    def request_received(self, message):
        self._last_request = message
        self.send_upstream(message)

    def reopened(self):
        if self._last_request is not None:
            self.upstream_call.send_message(self._last_request)
