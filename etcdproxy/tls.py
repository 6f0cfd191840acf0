"""TLS toward clients and toward etcd, from the flags of `etcd grpc-proxy start`.

Both sides offer ALPN "h2" only (gRPC runs on HTTP/2). Toward clients, a
trusted CA file makes client certificates required and verified (optionally
against a CRL). Toward etcd, the server's certificate is verified against the
CA bundle (or the system's roots) and must match the endpoint's host name or IP
address (service_identity).
"""

import datetime
import ipaddress
import os

from OpenSSL import SSL, crypto
from twisted.internet import ssl
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.protocols.tls import TLSMemoryBIOFactory
from zope.interface import implementer

ALPN = [b"h2"]

TLS_VERSIONS = {
    "TLS1.0": ssl.TLSVersion.TLSv1_0,
    "TLS1.1": ssl.TLSVersion.TLSv1_1,
    "TLS1.2": ssl.TLSVersion.TLSv1_2,
    "TLS1.3": ssl.TLSVersion.TLSv1_3,
}

_PROTOCOL_VERSIONS = {
    "TLS1.0": SSL.TLS1_VERSION,
    "TLS1.1": SSL.TLS1_1_VERSION,
    "TLS1.2": SSL.TLS1_2_VERSION,
    "TLS1.3": SSL.TLS1_3_VERSION,
}

# Go's names of the TLS 1.0-1.2 cipher suites (--listen-cipher-suites) in
# OpenSSL's; TLS 1.3 suites are not configurable, in Go either.
CIPHER_SUITES = {
    "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256": "ECDHE-ECDSA-AES128-GCM-SHA256",
    "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256": "ECDHE-RSA-AES128-GCM-SHA256",
    "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384": "ECDHE-ECDSA-AES256-GCM-SHA384",
    "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384": "ECDHE-RSA-AES256-GCM-SHA384",
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305": "ECDHE-ECDSA-CHACHA20-POLY1305",
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-ECDSA-CHACHA20-POLY1305",
    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305": "ECDHE-RSA-CHACHA20-POLY1305",
    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-RSA-CHACHA20-POLY1305",
    "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA": "ECDHE-ECDSA-AES128-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA": "ECDHE-ECDSA-AES256-SHA",
    "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA": "ECDHE-RSA-AES128-SHA",
    "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA": "ECDHE-RSA-AES256-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA256": "ECDHE-ECDSA-AES128-SHA256",
    "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA256": "ECDHE-RSA-AES128-SHA256",
    "TLS_RSA_WITH_AES_128_GCM_SHA256": "AES128-GCM-SHA256",
    "TLS_RSA_WITH_AES_256_GCM_SHA384": "AES256-GCM-SHA384",
    "TLS_RSA_WITH_AES_128_CBC_SHA": "AES128-SHA",
    "TLS_RSA_WITH_AES_256_CBC_SHA": "AES256-SHA",
    "TLS_RSA_WITH_AES_128_CBC_SHA256": "AES128-SHA256",
}


def _read(path):
    with open(path, "rb") as f:
        return f.read()


def _certificates(path):
    """Every certificate of a PEM file (a bundle, or a leaf and its chain)."""
    data = _read(path)
    marker = b"-----BEGIN CERTIFICATE-----"
    pems = [marker + part for part in data.split(marker)[1:]]
    if not pems:
        raise ValueError(f"{path}: no PEM certificate in it")
    return [crypto.load_certificate(crypto.FILETYPE_PEM, pem) for pem in pems]


def _key(path):
    return crypto.load_privatekey(crypto.FILETYPE_PEM, _read(path))


def cipher_string(names):
    """Go cipher suite names -> an OpenSSL cipher string (ValueError on an unknown one)."""
    unknown = [n for n in names if n not in CIPHER_SUITES]
    if unknown:
        raise ValueError(f"unknown cipher suite(s): {', '.join(unknown)}")
    return ":".join(CIPHER_SUITES[n] for n in names)


