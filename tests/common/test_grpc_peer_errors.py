"""A peer that is draining, restarting or gone is a 503 with Retry-After for the caller, never a 500.

Real ``grpc.aio`` servers on loopback: one that resets calls the way a shutting-down server does
(CANCELLED), one stopped while a call is in flight, and a client whose channel was closed.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import grpc
import pytest

from services.common import grpc as rg_grpc
from services.common.errors import GatewayError, ServiceUnavailable
from services.common.pb.relaygate.quota.v1 import quota_pb2, quota_pb2_grpc
from services.common.tls import QUOTA
from tests.tls import client, server_security

if TYPE_CHECKING:
    from services.common.pb.relaygate.quota.v1.quota_pb2_grpc import QuotaServiceAsyncStub


class Peer(quota_pb2_grpc.QuotaServiceServicer):
    """Reserve cancels the call (what a server ending its in-flight calls sends); Settle hangs."""

    async def Reserve(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(grpc.StatusCode.CANCELLED, "Cancelled by the server")

    async def Settle(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await asyncio.sleep(30)
        return quota_pb2.SettleResponse()


@asynccontextmanager
async def peer() -> AsyncIterator[tuple[QuotaServiceAsyncStub, asyncio.Event, grpc.aio.Channel]]:
    stop = asyncio.Event()
    port: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    registration = rg_grpc.Registration(
        "relaygate.quota.v1.QuotaService",
        # The stubs declare every RPC abstract; the generated base answers UNIMPLEMENTED for the ones
        # this test never calls.
        Peer(),  # type: ignore[abstract]
        quota_pb2_grpc.add_QuotaServiceServicer_to_server,
    )
    server = asyncio.create_task(
        rg_grpc.serve(
            [registration],
            listen="127.0.0.1:0",
            drain_seconds=0.2,
            security=server_security(QUOTA),
            stop=stop,
            on_started=port.set_result,
        )
    )
    chan = client(f"127.0.0.1:{await port}", QUOTA)
    try:
        yield quota_pb2_grpc.QuotaServiceStub(chan), stop, chan
    finally:
        stop.set()
        await chan.close(None)
        await asyncio.wait_for(server, 10)


def assert_retryable_503(error: GatewayError) -> None:
    assert isinstance(error, ServiceUnavailable), repr(error)
    assert error.status == 503
    assert error.retry_after is not None and error.retry_after > 0


async def test_a_cancelled_call_is_503_with_retry_after() -> None:
    async with peer() as (stub, _stop, _chan):
        with pytest.raises(GatewayError) as caught:
            await rg_grpc.call(stub.Reserve, quota_pb2.ReserveRequest(), timeout=5)
    assert_retryable_503(caught.value)


async def test_a_peer_stopping_under_a_call_is_503_with_retry_after() -> None:
    async with peer() as (stub, stop, _chan):
        pending = asyncio.ensure_future(rg_grpc.call(stub.Settle, quota_pb2.SettleRequest(), timeout=10))
        await asyncio.sleep(0.2)
        stop.set()  # drains for 0.2 s, then ends the call
        with pytest.raises(GatewayError) as caught:
            await pending
        assert_retryable_503(caught.value)
        with pytest.raises(GatewayError) as after:
            await rg_grpc.call(stub.Settle, quota_pb2.SettleRequest(), timeout=1)
        assert_retryable_503(after.value)


async def test_a_closed_channel_is_503() -> None:
    async with peer() as (stub, _stop, chan):
        await chan.close(None)
        with pytest.raises(GatewayError) as caught:
            await rg_grpc.call(stub.Settle, quota_pb2.SettleRequest(), timeout=1)
    assert_retryable_503(caught.value)
