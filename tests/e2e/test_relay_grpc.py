"""The relay's gRPC front (relaygate.relay.v1.InferenceService) through the whole stack, called with
grpcio as an internal service would: TLS checking the relay's certificate, no client certificate, the
API key in the metadata. Each call goes through the pipeline the HTTP front uses: the same chunks as
an HTTP stream, billed once, logged once with front=grpc, refusals as statuses with google.rpc
details, and a call cancelled mid-stream settled like an HTTP disconnect."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import httpx
import orjson
import pytest
from google.protobuf import json_format, message_factory
from google.rpc import error_details_pb2, status_pb2

from services.common.pb.relaygate.relay.v1 import inference_pb2 as pb
from services.common.pb.relaygate.relay.v1 import inference_pb2_grpc as pb_grpc
from services.common.rpc_policy import method_name
from services.common.tls import RELAY, server_name
from tests.e2e.stack import MODEL, PRICE, Deployment, balance, fund_user, settled
from tests.tls import certificates

TIMEOUT = 10.0


@pytest.fixture(scope="module")
def relay_env() -> dict[str, str]:
    return {"RELAYGATE_STREAM_DRAIN_S": "10"}


@pytest.fixture(autouse=True)
def _fresh_upstream(deployment: Deployment) -> None:
    deployment.upstream.reset()


@pytest.fixture
async def channel(deployment: Deployment) -> AsyncIterator[grpc.aio.Channel]:
    """A channel to the relay's gRPC port that trusts the deployment's CA and presents no certificate."""
    credentials = grpc.ssl_channel_credentials(root_certificates=certificates().tls(RELAY).ca)
    options = [("grpc.ssl_target_name_override", server_name(RELAY))]
    async with grpc.aio.secure_channel(deployment.relay_grpc_address, credentials, options=options) as opened:
        yield opened


@pytest.fixture
def stub(channel: grpc.aio.Channel) -> pb_grpc.InferenceServiceAsyncStub:
    return pb_grpc.InferenceServiceStub(channel)


def bearer(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


def chat(**fields: Any) -> pb.ChatCompletionRequest:
    return pb.ChatCompletionRequest(
        model=MODEL, messages=[pb.ChatMessage(role="user", content="x")], **fields
    )


def cost(usage: dict[str, Any]) -> int:
    micro = int(usage["prompt_tokens"]) * PRICE["input_per_mtok"]
    micro += int(usage.get("completion_tokens", 0)) * PRICE["output_per_mtok"]
    return -(-micro // 1_000_000)


def log_rows(deployment: Deployment, user_id: str, timeout: float = 15.0) -> list[dict[str, Any]]:
    """The user's request-log rows, once there is at least one (and a moment for a duplicate)."""
    deadline = time.monotonic() + timeout
    with deployment.admin() as admin:
        while True:
            rows: list[dict[str, Any]] = admin.get("/admin/v1/logs", params={"user_id": user_id}).json()[
                "logs"
            ]
            if rows:
                return rows
            assert time.monotonic() < deadline, "no request log row"
            time.sleep(0.1)


def details(error: grpc.aio.AioRpcError) -> dict[str, Any]:
    """The google.rpc details of a failed call, by type name."""
    found: dict[str, Any] = {}
    for key, value in error.trailing_metadata() or ():  # type: ignore[misc,has-type]
        if key == "grpc-status-details-bin":
            status = status_pb2.Status.FromString(value)
            assert status.code == error.code().value[0]
            assert status.message == error.details()
            for packed in status.details:
                for kind in (
                    error_details_pb2.ErrorInfo,
                    error_details_pb2.RetryInfo,
                    error_details_pb2.QuotaFailure,
                    error_details_pb2.BadRequest,
                ):
                    if packed.Is(kind.DESCRIPTOR):
                        detail = kind()
                        packed.Unpack(detail)
                        found[kind.DESCRIPTOR.name] = detail
    return found


