"""Streams through the whole stack: bytes as the upstream sent them, time to first byte next to a
direct call, keep-alive comments, the idle timeout, and usage settled after the client went away."""

from __future__ import annotations

import time
from typing import Any

import httpx
import openai
import orjson
import pytest

from tests.e2e.stack import MODEL, PRICE, Deployment, fund_user, only_log_row, settled

pytestmark = pytest.mark.shared_stack

RELAY_ENV = {
    "RELAYGATE_STREAM_KEEPALIVE_S": "0.3",
    "RELAYGATE_STREAM_IDLE_TIMEOUT_S": "1.5",
    "RELAYGATE_STREAM_DRAIN_S": "10",
}


@pytest.fixture(scope="module")
def relay_env() -> dict[str, str]:
    return RELAY_ENV


@pytest.fixture(autouse=True)
def _fresh_upstream(deployment: Deployment) -> None:
    deployment.upstream.reset()


def chat_body(**extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "stream it"}], "stream": True, **extra}


def raw_stream(url: str, body: dict[str, Any], key: str | None = None) -> bytes:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    with httpx.stream("POST", f"{url}/chat/completions", json=body, headers=headers, timeout=10) as response:
        assert response.status_code == 200, response.read()
        return b"".join(response.iter_raw())


def events(data: bytes) -> list[bytes]:
    return [event + b"\n\n" for event in data.split(b"\n\n") if event]


def cost(usage: dict[str, Any]) -> int:
    micro = int(usage["prompt_tokens"]) * PRICE["input_per_mtok"]
    micro += int(usage.get("completion_tokens", 0)) * PRICE["output_per_mtok"]
    return -(-micro // 1_000_000)


@pytest.mark.parametrize("include_usage", [True, False], ids=["caller-asks-usage", "relay-adds-usage"])
def test_chunks_are_byte_identical_to_a_direct_call(deployment: Deployment, include_usage: bool) -> None:
    deployment.upstream.configure(deterministic=True, chunks=12)
    _, key = fund_user(deployment, 10_000_000)
    body = chat_body(stream_options={"include_usage": True}) if include_usage else chat_body()

    relayed = raw_stream(f"{deployment.relay_url}/v1", body, key)
    # What the relay sent upstream always asks for usage: the direct call does the same.
    direct = raw_stream(deployment.upstream.base_url, chat_body(stream_options={"include_usage": True}))

    assert relayed.endswith(b"data: [DONE]\n\n")
    if include_usage:
        assert relayed == direct
    else:
        usage_chunk = [e for e in events(direct) if b'"choices":[]' in e]
        assert len(usage_chunk) == 1
        assert relayed == direct.replace(usage_chunk[0], b"")


def byte_times_s(url: str, body: dict[str, Any], key: str) -> tuple[float, float]:
    """Seconds until the first body byte and until the end of a streamed answer."""
    started = time.perf_counter()
    first = 0.0
    with (
        httpx.Client(timeout=10) as client,
        client.stream(
            "POST", f"{url}/chat/completions", json=body, headers={"authorization": f"Bearer {key}"}
        ) as response,
    ):
        for _ in response.iter_raw():
            first = first or time.perf_counter() - started
    return first, time.perf_counter() - started


def test_the_first_bytes_reach_the_caller_while_the_upstream_is_still_sending(deployment: Deployment) -> None:
    # Functional, not a speed check (bench measures time to first byte): with 4 chunks 500 ms apart,
    # a relay that buffered the stream would deliver its first byte only at the end.
    deployment.upstream.configure(chunks=4, chunk_interval_ms=500)
    _, key = fund_user(deployment, 100_000_000)
    first, total = byte_times_s(f"{deployment.relay_url}/v1", chat_body(max_tokens=8), key)
    assert total >= 1.9
    assert first < total / 2, f"first byte after {first:.2f} s of a {total:.2f} s stream"


def test_keepalive_comments_while_the_upstream_is_silent(deployment: Deployment) -> None:
    deployment.upstream.configure(chunks=3, chunk_interval_ms=800)
    _, key = fund_user(deployment, 10_000_000)
    data = raw_stream(f"{deployment.relay_url}/v1", chat_body(), key)
    assert b": keep-alive\n\n" in data
    assert data.endswith(b"data: [DONE]\n\n")
    # SDKs ignore SSE comments.
    stream = openai.OpenAI(
        base_url=f"{deployment.relay_url}/v1", api_key=key, max_retries=0
    ).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices).split() == [
        "tok0",
        "tok1",
        "tok2",
    ]


def test_an_upstream_silent_past_the_idle_timeout_ends_the_stream_in_band(deployment: Deployment) -> None:
    deployment.upstream.configure(chunks=4, chunk_interval_ms=2500)
    user_id, key = fund_user(deployment, 10_000_000)
    data = raw_stream(f"{deployment.relay_url}/v1", chat_body(), key)
    error = [e for e in events(data) if e.startswith(b'data: {"error"')]
    assert len(error) == 1
    assert orjson.loads(error[0][6:])["error"]["code"] == "upstream_timeout"
    assert not data.endswith(b"data: [DONE]\n\n")
    row = only_log_row(deployment, user_id)
    assert (row["end_reason"], row["error_type"]) == ("timeout", "provider")
    settled(deployment, user_id)


def test_usage_is_settled_after_the_client_disconnects(deployment: Deployment) -> None:
    deployment.upstream.configure(chunks=15, chunk_interval_ms=100)
    user_id, key = fund_user(deployment, 10_000_000)
    with httpx.stream(
        "POST",
        f"{deployment.relay_url}/v1/chat/completions",
        json=chat_body(),
        headers={"authorization": f"Bearer {key}"},
        timeout=10,
    ) as response:
        received = b""
        for piece in response.iter_raw():
            received += piece
            if received.count(b"data:") >= 3:
                break  # the client goes away mid-stream

    after = settled(deployment, user_id)
    row = only_log_row(deployment, user_id)
    usage = row["usage"]
    # The provider's own count, read by draining the abandoned stream: all 15 tokens, not an estimate.
    assert int(usage["completion_tokens"]) == 15
    assert not usage.get("estimated", False)
    assert row["end_reason"] == "client_gone"
    assert 10_000_000 - after["balance_micros"] == cost(usage) == int(row["cost_micros"])
    assert deployment.upstream.stats()["completed_streams"] == 1


def test_a_stream_without_provider_usage_bills_a_marked_estimate(deployment: Deployment) -> None:
    deployment.upstream.configure(chunks=5, omit_usage=True)
    user_id, key = fund_user(deployment, 10_000_000)
    data = raw_stream(f"{deployment.relay_url}/v1", chat_body(max_tokens=5), key)
    assert data.endswith(b"data: [DONE]\n\n")
    settled(deployment, user_id)
    row = only_log_row(deployment, user_id)
    assert row["usage"]["estimated"] is True
    assert row["end_reason"] == "done"
    assert int(row["cost_micros"]) > 0
