"""gRPC status codes, the error that carries them, and grpc-message encoding."""

import enum
from urllib.parse import quote, unquote_to_bytes

from h2.errors import ErrorCodes


class StatusCode(enum.IntEnum):
    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


class GRPCError(Exception):
    """A call ended with a non-OK status.

    ``metadata`` is the trailing metadata as (bytes, bytes) pairs; it is relayed
    unchanged, so details such as grpc-status-details-bin survive a proxy hop.

    ``unprocessed`` is true when the request is known never to have reached the
    server's application (connect failure, GOAWAY below the call's stream,
    REFUSED_STREAM): such a call is safe to retry whatever it does. False means
    the outcome is unknown or the server answered.
    """

    def __init__(self, code, message="", metadata=(), unprocessed=False):
        super().__init__(code, message)
        self.code = StatusCode(code) if 0 <= code <= 16 else StatusCode.UNKNOWN
        self.message = message
        self.metadata = tuple(metadata)
        self.unprocessed = unprocessed

    def __str__(self):
        return f"{self.code.name}: {self.message}"


# The gRPC spec (doc/PROTOCOL-HTTP2.md, "Errors") maps RST_STREAM codes to statuses.
_RESET_TO_STATUS = {
    ErrorCodes.NO_ERROR: StatusCode.INTERNAL,
    ErrorCodes.PROTOCOL_ERROR: StatusCode.INTERNAL,
    ErrorCodes.INTERNAL_ERROR: StatusCode.INTERNAL,
    ErrorCodes.FLOW_CONTROL_ERROR: StatusCode.INTERNAL,
    ErrorCodes.SETTINGS_TIMEOUT: StatusCode.INTERNAL,
    ErrorCodes.FRAME_SIZE_ERROR: StatusCode.INTERNAL,
    ErrorCodes.REFUSED_STREAM: StatusCode.UNAVAILABLE,
    ErrorCodes.CANCEL: StatusCode.CANCELLED,
    ErrorCodes.COMPRESSION_ERROR: StatusCode.INTERNAL,
    ErrorCodes.CONNECT_ERROR: StatusCode.INTERNAL,
    ErrorCodes.ENHANCE_YOUR_CALM: StatusCode.RESOURCE_EXHAUSTED,
    ErrorCodes.INADEQUATE_SECURITY: StatusCode.PERMISSION_DENIED,
}


def status_for_reset(error_code):
    return _RESET_TO_STATUS.get(error_code, StatusCode.INTERNAL)


# Everything outside printable ASCII, and '%' itself, is percent-encoded.
_SAFE = "".join(chr(c) for c in range(0x20, 0x7F) if c != 0x25)


def encode_grpc_message(message):
    return quote(message, safe=_SAFE, encoding="utf-8", errors="replace").encode("ascii")


def decode_grpc_message(raw):
    """Decodes a grpc-message value; a bad escape or bad UTF-8 never raises."""
    if isinstance(raw, str):
        raw = raw.encode("latin-1", "replace")
    if b"%" not in raw:
        return raw.decode("utf-8", "replace")
    return unquote_to_bytes(raw).decode("utf-8", "replace")
