"""A renewed certificate is served and presented without a restart (services/common/tls.py,
services/common/renewing_channel.py), and the relay's
certificate names the local addresses a client dials (services/stack_certs.py).

Real ``grpc.aio`` servers in this process, real TLS handshakes from the ``ssl`` module (which shows the
certificate the server presented) and from gRPC channels."""

from __future__ import annotations

import asyncio
import datetime
import socket
import ssl
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from services.common.grpc import channel
from services.common.renewing_channel import RenewingChannel
from services.common.tls import AUTH, CA_FILE, CERT_FILE, KEY_FILE, QUOTA, RELAY, Tls, server_name
from services.stack_certs import Certificates, ensure_certificates, reissue

YEAR = datetime.timedelta(days=365)


async def _serve(certs: Certificates, identity: str, *, client_auth: bool) -> AsyncIterator[int]:
    server = grpc.aio.server()
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    credentials = certs.tls(identity).server_credentials(require_client_auth=client_auth)
    port = server.add_secure_port("127.0.0.1:0", credentials)
    await server.start()
    try:
        yield port
    finally:
        await server.stop(None)


@pytest.fixture
async def quota_port(tmp_path: Path) -> AsyncIterator[tuple[Certificates, int]]:
    certs = ensure_certificates(tmp_path / "tls")
    async for port in _serve(certs, QUOTA, client_auth=True):
        yield certs, port


def _presented(certs: Certificates, port: int, *, name: str, host: str = "127.0.0.1") -> int:
    """The serial of the certificate the server at ``port`` presents to a new connection, checked
    against the CA and ``name`` as any TLS client checks it (raises when it does not pass)."""
    context = ssl.create_default_context(cafile=str(certs.root / CA_FILE))
    client = certs.directory(AUTH)
    context.load_cert_chain(client / CERT_FILE, client / KEY_FILE)
    context.set_alpn_protocols(["h2"])
    with (
        socket.create_connection((host, port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname=name) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def _serial(certs: Certificates, identity: str) -> int:
    return x509.load_pem_x509_certificate((certs.directory(identity) / CERT_FILE).read_bytes()).serial_number


async def _health(certs: Certificates, port: int) -> None:
    """A real call on a new channel (a new handshake), as auth would make it."""
    ch = channel(f"127.0.0.1:{port}", tls=certs.tls(AUTH), peer=QUOTA)
    try:
        stub = health_pb2_grpc.HealthStub(ch)
        await stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
    finally:
        await ch.close(None)


async def test_a_renewed_certificate_is_presented_without_a_restart(
    quota_port: tuple[Certificates, int],
) -> None:
    certs, port = quota_port
    first = _serial(certs, QUOTA)
    assert await asyncio.to_thread(_presented, certs, port, name=server_name(QUOTA)) == first

    reissue(certs, QUOTA, lifetime=YEAR)
    renewed = _serial(certs, QUOTA)
    assert renewed != first
    assert await asyncio.to_thread(_presented, certs, port, name=server_name(QUOTA)) == renewed
    await _health(certs, port)

    # Had the server kept a certificate that has since expired, every new handshake would fail: the
    # files now hold an expired one, which the server takes up like any other and clients refuse.
    reissue(certs, QUOTA, lifetime=-datetime.timedelta(days=1))
    with pytest.raises(ssl.SSLCertVerificationError, match="expired"):
        await asyncio.to_thread(_presented, certs, port, name=server_name(QUOTA))
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await _health(certs, port)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_a_half_written_set_is_not_loaded(quota_port: tuple[Certificates, int]) -> None:
    certs, port = quota_port
    served = _serial(certs, QUOTA)
    kept = (certs.directory(QUOTA) / CERT_FILE).read_bytes()
    # A renewal caught after its new key was written, before its certificate: the pair does not match.
    stray = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    (certs.directory(QUOTA) / KEY_FILE).write_bytes(stray)
    assert await asyncio.to_thread(_presented, certs, port, name=server_name(QUOTA)) == served
    await _health(certs, port)

    # A certificate that is not PEM yet (cut off mid-write) is not loaded either.
    (certs.directory(QUOTA) / CERT_FILE).write_bytes(kept[: len(kept) // 2])
    assert await asyncio.to_thread(_presented, certs, port, name=server_name(QUOTA)) == served

    # Once the whole set is there, the next handshake presents it.
    reissue(certs, QUOTA, lifetime=YEAR)
    assert await asyncio.to_thread(_presented, certs, port, name=server_name(QUOTA)) == _serial(certs, QUOTA)
    await _health(certs, port)


async def test_the_relay_front_is_verified_by_the_address_dialled(tmp_path: Path) -> None:
    certs = ensure_certificates(tmp_path / "tls")
    async for port in _serve(certs, RELAY, client_auth=False):
        for name in ("127.0.0.1", "localhost"):
            assert await asyncio.to_thread(_presented, certs, port, name=name) == _serial(certs, RELAY)
        # A gRPC client with only the CA and no target-name override, as an external caller dials it.
        credentials = grpc.ssl_channel_credentials(root_certificates=(certs.root / CA_FILE).read_bytes())
        async with grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials) as ch:
            await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)


async def _caller_serial(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
    [pem] = context.auth_context()["x509_pem_cert"]
    return str(x509.load_pem_x509_certificate(pem).serial_number).encode()


async def test_a_client_presents_its_renewed_certificate_without_a_restart(tmp_path: Path) -> None:
    certs = ensure_certificates(tmp_path / "tls")
    server = grpc.aio.server()
    who = grpc.unary_unary_rpc_method_handler(_caller_serial)
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("test.Caller", {"Serial": who})])
    port = server.add_secure_port("127.0.0.1:0", certs.tls(QUOTA).server_credentials())
    await server.start()
    options = [("grpc.ssl_target_name_override", server_name(QUOTA))]

    def secure(tls: Tls) -> grpc.aio.Channel:
        return grpc.aio.secure_channel(f"127.0.0.1:{port}", tls.channel_credentials(), options=options)

    # What services.common.grpc.channel returns for a certificate read from files.
    made = channel(f"127.0.0.1:{port}", tls=certs.tls(AUTH), peer=QUOTA)
    assert isinstance(made, RenewingChannel)
    await made.close(None)
    renewing = RenewingChannel(certs.tls(AUTH), secure, check_every_s=0, clock=time.monotonic)
    serial = renewing.unary_unary("/test.Caller/Serial")
    try:
        assert int(await serial(b"", timeout=5)) == _serial(certs, AUTH)
        reissue(certs, AUTH, lifetime=YEAR)
        # The same stub method, on the channel already connected: the next call presents the new one.
        assert int(await serial(b"", timeout=5)) == _serial(certs, AUTH)

        # Half a renewal (the key alone) is not used: calls go on with the current certificate.
        presented = _serial(certs, AUTH)
        stray = ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        (certs.directory(AUTH) / KEY_FILE).write_bytes(stray)
        assert int(await serial(b"", timeout=5)) == presented

        # An expired certificate is refused by the server: what a client would meet if it kept presenting
        # the certificate it started with past its end.
        reissue(certs, AUTH, lifetime=-datetime.timedelta(days=1))
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await serial(b"", timeout=5)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await renewing.close(None)
        await server.stop(None)