class ServerTLSOptions(ssl.CertificateOptions):
    """The proxy's own TLS: certificate, optional client-certificate check with a CRL."""

    def __init__(self, cert_file, key_file, trusted_ca_file=None, crl_file=None,
                 min_version="TLS1.2", max_version=None, cipher_suites=()):
        leaf, *chain = _certificates(cert_file)
        kwargs = {}
        if trusted_ca_file:
            kwargs.update(verify=True, caCerts=_certificates(trusted_ca_file), requireCertificate=True)
        if cipher_suites:
            kwargs["acceptableCiphers"] = ssl.AcceptableCiphers.fromOpenSSLCipherString(
                cipher_string(cipher_suites))
        minimum = TLS_VERSIONS[min_version]
        if minimum < ssl.TLSVersion.TLSv1_2:
            kwargs["insecurelyLowerMinimumTo"] = minimum
        else:
            kwargs["raiseMinimumTo"] = minimum
        super().__init__(
            privateKey=_key(key_file), certificate=leaf, extraCertChain=chain,
            acceptableProtocols=ALPN, **kwargs)
        self._crl = _read(crl_file) if crl_file else None
        # Set on the context: Twisted 22.4's lowerMaximumSecurityTo also turns off
        # the version it is given.
        self._max_version = _PROTOCOL_VERSIONS[max_version] if max_version else None

    def _makeContext(self):
        context = super()._makeContext()
        if self._max_version is not None:
            context.set_max_proto_version(self._max_version)
        if self._crl is not None:
            store = context.get_cert_store()
            _add_crl(store, self._crl)
            store.set_flags(crypto.X509StoreFlags.CRL_CHECK)
        return context


class ReloadableServerTLS:
    """The proxy's TLS options, made again from their files on reload
    (SIGHUP): new connections get the new certificate, established ones keep
    theirs. A reload that fails (a bad file) keeps the options in force."""

    def __init__(self, make):
        self._make = make
        self.options = make()

    def reload(self):
        self.options = self._make()

    def getContext(self):  # asked for each new connection
        return self.options.getContext()


def _add_crl(store, pem):
    """pyOpenSSL takes cryptography's CRL objects (newer releases) or its own
    (older ones, e.g. Debian bookworm's 23.0)."""
    from cryptography import x509

    try:
        store.add_crl(x509.load_pem_x509_crl(pem))
    except (TypeError, AttributeError):
        store.add_crl(crypto.load_crl(crypto.FILETYPE_PEM, pem))


@implementer(IStreamServerEndpoint)
class TLSServerEndpoint:
    """Any stream server endpoint, with TLS on its connections."""

    def __init__(self, endpoint, options):
        self.endpoint = endpoint
        self.options = options

    def listen(self, factory):
        return self.endpoint.listen(TLSMemoryBIOFactory(self.options, False, factory))


class ClientTLS:
    """TLS toward etcd endpoints: ``creator(host)`` gives the connection
    creator for one endpoint."""

    def __init__(self, cacert=None, cert=None, key=None, insecure_skip_verify=False):
        self._client_certificate = None
        if cert:
            leaf, *_ = _certificates(cert)
            self._client_certificate = ssl.PrivateCertificate.fromCertificateAndKeyPair(
                ssl.Certificate(leaf), ssl.KeyPair(_key(key)))
        self._trust = (ssl.trustRootFromCertificates([ssl.Certificate(c) for c in _certificates(cacert)])
                       if cacert else ssl.platformTrust())
        self.insecure_skip_verify = insecure_skip_verify

    def creator(self, host):
        if self.insecure_skip_verify:
            options = {"acceptableProtocols": ALPN}
            if self._client_certificate is not None:
                options.update(privateKey=self._client_certificate.privateKey.original,
                               certificate=self._client_certificate.original)
            return ssl.CertificateOptions(**options)  # encrypted, etcd not authenticated
        return ssl.optionsForClientTLS(
            host, trustRoot=self._trust, clientCertificate=self._client_certificate,
            acceptableProtocols=ALPN)


def subject_alt_names(hosts):
    """A certificate's SubjectAlternativeName for host names and IP addresses."""
    from cryptography import x509

    names = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def self_signed(directory, hosts):
    """--auto-tls: a self-signed certificate and key for ``hosts`` (names or
    IP addresses) in ``directory``, made once and kept (as etcd does).
    Returns (cert_file, key_file)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    cert_file = os.path.join(directory, "cert.pem")
    key_file = os.path.join(directory, "key.pem")
    if os.path.exists(cert_file) and os.path.exists(key_file):
        return cert_file, key_file
    os.makedirs(directory, mode=0o700, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "etcdgrpcproxy")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(subject_alt_names(hosts), critical=False)
        .sign(key, hashes.SHA256())
    )
    with open(key_file, "wb", opener=lambda p, f: os.open(p, f, 0o600)) as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    with open(cert_file, "wb") as f:
        f.write(certificate.public_bytes(serialization.Encoding.PEM))
    return cert_file, key_file