async def test_a_chat_completion_is_billed_once_and_logged_with_front_grpc(
    deployment: Deployment, stub: pb_grpc.InferenceServiceAsyncStub
) -> None:
    user_id, key = fund_user(deployment, 10_000_000)
    call = stub.CreateChatCompletion(chat(max_tokens=8), metadata=bearer(key), timeout=TIMEOUT)
    reply = await call
    request_id = dict(await call.initial_metadata())["x-request-id"]
    assert reply.object == "chat.completion"
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content.split() == [f"tok{i}" for i in range(8)]
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 8

    after = settled(deployment, user_id)
    rows = log_rows(deployment, user_id)
    assert len(rows) == 1, rows
    row = rows[0]
    assert (row["front"], row["endpoint"], row["event_id"]) == ("grpc", "chat.completions", request_id)
    assert int(row["usage"]["completion_tokens"]) == 8
    assert 10_000_000 - after["balance_micros"] == cost(row["usage"]) == int(row["cost_micros"])

    # The same request over HTTP is logged with its own front.
    http_user, http_key = fund_user(deployment, 10_000_000)
    response = httpx.post(
        f"{deployment.relay_url}/v1/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 8},
        headers={"authorization": f"Bearer {http_key}"},
        timeout=TIMEOUT,
    )
    assert response.status_code == 200, response.text
    assert log_rows(deployment, http_user)[0]["front"] == "http"
    assert settled(deployment, http_user) == after


async def test_completions_embeddings_and_models(
    deployment: Deployment, stub: pb_grpc.InferenceServiceAsyncStub
) -> None:
    _, key = fund_user(deployment, 10_000_000)
    completion = await stub.CreateCompletion(
        pb.CompletionRequest(model=MODEL, prompt=["say"], max_tokens=3), metadata=bearer(key), timeout=TIMEOUT
    )
    assert completion.object == "text_completion"
    assert completion.choices[0].text.split() == ["tok0", "tok1", "tok2"]
    embedded = await stub.CreateEmbedding(
        pb.EmbeddingRequest(model=MODEL, input=["a", "b"], dimensions=4),
        metadata=bearer(key),
        timeout=TIMEOUT,
    )
    assert [(e.index, len(e.embedding)) for e in embedded.data] == [(0, 4), (1, 4)]
    assert embedded.usage.prompt_tokens > 0
    listed = await stub.ListModels(pb.ListModelsRequest(), metadata=bearer(key), timeout=TIMEOUT)
    assert [m.id for m in listed.data] == [MODEL]


def http_chunks(deployment: Deployment, key: str, body: dict[str, Any]) -> list[pb.ChatCompletionChunk]:
    with httpx.stream(
        "POST",
        f"{deployment.relay_url}/v1/chat/completions",
        json=body,
        headers={"authorization": f"Bearer {key}"},
        timeout=TIMEOUT,
    ) as response:
        assert response.status_code == 200, response.read()
        data = b"".join(response.iter_raw())
    assert data.endswith(b"data: [DONE]\n\n")
    events = [e[len(b"data: ") :] for e in data.split(b"\n\n") if e.startswith(b"data: {")]
    return [
        json_format.ParseDict(orjson.loads(e), pb.ChatCompletionChunk(), ignore_unknown_fields=True)
        for e in events
    ]


@pytest.mark.parametrize("include_usage", [True, False], ids=["with-usage-chunk", "without"])
async def test_stream_chunks_are_the_http_streams_and_billed_once(
    deployment: Deployment, stub: pb_grpc.InferenceServiceAsyncStub, include_usage: bool
) -> None:
    deployment.upstream.configure(deterministic=True, chunks=6)
    user_id, key = fund_user(deployment, 10_000_000)
    request = chat(stream_options=pb.StreamOptions(include_usage=include_usage))
    streamed = [
        chunk async for chunk in stub.StreamChatCompletion(request, metadata=bearer(key), timeout=TIMEOUT)
    ]

    body: dict[str, Any] = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "x"}],
        "stream": True,
    }
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    _, http_key = fund_user(deployment, 10_000_000)
    assert streamed == http_chunks(deployment, http_key, body)
    assert "".join(c.choices[0].delta.content for c in streamed if c.choices).split() == [
        f"tok{i}" for i in range(6)
    ]
    assert streamed[-1].HasField("usage") is include_usage

    after = settled(deployment, user_id)
    rows = log_rows(deployment, user_id)
    assert len(rows) == 1, rows
    assert (rows[0]["front"], rows[0]["stream"], rows[0]["end_reason"]) == ("grpc", True, "done")
    assert 10_000_000 - after["balance_micros"] == cost(rows[0]["usage"]) == int(rows[0]["cost_micros"])


