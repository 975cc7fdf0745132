"""The fake upstream, exercised over real HTTP: shapes, token arithmetic, failure modes, control."""

from __future__ import annotations

import base64
import os
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from services.fake_upstream import Behaviour, BehaviourError, FakeUpstream, FakeUpstreamProcess
from services.fake_upstream.tokens import count_chat_prompt, count_prompt_input

PROJECT_ROOT = Path(__file__).resolve().parents[2]

MESSAGES = [
    {"role": "system", "content": "You are terse."},  # 3 words
    {"role": "user", "content": [{"type": "text", "text": "Describe this picture"}, {"type": "image_url"}]},
    {"role": "assistant", "content": None},  # 0 words
]
MESSAGES_PROMPT_TOKENS = 3 + 3 + 0 + len(MESSAGES)


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream() as running:
        yield running


@pytest.fixture(autouse=True)
def _fresh(upstream: FakeUpstream) -> None:
    upstream.reset()


@pytest.fixture
def client(upstream: FakeUpstream) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=upstream.base_url, timeout=5) as http:
        yield http


def chat(**extra: Any) -> dict[str, Any]:
    return {"model": "any-model", "messages": MESSAGES, **extra}


def sse_payloads(text: str) -> list[Any]:
    """The JSON payloads of an SSE body, with ``"[DONE]"`` kept as the string."""
    events = [block for block in text.split("\n\n") if block]
    assert all(block.startswith("data: ") for block in events)
    return [block[6:] if block == "data: [DONE]" else orjson.loads(block[6:]) for block in events]


# Token arithmetic.


def test_token_rules() -> None:
    assert count_chat_prompt(MESSAGES) == MESSAGES_PROMPT_TOKENS
    assert count_chat_prompt([{"role": "user", "content": "  one\ttwo\nthree  "}]) == 4
    assert count_prompt_input(["a b", "c"]) == 3
    assert count_prompt_input([[1, 2, 3], [4]]) == 4
    assert count_prompt_input([5, 6]) == 2


# Endpoint shapes.


def test_chat_completion(client: httpx.Client) -> None:
    response = client.post("/chat/completions", json=chat())
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["id"].startswith("chatcmpl-")
    assert body["object"] == "chat.completion"
    assert isinstance(body["created"], int)
    assert body["model"] == "any-model"
    [choice] = body["choices"]
    assert choice["index"] == 0
    assert choice["finish_reason"] == "stop"
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"] == "".join(f"tok{i} " for i in range(20))
    assert body["usage"] == {
        "prompt_tokens": MESSAGES_PROMPT_TOKENS,
        "completion_tokens": 20,
        "total_tokens": MESSAGES_PROMPT_TOKENS + 20,
    }


def test_chat_stream_without_usage(client: httpx.Client, upstream: FakeUpstream) -> None:
    upstream.configure(chunks=5)
    response = client.post("/chat/completions", json=chat(stream=True))
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/event-stream"
    *chunks, done = sse_payloads(response.text)
    assert done == "[DONE]"
    assert len(chunks) == 1 + 5
    assert all(c["object"] == "chat.completion.chunk" and "usage" not in c for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [c["choices"][0]["delta"]["content"] for c in chunks[1:]] == [f"tok{i} " for i in range(5)]
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * 5 + ["stop"]
    assert upstream.stats()["completed_streams"] == 1


def test_chat_stream_usage_when_asked(client: httpx.Client) -> None:
    body = chat(stream=True, stream_options={"include_usage": True})
    *chunks, usage_chunk, done = sse_payloads(client.post("/chat/completions", json=body).text)
    assert done == "[DONE]"
    assert len(chunks) == 21
    assert all(c["usage"] is None for c in chunks)
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"] == {
        "prompt_tokens": MESSAGES_PROMPT_TOKENS,
        "completion_tokens": 20,
        "total_tokens": MESSAGES_PROMPT_TOKENS + 20,
    }


def test_include_usage_always(client: httpx.Client, upstream: FakeUpstream) -> None:
    upstream.configure(include_usage_always=True, chunks=3)
    *_, usage_chunk, _done = sse_payloads(client.post("/chat/completions", json=chat(stream=True)).text)
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"]["completion_tokens"] == 3


