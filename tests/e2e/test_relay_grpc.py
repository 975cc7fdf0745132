"""The relay's gRPC front (relaygate.relay.v1.InferenceService) through the whole stack, called with
grpcio as an internal service would: TLS checking the relay's certificate, no client certificate, the
API key in the metadata. Each call goes through the pipeline the HTTP front uses: the same chunks as
an HTTP stream, billed once, logged once with front=grpc, refusals as statuses with google.rpc
details, a call cancelled mid-stream settled like an HTTP disconnect, failover, the key's rate and
stream limits, the request size limit and readiness of HTTP, and HTTP's gateway headers as trailing
metadata. Health and reflection answer on the front's own port."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import httpx
import orjson
import pytest
from google.protobuf import descriptor_pb2, json_format, message_factory
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2

from devinfra.processes import ManagedProcess, free_ports
from services.common.pb.relaygate.relay.v1 import inference_pb2 as pb
from services.common.pb.relaygate.relay.v1 import inference_pb2_grpc as pb_grpc
from services.common.rpc_policy import INFERENCE_SERVICE, method_name
from services.common.tls import RELAY, server_name
from tests.e2e.stack import MODEL, PRICE, Deployment, balance, fund_user, ok, settled
from tests.tls import certificates

TIMEOUT = 10.0
STREAMS_PER_KEY = 2
# Small, so that a message over the limit is quick to send; the HTTP front has the same one.
MAX_BODY_BYTES = 64 * 1024

Metadata = dict[str, str | bytes]


@pytest.fixture(scope="module")
def relay_env() -> dict[str, str]:
    return {
        "RELAYGATE_STREAM_DRAIN_S": "10",
        "RELAYGATE_MAX_STREAMS_PER_KEY": str(STREAMS_PER_KEY),
        "RELAYGATE_MAX_BODY_BYTES": str(MAX_BODY_BYTES),
    }


@pytest.fixture(autouse=True)
def _fresh_upstream(deployment: Deployment) -> None:
    deployment.upstream.reset()


def front_channel(address: str) -> grpc.aio.Channel:
    """A channel to a relay's gRPC port that trusts the deployment's CA and presents no certificate."""
    credentials = grpc.ssl_channel_credentials(root_certificates=certificates().tls(RELAY).ca)
    options = [("grpc.ssl_target_name_override", server_name(RELAY))]
    return grpc.aio.secure_channel(address, credentials, options=options)


@pytest.fixture
async def channel(deployment: Deployment) -> AsyncIterator[grpc.aio.Channel]:
    async with front_channel(deployment.relay_grpc_address) as opened:
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


def said(content: str, **fields: Any) -> pb.ChatCompletionRequest:
    return pb.ChatCompletionRequest(
        model=MODEL, messages=[pb.ChatMessage(role="user", content=content)], **fields
    )


def cost(usage: dict[str, Any]) -> int:
    micro = int(usage["prompt_tokens"]) * PRICE["input_per_mtok"]
    micro += int(usage.get("completion_tokens", 0)) * PRICE["output_per_mtok"]
    return -(-micro // 1_000_000)


def log_rows(
    deployment: Deployment, user_id: str, timeout: float = 15.0, settle: float = 1.0, at_least: int = 1
) -> list[dict[str, Any]]:
    """The user's request-log rows, read again ``settle`` seconds after ``at_least`` of them appeared, so
    that a duplicate written just after them is among them."""
    deadline = time.monotonic() + timeout
    with deployment.admin() as admin:

        def read() -> list[dict[str, Any]]:
            rows: list[dict[str, Any]] = admin.get("/admin/v1/logs", params={"user_id": user_id}).json()[
                "logs"
            ]
            return rows

        while len(read()) < at_least:
            assert time.monotonic() < deadline, f"fewer than {at_least} request log rows"
            time.sleep(0.1)
        time.sleep(settle)
        return read()


def as_dict(pairs: Any) -> Metadata:
    """gRPC metadata by key (the stubs leave its type unresolved in grpc.aio)."""
    found: Metadata = {}
    for key, value in pairs or ():
        assert isinstance(key, str) and isinstance(value, str | bytes), (key, value)
        found.setdefault(key, value)
    return found


def details(error: grpc.aio.AioRpcError) -> dict[str, Any]:
    """The google.rpc details of a failed call, by type name."""
    found: dict[str, Any] = {}
    for key, value in as_dict(error.trailing_metadata()).items():
        if key == "grpc-status-details-bin":
            assert isinstance(value, bytes)
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
    request_id = dict(await call.trailing_metadata())["x-request-id"]
    # No headers of its own: gRPC sends them with the answer and the trailers, in one write.
    assert not await call.initial_metadata()
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


async def test_logprobs_asked_in_extra_json_come_back_as_over_http(
    deployment: Deployment, stub: pb_grpc.InferenceServiceAsyncStub
) -> None:
    """The reply keeps what the proto has no field for: a choice's logprobs, unary and streamed, are
    the upstream's, as the HTTP front returns them."""
    _, key = fund_user(deployment, 10_000_000)
    asked = '{"logprobs": true, "top_logprobs": 2}'
    reply = await stub.CreateChatCompletion(
        chat(max_tokens=3, extra_json=asked), metadata=bearer(key), timeout=TIMEOUT
    )
    response = httpx.post(
        f"{deployment.relay_url}/v1/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 3}
        | orjson.loads(asked),
        headers={"authorization": f"Bearer {key}"},
        timeout=TIMEOUT,
    )
    assert response.status_code == 200, response.text
    over_http = response.json()["choices"][0]["logprobs"]
    assert [entry["token"] for entry in over_http["content"]] == ["tok0 ", "tok1 ", "tok2 "]
    assert orjson.loads(reply.choices[0].logprobs_json) == over_http

    streamed = [
        chunk
        async for chunk in stub.StreamChatCompletion(
            chat(max_tokens=3, extra_json=asked), metadata=bearer(key), timeout=TIMEOUT
        )
    ]
    tokens = [
        entry
        for chunk in streamed
        for choice in chunk.choices
        if choice.logprobs_json
        for entry in orjson.loads(choice.logprobs_json)["content"]
    ]
    assert tokens == over_http["content"]


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
    call = stub.StreamChatCompletion(request, metadata=bearer(key), timeout=TIMEOUT)
    streamed = [chunk async for chunk in call]
    trailing = as_dict(await call.trailing_metadata())

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
    # The gateway facts HTTP sends as the stream's headers come as the call's trailing metadata.
    assert trailing["x-request-id"] == rows[0]["event_id"]
    assert float(trailing["x-relaygate-overhead-ms"]) >= 0


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
        serializers: dict[str, Any] = {
            "request_serializer": request.SerializeToString,
            "response_deserializer": response.FromString,
        }
        for metadata in ((), bearer("rg-" + "0" * 40)):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                if method.server_streaming:
                    streamed = channel.unary_stream(name, **serializers)
                    [_ async for _ in streamed(message, metadata=metadata, timeout=TIMEOUT)]
                else:
                    await channel.unary_unary(name, **serializers)(
                        message, metadata=metadata, timeout=TIMEOUT
                    )
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
    with pytest.raises(grpc.aio.AioRpcError) as unary:
        await stub.CreateChatCompletion(chat(), metadata=bearer(key), timeout=TIMEOUT)
    with pytest.raises(grpc.aio.AioRpcError) as streamed:
        [_ async for _ in stub.StreamChatCompletion(chat(), metadata=bearer(key), timeout=TIMEOUT)]
    for refused in (unary, streamed):
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


