"""The frames the fast path (`etcdproxy.grpc.h2fast`) hands to h2's own frame
handlers: records of just the fields those handlers read, in place of the
hyperframe frames h2's parser would build (a Flags set, padding and priority
state, per frame), and the flag sets as hyperframe names them."""

END_STREAM, END_HEADERS = 0x1, 0x4


class DataFrame:
    """What h2's `_receive_data_frame` reads of an unpadded DATA frame."""

    __slots__ = ("stream_id", "data", "flags", "flow_controlled_length")

    def __init__(self, stream_id, data, flags):
        self.stream_id = stream_id
        self.data = data
        self.flags = flags
        self.flow_controlled_length = len(data)

    def __repr__(self):
        return f"DataFrame(stream_id={self.stream_id}, flags={sorted(self.flags)}, {len(self.data)} bytes)"


class HeadersFrame:
    """What h2's `_receive_headers_frame` reads of a whole header block."""

    __slots__ = ("stream_id", "data", "flags")

    def __init__(self, stream_id, data, flags):
        self.stream_id = stream_id
        self.data = data
        self.flags = flags

    def __repr__(self):
        return f"HeadersFrame(stream_id={self.stream_id}, flags={sorted(self.flags)}, {len(self.data)} bytes)"


class WindowUpdateFrame:
    """What h2's `_receive_window_update_frame` reads."""

    __slots__ = ("stream_id", "window_increment")

    def __init__(self, stream_id, window_increment):
        self.stream_id = stream_id
        self.window_increment = window_increment

    def __repr__(self):
        return f"WindowUpdateFrame(stream_id={self.stream_id}, window_increment={self.window_increment})"


class PingFrame:
    """What h2's `_receive_ping_frame` reads (h2 answers it as ever)."""

    __slots__ = ("stream_id", "flags", "opaque_data")

    def __init__(self, flags, opaque_data):
        self.stream_id = 0
        self.flags = flags
        self.opaque_data = opaque_data

    def __repr__(self):
        return f"PingFrame(flags={sorted(self.flags)}, opaque_data={self.opaque_data!r})"


# Flag names as hyperframe gives them, for the flag bytes the fast path takes.
DATA_FLAGS = {0: frozenset(), END_STREAM: frozenset({"END_STREAM"})}
PING_FLAGS = {0: frozenset(), 0x1: frozenset({"ACK"})}
HEADERS_FLAGS = {END_HEADERS: frozenset({"END_HEADERS"}),
                 END_HEADERS | END_STREAM: frozenset({"END_HEADERS", "END_STREAM"})}
