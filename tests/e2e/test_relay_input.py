"""Bad input at the edge: every malformed, oversized or mistyped request gets a precise 4xx in
OpenAI's error shape, and never reaches an upstream or a balance."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest

from tests.e2e.stack import MODEL, Deployment, balance, fund_user

pytestmark = pytest.mark.shared_stack

MAX_BODY = 64 * 1024


@pytest.fixture(scope="module")
def relay_env() -> dict[str, str]:
    return {"RELAYGATE_MAX_BODY_BYTES": str(MAX_BODY)}


@pytest.fixture(scope="module")
def account(deployment: Deployment) -> tuple[str, str]:
    return fund_user(deployment, 1_000_000)


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "x"}], **fields}


def nested(depth: int) -> bytes:
    return b'{"model": "gpt-e2e", "messages": ' + b"[" * depth + b"]" * depth + b"}"


CASES = [
    # (id, path, body as bytes or JSON, status, param)
    ("malformed-json", "chat/completions", b'{"model": "gpt-e2e", "messages": [', 400, None),
    ("invalid-utf8", "chat/completions", b'{"model": "gpt-e2e", "messages": "\xff\xfe"}', 400, None),
    ("empty-body", "chat/completions", b"", 400, None),
    ("array-body", "chat/completions", b"[1, 2]", 400, None),
    ("deep-nesting", "chat/completions", nested(5000), 400, None),
    (
        "huge-integer",
        "chat/completions",
        b'{"model": "gpt-e2e", "max_tokens": 1' + b"0" * 30 + b"}",
        400,
        "max_tokens",
    ),
    ("model-not-string", "chat/completions", {"model": 5, "messages": []}, 400, "model"),
    ("messages-string", "chat/completions", {"model": MODEL, "messages": "hi"}, 400, "messages"),
    ("messages-empty", "chat/completions", {"model": MODEL, "messages": []}, 400, "messages"),
    ("message-not-object", "chat/completions", {"model": MODEL, "messages": [1]}, 400, "messages"),
    (
        "message-without-role",
        "chat/completions",
        {"model": MODEL, "messages": [{"content": "x"}]},
        400,
        "messages",
    ),
    (
        "content-number",
        "chat/completions",
        {"model": MODEL, "messages": [{"role": "user", "content": 5}]},
        400,
        "messages",
    ),
    ("stream-string", "chat/completions", chat(stream="yes"), 400, "stream"),
    ("max-tokens-string", "chat/completions", chat(max_tokens="5"), 400, "max_tokens"),
    ("max-tokens-zero", "chat/completions", chat(max_tokens=0), 400, "max_tokens"),
    ("max-tokens-bool", "chat/completions", chat(max_tokens=True), 400, "max_tokens"),
    ("temperature-string", "chat/completions", chat(temperature="hot"), 400, "temperature"),
    ("n-zero", "chat/completions", chat(n=0), 400, "n"),
    ("stream-options-string", "chat/completions", chat(stream_options="x"), 400, "stream_options"),
    ("prompt-missing", "completions", {"model": MODEL}, 400, "prompt"),
    ("prompt-number", "completions", {"model": MODEL, "prompt": 5}, 400, "prompt"),
    ("input-missing", "embeddings", {"model": MODEL}, 400, "input"),
    ("input-object", "embeddings", {"model": MODEL, "input": {"a": 1}}, 400, "input"),
    ("embeddings-stream", "embeddings", {"model": MODEL, "input": "x", "stream": True}, 400, "stream"),
    ("image-prompt-missing", "images/generations", {"model": MODEL}, 400, "prompt"),
    ("image-n-string", "images/generations", {"model": MODEL, "prompt": "cat", "n": "2"}, 400, "n"),
    (
        "oversized",
        "chat/completions",
        chat(messages=[{"role": "user", "content": "x" * MAX_BODY}]),
        413,
        None,
    ),
]


@pytest.mark.parametrize(
    ("path", "body", "status", "param"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_bad_input_is_refused_before_any_upstream_call(
    deployment: Deployment, account: tuple[str, str], path: str, body: object, status: int, param: str | None
) -> None:
    user_id, key = account
    calls_before = deployment.upstream.stats()["requests_total"]
    content = body if isinstance(body, bytes) else orjson.dumps(body)
    response = httpx.post(
        f"{deployment.relay_url}/v1/{path}",
        content=content,
        headers={"authorization": f"Bearer {key}", "content-type": "application/json"},
        timeout=10,
    )
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    assert error["param"] == param
    assert deployment.upstream.stats()["requests_total"] == calls_before
    after = balance(deployment, user_id)
    assert (after["balance_micros"], after["reserved_micros"]) == (1_000_000, 0)


def test_an_oversized_body_without_a_length_is_cut_off(
    deployment: Deployment, account: tuple[str, str]
) -> None:
    _, key = account

    def chunks() -> Iterator[bytes]:
        yield b'{"model": "gpt-e2e", "messages": [{"role": "user", "content": "'
        for _ in range(20):
            yield b"x" * 8192
        yield b'"}]}'

    response = httpx.post(
        f"{deployment.relay_url}/v1/chat/completions",
        content=chunks(),
        headers={"authorization": f"Bearer {key}", "content-type": "application/json"},
        timeout=10,
    )
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "payload_too_large"


def test_a_missing_key_is_refused_before_the_body_is_read(deployment: Deployment) -> None:
    response = httpx.post(f"{deployment.relay_url}/v1/chat/completions", content=b"not even json", timeout=10)
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [("GET", "/v1/chat/completions", 405), ("POST", "/v1/nothing-here", 404), ("DELETE", "/v1/models", 405)],
)
def test_unknown_routes_and_methods_answer_in_openai_shape(
    deployment: Deployment, method: str, path: str, status: int
) -> None:
    response = httpx.request(method, f"{deployment.relay_url}{path}", timeout=10)
    assert response.status_code == status
    if status == 405:
        assert response.headers["allow"]
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}
