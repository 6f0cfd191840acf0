"""SIGHUP: the endpoint list (--endpoints-file) and the TLS certificates are
read again; established client connections stay."""

import signal

from twisted.application import service
from twisted.logger import Logger


class ReloadOnHangup(service.Service):
    name = "reload"
    _log = Logger()

    def __init__(self, reactor, actions):
        """``actions``: (what, callable) pairs, run in turn on SIGHUP; one
        that fails is logged and leaves what it reloads as it was."""
        self.reactor = reactor
        self.actions = list(actions)
        self._previous = None

    def startService(self):
        super().startService()
        self._previous = signal.signal(signal.SIGHUP, self._signalled)

    def stopService(self):
        super().stopService()
        signal.signal(signal.SIGHUP, self._previous or signal.SIG_DFL)

    def _signalled(self, signum, frame):
        self.reactor.callFromThread(self.reload)

    def reload(self):
        for what, action in self.actions:
            try:
                action()
            except Exception as e:
                self._log.error("reload of {what} failed, kept as it was: {error}", what=what, error=e)
            else:
                self._log.info("{what} reloaded", what=what)