def test_usage_in_every_chunk(client: httpx.Client, upstream: FakeUpstream) -> None:
    upstream.configure(usage_in_every_chunk=True, chunks=4)
    *chunks, _done = sse_payloads(client.post("/chat/completions", json=chat(stream=True)).text)
    assert [c["usage"]["completion_tokens"] for c in chunks] == [0, 1, 2, 3, 4]
    assert {c["usage"]["prompt_tokens"] for c in chunks} == {MESSAGES_PROMPT_TOKENS}


def test_omit_usage(client: httpx.Client, upstream: FakeUpstream) -> None:
    upstream.configure(omit_usage=True, include_usage_always=True, usage_in_every_chunk=True)
    assert "usage" not in client.post("/chat/completions", json=chat()).json()
    body = chat(stream=True, stream_options={"include_usage": True})
    *chunks, _done = sse_payloads(client.post("/chat/completions", json=body).text)
    assert len(chunks) == 21
    assert all("usage" not in c for c in chunks)
    embedding = client.post("/embeddings", json={"model": "e", "input": "x"}).json()
    assert "usage" not in embedding


def test_zero_chunks(client: httpx.Client, upstream: FakeUpstream) -> None:
    upstream.configure(chunks=0)
    body = client.post("/chat/completions", json=chat()).json()
    assert body["choices"][0]["message"]["content"] == ""
    assert body["usage"]["completion_tokens"] == 0
    *chunks, done = sse_payloads(client.post("/chat/completions", json=chat(stream=True)).text)
    assert done == "[DONE]"
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None, "stop"]
    assert chunks[1]["choices"][0]["delta"] == {}


@pytest.mark.parametrize("cap_field", ["max_tokens", "max_completion_tokens"])
def test_token_cap(client: httpx.Client, cap_field: str) -> None:
    body = client.post("/chat/completions", json=chat(**{cap_field: 7})).json()
    assert body["usage"]["completion_tokens"] == 7
    assert body["choices"][0]["message"]["content"].split() == [f"tok{i}" for i in range(7)]
    assert body["choices"][0]["finish_reason"] == "length"
    stream = chat(stream=True, stream_options={"include_usage": True}, **{cap_field: 2})
    *chunks, usage_chunk, _done = sse_payloads(client.post("/chat/completions", json=stream).text)
    assert len(chunks) == 1 + 2
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert usage_chunk["usage"]["completion_tokens"] == 2
    uncapped = client.post("/chat/completions", json=chat(**{cap_field: 50})).json()
    assert uncapped["usage"]["completion_tokens"] == 20
    assert uncapped["choices"][0]["finish_reason"] == "stop"


