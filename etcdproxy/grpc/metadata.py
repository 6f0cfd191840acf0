"""Request/response metadata: which headers are gRPC's own, and grpc-timeout."""

import math
import re

# Headers that belong to the transport or to gRPC itself and are never relayed
# as application metadata; everything else (token, hasleader, custom keys,
# -bin keys) is. Names are lower-case bytes, as h2 delivers them.
RESERVED = frozenset(
    [
        b"content-type",
        b"te",
        b"user-agent",
        b"grpc-timeout",
        b"grpc-encoding",
        b"grpc-accept-encoding",
        b"grpc-message-type",
        b"grpc-status",
        b"grpc-message",
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"transfer-encoding",
        b"upgrade",
        b"host",
    ]
)


# What most header lists hold: nothing to relay (told apart without a loop in Python).
_NEVER_RELAYED = RESERVED | {b":status", b":method", b":path", b":scheme", b":authority", b":protocol"}


def application_metadata(headers):
    """The relayable (name, value) pairs of a header list."""
    if dict(headers).keys() <= _NEVER_RELAYED:
        return []
    return [(n, v) for n, v in headers if n[:1] != b":" and n not in RESERVED]


_TIMEOUT = re.compile(rb"^([0-9]{1,8})([HMSmun])$")
_UNIT_SECONDS = {
    b"H": 3600.0,
    b"M": 60.0,
    b"S": 1.0,
    b"m": 1e-3,
    b"u": 1e-6,
    b"n": 1e-9,
}


def parse_timeout(value):
    """Seconds from a grpc-timeout value; raises ValueError if malformed."""
    m = _TIMEOUT.match(value)
    if m is None:
        raise ValueError(f"malformed grpc-timeout {value!r}")
    return int(m.group(1)) * _UNIT_SECONDS[m.group(2)]


def format_timeout(seconds):
    """The shortest grpc-timeout value (at most 8 digits) covering ``seconds``."""
    micros = max(0, math.ceil(seconds * 1e6))
    for unit, scale in ((b"u", 1), (b"m", 1000), (b"S", 1000000), (b"M", 60000000), (b"H", 3600000000)):
        value = -(-micros // scale)  # round up: never shorten the deadline
        if value < 100000000:
            return b"%d%s" % (value, unit)
    return b"99999999H"
