"""The certificates of a local stack: a private CA and one certificate per identity, for mutual TLS
between the services (``services.common.tls``).

``relaygate up`` keeps them in its data directory (``tls/``) and reuses them on every start; tests and
benchmarks issue a set once per session. Every file is written 0600 in 0700 directories: the CA key
signs certificates every service trusts. Each identity's directory holds what its process reads, under
cert-manager's names (``tls.crt``, ``tls.key``, ``ca.crt``), so ``RELAYGATE_GRPC_TLS_DIR`` points at it
exactly as a mounted Kubernetes Secret would be.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from services.common.tls import CA_FILE, CERT_FILE, IDENTITIES, KEY_FILE, RELAY, Tls, server_name

__all__ = ["CA_KEY_FILE", "Certificates", "ensure_certificates", "reissue", "subject_names"]

CA_KEY_FILE = "ca.key"
_CA_DAYS = 3650
_LEAF_DAYS = 365
# A certificate this close to its end is issued again on the next start.
_RENEW_BEFORE = datetime.timedelta(days=30)
# Tolerates clocks of the processes that check the certificate being slightly behind.
_BACKDATE = datetime.timedelta(minutes=5)


@dataclass(frozen=True)
class Certificates:
    """A directory of issued certificates: ``<root>/<identity>/{tls.crt,tls.key,ca.crt}``."""

    root: Path

    def directory(self, identity: str) -> Path:
        return self.root / identity

    def tls(self, identity: str) -> Tls:
        return Tls.from_dir(self.directory(identity))

    def env(self, identity: str) -> dict[str, str]:
        """The setting a process of ``identity`` reads its certificate from."""
        return {"RELAYGATE_GRPC_TLS_DIR": str(self.directory(identity))}


def ensure_certificates(root: Path) -> Certificates:
    """The CA and every identity's certificate under ``root``: those present and valid for another
    30 days are kept, the others issued (by the CA kept there, created on first use)."""
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(root, 0o700)
    now = datetime.datetime.now(datetime.UTC)
    ca_cert, ca_key = _ca(root, now)
    ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM)
    for identity in IDENTITIES:
        directory = root / identity
        directory.mkdir(mode=0o700, exist_ok=True)
        os.chmod(directory, 0o700)
        if _current(directory, identity, ca_pem, now):
            continue
        _issue(directory, identity, ca_cert, ca_key, now, datetime.timedelta(days=_LEAF_DAYS))
    return Certificates(root)


def reissue(certs: Certificates, identity: str, *, lifetime: datetime.timedelta) -> None:
    """Issue ``identity`` a new key and certificate ending ``lifetime`` from now (negative: already
    expired), by the CA kept in ``certs``: what a renewal writes into a mounted Secret."""
    now = datetime.datetime.now(datetime.UTC)
    ca_cert, ca_key = _ca(certs.root, now)
    _issue(certs.directory(identity), identity, ca_cert, ca_key, now, lifetime)


def subject_names(identity: str) -> list[x509.GeneralName]:
    """The names a certificate of ``identity`` carries: its identity's name, and for the relay, whose
    gRPC front clients outside the deployment reach, the addresses ``relaygate up`` serves it on, so a
    client checks the certificate against the address it dialled (no target-name override)."""
    names: list[x509.GeneralName] = [x509.DNSName(server_name(identity))]
    if identity == RELAY:
        names += [
            x509.DNSName("localhost"),
            x509.IPAddress(ipaddress.IPv4Address("127.0.0.1")),
            x509.IPAddress(ipaddress.IPv6Address("::1")),
        ]
    return names


def _issue(
    directory: Path,
    identity: str,
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    now: datetime.datetime,
    lifetime: datetime.timedelta,
) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    # An already-expired one (tests) starts before it ends.
    start = min(now - _BACKDATE, now + lifetime - datetime.timedelta(days=1))
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, identity)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(now + lifetime)
        .add_extension(x509.SubjectAlternativeName(subject_names(identity)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    _write(directory / KEY_FILE, _key_pem(key))
    _write(directory / CERT_FILE, certificate.public_bytes(serialization.Encoding.PEM))
    _write(directory / CA_FILE, ca_cert.public_bytes(serialization.Encoding.PEM))


def _ca(root: Path, now: datetime.datetime) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert_path, key_path = root / CA_FILE, root / CA_KEY_FILE
    if cert_path.is_file() and key_path.is_file():
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{key_path} is not the EC key this CA was created with")
        os.chmod(key_path, 0o600)
        return x509.load_pem_x509_certificate(cert_path.read_bytes()), key
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "relaygate local CA")])
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + datetime.timedelta(days=_CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write(key_path, _key_pem(key))
    _write(cert_path, certificate.public_bytes(serialization.Encoding.PEM))
    return certificate, key


def _current(directory: Path, identity: str, ca_pem: bytes, now: datetime.datetime) -> bool:
    """Whether ``directory`` holds a certificate of this CA with the names it should carry, valid past
    the renewal margin."""
    try:
        if (directory / CA_FILE).read_bytes() != ca_pem or not (directory / KEY_FILE).is_file():
            return False
        certificate = x509.load_pem_x509_certificate((directory / CERT_FILE).read_bytes())
    except (OSError, ValueError):
        return False
    for name in (CERT_FILE, KEY_FILE, CA_FILE):
        os.chmod(directory / name, 0o600)
    try:
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    # A set issued before the relay's certificate named its local addresses is issued again.
    if set(names) != set(subject_names(identity)):
        return False
    return certificate.not_valid_after_utc - _RENEW_BEFORE > now


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _write(path: Path, body: bytes) -> None:
    """Replace ``path`` with ``body``, never readable by anyone else, even for a moment."""
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(body)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(partial, path)
