"""The relay's request series tell its fronts apart: a call on the gRPC front moves the ``front="grpc"``
series of ``relaygate_http_requests`` (and of the latency, overhead and stream histograms), an HTTP
request the ``front="http"`` ones, and neither moves the other's. ``status`` is the HTTP status the
outcome maps to on both fronts, so a refused gRPC call counts as the 401 the HTTP front answers."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable

import grpc
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from services.common.pb.relaygate.relay.v1 import inference_pb2 as pb
from services.common.pb.relaygate.relay.v1 import inference_pb2_grpc as pb_grpc
from services.common.tls import RELAY, server_name
from tests.e2e.stack import MODEL, Deployment, fund_user
from tests.tls import certificates

pytestmark = pytest.mark.shared_stack

TIMEOUT = 10.0
ROUTE = "chat.completions"
# Series name -> its samples, each as (labels, value).
Samples = dict[str, list[tuple[dict[str, str], float]]]


@pytest.fixture
async def stub(deployment: Deployment) -> AsyncIterator[pb_grpc.InferenceServiceAsyncStub]:
    credentials = grpc.ssl_channel_credentials(root_certificates=certificates().tls(RELAY).ca)
    options = [("grpc.ssl_target_name_override", server_name(RELAY))]
    async with grpc.aio.secure_channel(deployment.relay_grpc_address, credentials, options=options) as opened:
        yield pb_grpc.InferenceServiceStub(opened)


def scrape(deployment: Deployment) -> Samples:
    text = httpx.get(f"{deployment.relay_url}/metrics", timeout=TIMEOUT).text
    found: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    return found


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples carrying ``labels`` (other labels summed over)."""
    return sum(
        value
        for have, value in samples.get(name, [])
        if all(have.get(label) == wanted for label, wanted in labels.items())
    )


def moved(before: Samples, after: Samples) -> Callable[..., float]:
    def delta(name: str, **labels: str) -> float:
        return total(after, name, **labels) - total(before, name, **labels)

    return delta


def settle(deployment: Deployment, name: str, at_least: float, **labels: str) -> Samples:
    """The relay's samples once ``name`` with ``labels`` reached ``at_least`` (a finished request is
    counted as its settlement starts, which may trail the caller's last byte by a moment)."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        samples = scrape(deployment)
        if total(samples, name, **labels) >= at_least or time.monotonic() > deadline:
            return samples
        time.sleep(0.05)


def bearer(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


def chat() -> pb.ChatCompletionRequest:
    return pb.ChatCompletionRequest(
        model=MODEL, messages=[pb.ChatMessage(role="user", content="x")], max_tokens=4
    )


async def test_a_grpc_call_moves_the_grpc_series_and_an_http_request_the_http_ones(
    deployment: Deployment, stub: pb_grpc.InferenceServiceAsyncStub
) -> None:
    _, key = fund_user(deployment, 10_000_000)
    ok = {"route": ROUTE, "status": "200", "error_type": ""}
    requests = "relaygate_http_requests_total"

    before = scrape(deployment)
    reply = await stub.CreateChatCompletion(chat(), metadata=bearer(key), timeout=TIMEOUT)
    assert reply.usage.completion_tokens == 4
    expected = total(before, requests, front="grpc", **ok) + 1
    delta = moved(before, settle(deployment, requests, expected, front="grpc", **ok))
    assert (delta(requests, front="grpc", **ok), delta(requests, front="http")) == (1, 0)
    for histogram in ("relaygate_http_latency_seconds_count", "relaygate_gateway_overhead_seconds_count"):
        assert (delta(histogram, front="grpc", route=ROUTE), delta(histogram, front="http")) == (1, 0)

    before = scrape(deployment)
    response = httpx.post(
        f"{deployment.relay_url}/v1/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 4},
        headers={"authorization": f"Bearer {key}"},
        timeout=TIMEOUT,
    )
    assert response.status_code == 200, response.text
    expected = total(before, requests, front="http", **ok) + 1
    delta = moved(before, settle(deployment, requests, expected, front="http", **ok))
    assert (delta(requests, front="http", **ok), delta(requests, front="grpc")) == (1, 0)
    for histogram in ("relaygate_http_latency_seconds_count", "relaygate_gateway_overhead_seconds_count"):
        assert (delta(histogram, front="http", route=ROUTE), delta(histogram, front="grpc")) == (1, 0)


async def test_a_grpc_stream_and_a_refused_grpc_call_count_on_the_grpc_front(
    deployment: Deployment, stub: pb_grpc.InferenceServiceAsyncStub
) -> None:
    _, key = fund_user(deployment, 10_000_000)
    streams = ("relaygate_stream_ttfb_seconds_count", "relaygate_stream_duration_seconds_count")

    before = scrape(deployment)
    chunks = [c async for c in stub.StreamChatCompletion(chat(), metadata=bearer(key), timeout=TIMEOUT)]
    assert chunks
    expected = total(before, streams[1], front="grpc", route=ROUTE) + 1
    delta = moved(before, settle(deployment, streams[1], expected, front="grpc", route=ROUTE))
    for histogram in streams:
        assert (delta(histogram, front="grpc", route=ROUTE), delta(histogram, front="http")) == (1, 0)

    refused = {"route": ROUTE, "status": "401", "error_type": "caller"}
    requests = "relaygate_http_requests_total"
    before = scrape(deployment)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.CreateChatCompletion(chat(), metadata=bearer("rg-not-a-key"), timeout=TIMEOUT)
    assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
    expected = total(before, requests, front="grpc", **refused) + 1
    delta = moved(before, settle(deployment, requests, expected, front="grpc", **refused))
    assert (delta(requests, front="grpc", **refused), delta(requests, front="http")) == (1, 0)
