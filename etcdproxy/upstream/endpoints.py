"""Parsing of --endpoints entries."""

import dataclasses
from urllib.parse import urlsplit


@dataclasses.dataclass(frozen=True)
class Endpoint:
    host: str
    port: int
    tls: bool = False

    @property
    def authority(self):
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def parse_endpoint(text):
    """'127.0.0.1:2379', 'http://host:2379', 'https://[::1]:2379' -> Endpoint."""
    text = text.strip()
    if "://" not in text:
        text = "http://" + text
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"endpoint {text!r}: scheme must be http or https")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"endpoint {text!r}: expected host:port")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"endpoint {text!r}: invalid port")
    if not parts.hostname:
        raise ValueError(f"endpoint {text!r}: missing host")
    return Endpoint(parts.hostname, port or 2379, parts.scheme == "https")


def parse_endpoints(text):
    endpoints = [parse_endpoint(e) for e in text.split(",") if e.strip()]
    if not endpoints:
        raise ValueError("no endpoint given")
    return endpoints