# A well-formed request of each input type: only the key is wrong.
WELL_FORMED: dict[str, Any] = {
    "ChatCompletionRequest": chat(),
    "CompletionRequest": pb.CompletionRequest(model=MODEL, prompt=["x"]),
    "EmbeddingRequest": pb.EmbeddingRequest(model=MODEL, input=["x"]),
    "ListModelsRequest": pb.ListModelsRequest(),
}


async def test_every_rpc_refuses_a_missing_or_invalid_key(
    deployment: Deployment, channel: grpc.aio.Channel
) -> None:
    """Enumerated from the service descriptor, so a new RPC cannot be left open."""
    service = pb.DESCRIPTOR.services_by_name["InferenceService"]
    codes: dict[str, set[Any]] = {}
    for method in service.methods:
        message = WELL_FORMED[method.input_type.name]
        request = message_factory.GetMessageClass(method.input_type)
        response = message_factory.GetMessageClass(method.output_type)
        name = method_name(service.full_name, method.name)
        kind = channel.unary_stream if method.server_streaming else channel.unary_unary
        bound = kind(
            name, request_serializer=request.SerializeToString, response_deserializer=response.FromString
        )
        for metadata in ((), bearer("rg-" + "0" * 40)):
            call = bound(message, metadata=metadata, timeout=TIMEOUT)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                if method.server_streaming:
                    [_ async for _ in call]
                else:
                    await call
            codes.setdefault(method.name, set()).add(refused.value.code())
            info = details(refused.value)["ErrorInfo"]
            assert (info.reason, info.domain) == ("INVALID_API_KEY", "relaygate.io")
    assert codes == {m.name: {grpc.StatusCode.UNAUTHENTICATED} for m in service.methods}


async def test_an_exhausted_balance_is_resource_exhausted_with_a_quota_failure(
    deployment: Deployment, stub: pb_grpc.InferenceServiceAsyncStub
) -> None:
    # One micro-dollar: not enough for any request.
    user_id, key = fund_user(deployment, 1)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.CreateChatCompletion(chat(), metadata=bearer(key), timeout=TIMEOUT)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    found = details(refused.value)
    assert found["ErrorInfo"].reason == "INSUFFICIENT_QUOTA"
    assert [v.subject for v in found["QuotaFailure"].violations] == [f"user:{user_id}"]
    with pytest.raises(grpc.aio.AioRpcError) as streamed:
        [_ async for _ in stub.StreamChatCompletion(chat(), metadata=bearer(key), timeout=TIMEOUT)]
    assert streamed.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "QuotaFailure" in details(streamed.value)
    assert settled(deployment, user_id)["balance_micros"] == 1


