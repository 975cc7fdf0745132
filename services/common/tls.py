"""Mutual TLS between the services: whose certificate a process holds, and who called it.

Every process has one identity (``relay``, ``auth``, ``quota``, ``logger``, or ``admin`` for people and
tools calling the internal APIs) and a certificate for it, signed by the deployment's own CA, in a
directory holding ``tls.crt``, ``tls.key`` and ``ca.crt`` (the names cert-manager writes into a
Secret). The identity is the certificate's DNS name ``<identity>.relaygate.internal``: servers read it
from the verified peer certificate, and clients check that the server they reached presents the name of
the service they meant to call (the target name is overridden, so the names do not depend on DNS).

Plaintext exists for local development only, when explicitly chosen (``RELAYGATE_GRPC_TLS=off``);
production refuses it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import grpc

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
    "Tls",
    "TlsSetupError",
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
            )
        except OSError as exc:
            raise TlsSetupError(f"cannot read the certificate files in {directory}: {exc}") from exc

    def server_credentials(self, *, require_client_auth: bool = True) -> grpc.ServerCredentials:
        # No handshake completes without a certificate signed by the deployment's CA, except on a port
        # whose callers authenticate otherwise (the relay's inference port: API keys).
        return grpc.ssl_server_credentials(
            [(self.private_key, self.certificate)],
            root_certificates=self.ca,
            require_client_auth=require_client_auth,
        )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca, private_key=self.private_key, certificate_chain=self.certificate
        )


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
