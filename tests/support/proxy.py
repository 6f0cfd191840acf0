"""A proxy process in front of etcd, for tests.

    with ProxyProcess(cluster.endpoints) as p:      # our proxy (twistd plugin)
        p.address                                   # "127.0.0.1:PORT"
    ProxyProcess(cluster.endpoints, kind="go")      # etcd's own grpc-proxy

kind="python" runs ``twistd -n etcdgrpcproxy`` from this checkout (PYTHONPATH =
repo root); kind="go" runs ``etcd grpc-proxy start`` (the reference proxy).
"""
import atexit
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

from tests.support.ports import free_port
from tests.support.process import stop_process

__all__ = ["ProxyProcess", "REPO_ROOT", "KINDS"]

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
KINDS = ("python", "go")
START_TIMEOUT = 20.0
STOP_GRACE = 10.0

_live = set()
_live_lock = threading.Lock()


def _stop_all_at_exit():
    with _live_lock:
        procs = list(_live)
    for p in procs:
        try:
            p.stop()
        except Exception:
            pass


atexit.register(_stop_all_at_exit)


def _read(path):
    try:
        with open(path, "rb") as f:
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


class ProxyProcess(object):
    def __init__(self, endpoints, kind="python", extra_args=()):
        if kind not in KINDS:
            raise ValueError("kind must be one of %s, not %r" % (KINDS, kind))
        if isinstance(endpoints, str):
            endpoints = [endpoints]
        self.endpoints = list(endpoints)
        self.kind = kind
        self.extra_args = list(extra_args)
        self.port = None
        self.proc = None
        self.tmpdir = None
        self.returncode = None
        self._out = None
        self._saved_log = ""

    @property
    def address(self):
        return "127.0.0.1:%d" % self.port

    @property
    def endpoint(self):
        return self.address

    def command(self):
        listen = "--listen-addr=127.0.0.1:%d" % self.port
        eps = "--endpoints=" + ",".join(self.endpoints)
        if self.kind == "python":
            return [sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
                    "-n", "--pidfile=", "--logfile=" + os.path.join(self.tmpdir, "proxy.log"),
                    "etcdgrpcproxy", eps, listen] + self.extra_args
        return ["etcd", "grpc-proxy", "start", eps, listen] + self.extra_args

    def _env(self):
        env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD")}
        if self.kind == "python":
            old = env.get("PYTHONPATH")
            env["PYTHONPATH"] = REPO_ROOT + (os.pathsep + old if old else "")
        return env

    def start(self):
        if self.proc is not None:
            return self
        self.tmpdir = tempfile.mkdtemp(prefix="etcdproxy-test-proxy-")
        self.port = free_port()
        self._out = open(os.path.join(self.tmpdir, "proxy.out"), "wb")
        self.returncode = None
        with _live_lock:
            _live.add(self)
        try:
            self.proc = subprocess.Popen(
                self.command(), stdin=subprocess.DEVNULL, stdout=self._out,
                stderr=subprocess.STDOUT, env=self._env(), cwd=self.tmpdir)
            self._wait_listening(START_TIMEOUT)
        except BaseException:
            log = self.log()
            self.stop()
            self._saved_log = log
            raise
        return self

    def _wait_listening(self, timeout):
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError("%s proxy exited with %s before listening:\n%s"
                                   % (self.kind, self.proc.returncode, self.log()[-6000:]))
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1.0).close()
                return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("%s proxy not listening on %s after %.0fs:\n%s"
                                   % (self.kind, self.address, timeout, self.log()[-6000:]))
            time.sleep(0.05)

    def is_running(self):
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self):
        return self.proc.pid

    def stop(self):
        """SIGTERM, SIGKILL after 10 s; returns the exit code. Idempotent."""
        if self.proc is not None:
            self.returncode = stop_process(self.proc, STOP_GRACE)
            self.proc = None
        if self._out is not None:
            self._out.close()
            self._out = None
        if self.tmpdir:
            self._saved_log = self.log()
            shutil.rmtree(self.tmpdir, ignore_errors=True)
            self.tmpdir = None
        with _live_lock:
            _live.discard(self)
        return self.returncode

    def log(self):
        """twistd's log file (python) followed by the process' stdout/stderr."""
        if not self.tmpdir:
            return self._saved_log
        parts = []
        if self.kind == "python":
            parts.append(_read(os.path.join(self.tmpdir, "proxy.log")))
        out = _read(os.path.join(self.tmpdir, "proxy.out"))
        if out:
            parts.append(out)
        return "\n".join(p for p in parts if p)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
        return False