async def test_an_upstream_that_is_down_is_unavailable_with_retry_info(
    deployment: Deployment, stub: pb_grpc.InferenceServiceAsyncStub
) -> None:
    deployment.upstream.configure(fail_status=503, fail_count=-1)
    user_id, key = fund_user(deployment, 10_000_000)
    for call in (
        stub.CreateChatCompletion(chat(), metadata=bearer(key), timeout=TIMEOUT),
        stub.StreamChatCompletion(chat(), metadata=bearer(key), timeout=TIMEOUT),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            if isinstance(call, grpc.aio.UnaryStreamCall):
                [_ async for _ in call]
            else:
                await call
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, refused.value
        found = details(refused.value)
        assert found["RetryInfo"].retry_delay.ToNanoseconds() > 0
        assert found["ErrorInfo"].metadata["type"] == "api_error"
    # Nothing was delivered: nothing is charged.
    assert settled(deployment, user_id)["balance_micros"] == 10_000_000


async def test_a_call_cancelled_mid_stream_is_settled_like_an_http_disconnect(
    deployment: Deployment, stub: pb_grpc.InferenceServiceAsyncStub
) -> None:
    deployment.upstream.configure(chunks=15, chunk_interval_ms=100)
    user_id, key = fund_user(deployment, 10_000_000)
    call = stub.StreamChatCompletion(chat(), metadata=bearer(key), timeout=TIMEOUT)
    received = 0
    async for _ in call:
        received += 1
        if received == 3:
            call.cancel()  # the client goes away mid-stream
            break

    after = settled(deployment, user_id)
    rows = log_rows(deployment, user_id)
    assert len(rows) == 1, rows
    usage = rows[0]["usage"]
    # The provider's own count, read by draining the abandoned stream: all 15 tokens, not an estimate.
    assert int(usage["completion_tokens"]) == 15
    assert not usage.get("estimated", False)
    assert (rows[0]["front"], rows[0]["end_reason"]) == ("grpc", "client_gone")
    assert 10_000_000 - after["balance_micros"] == cost(usage) == int(rows[0]["cost_micros"])


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (pb.ChatCompletionRequest(messages=[pb.ChatMessage(role="user", content="x")]), "model"),
        (pb.ChatCompletionRequest(model=MODEL), "messages"),
        (chat(extra_json="[1, 2]"), "extra_json"),
        (chat(extra_json='{"temperature": 2}'), "extra_json"),
        (chat(max_tokens=-1), "max_tokens"),
        (
            pb.ChatCompletionRequest(
                model=MODEL,
                messages=[pb.ChatMessage(role="user", content_parts=[pb.ContentPart(type="video")])],
            ),
            "messages[0].content_parts[0].type",
        ),
    ],
    ids=[
        "no-model",
        "no-messages",
        "extra-not-object",
        "extra-repeats-field",
        "negative-cap",
        "unknown-part",
    ],
)
async def test_a_malformed_request_is_invalid_argument_and_moves_no_balance(
    deployment: Deployment,
    stub: pb_grpc.InferenceServiceAsyncStub,
    request_: pb.ChatCompletionRequest,
    field: str,
) -> None:
    user_id, key = fund_user(deployment, 10_000_000)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.CreateChatCompletion(request_, metadata=bearer(key), timeout=TIMEOUT)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    found = details(refused.value)
    assert [v.field for v in found["BadRequest"].field_violations] == [field]
    assert found["ErrorInfo"].metadata["param"] == field
    after = balance(deployment, user_id)
    assert (after["balance_micros"], after["reserved_micros"]) == (10_000_000, 0)


async def test_a_stream_the_upstream_breaks_ends_with_a_status_after_its_chunks(
    deployment: Deployment, stub: pb_grpc.InferenceServiceAsyncStub
) -> None:
    deployment.upstream.configure(chunks=10, drop_after_chunks=3)
    user_id, key = fund_user(deployment, 10_000_000)
    received: list[pb.ChatCompletionChunk] = []
    with pytest.raises(grpc.aio.AioRpcError) as broken:
        async for chunk in stub.StreamChatCompletion(chat(), metadata=bearer(key), timeout=TIMEOUT):
            received.append(chunk)
    # What arrived before the break was delivered (and is billed); the break is the call's status.
    assert len(received) == 3
    assert broken.value.code() == grpc.StatusCode.UNAVAILABLE
    assert details(broken.value)["ErrorInfo"].reason == "UPSTREAM_ERROR"
    settled(deployment, user_id)
    rows = log_rows(deployment, user_id)
    assert (rows[0]["end_reason"], rows[0]["error_type"]) == ("upstream_error", "provider")
