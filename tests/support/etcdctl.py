"""Runs Debian's etcdctl (v3 API) against an endpoint."""
import atexit
import os
import signal
import subprocess
import threading
import time

__all__ = ["etcdctl", "EtcdctlProcess", "ETCDCTL_BINARY", "etcdctl_env"]

ETCDCTL_BINARY = os.environ.get("ETCDPROXY_TEST_ETCDCTL", "etcdctl")

_live = set()


@atexit.register
def _stop_all_at_exit():
    for p in list(_live):
        try:
            p.stop(sig=signal.SIGKILL)
        except Exception:
            pass


def etcdctl_env(env=None):
    e = {k: v for k, v in os.environ.items() if not k.startswith("ETCDCTL")}
    e["ETCDCTL_API"] = "3"
    if env:
        e.update(env)
    return e


def etcdctl(endpoint, *args, input=None, timeout=20, check=True, env=None):
    """``etcdctl --endpoints=endpoint *args``; returns the CompletedProcess
    (text mode, stdout/stderr captured). With ``check``, a non-zero exit
    raises AssertionError showing stderr."""
    cmd = [ETCDCTL_BINARY, "--endpoints=" + endpoint] + [str(a) for a in args]
    try:
        cp = subprocess.run(cmd, input=input, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, timeout=timeout, env=etcdctl_env(env),
                            stdin=None if input is not None else subprocess.DEVNULL)
    except subprocess.TimeoutExpired as e:
        raise AssertionError("etcdctl %s timed out after %ss; stdout=%r stderr=%r"
                             % (" ".join(cmd[1:]), timeout, e.stdout, e.stderr))
    if check and cp.returncode != 0:
        raise AssertionError("etcdctl %s exited %d:\nstderr: %s\nstdout: %s"
                             % (" ".join(cmd[1:]), cp.returncode, cp.stderr, cp.stdout))
    return cp


class EtcdctlProcess(object):
    """A long-running etcdctl (watch, lease keep-alive, elect, lock...) in the
    background; its stdout lines are collected by a reader thread.

        w = EtcdctlProcess(endpoint, "watch", "k").start()
        w.wait_for(lambda lines: len(lines) >= 3, timeout=10)
        out = w.stop()           # SIGINT, then SIGKILL; returns stdout text
    """

    def __init__(self, endpoint, *args, env=None, stdin_text=None):
        self.cmd = [ETCDCTL_BINARY, "--endpoints=" + endpoint] + [str(a) for a in args]
        self.env = etcdctl_env(env)
        self.stdin_text = stdin_text
        self.proc = None
        self._lines = []
        self._err = []
        self._cond = None
        self._threads = []
        self.returncode = None

    def start(self):
        _live.add(self)
        self._cond = threading.Condition()
        self.proc = subprocess.Popen(
            self.cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            stdin=subprocess.PIPE if self.stdin_text is not None else subprocess.DEVNULL,
            env=self.env, text=True)
        if self.stdin_text is not None:
            self.proc.stdin.write(self.stdin_text)
            self.proc.stdin.flush()
        for stream, sink in ((self.proc.stdout, self._lines), (self.proc.stderr, self._err)):
            t = threading.Thread(target=self._reader, args=(stream, sink), daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def _reader(self, stream, sink):
        for line in stream:
            with self._cond:
                sink.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def write(self, text):
        """More text to etcdctl's stdin (with ``stdin_text`` given, even "")."""
        self.proc.stdin.write(text)
        self.proc.stdin.flush()

    @property
    def lines(self):
        with self._cond:
            return list(self._lines)

    @property
    def stderr(self):
        with self._cond:
            return "\n".join(self._err)

    def output(self):
        return "".join(l + "\n" for l in self.lines)

    def running(self):
        return self.proc is not None and self.proc.poll() is None

    def wait_for(self, predicate, timeout=10.0, what=None):
        """Waits until ``predicate(lines)`` is true; AssertionError (showing the
        output so far) after ``timeout`` s or when etcdctl exits first."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                if predicate(list(self._lines)):
                    return list(self._lines)
                left = deadline - time.monotonic()
                exited = self.proc.poll() is not None and all(not t.is_alive() for t in self._threads)
                if left <= 0 or exited:
                    raise AssertionError(
                        "etcdctl %s: %s %s; stdout:\n%s\nstderr:\n%s" % (
                            " ".join(self.cmd[1:]), what or "condition not met",
                            "(exited %s)" % self.proc.returncode if exited else "after %ss" % timeout,
                            "\n".join(self._lines), "\n".join(self._err)))
                self._cond.wait(min(left, 0.1))

    def wait_exit(self, timeout=10.0):
        """Waits for etcdctl to exit by itself; returns the exit code."""
        try:
            self.returncode = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError("etcdctl %s still running after %ss; stdout:\n%s" % (
                " ".join(self.cmd[1:]), timeout, self.output()))
        self._join()
        _live.discard(self)
        return self.returncode

    def _join(self):
        for t in self._threads:
            t.join(timeout=5)

    def stop(self, sig=None, grace=5.0):
        """Ends etcdctl (SIGINT by default, SIGKILL after ``grace`` s) and
        returns its stdout text. Idempotent."""
        if self.proc is None:
            return ""
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(sig or signal.SIGINT)
            except OSError:
                pass
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.returncode = self.proc.returncode
        if self.proc.stdin is not None:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
        self._join()
        _live.discard(self)
        return self.output()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
        return False
