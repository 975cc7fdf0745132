"""Mutual TLS for tests: one set of certificates per test session, issued by the code ``relaygate up``
uses, and the channels and server settings that present them."""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

import grpc

from services.common.grpc import channel
from services.common.rpc_auth import ServerSecurity
from services.common.tls import RELAY
from services.stack_certs import Certificates, ensure_certificates


@functools.cache
def certificates() -> Certificates:
    """The session's CA and certificates (issued on first use, about 10 ms; removed at exit)."""
    root = Path(tempfile.mkdtemp(prefix="relaygate-tls-"))
    atexit.register(shutil.rmtree, root, True)
    return ensure_certificates(root / "tls")


def tls_dir(identity: str) -> str:
    """``grpc_tls_dir`` for a server or client of ``identity``."""
    return str(certificates().directory(identity))


def tls_env(identity: str) -> dict[str, str]:
    """The ``RELAYGATE_*`` setting a process of ``identity`` reads its certificate from."""
    return certificates().env(identity)


def client(address: str, peer: str, *, identity: str = RELAY) -> grpc.aio.Channel:
    """A channel to the ``peer`` service at ``address``, presenting ``identity``'s certificate (the
    relay's by default: it may call almost every RPC)."""
    return channel(address, tls=certificates().tls(identity), peer=peer)


def server_security(identity: str) -> ServerSecurity:
    """For a test server built directly on ``services.common.grpc.serve``."""
    return ServerSecurity(certificates().tls(identity))
