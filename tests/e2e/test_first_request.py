"""One real request through relay → auth → quota → upstream → Kafka → logger → database, with every
service in its own process on real PostgreSQL (primary + replica), Redis and the broker."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from services.common.config import normalize_database_url
from tests.e2e.stack import MODEL, PRICE, Deployment, balance, fund_user

pytestmark = pytest.mark.shared_stack

T = TypeVar("T")


def chat(url: str, key: str | None, body: object, **headers: str) -> httpx.Response:
    if key is not None:
        headers["authorization"] = f"Bearer {key}"
    content = body if isinstance(body, bytes) else None
    return httpx.post(
        f"{url}/v1/chat/completions",
        content=content,
        json=None if content is not None else body,
        headers={"content-type": "application/json", **headers},
        timeout=10,
    )


def expected_cost(usage: dict[str, int]) -> int:
    micro = (
        usage["prompt_tokens"] * PRICE["input_per_mtok"]
        + usage["completion_tokens"] * PRICE["output_per_mtok"]
    )
    return -(-micro // 1_000_000)


def wait_for(predicate: Callable[[], T | None], timeout: float = 15.0) -> T:
    """``predicate``'s first truthy answer, polled for up to ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.1)


async def test_chat_completion_travels_the_whole_path(deployment: Deployment) -> None:
    user_id, key = fund_user(deployment, 1_000_000)
    before = balance(deployment, user_id)
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "say hello to the gateway"}],
        "max_tokens": 8,
    }

    response = chat(deployment.relay_url, key, body)

    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["object"] == "chat.completion"
    assert answer["model"] == MODEL
    assert answer["choices"][0]["message"]["content"].split() == [f"tok{i}" for i in range(8)]
    # The upstream saw the caller's request as sent, and answered with the usage we bill.
    last_request = deployment.upstream.stats()["last_request"]
    assert last_request is not None
    assert last_request["body"] == body
    usage = answer["usage"]
    assert usage["completion_tokens"] == 8
    request_id = response.headers["x-request-id"]

    # The usage event settles the hold in quota's consumer, shortly after the response.
    def settled() -> dict[str, int] | None:
        now = balance(deployment, user_id)
        return now if now["reserved_micros"] == 0 else None

    after = wait_for(settled)
    assert isinstance(after, dict)
    assert before["balance_micros"] - after["balance_micros"] == expected_cost(usage)

    with deployment.admin() as admin:

        def logged() -> list[dict[str, Any]]:
            page = admin.get("/admin/v1/logs", params={"user_id": user_id}).json()
            return list(page.get("logs", []))

        rows = wait_for(logged)
    assert isinstance(rows, list) and len(rows) == 1
    row = rows[0]
    assert row["event_id"] == request_id
    assert int(row["cost_micros"]) == expected_cost(usage)
    assert row["usage"]["completion_tokens"] == "8" or row["usage"]["completion_tokens"] == 8

    # The row the logger wrote from the Kafka event is readable on the replica.
    engine = create_async_engine(normalize_database_url(deployment.db.replica))
    try:
        async with engine.connect() as conn:
            assert await conn.scalar(text("SELECT pg_is_in_recovery()")) is True
            count = await conn.scalar(
                text("SELECT count(*) FROM request_logs WHERE event_id = :id AND cost_micros = :cost"),
                {"id": request_id, "cost": expected_cost(usage)},
            )
    finally:
        await engine.dispose()
    assert count == 1

    # The hourly rollup the logger kept in the same transaction answers the usage summary.
    with deployment.admin() as admin:
        summary = admin.get("/admin/v1/usage", params={"group_by": "user,model", "user_id": user_id}).json()
    assert [
        (b["user_id"], b["model"], int(b["requests"]), int(b["cost_micros"])) for b in summary["buckets"]
    ] == [(user_id, MODEL, 1, expected_cost(usage))]


@pytest.mark.parametrize(
    ("key_kind", "body", "status", "code"),
    [
        pytest.param(
            "valid", b'{"model": "gpt-e2e", "messages": [', 400, "invalid_request", id="malformed-json"
        ),
        pytest.param(
            "valid", b'{"model": "gpt-e2e", "messages": "\xff\xfe"}', 400, "invalid_request", id="bad-utf8"
        ),
        pytest.param("valid", {"model": MODEL, "messages": "hi"}, 400, "invalid_request", id="wrong-type"),
        pytest.param(
            "valid", {"messages": [{"role": "user", "content": "x"}]}, 400, "invalid_request", id="no-model"
        ),
        pytest.param(
            "none",
            {"model": MODEL, "messages": [{"role": "user", "content": "x"}]},
            401,
            "invalid_api_key",
            id="missing-key",
        ),
        pytest.param(
            "bogus",
            {"model": MODEL, "messages": [{"role": "user", "content": "x"}]},
            401,
            "invalid_api_key",
            id="invalid-key",
        ),
        pytest.param(
            "valid",
            {"model": "no-such-model", "messages": [{"role": "user", "content": "x"}]},
            404,
            "model_not_found",
            id="unknown-model",
        ),
    ],
)
def test_bad_input_gets_openai_errors_and_no_upstream_call(
    deployment: Deployment, key_kind: str, body: object, status: int, code: str
) -> None:
    user_id, key = fund_user(deployment, 1_000_000)
    api_key = {"valid": key, "none": None, "bogus": "rg-AAAAAAAAAAAA-" + "B" * 32}[key_kind]
    calls_before = deployment.upstream.stats()["requests_total"]

    response = chat(deployment.relay_url, api_key, body)

    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code
    assert error["message"]
    assert deployment.upstream.stats()["requests_total"] == calls_before
    assert balance(deployment, user_id)["balance_micros"] == 1_000_000


def test_openai_sdk_call(deployment: Deployment) -> None:
    import openai

    _, key = fund_user(deployment, 1_000_000)
    client = openai.OpenAI(base_url=f"{deployment.relay_url}/v1", api_key=key, max_retries=0)
    completion = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hello"}], max_tokens=4
    )
    assert completion.choices[0].message.content is not None
    assert completion.usage is not None and completion.usage.completion_tokens == 4
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{deployment.relay_url}/v1", api_key="rg-nope", max_retries=0).models.list()
