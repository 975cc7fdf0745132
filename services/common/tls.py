"""Mutual TLS between the services: whose certificate a process holds, and who called it.

Every process has one identity (``relay``, ``auth``, ``quota``, ``logger``, or ``admin`` for people and
tools calling the internal APIs) and a certificate for it, signed by the deployment's own CA, in a
directory holding ``tls.crt``, ``tls.key`` and ``ca.crt`` (the names cert-manager writes into a
Secret). The identity is the certificate's DNS name ``<identity>.relaygate.internal``: servers read it
from the verified peer certificate, and clients check that the server they reached presents the name of
the service they meant to call (the target name is overridden, so the names do not depend on DNS).

Servers pick up a renewed certificate without a restart: before each new connection's handshake, grpc
asks :meth:`Tls.server_credentials`'s fetcher, which re-reads the three files when their stamps
(inode, size, mtime) changed and the new key matches the new chain (cert-manager rewrites a mounted
Secret's files one by one; a set caught halfway is not loaded, and the next handshake looks again).
A client channel presents the certificate it was created with (grpcio's channel credentials are fixed,
and every reconnect of that channel presents it again), so the services' client channels are
:class:`services.common.renewing_channel.RenewingChannel`, which opens a new channel once the same
files were renewed.

Plaintext exists for local development only, when explicitly chosen (``RELAYGATE_GRPC_TLS=off``);
production refuses it.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from services.common.config import Environment, GrpcTlsSettings

__all__ = [
    "ADMIN",
    "AUTH",
    "CA_FILE",
    "CERT_FILE",
    "DOMAIN",
    "IDENTITIES",
    "KEY_FILE",
    "LOGGER",
    "QUOTA",
    "RELAY",
    "Renewals",
    "Tls",
    "TlsSetupError",
    "consistent",
    "load_tls",
    "peer_identity",
    "server_name",
]

RELAY: Final = "relay"
AUTH: Final = "auth"
QUOTA: Final = "quota"
LOGGER: Final = "logger"
# People and tools calling the admin-level RPCs; they also present an admin token (see rpc_auth).
ADMIN: Final = "admin"
IDENTITIES: Final = (RELAY, AUTH, QUOTA, LOGGER, ADMIN)

DOMAIN: Final = "relaygate.internal"
CERT_FILE: Final = "tls.crt"
KEY_FILE: Final = "tls.key"
CA_FILE: Final = "ca.crt"


log = logging.getLogger(__name__)

# What identifies one version of a file without reading it: inode, size, mtime (ns).
_Stamp = tuple[int, int, int]


class TlsSetupError(RuntimeError):
    """The TLS settings cannot be used; the message says what to set."""


def server_name(identity: str) -> str:
    """The DNS name a certificate of ``identity`` carries."""
    return f"{identity}.{DOMAIN}"


@dataclass(frozen=True)
class Tls:
    """One process's certificate, private key and the CA it trusts (PEM)."""

    certificate: bytes
    private_key: bytes
    ca: bytes
    # Where they were read from: a server re-reads them there when they change.
    directory: Path | None = field(default=None, compare=False)

    def __repr__(self) -> str:
        return "Tls(<certificate>)"

    @classmethod
    def from_dir(cls, directory: Path) -> Tls:
        files = {name: directory / name for name in (CERT_FILE, KEY_FILE, CA_FILE)}
        missing = [str(path) for path in files.values() if not path.is_file()]
        if missing:
            raise TlsSetupError(
                f"internal gRPC uses mutual TLS, and {', '.join(missing)} is missing: point "
                "RELAYGATE_GRPC_TLS_DIR at a directory holding this service's tls.crt, tls.key and ca.crt "
                "(`relaygate up` issues them; in Kubernetes, mount the service's certificate Secret), or "
                "set RELAYGATE_GRPC_TLS=off for local development"
            )
        try:
            return cls(
                certificate=files[CERT_FILE].read_bytes(),
                private_key=files[KEY_FILE].read_bytes(),
                ca=files[CA_FILE].read_bytes(),
                directory=directory,
            )
        except OSError as exc:
            raise TlsSetupError(f"cannot read the certificate files in {directory}: {exc}") from exc

    def server_credentials(self, *, require_client_auth: bool = True) -> grpc.ServerCredentials:
        # No handshake completes without a certificate signed by the deployment's CA, except on a port
        # whose callers authenticate otherwise (the relay's inference port: API keys).
        if self.directory is None:
            return grpc.ssl_server_credentials(
                [(self.private_key, self.certificate)],
                root_certificates=self.ca,
                require_client_auth=require_client_auth,
            )
        return grpc.dynamic_ssl_server_credentials(
            _configuration(self),
            # The stubs want a configuration every time; grpc documents None as "keep the current one".
            _fetcher(Renewals(self)),  # type: ignore[arg-type]
            require_client_authentication=require_client_auth,
        )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca, private_key=self.private_key, certificate_chain=self.certificate
        )


