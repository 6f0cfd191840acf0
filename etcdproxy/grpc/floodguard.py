"""Counting the frames a peer sends that cost work without being calls.

Past a limit per second of one kind (RST_STREAM: HTTP/2 rapid reset,
CVE-2023-44487; PING; SETTINGS) the connection is to be ended with GOAWAY
ENHANCE_YOUR_CALM; `FloodGuard` only counts and says when.
"""


class _RateGuard:
    """Counts events in one-second windows."""

    __slots__ = ("limit", "window", "count")

    def __init__(self, limit):
        self.limit = limit
        self.window = None
        self.count = 0

    def exceeded(self, now):
        if self.window is None or now - self.window >= 1.0:
            self.window = now
            self.count = 0
        self.count += 1
        return self.count > self.limit


class FloodGuard:
    """One connection's counts, from its `Limits`."""

    def __init__(self, limits):
        self._guards = {
            "RST_STREAM": _RateGuard(limits.max_resets_per_second),
            "PING": _RateGuard(limits.max_pings_per_second),
            "SETTINGS": _RateGuard(limits.max_settings_per_second),
        }

    def limit(self, frame_type):
        return self._guards[frame_type].limit

    def flooded(self, frame_type, now):
        """Counts one frame of ``frame_type``; True once past its limit this second."""
        return self._guards[frame_type].exceeded(now)
