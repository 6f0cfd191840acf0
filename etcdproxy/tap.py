"""twistd plugin body: the command-line options and the service tree."""

import math
import os

from OpenSSL import crypto

from twisted.application import service
from twisted.internet import defer
from twisted.python import usage

from etcdproxy.collector import tune_for_serving
from etcdproxy.services.watch_responses import DEFAULT_FRAGMENT_SIZE
from etcdproxy.tls import TLS_VERSIONS, ClientTLS, ReloadableServerTLS, ServerTLSOptions, self_signed
from etcdproxy.upstream.endpoints import parse_endpoints, read_endpoints_text
from etcdproxy.upstream.policy import POLICIES


def _listen_description(address):
    """'127.0.0.1:23790' or '[::1]:23790' -> a server endpoint description."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise usage.UsageError(f"--listen-addr {address!r}: expected host:port")
    host = host.strip("[]")
    if not host:
        return f"tcp:{port}"
    return f"tcp:{port}:interface={host.replace(':', chr(92) + ':')}"


NOT_IMPLEMENTED = {
    "discovery-srv": "DNS SRV discovery",
    "discovery-srv-name": "DNS SRV discovery",
    "experimental-leasing-prefix": "leasing",
}


def _positive_int(name):
    def parse(value):
        number = int(value)
        if number <= 0:
            raise ValueError(f"{name} must be positive")
        return number

    return parse


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "An etcd v3 gRPC proxy. Flags follow `etcd grpc-proxy start`. "
        "etcd clients connect to --listen-addr exactly as to etcd."
    )
    optParameters = [
        ["endpoints", None, "127.0.0.1:2379",
         "comma-separated etcd endpoints, host:port or http://host:port; with "
         "--endpoint-policy=weighted each may end with =WEIGHT (a positive integer, "
         "default 1), e.g. 10.0.0.1:2379=3,10.0.0.2:2379=1"],
        ["endpoints-file", None, None,
         "read the endpoints from this file instead (entries separated by commas, spaces or "
         "lines, # comments), and again on SIGHUP"],
        ["endpoint-policy", None, "sticky",
         "which endpoint new calls go to: sticky (one picked at random at start, "
         "used until it fails), round-robin (each call to the next healthy one), "
         "weighted (round-robin in proportion to the =WEIGHT of each endpoint)"],
        ["listen-addr", None, "127.0.0.1:23790", "address (host:port) to serve clients on"],
        ["max-recv-bytes", None, 4 * 1024 * 1024,
         "largest request message accepted from a client, in bytes (requests "
         "larger than etcd's own limit still reach etcd and get etcd's answer)",
         _positive_int("max-recv-bytes")],
        ["max-send-bytes", None, math.floor(2**31 - 1),
         "largest response message sent to a client, in bytes",
         _positive_int("max-send-bytes")],
        ["max-concurrent-streams", None, 2**32 - 1,
         "maximum concurrent streams that each client connection can open",
         _positive_int("max-concurrent-streams")],
        ["send-stall-timeout", None, 60.0,
         "seconds a client may read none of a call's pending answer before the call "
         "ends (RESOURCE_EXHAUSTED; reset if its status already waits behind the "
         "data); 0: never", float],
        ["upstream-keepalive-interval", None, 10.0,
         "seconds between keepalive pings to etcd while calls are open (at least 5: "
         "etcd answers faster pings with GOAWAY too_many_pings)", float],
        ["upstream-keepalive-timeout", None, 10.0,
         "seconds without a ping answer after which an etcd connection is dropped", float],
        ["upstream-connect-timeout", None, 2.0,
         "seconds a connection attempt to an etcd endpoint may take", float],
        ["health-check-interval", None, 1.0,
         "seconds between health checks (Maintenance.Status) of each healthy endpoint", float],
        ["health-check-timeout", None, 2.0,
         "seconds a health check may take; an endpoint that does not answer in time "
         "is considered hung and left", float],
        ["endpoint-probe-max-interval", None, 3.0,
         "longest pause between health checks of a failed endpoint (they start at "
         "0.5 s and double)", float],
        ["max-connections", None, 0,
         "client connections open at once, at most (0: no limit); one more is closed at once",
         int],
        ["handshake-timeout", None, 10.0,
         "seconds a new client connection has to say what it is (TLS handshake and HTTP/2 "
         "preface or HTTP/1.1 request line) before it is closed", float],
        ["drain-timeout", None, 10.0,
         "seconds that calls in flight may take to finish on shutdown", float],
        ["watch-send-buffer", None, 4 * 1024 * 1024,
         "bytes of watch responses that may wait for a client that does not read; past "
         "them its Watch stream ends with RESOURCE_EXHAUSTED", int],
        ["watch-fragment-size", None, DEFAULT_FRAGMENT_SIZE,
         "size at which watch responses are split for watchers created with fragment=true "
         "(etcd's: its --max-request-bytes + 512 KiB)", int],
        # range cache and per-client limits
        ["cache-max-bytes", None, 64 * 1024 * 1024,
         "bytes of Range answers the range cache may hold (0: no cache, Range is "
         "relayed as it is)", int],
        ["cache-max-entries", None, 100_000, "Range answers the range cache may hold", int],
        ["cache-token-max-age", None, 1.0,
         "seconds an answer cached for an auth token may be served (bounds how long an "
         "auth change made elsewhere than through this proxy goes unseen)", float],
        ["cache-check-interval", None, 1.0,
         "seconds between checks for compaction and auth enabled elsewhere than through "
         "this proxy (bounds how long they go unseen)", float],
        ["cache-watch-user", None, None,
         "with etcd auth enabled: a user who may read every key, whose token the range "
         "cache's invalidation watch uses (without it the cache is off while auth is on)"],
        ["cache-watch-password-file", None, None,
         "file holding the password of --cache-watch-user (its first line)"],
        ["client-max-rps", None, 0.0,
         "calls per second each client may start (0: no limit); more get RESOURCE_EXHAUSTED", float],
        ["client-burst", None, 0,
         "calls a client may start at once above --client-max-rps (default: the rate)", int],
        ["client-max-concurrent", None, 0,
         "calls (streams included) each client may have open at once (0: no limit)", int],
        ["client-limit-by", None, "peer",
         "what a client is for the limits: peer (address), connection, token (auth "
         "token; calls without one count by peer address)"],
        # TLS toward clients
        ["cert-file", None, None, "serve clients over TLS with this certificate (PEM, may hold its chain)"],
        ["key-file", None, None, "the private key of --cert-file (PEM)"],
        ["trusted-ca-file", None, None,
         "require client certificates, verified against this CA bundle (PEM)"],
        ["client-crl-file", None, None, "refuse client certificates revoked by this CRL (PEM)"],
        ["listen-cipher-suites", None, None,
         "comma-separated TLS 1.0-1.2 cipher suites offered to clients, Go's names (e.g. "
         "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256); default: OpenSSL's secure set"],
        ["tls-min-version", None, "TLS1.2", "lowest TLS version accepted from clients: "
         + ", ".join(TLS_VERSIONS)],
        ["tls-max-version", None, None, "highest TLS version accepted from clients (default: the highest)"],
        ["data-dir", None, "default.proxy", "directory for persistent data (--auto-tls certificates)"],
        # TLS toward etcd (https:// endpoints)
        ["cacert", None, None, "verify etcd's certificates with this CA bundle (default: the system's)"],
        ["cert", None, None, "client certificate presented to etcd (PEM)"],
        ["key", None, None, "the private key of --cert (PEM)"],
        ["namespace", None, None,
         "prefix every key with this string on the way to etcd and strip it on the way back "
         "(KV, Watch, LeaseTimeToLive, Election and Lock names)"],
        ["resolver-prefix", None, None,
         "register this proxy in etcd under this prefix (etcd's naming format); MemberList "
         "through any proxy then gives the registered proxies' addresses as client URLs"],
        ["resolver-ttl", None, 60, "seconds a registration outlives a proxy that died", _positive_int("resolver-ttl")],
        ["advertise-client-url", None, None,
         "this proxy's address for clients (host:port), as registered and as MemberList "
         "gives it for every started member (default: --listen-addr)"],
        ["metrics-addr", None, None,
         "also serve /metrics, /health and /proxy/health on this address (host:port or "
         "http://host:port); they are always served on --listen-addr too"],
        # etcd grpc-proxy flags not implemented yet: refused at start, never ignored
        *[[name, None, None, f"not implemented yet ({why}): refused at start"]
          for name, why in NOT_IMPLEMENTED.items()],
    ]
    optFlags = [
        ["debug", None, "log every call (method, peer, status, time) at debug level"],
        ["relay-member-list", None,
         "answer MemberList as etcd does, with the members' own client URLs (clients that "
         "sync endpoints then go around the proxy); by default they are the proxies'"],
        ["enable-pprof", None, "not available: Go's runtime profiler (refused at start)"],
        ["experimental-serializable-ordering", None, "not implemented yet (refused at start)"],
        ["insecure-discovery", None, "not implemented yet (refused at start)"],
        ["auto-tls", None, "serve clients over TLS with a self-signed certificate kept in --data-dir"],
        ["insecure-skip-tls-verify", None,
         "do not verify etcd's certificates (CAUTION: for testing only)"],
        ["watch-exact", None,
         "watches with no start revision start exactly at etcd's current revision (one "
         "serializable count read at etcd per such watch); without it they may start "
         "slightly behind. A stream can ask for it with metadata etcdproxy-watch-exact: true"],
    ]

    def parseOptions(self, options=None):
        # A bad flag must stop the start with a non-zero status: twistd 22.4 prints
        # a usage error but exits 0 (systemd would take it for a clean stop).
        try:
            super().parseOptions(options)
        except usage.UsageError as e:
            raise SystemExit(f"etcdgrpcproxy: {e}")

    def postOptions(self):
        if self["endpoint-policy"] not in POLICIES:
            raise usage.UsageError(f"--endpoint-policy must be one of {', '.join(POLICIES)}")
        try:
            self["endpoints"] = self.read_endpoints()
        except (OSError, ValueError) as e:
            raise usage.UsageError(f"--endpoints: {e}")
        if self["upstream-keepalive-interval"] < 5:
            raise usage.UsageError("--upstream-keepalive-interval must be at least 5 (etcd's minimum)")
        for name in ("upstream-keepalive-timeout", "upstream-connect-timeout", "health-check-interval",
                     "health-check-timeout", "endpoint-probe-max-interval", "watch-send-buffer",
                     "handshake-timeout",
                     "watch-fragment-size"):
            if self[name] <= 0:
                raise usage.UsageError(f"--{name} must be positive")
        for name in ("cache-max-bytes", "cache-max-entries", "cache-token-max-age", "client-max-rps",
                     "client-burst", "client-max-concurrent", "send-stall-timeout"):
            if self[name] < 0:
                raise usage.UsageError(f"--{name} must not be negative")
        if self["cache-check-interval"] <= 0:
            raise usage.UsageError("--cache-check-interval must be positive")
        if self["client-limit-by"] not in ("peer", "connection", "token"):
            raise usage.UsageError("--client-limit-by must be one of peer, connection, token")
        self["cache-credentials"] = None
        if bool(self["cache-watch-user"]) != bool(self["cache-watch-password-file"]):
            raise usage.UsageError("--cache-watch-user and --cache-watch-password-file go together")
        if self["cache-watch-user"]:
            try:
                with open(self["cache-watch-password-file"], encoding="utf-8") as f:
                    password = f.readline().rstrip("\r\n")
            except OSError as e:
                raise usage.UsageError(f"--cache-watch-password-file: {e.strerror}")
            self["cache-credentials"] = (self["cache-watch-user"], password)
        for name in [*NOT_IMPLEMENTED, "experimental-serializable-ordering", "insecure-discovery"]:
            if self[name]:
                raise usage.UsageError(f"--{name} is not implemented yet in etcdgrpcproxy")
        if self["enable-pprof"]:
            raise usage.UsageError("--enable-pprof is Go's runtime profiler: not available in etcdgrpcproxy")
        if self["max-connections"] < 0:
            raise usage.UsageError("--max-connections must be 0 (no limit) or positive")
        self["listen-description"] = _listen_description(self["listen-addr"])
        self["advertise-client-url"] = self["advertise-client-url"] or self["listen-addr"]
        if self["metrics-addr"]:
            address = self["metrics-addr"]
            if address.startswith("https://"):
                raise usage.UsageError("--metrics-addr: https is not implemented yet")
            self["metrics-description"] = _listen_description(address.removeprefix("http://"))
        self._tls()

    def read_endpoints(self):
        """The endpoints, from --endpoints-file when given (read again on SIGHUP)."""
        text = self["endpoints"]
        if self["endpoints-file"]:
            text = read_endpoints_text(self["endpoints-file"])
        if "=" in text and self["endpoint-policy"] != "weighted":
            raise ValueError("weights (host:port=WEIGHT) need --endpoint-policy=weighted")
        return parse_endpoints(text)

    def _tls(self):
        """Loads the certificates now, so that a bad file stops the start with a clear message."""
        for first, second in (("cert-file", "key-file"), ("cert", "key")):
            if bool(self[first]) != bool(self[second]):
                raise usage.UsageError(f"--{first} and --{second} go together")
        for name in ("tls-min-version", "tls-max-version"):
            if self[name] is not None and self[name] not in TLS_VERSIONS:
                raise usage.UsageError(f"--{name} must be one of {', '.join(TLS_VERSIONS)}")
        cert_file, key_file = self["cert-file"], self["key-file"]
        if not cert_file and self["auto-tls"]:
            host = self["listen-addr"].rpartition(":")[0].strip("[]") or "127.0.0.1"
            directory = os.path.join(self["data-dir"], "fixtures", "proxy")
            cert_file, key_file = self_signed(directory, sorted({host, "localhost"}))
        if not cert_file and (self["trusted-ca-file"] or self["client-crl-file"]):
            raise usage.UsageError("--trusted-ca-file and --client-crl-file need --cert-file or --auto-tls")
        suites = [c.strip() for c in (self["listen-cipher-suites"] or "").split(",") if c.strip()]
        try:
            self["server-tls"] = cert_file and ReloadableServerTLS(lambda: ServerTLSOptions(
                cert_file, key_file, self["trusted-ca-file"], self["client-crl-file"],
                self["tls-min-version"], self["tls-max-version"], suites))
            self["client-tls"] = ClientTLS(self["cacert"], self["cert"], self["key"],
                                           self["insecure-skip-tls-verify"])
        except (OSError, ValueError, crypto.Error) as e:
            raise usage.UsageError(f"TLS: {e}")


class ProxyService(service.MultiService):
    """The proxy's service tree. Children stop one after another, the last
    added first: the gRPC server drains (unary calls in flight finish, streams
    end with UNAVAILABLE) before the upstream connections they use close."""

    def startService(self):
        tune_for_serving()  # what startup made is there for good
        super().startService()

    @defer.inlineCallbacks
    def stopService(self):
        service.Service.stopService(self)
        for child in reversed(list(self)):
            yield defer.maybeDeferred(child.stopService)


def makeService(options):
    # The reactor is imported here, not at module level: twistd installs it first.
    from twisted.internet import reactor
    from twisted.internet.endpoints import serverFromString

    from etcdproxy.proxy import ProxyRouter
    from etcdproxy.grpc.connection import Limits
    from etcdproxy.grpc.server import GRPCServerFactory
    from etcdproxy.grpc.service import GRPCServerService
    from etcdproxy.services.broadcast import WatchBroadcaster
    from etcdproxy.services.client_limits import ClientLimits
    from etcdproxy.services.range_cache import RangeCache
    from etcdproxy.services.lease_coalescer import LeaseCoalescer
    from twisted.application import strports

    from etcdproxy.grpc.sniff import SniffingFactory
    from etcdproxy.http import make_site
    from etcdproxy.metrics import CallLog, make_registry
    from etcdproxy.reload import ReloadOnHangup
    from etcdproxy.services.registration import Registration
    from etcdproxy.tls import TLSServerEndpoint
    from etcdproxy.upstream.monitor import EndpointMonitor
    from etcdproxy.memory import keep_large_blocks_returnable

    keep_large_blocks_returnable()
    top = ProxyService()
    monitor = EndpointMonitor(
        reactor,
        options["endpoints"],
        policy=options["endpoint-policy"],
        limits=Limits(max_receive_message=2**31 - 1),
        keepalive_interval=options["upstream-keepalive-interval"],
        keepalive_timeout=options["upstream-keepalive-timeout"],
        connect_timeout=options["upstream-connect-timeout"],
        check_interval=options["health-check-interval"],
        check_timeout=options["health-check-timeout"],
        probe_backoff_max=options["endpoint-probe-max-interval"],
        client_tls=options["client-tls"],
    )
    monitor.setServiceParent(top)
    limits = Limits(
        max_receive_message=options["max-recv-bytes"],
        max_send_message=options["max-send-bytes"],
        max_concurrent_streams=options["max-concurrent-streams"],
        send_stall_timeout=options["send-stall-timeout"],
    )
    watches = WatchBroadcaster(
        monitor, exact=options["watch-exact"], send_buffer=options["watch-send-buffer"],
        fragment_size=options["watch-fragment-size"])
    watches.setServiceParent(top)
    cache = None
    if options["cache-max-bytes"] and options["cache-max-entries"]:
        cache = RangeCache(monitor, options["cache-max-bytes"], options["cache-max-entries"],
                           options["cache-token-max-age"], options["cache-check-interval"],
                           options["cache-credentials"])
        cache.setServiceParent(top)
    client_limits = ClientLimits(reactor, options["client-max-rps"], options["client-burst"],
                                 options["client-max-concurrent"], options["client-limit-by"])
    client_limits.setServiceParent(top)
    leases = LeaseCoalescer(monitor)
    leases.setServiceParent(top)
    registry, call_metrics = make_registry(monitor, top)
    observers = [call_metrics, CallLog()] if options["debug"] else [call_metrics]
    registration = None
    if options["resolver-prefix"]:
        registration = Registration(monitor, options["resolver-prefix"], options["advertise-client-url"],
                                    options["resolver-ttl"])
        registration.setServiceParent(top)
    router = ProxyRouter(monitor, watches, leases=leases, cache=cache, client_limits=client_limits,
                         advertise=options["advertise-client-url"], registration=registration,
                         namespace=(options["namespace"] or "").encode() or None,
                         relay_member_list=options["relay-member-list"])
    factory = GRPCServerFactory(router, reactor, limits, observers)
    site = make_site(registry, monitor, _self_channel(reactor, options), access_log=options["debug"])
    endpoint = serverFromString(reactor, options["listen-description"])
    if options["server-tls"]:
        endpoint = TLSServerEndpoint(endpoint, options["server-tls"])
    # gRPC and HTTP/1.1 (/metrics, /health) on one port, as etcd's proxy serves them
    listen = SniffingFactory(factory, site, reactor, options["handshake-timeout"], options["max-connections"])
    server = GRPCServerService(endpoint, factory, options["drain-timeout"], listen)
    server.setName("grpc-server")
    server.setServiceParent(top)
    reloads = [("TLS certificates", options["server-tls"].reload)] if options["server-tls"] else []
    if options["endpoints-file"]:
        reloads.append(("etcd endpoints", lambda: monitor.set_endpoints(options.read_endpoints())))
    ReloadOnHangup(reactor, reloads).setServiceParent(top)
    if options["metrics-addr"]:
        metrics = strports.service(options["metrics-description"], site, reactor=reactor)
        metrics.setName("metrics-server")
        metrics.setServiceParent(top)
    return top


def _self_channel(reactor, options):
    """A channel to the proxy's own listen address, for /proxy/health."""
    from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS

    from etcdproxy.grpc.client import Channel

    host, _, port = options["listen-addr"].rpartition(":")
    host = host.strip("[]")
    if host in ("", "0.0.0.0", "::"):
        host = "127.0.0.1"
    endpoint = HostnameEndpoint(reactor, host, int(port), timeout=1)
    tls = bool(options["server-tls"])
    if tls:
        own = ClientTLS(None, options["cert"], options["key"], insecure_skip_verify=True)
        endpoint = wrapClientTLS(own.creator(host), endpoint)
    return Channel(reactor, endpoint, options["listen-addr"].encode("ascii"), tls=tls)
