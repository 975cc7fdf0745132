"""The gRPC server's security plumbing on its own: the plaintext probe port, the refusal to start with an
RPC left without a rule, the TLS settings' failures, how a client reads a refusal of its own
certificate, and the server's own bounds: health held at NOT_SERVING until its process is ready, and
a request size limit of its own."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from devinfra.processes import free_port
from services.common.config import GrpcTlsSettings
from services.common.errors import ERROR_CODE_KEY, AuthenticationError, GatewayError
from services.common.grpc import CHANNEL_OPTIONS, Registration, rpc_error, serve
from services.common.pb.relaygate.quota.v1 import quota_pb2, quota_pb2_grpc
from services.common.rpc_auth import ServerSecurity
from services.common.rpc_policy import RULES
from services.common.tls import QUOTA, TlsSetupError, load_tls
from tests.tls import certificates

QUOTA_SERVICE = quota_pb2.DESCRIPTOR.services_by_name["QuotaService"].full_name


def registration(servicer: quota_pb2_grpc.QuotaServiceServicer) -> Registration:
    return Registration(QUOTA_SERVICE, servicer, quota_pb2_grpc.add_QuotaServiceServicer_to_server)


@asynccontextmanager
async def running(
    security: ServerSecurity,
    *,
    servicer: quota_pb2_grpc.QuotaServiceServicer | None = None,
    ready: asyncio.Event | None = None,
    options: Sequence[tuple[str, Any]] = (),
) -> AsyncIterator[int]:
    """``serve`` on a free port; the servicer defaults to the generated base one (UNIMPLEMENTED)."""
    if servicer is None:
        servicer = quota_pb2_grpc.QuotaServiceServicer()  # type: ignore[abstract]  # every RPC UNIMPLEMENTED
    stop = asyncio.Event()
    port: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    server = asyncio.create_task(
        serve(
            [registration(servicer)],
            listen="127.0.0.1:0",
            drain_seconds=0.2,
            security=security,
            stop=stop,
            on_started=port.set_result,
            ready=ready,
            options=options,
        )
    )
    try:
        starting: set[asyncio.Future[Any]] = {server, port}
        done, _ = await asyncio.wait(starting, timeout=10, return_when=asyncio.FIRST_COMPLETED)
        if server in done:
            server.result()
        yield await port
    finally:
        stop.set()
        await asyncio.wait_for(server, 10)


async def test_the_probe_port_serves_health_alone_in_plaintext() -> None:
    probe = f"127.0.0.1:{free_port()}"
    security = ServerSecurity(certificates().tls(QUOTA), health_listen=probe)
    async with running(security), grpc.aio.insecure_channel(probe, options=CHANNEL_OPTIONS) as chan:
        status = await health_pb2_grpc.HealthStub(chan).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert status.status == health_pb2.HealthCheckResponse.SERVING
        named = health_pb2.HealthCheckRequest(service=QUOTA_SERVICE)
        assert (await health_pb2_grpc.HealthStub(chan).Check(named, timeout=5)).status == status.status
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await quota_pb2_grpc.QuotaServiceStub(chan).TopUp(quota_pb2.TopUpRequest(), timeout=5)
        assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_a_server_with_an_rpc_without_a_rule_refuses_to_start() -> None:
    rules = {name: rule for name, rule in RULES.items() if not name.endswith("QuotaService/TopUp")}
    with pytest.raises(RuntimeError, match="QuotaService/TopUp"):
        async with running(ServerSecurity(certificates().tls(QUOTA), rules=rules)):
            pass


def test_tls_is_required_unless_plaintext_is_chosen(tmp_path: Path) -> None:
    with pytest.raises(TlsSetupError, match="RELAYGATE_GRPC_TLS_DIR is not set"):
        load_tls(GrpcTlsSettings(grpc_tls=True, grpc_tls_dir=""), environment="dev")
    with pytest.raises(TlsSetupError, match=r"tls\.key"):
        (tmp_path / "tls.crt").write_text("x")
        load_tls(GrpcTlsSettings(grpc_tls=True, grpc_tls_dir=str(tmp_path)), environment="dev")
    assert load_tls(GrpcTlsSettings(grpc_tls=False), environment="dev") is None
    with pytest.raises(TlsSetupError, match="prod"):
        load_tls(GrpcTlsSettings(grpc_tls=False), environment="prod")
    loaded = load_tls(
        GrpcTlsSettings(grpc_tls=True, grpc_tls_dir=str(certificates().directory(QUOTA))), environment="prod"
    )
    assert loaded is not None and b"PRIVATE KEY" in loaded.private_key
    assert "PRIVATE" not in repr(loaded)


def test_the_switch_reads_off_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RELAYGATE_GRPC_TLS", "off")
    assert GrpcTlsSettings().grpc_tls is False


def refusal(code: grpc.StatusCode, metadata: tuple[tuple[str, str], ...] = ()) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(
        code, grpc.aio.Metadata(), grpc.aio.Metadata(*metadata), details="refused", debug_error_string=""
    )


def test_a_refused_certificate_is_not_the_callers_fault() -> None:
    # The interceptor refuses a certificate without relaygate's error metadata: the relay must not
    # answer its HTTP client 401/403 for its own deployment's mistake.
    for code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        error = rpc_error(refusal(code))
        assert type(error) is GatewayError and error.status == 500
    # A service's own refusal (it carries the metadata) keeps its meaning.
    own = rpc_error(refusal(grpc.StatusCode.UNAUTHENTICATED, ((ERROR_CODE_KEY, "invalid_api_key"),)))
    assert isinstance(own, AuthenticationError)


async def test_a_plaintext_server_is_reached_without_a_certificate() -> None:
    # RELAYGATE_GRPC_TLS=off, local development only: the call reaches the handler, where a TLS
    # server's handshake would have refused it.
    probe = f"127.0.0.1:{free_port()}"
    security = ServerSecurity(None, health_listen=probe)
    request = quota_pb2.TopUpRequest(user_id="usr_local")
    async with running(security, servicer=answering()) as port:
        chan = grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=CHANNEL_OPTIONS)
        try:
            answer = await quota_pb2_grpc.QuotaServiceStub(chan).TopUp(request, timeout=5)
        finally:
            await chan.close(None)
    assert answer.user_id == "usr_local"


def answering() -> quota_pb2_grpc.QuotaServiceServicer:
    return Answering()  # type: ignore[abstract]  # the RPCs it leaves out answer UNIMPLEMENTED


class Answering(quota_pb2_grpc.QuotaServiceServicer):
    async def TopUp(self, request: quota_pb2.TopUpRequest, context: object) -> quota_pb2.Balance:
        return quota_pb2.Balance(user_id=request.user_id)


async def health_of(chan: grpc.aio.Channel, service: str = "") -> int:
    request = health_pb2.HealthCheckRequest(service=service)
    answer = await health_pb2_grpc.HealthStub(chan).Check(request, timeout=5)
    status: int = answer.status
    return status


async def test_health_is_not_serving_until_the_process_is_ready() -> None:
    probe = f"127.0.0.1:{free_port()}"
    ready = asyncio.Event()
    serving = health_pb2.HealthCheckResponse.SERVING
    async with (
        running(ServerSecurity(None, health_listen=probe), ready=ready),
        grpc.aio.insecure_channel(probe, options=CHANNEL_OPTIONS) as chan,
    ):
        for service in ("", QUOTA_SERVICE):
            assert await health_of(chan, service) == health_pb2.HealthCheckResponse.NOT_SERVING
        ready.set()
        deadline = asyncio.get_running_loop().time() + 5
        while await health_of(chan, QUOTA_SERVICE) != serving:
            assert asyncio.get_running_loop().time() < deadline, "still NOT_SERVING once ready"
            await asyncio.sleep(0.02)
        assert await health_of(chan) == serving


async def test_a_server_that_is_never_ready_still_stops() -> None:
    async with running(ServerSecurity(None), ready=asyncio.Event()) as port:
        chan = grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=CHANNEL_OPTIONS)
        try:
            assert await health_of(chan) == health_pb2.HealthCheckResponse.NOT_SERVING
        finally:
            await chan.close(None)


async def test_a_request_over_the_servers_own_size_limit_is_refused_before_its_handler() -> None:
    limit = 4096
    options = [("grpc.max_receive_message_length", limit)]
    async with running(ServerSecurity(None), servicer=answering(), options=options) as port:
        chan = grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=CHANNEL_OPTIONS)
        try:
            stub = quota_pb2_grpc.QuotaServiceStub(chan)
            small = quota_pb2.TopUpRequest(user_id="usr_small", reason="x" * (limit // 2))
            assert (await stub.TopUp(small, timeout=5)).user_id == "usr_small"
            large = quota_pb2.TopUpRequest(user_id="usr_large", reason="x" * limit)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.TopUp(large, timeout=5)
        finally:
            await chan.close(None)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f"vs. {limit}" in (refused.value.details() or ""), refused.value.details()
