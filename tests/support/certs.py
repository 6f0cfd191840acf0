"""Certificates for TLS tests, made in the test setup (cryptography).

    pki = PKI(directory)
    ca = pki.ca("ca")                                  # a CA: .cert path, .key path
    server = pki.issue(ca, "server", ["127.0.0.1", "localhost"])
    client = pki.issue(ca, "client", [], client=True)
    pki.crl(ca, [client])                              # a CRL file revoking ``client``
"""

import datetime
import os

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from etcdproxy.tls import subject_alt_names


class Identity:
    def __init__(self, name, cert, key, certificate, private_key):
        self.name = name
        self.cert = cert  # PEM file paths
        self.key = key
        self.certificate = certificate
        self.private_key = private_key

    def pem(self):
        """(certificate, key) PEM bytes, e.g. for grpc.ssl_channel_credentials."""
        with open(self.cert, "rb") as c, open(self.key, "rb") as k:
            return c.read(), k.read()


def _now():
    return datetime.datetime.now(datetime.timezone.utc)


class PKI:
    def __init__(self, directory):
        self.directory = directory
        os.makedirs(directory, exist_ok=True)

    def _write(self, name, certificate, private_key):
        cert = os.path.join(self.directory, name + ".pem")
        key = os.path.join(self.directory, name + "-key.pem")
        with open(cert, "wb") as f:
            f.write(certificate.public_bytes(serialization.Encoding.PEM))
        with open(key, "wb") as f:
            f.write(private_key.private_bytes(serialization.Encoding.PEM,
                                              serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption()))
        return Identity(name, cert, key, certificate, private_key)

    def _builder(self, name, public_key):
        return (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
                .public_key(public_key)
                .serial_number(x509.random_serial_number())
                .not_valid_before(_now() - datetime.timedelta(minutes=5))
                .not_valid_after(_now() + datetime.timedelta(days=2)))

    def ca(self, name):
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        certificate = (self._builder(name, key.public_key()).issuer_name(subject)
                       .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                       .add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False),
                                      critical=True)
                       .sign(key, hashes.SHA256()))
        return self._write(name, certificate, key)

    def issue(self, ca, name, hosts, client=False):
        key = ec.generate_private_key(ec.SECP256R1())
        builder = self._builder(name, key.public_key()).issuer_name(ca.certificate.subject)
        if hosts:
            builder = builder.add_extension(subject_alt_names(hosts), critical=False)
        usages = [ExtendedKeyUsageOID.CLIENT_AUTH] + ([] if client else [ExtendedKeyUsageOID.SERVER_AUTH])
        builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        return self._write(name, builder.sign(ca.private_key, hashes.SHA256()), key)

    def crl(self, ca, revoked):
        builder = (x509.CertificateRevocationListBuilder()
                   .issuer_name(ca.certificate.subject)
                   .last_update(_now() - datetime.timedelta(minutes=5))
                   .next_update(_now() + datetime.timedelta(days=1)))
        for identity in revoked:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder()
                .serial_number(identity.certificate.serial_number)
                .revocation_date(_now() - datetime.timedelta(minutes=1))
                .build())
        path = os.path.join(self.directory, ca.name + ".crl")
        with open(path, "wb") as f:
            f.write(builder.sign(ca.private_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
        return path