async def test_health_and_reflection_answer_on_the_fronts_own_port(channel: grpc.aio.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", INFERENCE_SERVICE):
        answer = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING, service
    reflect = channel.stream_stream(
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    questions = [
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol=INFERENCE_SERVICE),
    ]
    answers = [answer async for answer in reflect(iter(questions), timeout=TIMEOUT)]
    listed = {s.name for s in answers[0].list_services_response.service}
    assert {INFERENCE_SERVICE, "grpc.health.v1.Health"} <= listed, listed
    files = [
        descriptor_pb2.FileDescriptorProto.FromString(raw)
        for raw in answers[1].file_descriptor_response.file_descriptor_proto
    ]
    described = {service.name for proto in files for service in proto.service}
    assert "InferenceService" in described, described


async def test_a_channel_that_is_down_fails_over_to_the_next_as_over_http(
    deployment: Deployment, stub: pb_grpc.InferenceServiceAsyncStub
) -> None:
    tag = uuid.uuid4().hex[:6]
    model = f"gpt-grpc-failover-{tag}"
    down = free_ports(1)[0]  # nothing listens there: every connection is refused
    with deployment.admin() as admin:
        ok(admin.put(f"/admin/v1/prices/{model}", json=PRICE))
        first = {"name": f"down-{tag}", "base_url": f"http://127.0.0.1:{down}", "priority": 10}
        second = {"name": f"up-{tag}", "base_url": deployment.upstream.base_url}
        ok(admin.post("/admin/v1/channels", json={**first, "models": [model], "enabled": True}))
        backup = ok(admin.post("/admin/v1/channels", json={**second, "models": [model], "enabled": True}))
    user_id, key = fund_user(deployment, 10_000_000)
    request = pb.ChatCompletionRequest(
        model=model, messages=[pb.ChatMessage(role="user", content="x")], max_tokens=4
    )
    reply = await stub.CreateChatCompletion(request, metadata=bearer(key), timeout=TIMEOUT)
    assert reply.choices[0].message.content.split() == [f"tok{i}" for i in range(4)]

    after = settled(deployment, user_id)
    rows = log_rows(deployment, user_id)
    assert len(rows) == 1, rows
    row = rows[0]
    assert (row["front"], row["attempts"], row["channel_id"]) == ("grpc", 2, str(backup["channel_id"]))
    assert 10_000_000 - after["balance_micros"] == cost(row["usage"]) == int(row["cost_micros"])


async def test_the_keys_stream_cap_applies_over_grpc(
    deployment: Deployment, stub: pb_grpc.InferenceServiceAsyncStub
) -> None:
    # Each held stream lasts about 3 s after its first chunk: time enough for the refused call.
    deployment.upstream.configure(chunks=10, chunk_interval_ms=300)
    user_id, key = fund_user(deployment, 10_000_000)
    held = [
        aiter(stub.StreamChatCompletion(chat(), metadata=bearer(key), timeout=TIMEOUT))
        for _ in range(STREAMS_PER_KEY)
    ]
    try:
        for stream in held:
            # Its first chunk is out: the stream holds one of the key's slots.
            await anext(stream)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            [_ async for _ in stub.StreamChatCompletion(chat(), metadata=bearer(key), timeout=TIMEOUT)]
    finally:
        for stream in held:
            [_ async for _ in stream]
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    found = details(refused.value)
    assert found["ErrorInfo"].reason == "CONCURRENCY_LIMIT_EXCEEDED"
    assert found["RetryInfo"].retry_delay.ToNanoseconds() > 0
    [subject] = [v.subject for v in found["QuotaFailure"].violations]
    assert subject.startswith("key:") and subject != "key:"
    # The slots are given back when the streams end.
    deployment.upstream.reset()
    after = [
        _ async for _ in stub.StreamChatCompletion(chat(max_tokens=2), metadata=bearer(key), timeout=TIMEOUT)
    ]
    assert after
    # The held streams and the one after are logged (the batch may come in pieces).
    assert len(log_rows(deployment, user_id, settle=0, at_least=STREAMS_PER_KEY + 1)) >= STREAMS_PER_KEY + 1


async def test_a_keys_rpm_limit_is_in_the_trailing_metadata_and_refuses_with_retry_info(
    deployment: Deployment, stub: pb_grpc.InferenceServiceAsyncStub
) -> None:
    _, key = fund_user(deployment, 10_000_000, limits={"rpm": 2})
    remaining = []
    for _ in range(2):
        call = stub.CreateChatCompletion(chat(max_tokens=1), metadata=bearer(key), timeout=TIMEOUT)
        await call
        trailing = as_dict(await call.trailing_metadata())
        # What the HTTP front sends as headers (services/relay/edge/http/headers.py).
        assert str(trailing["x-request-id"]).startswith("req")
        assert (trailing["x-ratelimit-limit-requests"], trailing["x-ratelimit-reset-requests"] != "") == (
            "2",
            True,
        )
        assert float(trailing["x-relaygate-overhead-ms"]) >= 0
        assert int(trailing["x-relaygate-available-micros"]) > 0
        remaining.append(trailing["x-ratelimit-remaining-requests"])
    assert remaining == ["1", "0"]

    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.CreateChatCompletion(chat(max_tokens=1), metadata=bearer(key), timeout=TIMEOUT)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    found = details(refused.value)
    assert (found["ErrorInfo"].reason, found["ErrorInfo"].metadata["http_status"]) == (
        "RATE_LIMIT_EXCEEDED",
        "429",
    )
    assert found["RetryInfo"].retry_delay.ToNanoseconds() > 0
    [subject] = [v.subject for v in found["QuotaFailure"].violations]
    assert subject.startswith("key:") and subject != "key:"


async def test_the_request_size_limit_is_the_http_bodys(
    deployment: Deployment, stub: pb_grpc.InferenceServiceAsyncStub
) -> None:
    user_id, key = fund_user(deployment, 10_000_000)
    over = "x" * MAX_BODY_BYTES
    response = httpx.post(
        f"{deployment.relay_url}/v1/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": over}]},
        headers={"authorization": f"Bearer {key}"},
        timeout=TIMEOUT,
    )
    assert response.status_code == 413, response.text
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.CreateChatCompletion(said(over), metadata=bearer(key), timeout=TIMEOUT)
    # Refused by gRPC before any handler reads it, with gRPC's own code for an oversize message.
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    message = refused.value.details() or ""
    assert "larger than max" in message and f"vs. {MAX_BODY_BYTES})" in message, message
    # Under the limit, the same request goes through.
    under = " ".join(["x"] * (MAX_BODY_BYTES // 4))
    reply = await stub.CreateChatCompletion(
        said(under, max_tokens=1),
        metadata=bearer(key),
        timeout=TIMEOUT,
    )
    assert reply.usage.prompt_tokens > 0
    settled(deployment, user_id)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


@contextlib.asynccontextmanager
async def forwarding(port: int, target: int) -> AsyncIterator[None]:
    """Connections to ``port`` go on to ``target`` while the context is open."""
    pipes: set[asyncio.Task[None]] = set()

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            target_reader, target_writer = await asyncio.open_connection("127.0.0.1", target)
        except OSError:
            writer.close()
            return
        for pipe in (_pipe(reader, target_writer), _pipe(target_reader, writer)):
            task = asyncio.create_task(pipe)
            pipes.add(task)
            task.add_done_callback(pipes.discard)

    server = await asyncio.start_server(accept, "127.0.0.1", port)
    try:
        yield
    finally:
        server.close()
        for task in list(pipes):
            task.cancel()
        await asyncio.gather(*pipes, return_exceptions=True)


@contextlib.contextmanager
def relay_process(
    deployment: Deployment, name: str, env: dict[str, str], port: int
) -> Iterator[ManagedProcess]:
    stack = deployment.stack
    env = {"RELAYGATE_RELAY_PORT": str(port), **env}
    process = ManagedProcess(
        name,
        [sys.executable, "-m", "services.relay"],
        stack.log_dir / f"{name}.log",
        env=stack.process_env("relay", env),
        port=port,
    )
    try:
        yield process
    finally:
        process.stop()


async def test_the_fronts_health_is_not_serving_until_the_relay_is_ready(deployment: Deployment) -> None:
    """As HTTP's /readyz: a relay that has not read the channel catalog yet is not ready. This relay
    reaches the catalog through a port that only starts forwarding to quota once it was seen not
    ready."""
    http_port, grpc_port, catalog_port = free_ports(3)
    env = {
        "RELAYGATE_RELAY_GRPC_LISTEN": f"127.0.0.1:{grpc_port}",
        "RELAYGATE_CATALOG_ADDR": f"127.0.0.1:{catalog_port}",
    }
    serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    readyz = f"http://127.0.0.1:{http_port}/readyz"

    async def health(chan: grpc.aio.Channel) -> set[int]:
        stub = health_pb2_grpc.HealthStub(chan)
        found = set()
        for service in ("", INFERENCE_SERVICE):
            request = health_pb2.HealthCheckRequest(service=service)
            found.add((await stub.Check(request, timeout=TIMEOUT, wait_for_ready=True)).status)
        return found

    with relay_process(deployment, "relay-unready", env, http_port) as relay:
        await asyncio.to_thread(relay.wait_listening, timeout=60)
        async with front_channel(f"127.0.0.1:{grpc_port}") as chan:
            assert await health(chan) == {not_serving}
            assert httpx.get(readyz, timeout=TIMEOUT).status_code == 503
            async with forwarding(catalog_port, deployment.stack.port_of("quota")):
                deadline = time.monotonic() + 20
                while (states := await health(chan)) != {serving}:
                    assert time.monotonic() < deadline, f"health still {states} with the catalog reachable"
                    await asyncio.sleep(0.1)
                assert httpx.get(readyz, timeout=TIMEOUT).status_code == 200
                # Stopped while the catalog is still reachable: the relay's way out reads nothing.
                await asyncio.to_thread(relay.stop)


CLAUDE = "claude-grpc-e2e"
THOUGHTS = 3


async def test_an_anthropic_channels_reasoning_and_thinking_blocks_come_back(
    deployment: Deployment, stub: pb_grpc.InferenceServiceAsyncStub
) -> None:
    """What the relay adds to an Anthropic channel's answer (its thinking as reasoning_content, the
    signed thinking_blocks to send back with the turn) reaches a gRPC caller, unary and streamed."""
    with deployment.admin() as admin:
        created = ok(
            admin.post(
                "/admin/v1/channels",
                json={
                    "name": CLAUDE,
                    "type": "anthropic",
                    "base_url": f"{deployment.upstream.url}/v1",
                    "api_key": "anthropic-key",
                    "models": [CLAUDE],
                    "enabled": True,
                },
            )
        )
        ok(admin.put(f"/admin/v1/prices/{CLAUDE}", json=PRICE))
    try:
        deployment.upstream.configure(reasoning_tokens=THOUGHTS)
        _, key = fund_user(deployment, 10_000_000)
        request = pb.ChatCompletionRequest(
            model=CLAUDE,
            messages=[pb.ChatMessage(role="user", content="x")],
            max_tokens=2000,
            extra_json='{"reasoning_effort": "low"}',
        )
        thoughts = "".join(f"thought{n} " for n in range(THOUGHTS))
        reply = await stub.CreateChatCompletion(request, metadata=bearer(key), timeout=TIMEOUT)
        message = reply.choices[0].message
        assert message.reasoning_content == thoughts
        [block] = orjson.loads(message.extra_json)["thinking_blocks"]
        assert (block["type"], block["thinking"]) == ("thinking", thoughts) and block["signature"]

        streamed = [
            chunk async for chunk in stub.StreamChatCompletion(request, metadata=bearer(key), timeout=TIMEOUT)
        ]
        deltas = [chunk.choices[0].delta for chunk in streamed if chunk.choices]
        assert "".join(delta.reasoning_content for delta in deltas) == thoughts
        signed = [b for d in deltas if d.extra_json for b in orjson.loads(d.extra_json)["thinking_blocks"]]
        assert [b["signature"] for b in signed] == [block["signature"]]
    finally:
        with deployment.admin() as admin:
            ok(admin.delete(f"/admin/v1/channels/{created['channel_id']}"))
