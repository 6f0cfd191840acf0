"""Stopping a child process politely, then for sure."""
import signal
import subprocess


def stop_process(proc, grace):
    """SIGCONT (in case it was paused), SIGTERM, then SIGKILL after ``grace``
    seconds; reaps it. Returns the exit code (None for no process)."""
    if proc is None:
        return None
    if proc.poll() is None:
        for sig in (signal.SIGCONT, signal.SIGTERM):
            try:
                proc.send_signal(sig)
            except OSError:
                pass
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            try:
                proc.kill()
            except OSError:
                pass
            proc.wait(timeout=10)
    return proc.returncode
