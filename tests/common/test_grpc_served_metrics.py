"""Server streams are counted and timed per method like unary calls (``relaygate_rpc_served``,
``relaygate_rpc_latency_seconds``), and an unhandled error in one ends the call INTERNAL.

A real ``grpc.aio`` server on loopback serving the inference service with a servicer whose stream
writes two chunks, aborts on request, or raises.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import grpc
import pytest

from services.common import grpc as rg_grpc
from services.common.pb.relaygate.relay.v1 import inference_pb2 as pb
from services.common.pb.relaygate.relay.v1 import inference_pb2_grpc
from services.common.rpc_auth import ServerSecurity
from services.common.rpc_policy import FRONT_RULES, INFERENCE_SERVICE
from services.common.telemetry import METRICS
from services.common.tls import RELAY
from tests.tls import certificates, client

if TYPE_CHECKING:
    from services.common.pb.relaygate.relay.v1.inference_pb2_grpc import InferenceServiceAsyncStub

METHOD = "StreamChatCompletion"


class Streams(inference_pb2_grpc.InferenceServiceServicer):
    """The request's model says what the stream does: ``ok``, ``abort`` or ``crash``."""

    # Written with context.write, as the relay's servicer streams; the stubs type only the iterator form.
    async def StreamChatCompletion(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:  # type: ignore[override]
        await context.write(pb.ChatCompletionChunk(id="one"))
        if request.model == "abort":
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "out of credit")
        if request.model == "crash":
            raise RuntimeError("a bug")
        await context.write(pb.ChatCompletionChunk(id="two"))


@asynccontextmanager
async def front() -> AsyncIterator[InferenceServiceAsyncStub]:
    stop = asyncio.Event()
    port: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    security = ServerSecurity(certificates().tls(RELAY), rules=FRONT_RULES, client_certificates=False)
    registration = rg_grpc.Registration(
        INFERENCE_SERVICE,
        # The stubs declare every RPC abstract; the generated base answers UNIMPLEMENTED for the four
        # this test never calls.
        Streams(),  # type: ignore[abstract]
        inference_pb2_grpc.add_InferenceServiceServicer_to_server,
    )
    server = asyncio.create_task(
        rg_grpc.serve(
            [registration],
            listen="127.0.0.1:0",
            drain_seconds=0.2,
            security=security,
            stop=stop,
            on_started=port.set_result,
            signals=False,
        )
    )
    chan = client(f"127.0.0.1:{await port}", RELAY)
    try:
        yield inference_pb2_grpc.InferenceServiceStub(chan)
    finally:
        stop.set()
        await chan.close(None)
        await server


def sample(metric: Any, suffix: str, labels: dict[str, str]) -> float:
    for family in metric.collect():
        for one in family.samples:
            if one.name.endswith(suffix) and one.labels == labels:
                return float(one.value)
    return 0.0


def served(code: str) -> float:
    return sample(METRICS.rpc_served, "_total", {"method": METHOD, "code": code})


def timed() -> float:
    return sample(METRICS.rpc_latency, "_count", {"method": METHOD})


async def chunks(stub: InferenceServiceAsyncStub, model: str) -> list[str]:
    return [chunk.id async for chunk in stub.StreamChatCompletion(pb.ChatCompletionRequest(model=model))]


async def test_streams_are_counted_by_outcome_and_timed() -> None:
    before = {code: served(code) for code in ("ok", "error", "crash")}
    timed_before = timed()
    async with front() as stub:
        assert await chunks(stub, "ok") == ["one", "two"]
        with pytest.raises(grpc.aio.AioRpcError) as aborted:
            await chunks(stub, "abort")
        assert aborted.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        with pytest.raises(grpc.aio.AioRpcError) as crashed:
            await chunks(stub, "crash")
        assert crashed.value.code() == grpc.StatusCode.INTERNAL
        assert crashed.value.details() == "internal error"
    after = {code: served(code) - before[code] for code in before}
    assert after == {"ok": 1, "error": 1, "crash": 1}
    assert timed() - timed_before == 1
