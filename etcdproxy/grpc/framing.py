"""gRPC length-prefixed message framing: 1 flag byte, 4-byte big-endian length, body."""

import struct
import zlib

from etcdproxy.grpc.status import GRPCError, StatusCode

_PREFIX = struct.Struct(">BI")
PREFIX_SIZE = _PREFIX.size
# A message from this size on is handed on as a read-only view of the buffer it
# was assembled in, when it fills that buffer, not copied out of it (see feed).
HANDED_OVER = 64 * 1024


def encode_message(payload):
    return _PREFIX.pack(0, len(payload)) + payload


def message_prefix(length):
    """The prefix of an uncompressed message of ``length`` bytes."""
    return _PREFIX.pack(0, length)


def whole_message(data, max_size):
    """The body of ``data`` when it is one whole uncompressed message of at
    most ``max_size`` bytes (the usual DATA frame of a unary call), else None."""
    if type(data) is bytes and len(data) >= PREFIX_SIZE:
        flag, length = _PREFIX.unpack_from(data)
        if flag == 0 and len(data) == PREFIX_SIZE + length and length <= max_size:
            return data[PREFIX_SIZE:]
    return None


class MessageDecoder:
    """Splits a byte stream into messages.

    The declared length is checked against ``max_size`` as soon as the 5-byte
    prefix is in, so an oversize message is refused before its body is buffered.
    ``encoding`` is the call's grpc-encoding: compressed messages are inflated with
    the same limit applied to the inflated size.
    """

    def __init__(self, max_size, encoding=None):
        self.max_size = max_size
        self.encoding = encoding
        self._buffer = bytearray()
        self._needed = None  # body length of the message being read, or None

    @property
    def has_partial_message(self):
        return bool(self._buffer) or self._needed is not None

    def feed(self, data):
        """Returns the list of complete message bodies (bytes, or for a large one
        a read-only memoryview that nothing changes); raises GRPCError on bad input."""
        if self._needed is None and not self._buffer:
            body = whole_message(data, self.max_size)
            if body is not None:
                return [body]
        buf = self._buffer
        buf += data
        messages = []
        while True:
            if self._needed is None:
                if len(buf) < PREFIX_SIZE:
                    break
                flag, length = _PREFIX.unpack_from(buf)
                if flag > 1:
                    raise GRPCError(StatusCode.INTERNAL, f"invalid message flag {flag}")
                if length > self.max_size:
                    raise GRPCError(
                        StatusCode.RESOURCE_EXHAUSTED,
                        f"grpc: received message larger than max ({length} vs. {self.max_size})",
                    )
                self._compressed = flag == 1
                self._needed = length
                del buf[:PREFIX_SIZE]
            if len(buf) < self._needed:
                break
            # The body is buffered in one bytearray, not kept as the DATA frames it
            # came in: many large answers at once in 16 KiB pieces fragment the heap
            # (kept as pieces and joined once, 30 concurrent 5 MB answers left the
            # proxy's RSS at 124 MB after they ended, against 58 MB this way).
            if len(buf) == self._needed and self._needed >= HANDED_OVER and not self._compressed:
                # The buffer holds this message and nothing more: it is handed on
                # as a read-only view, and this decoder takes a new one. Nothing
                # changes it from then on (a 5 MB answer's copy, a tenth of its CPU).
                body = memoryview(buf).toreadonly()
                buf = self._buffer = bytearray()
            else:
                with memoryview(buf) as view:  # (a slice of the bytearray would be a second copy)
                    body = bytes(view[: self._needed])
                del buf[: self._needed]
            self._needed = None
            if self._compressed:
                body = self._decompress(body)
            messages.append(body)
        return messages

    def release(self):
        """Drops a partial message at once: a call's objects may be kept a
        while in reference cycles, its buffers need not be."""
        self._buffer = bytearray()
        self._needed = None

    def _decompress(self, body):
        if self.encoding in (None, "identity"):
            raise GRPCError(
                StatusCode.INTERNAL,
                "grpc: compressed flag set with identity or empty encoding",
            )
        if self.encoding == "deflate":
            inflater = zlib.decompressobj()
        elif self.encoding == "gzip":
            inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
        else:
            raise GRPCError(StatusCode.UNIMPLEMENTED, f"grpc: Decompressor is not installed for grpc-encoding \"{self.encoding}\"")
        try:
            out = inflater.decompress(body, self.max_size + 1)
        except zlib.error as e:
            raise GRPCError(StatusCode.INTERNAL, f"grpc: failed to decompress the received message: {e}")
        if len(out) > self.max_size:
            raise GRPCError(
                StatusCode.RESOURCE_EXHAUSTED,
                f"grpc: received message after decompression larger than max ({self.max_size})",
            )
        return out
