"""One asyncio loop, in a thread of its own, for every grpc.aio client of the
tests. grpcio ties its aio machinery to the loops that use it, and older
releases (Debian bookworm's 1.51) can hang when ``asyncio.run`` closes a loop
that grpc.aio used (a shutdown race fixed upstream later); a loop that runs
for the whole process and is never closed avoids it."""

import asyncio
import concurrent.futures
import threading

_loop = None
_lock = threading.Lock()


def loop():
    global _loop
    with _lock:
        if _loop is None:
            _loop = asyncio.new_event_loop()
            threading.Thread(target=_loop.run_forever, name="grpc-aio", daemon=True).start()
        return _loop


def submit(coroutine):
    """Starts ``coroutine`` on the loop; returns its concurrent Future."""
    return asyncio.run_coroutine_threadsafe(coroutine, loop())


def run(coroutine, timeout):
    """Runs ``coroutine`` on the loop; its result, within ``timeout`` s."""
    future = submit(coroutine)
    try:
        return future.result(timeout)
    except concurrent.futures.TimeoutError:
        future.cancel()
        raise AssertionError("asyncio part did not finish within %.0fs" % timeout)