def _configuration(tls: Tls) -> grpc.ServerCertificateConfiguration:
    return grpc.ssl_server_certificate_configuration([(tls.private_key, tls.certificate)], tls.ca)


def _stamps(directory: Path) -> tuple[_Stamp, ...]:
    found = [os.stat(directory / name) for name in (CERT_FILE, KEY_FILE, CA_FILE)]
    return tuple((st.st_ino, st.st_size, st.st_mtime_ns) for st in found)


def consistent(tls: Tls) -> str | None:
    """Why ``tls`` cannot be served (None when it can): each part parses and the key is the one the
    chain's first certificate was issued for."""
    try:
        leaf = x509.load_pem_x509_certificate(tls.certificate)
        key = serialization.load_pem_private_key(tls.private_key, password=None)
        x509.load_pem_x509_certificates(tls.ca)
    except ValueError as exc:
        return f"unreadable: {exc}"
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    if leaf.public_key().public_bytes(serialization.Encoding.DER, public) != key.public_key().public_bytes(
        serialization.Encoding.DER, public
    ):
        return "the private key does not match the certificate"
    return None


class Renewals:
    """Watches the files ``tls`` was read from for a renewal. :meth:`renewed` is called by grpc's own
    threads (a server's fetcher) and by the event loop (a client channel), so it locks; the common case
    is three ``stat`` calls."""

    def __init__(self, tls: Tls) -> None:
        if tls.directory is None:
            raise ValueError("a certificate built in memory has no files to watch")
        self._directory = tls.directory
        self._lock = threading.Lock()
        self._current = tls
        try:
            self._seen = _stamps(self._directory)
        except OSError:
            self._seen = ()

    def renewed(self) -> Tls | None:
        """The new set when the files changed since the current one and hold a consistent set (which
        becomes the current one), else None."""
        with self._lock:
            try:
                stamps = _stamps(self._directory)
            except OSError:
                return None  # a file replaced right now: look again next time
            if stamps == self._seen:
                return None
            try:
                candidate = Tls.from_dir(self._directory)
            except TlsSetupError:
                return None
            problem = consistent(candidate)
            if problem is not None:
                # Part of a renewal written so far; its stamps are not kept, so the next check reads
                # the set again.
                log.warning("not loading the certificate in %s yet: %s", self._directory, problem)
                return None
            self._seen = stamps
            if candidate == self._current:
                return None
            self._current = candidate
            log.info("loaded a renewed certificate from %s", self._directory)
            return candidate


def _fetcher(renewals: Renewals) -> Callable[[], grpc.ServerCertificateConfiguration | None]:
    def fetch() -> grpc.ServerCertificateConfiguration | None:
        # grpc treats an exception here as a failed handshake: keep serving what we have instead.
        try:
            renewed = renewals.renewed()
        except Exception:
            log.exception("checking the certificate files failed")
            return None
        return None if renewed is None else _configuration(renewed)

    return fetch


def load_tls(settings: GrpcTlsSettings, *, environment: Environment) -> Tls | None:
    """This process's certificate, or None when plaintext was chosen (refused in prod).

    Called at start, so a missing certificate stops the process with a message instead of failing
    every call later."""
    if not settings.grpc_tls:
        if environment == "prod":
            raise TlsSetupError(
                "RELAYGATE_GRPC_TLS=off is for local development: with RELAYGATE_ENVIRONMENT=prod, "
                "internal gRPC must use mutual TLS (set RELAYGATE_GRPC_TLS_DIR)"
            )
        return None
    if not settings.grpc_tls_dir:
        raise TlsSetupError(
            "RELAYGATE_GRPC_TLS_DIR is not set: internal gRPC uses mutual TLS; point it at a directory "
            "holding this service's tls.crt, tls.key and ca.crt, or set RELAYGATE_GRPC_TLS=off for "
            "local development"
        )
    return Tls.from_dir(Path(settings.grpc_tls_dir))


def peer_identity(context: grpc.aio.ServicerContext[Any, Any]) -> str | None:
    """The identity in the caller's verified certificate; None without one, or when it names no
    single known identity (a certificate of the CA issued for something else)."""
    properties = context.auth_context()
    names = {value.decode(errors="replace") for value in properties.get("x509_subject_alternative_name", ())}
    found = [name.removesuffix(f".{DOMAIN}") for name in names if name.endswith(f".{DOMAIN}")]
    if len(found) != 1 or found[0] not in IDENTITIES:
        return None
    return found[0]