def test_legacy_completions(client: httpx.Client, upstream: FakeUpstream) -> None:
    upstream.configure(chunks=4)
    body = client.post("/completions", json={"model": "m", "prompt": "one two three"}).json()
    assert body["object"] == "text_completion"
    assert body["id"].startswith("cmpl-")
    assert body["choices"][0]["text"] == "tok0 tok1 tok2 tok3 "
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    stream = {"model": "m", "prompt": ["a b", "c"], "stream": True, "stream_options": {"include_usage": True}}
    *chunks, usage_chunk, done = sse_payloads(client.post("/completions", json=stream).text)
    assert done == "[DONE]"
    assert [c["choices"][0]["text"] for c in chunks] == ["tok0 ", "tok1 ", "tok2 ", "tok3 "]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert usage_chunk["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}


def test_embeddings(client: httpx.Client) -> None:
    body = client.post("/embeddings", json={"model": "e", "input": ["hello world", "x"]}).json()
    assert body["object"] == "list"
    assert body["model"] == "e"
    assert body["usage"] == {"prompt_tokens": 3, "total_tokens": 3}
    first, second = body["data"]
    assert (first["index"], second["index"]) == (0, 1)
    assert len(first["embedding"]) == 8
    assert all(-1 <= value < 1 for value in first["embedding"])
    assert first["embedding"] != second["embedding"]
    single = client.post("/embeddings", json={"model": "e", "input": "hello world"}).json()
    assert single["data"][0]["embedding"] == first["embedding"]  # deterministic per input
    encoded = client.post(
        "/embeddings", json={"model": "e", "input": "hello world", "encoding_format": "base64"}
    ).json()
    raw = base64.b64decode(encoded["data"][0]["embedding"])
    assert list(struct.unpack("<8f", raw)) == first["embedding"]
    sized = client.post("/embeddings", json={"model": "e", "input": "x", "dimensions": 3}).json()
    assert len(sized["data"][0]["embedding"]) == 3


@pytest.mark.parametrize("response_format", ["url", "b64_json"])
def test_images(client: httpx.Client, response_format: str) -> None:
    request = {"model": "img", "prompt": "a cat", "n": 2, "response_format": response_format}
    body = client.post("/images/generations", json=request).json()
    assert set(body) == {"created", "data"}
    assert len(body["data"]) == 2
    for image in body["data"]:
        assert set(image) == {response_format}
    if response_format == "b64_json":
        assert base64.b64decode(body["data"][0]["b64_json"]).startswith(b"\x89PNG\r\n\x1a\n")


def test_models(client: httpx.Client, upstream: FakeUpstream) -> None:
    body = client.get("/models").json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == list(Behaviour().models)
    upstream.configure(models=["a", "b"])
    assert [m["id"] for m in client.get("/models").json()["data"]] == ["a", "b"]
    # Any model is served unless strict_models is on.
    assert client.post("/chat/completions", json=chat(model="zzz")).status_code == 200
    upstream.configure(strict_models=True)
    refused = client.post("/chat/completions", json=chat(model="zzz"))
    assert refused.status_code == 404
    assert refused.json()["error"]["code"] == "model_not_found"
    assert client.post("/chat/completions", json=chat(model="a")).status_code == 200


# Errors.


def assert_error(response: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    assert response.status_code == status
    error: dict[str, Any] = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    if code is not None:
        assert error["code"] == code
    return error


def test_request_errors(client: httpx.Client) -> None:
    headers = {"content-type": "application/json"}
    assert_error(client.post("/chat/completions", content=b"{nope", headers=headers), 400, "invalid_json")
    assert_error(client.post("/chat/completions", content=b"[1, 2]", headers=headers), 400, "invalid_json")
    error = assert_error(client.post("/chat/completions", json={"model": "m"}), 400)
    assert error["param"] == "messages"
    assert (
        assert_error(client.post("/chat/completions", json=chat(max_tokens=0)), 400)["param"] == "max_tokens"
    )
    assert_error(client.post("/nowhere", json={}), 404, "unknown_url")
    wrong_method = client.get("/chat/completions")
    assert_error(wrong_method, 405, "method_not_allowed")
    assert wrong_method.headers["allow"] == "POST"
    assert_error(client.post("/models"), 405)


def test_api_key(client: httpx.Client, upstream: FakeUpstream) -> None:
    upstream.configure(api_key="sk-secret")
    assert_error(client.post("/chat/completions", json=chat()), 401, "invalid_api_key")
    wrong = {"authorization": "Bearer sk-wrong"}
    assert_error(client.post("/chat/completions", json=chat(), headers=wrong), 401, "invalid_api_key")
    right = {"authorization": "Bearer sk-secret"}
    assert client.post("/chat/completions", json=chat(), headers=right).status_code == 200
    # The control endpoints never need the key.
    assert client.get(f"{upstream.url}/_fake/stats").status_code == 200


# Failure modes.


@pytest.mark.parametrize("status", [500, 502, 503, 429])
def test_fail_status_then_recover(client: httpx.Client, upstream: FakeUpstream, status: int) -> None:
    upstream.configure(fail_status=status, fail_count=2)
    for _ in range(2):
        response = client.post("/chat/completions", json=chat(stream=True))
        error = assert_error(response, status)
        assert error["type"] == ("requests" if status == 429 else "server_error")
        assert ("retry-after" in response.headers) == (status == 429)
    assert client.post("/chat/completions", json=chat()).status_code == 200
    assert upstream.behaviour.fail_count == 0
    assert upstream.stats()["injected_failures"] == 2


def test_fail_all_and_retry_after(client: httpx.Client, upstream: FakeUpstream) -> None:
    upstream.configure(fail_status=429, retry_after=7)
    for path in ("/chat/completions", "/embeddings"):
        response = client.post(path, json={"model": "m", "input": "x", "messages": MESSAGES})
        assert_error(response, 429, "rate_limit_exceeded")
        assert response.headers["retry-after"] == "7"
    assert upstream.behaviour.fail_count == -1


def test_hang_times_out_the_client(client: httpx.Client, upstream: FakeUpstream) -> None:
    upstream.configure(hang=True, fail_count=1)
    started = time.monotonic()
    with pytest.raises(httpx.ReadTimeout):
        client.post("/chat/completions", json=chat(), timeout=0.3)
    assert time.monotonic() - started >= 0.3
    assert client.post("/chat/completions", json=chat()).status_code == 200


def test_drop_connection(client: httpx.Client, upstream: FakeUpstream) -> None:
    upstream.configure(drop_connection=True, fail_count=1)
    with pytest.raises(httpx.RemoteProtocolError, match="without sending a response"):
        client.post("/chat/completions", json=chat())
    assert client.post("/chat/completions", json=chat()).status_code == 200


def test_drop_after_chunks(client: httpx.Client, upstream: FakeUpstream) -> None:
    upstream.configure(drop_after_chunks=3, fail_count=1)
    # Non-streaming requests are not affected and do not consume the failure.
    assert client.post("/chat/completions", json=chat()).status_code == 200
    received: list[str] = []
    with (
        pytest.raises(httpx.RemoteProtocolError, match="incomplete chunked read"),
        client.stream("POST", "/chat/completions", json=chat(stream=True)) as response,
    ):
        assert response.status_code == 200
        received.extend(line for line in response.iter_lines() if line)
    assert len(received) == 3
    assert orjson.loads(received[0][6:])["choices"][0]["delta"]["role"] == "assistant"
    assert not any("[DONE]" in line for line in received)
    stats = upstream.stats()
    assert (stats["aborted_streams"], stats["completed_streams"], stats["open_streams"]) == (1, 0, 0)
    assert client.post("/chat/completions", json=chat(stream=True)).text.endswith("data: [DONE]\n\n")


def test_latency_and_chunk_interval(client: httpx.Client, upstream: FakeUpstream) -> None:
    upstream.configure(latency_ms=150)
    started = time.monotonic()
    assert client.post("/chat/completions", json=chat()).status_code == 200
    assert time.monotonic() - started >= 0.15

    upstream.configure(latency_ms=0, chunk_interval_ms=40, chunks=5)
    started = time.monotonic()
    with client.stream("POST", "/chat/completions", json=chat(stream=True)) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")  # the role chunk comes at once
        assert time.monotonic() - started < 0.15
        assert upstream.stats()["open_streams"] == 1
        rest = [line for line in lines if line]
    assert time.monotonic() - started >= 5 * 0.04
    assert len(rest) == 5 + 1
    assert upstream.stats()["open_streams"] == 0


def test_stop_cuts_hanging_requests() -> None:
    upstream = FakeUpstream(hang=True).start()
    errors: list[BaseException] = []

    def call() -> None:
        try:
            httpx.post(f"{upstream.base_url}/chat/completions", json=chat(), timeout=10)
        except httpx.HTTPError as error:
            errors.append(error)

    caller = threading.Thread(target=call)
    caller.start()
    deadline = time.monotonic() + 5
    while upstream.stats()["injected_failures"] == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    started = time.monotonic()
    upstream.stop()
    caller.join(5)
    assert time.monotonic() - started < 2
    assert [type(error) for error in errors] == [httpx.RemoteProtocolError]


# Control endpoints and stats.


def test_control_endpoints(client: httpx.Client, upstream: FakeUpstream) -> None:
    control = f"{upstream.url}/_fake"
    current = client.get(f"{control}/behaviour").json()
    assert current == Behaviour().to_dict()
    changed = client.post(f"{control}/behaviour", json={"chunks": 2, "latency_ms": 1}).json()
    assert (changed["chunks"], changed["latency_ms"]) == (2, 1.0)
    assert upstream.behaviour.chunks == 2

    # A bad update names the field and changes nothing.
    refused = client.post(f"{control}/behaviour", json={"chunks": 3, "fail_status": "soon"})
    assert assert_error(refused, 400)["param"] == "fail_status"
    assert_error(client.post(f"{control}/behaviour", json={"colour": "red"}), 400)
    assert upstream.behaviour.chunks == 2

    assert client.post(f"{control}/reset").json() == Behaviour().to_dict()
    assert client.get(f"{control}/health").json() == {"status": "ok"}
    assert_error(client.delete(f"{control}/stats"), 405)


def test_configure_validates() -> None:
    with pytest.raises(BehaviourError):
        Behaviour(chunks=-1)
    upstream = FakeUpstream(chunks=3)  # not started: control methods act directly
    with pytest.raises(BehaviourError):
        upstream.configure(hang="yes")
    assert upstream.configure(hang=True).hang is True
    assert upstream.reset().chunks == 3


def test_stats(client: httpx.Client, upstream: FakeUpstream) -> None:
    client.post("/chat/completions", json=chat(stream=True))
    client.get("/models")
    client.post("/embeddings", json={"model": "e", "input": "x"}, headers={"X-Trace-Id": "abc"})
    client.get(f"{upstream.url}/_fake/stats")  # control traffic is not counted
    stats = upstream.stats()
    assert stats["requests"] == {"/v1/chat/completions": 1, "/v1/models": 1, "/v1/embeddings": 1}
    assert stats["requests_total"] == 3
    assert stats["completed_streams"] == 1
    last = stats["last_request"]
    assert last is not None
    assert (last["method"], last["path"]) == ("POST", "/v1/embeddings")
    assert last["headers"]["x-trace-id"] == "abc"
    assert last["body"] == {"model": "e", "input": "x"}
    assert client.get(f"{upstream.url}/_fake/stats").json() == stats
    upstream.reset()
    assert upstream.stats()["requests_total"] == 0


# Running as a process.


def test_cli_process_serves_and_exits_cleanly_on_sigterm() -> None:
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT), "FAKE_UPSTREAM_CHUNKS": "9"}
    process = subprocess.Popen(
        [sys.executable, "-m", "services.fake_upstream", "--port", "0", "--chunks", "3"],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        cwd=PROJECT_ROOT,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line.startswith("listening on http://127.0.0.1:")
        url = line.removeprefix("listening on ").strip()
        response = httpx.post(f"{url}/v1/chat/completions", json=chat(), timeout=5)
        assert response.json()["usage"]["completion_tokens"] == 3  # the flag beats the environment
        process.send_signal(signal.SIGTERM)
        assert process.wait(10) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()


def test_process_runner() -> None:
    child = FakeUpstreamProcess(chunks=2, fail_status=503, fail_count=1).start()
    try:
        assert child.base_url.startswith("http://127.0.0.1:")
        assert_error(httpx.post(f"{child.base_url}/completions", json={"model": "m", "prompt": "x"}), 503)
        assert child.configure(chunks=4).chunks == 4
        body = httpx.post(f"{child.base_url}/completions", json={"model": "m", "prompt": "x"}).json()
        assert body["usage"]["completion_tokens"] == 4
        assert child.stats()["requests"] == {"/v1/completions": 2}
        assert child.reset().chunks == 2
        assert child.stop() == 0
    finally:
        child.stop()


def test_cli_flags_and_environment() -> None:
    from services.fake_upstream.__main__ import behaviour_from, build_parser

    args = build_parser().parse_args(["--hang", "--chunks", "4", "--models", "a, b", "--fail-status", "none"])
    environ = {"FAKE_UPSTREAM_OMIT_USAGE": "yes", "FAKE_UPSTREAM_CHUNKS": "9", "FAKE_UPSTREAM_API_KEY": "k"}
    behaviour = behaviour_from(args, environ)
    assert (behaviour.hang, behaviour.chunks, behaviour.models) == (True, 4, ["a", "b"])
    assert (behaviour.omit_usage, behaviour.api_key, behaviour.fail_status) == (True, "k", None)
    with pytest.raises(BehaviourError):
        behaviour_from(build_parser().parse_args(["--hang", "maybe"]), {})
