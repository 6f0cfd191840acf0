"""Parsing of --endpoints entries: ``[http://]host:port[=weight]``, comma-separated."""

import dataclasses
from urllib.parse import urlsplit


@dataclasses.dataclass(frozen=True)
class Endpoint:
    host: str
    port: int
    tls: bool = False
    weight: int = 1  # used by the weighted round-robin policy only

    @property
    def authority(self):
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def __str__(self):
        return self.authority


def parse_endpoint(text):
    """'127.0.0.1:2379', 'http://host:2379=3', 'https://[::1]:2379' -> Endpoint."""
    text = text.strip()
    weight = 1
    address, sep, suffix = text.rpartition("=")
    if sep:
        if not suffix.isdigit() or int(suffix) < 1:
            raise ValueError(f"endpoint {text!r}: weight must be a positive integer")
        text, weight = address, int(suffix)
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
    return Endpoint(parts.hostname, port or 2379, parts.scheme == "https", weight)


def parse_endpoints(text):
    endpoints = [parse_endpoint(e) for e in text.split(",") if e.strip()]
    if not endpoints:
        raise ValueError("no endpoint given")
    if len(set((e.host, e.port) for e in endpoints)) != len(endpoints):
        raise ValueError("an endpoint is given twice")
    return endpoints


def read_endpoints_text(path):
    """An endpoints file (--endpoints-file): entries separated by commas,
    spaces or lines; ``#`` starts a comment. Returns them as --endpoints
    takes them."""
    with open(path, encoding="utf-8") as f:
        lines = [line.split("#", 1)[0] for line in f]
    return ",".join(" ".join(lines).replace(",", " ").split())
