"""Failover across channels through the whole stack: a primary channel that fails (5xx, silence, a
dropped connection) hands the request to the backup, the caller is billed once, caller errors are
never retried, and the primary's circuit breaker opens and half-opens."""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from services.fake_upstream import FakeUpstream
from tests.e2e.stack import PRICE, Deployment, balance, fund_user, ok, settled_balance

pytestmark = pytest.mark.shared_stack

RELAY_ENV = {
    "RELAYGATE_BREAKER_MIN_REQUESTS": "3",
    "RELAYGATE_BREAKER_FAILURE_RATIO": "0.5",
    "RELAYGATE_BREAKER_WINDOW_S": "30",
    "RELAYGATE_BREAKER_OPEN_S": "1",
    "RELAYGATE_BREAKER_MAX_OPEN_S": "4",
    # These tests count holds after each request: exact reservations only (tests/e2e/test_leases.py
    # covers leases, whose hold stays until the key goes quiet).
    "RELAYGATE_CREDIT_LEASES": "false",
}


@pytest.fixture(scope="module")
def relay_env() -> dict[str, str]:
    return RELAY_ENV


@pytest.fixture(scope="module")
def backup_upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream() as upstream:
        yield upstream


@dataclass
class Pair:
    """A model served by a primary channel (priority 10) and a backup channel (priority 0)."""

    model: str
    primary: FakeUpstream
    backup: FakeUpstream
    primary_name: str
    backup_id: str


@pytest.fixture
def pair(deployment: Deployment, backup_upstream: FakeUpstream) -> Pair:
    deployment.upstream.reset()
    backup_upstream.reset()
    tag = uuid.uuid4().hex[:6]
    model = f"gpt-failover-{tag}"
    with deployment.admin() as admin:
        ok(admin.put(f"/admin/v1/prices/{model}", json=PRICE))
        ok(
            admin.post(
                "/admin/v1/channels",
                json={
                    "name": f"primary-{tag}",
                    "base_url": deployment.upstream.base_url,
                    "models": [model],
                    "priority": 10,
                    "first_byte_timeout_ms": 500,
                    "enabled": True,
                },
            )
        )
        backup = ok(
            admin.post(
                "/admin/v1/channels",
                json={
                    "name": f"backup-{tag}",
                    "base_url": backup_upstream.base_url,
                    "models": [model],
                    "enabled": True,
                },
            )
        )
    return Pair(model, deployment.upstream, backup_upstream, f"primary-{tag}", str(backup["channel_id"]))


def chat(deployment: Deployment, key: str, model: str, **extra: Any) -> httpx.Response:
    return httpx.post(
        f"{deployment.relay_url}/v1/chat/completions",
        json={
            "model": model,
            "messages": [{"role": "user", "content": "fail over"}],
            "max_tokens": 4,
            **extra,
        },
        headers={"authorization": f"Bearer {key}"},
        timeout=10,
    )


def calls(upstream: FakeUpstream) -> int:
    return upstream.stats()["requests_total"]


def cost(usage: dict[str, Any]) -> int:
    micro: int = (
        usage["prompt_tokens"] * PRICE["input_per_mtok"]
        + usage["completion_tokens"] * PRICE["output_per_mtok"]
    )
    return -(-micro // 1_000_000)


def logged(deployment: Deployment, user_id: str, count: int, timeout: float = 15.0) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    with deployment.admin() as admin:
        while True:
            rows: list[dict[str, Any]] = (
                admin.get("/admin/v1/logs", params={"user_id": user_id}).json().get("logs", [])
            )
            if len(rows) >= count:
                return rows
            assert time.monotonic() < deadline, f"{len(rows)} of {count} log rows"
            time.sleep(0.1)


def another_key(deployment: Deployment, user_id: str) -> str:
    """A second key of ``user_id``: an outage shows as 5xx answers to more than one caller."""
    with deployment.admin() as admin:
        return str(ok(admin.post("/admin/v1/keys", json={"user_id": user_id, "name": "e2e-2"}))["api_key"])


def breaker_state(deployment: Deployment, channel: str) -> float:
    metrics = httpx.get(f"{deployment.relay_url}/metrics", timeout=5).text
    found = re.search(rf'relaygate_breaker_state{{channel="{re.escape(channel)}"}} (\S+)', metrics)
    assert found, f"no breaker gauge for {channel}"
    return float(found.group(1))


@pytest.mark.parametrize(
    "failure",
    [
        pytest.param({"fail_status": 500}, id="5xx"),
        pytest.param({"hang": True}, id="first-byte-timeout"),
        pytest.param({"drop_connection": True}, id="dropped-connection"),
    ],
)
def test_the_backup_answers_and_the_caller_is_billed_once(
    deployment: Deployment, pair: Pair, failure: dict[str, Any]
) -> None:
    user_id, key = fund_user(deployment, 10_000_000)
    pair.primary.configure(fail_count=1, **failure)

    response = chat(deployment, key, pair.model)

    assert response.status_code == 200, response.text
    assert (calls(pair.primary), calls(pair.backup)) == (1, 1)
    usage = response.json()["usage"]
    after = settled_balance(deployment, user_id)
    assert (10_000_000 - after["balance_micros"], after["reserved_micros"]) == (cost(usage), 0)
    (row,) = logged(deployment, user_id, 1)
    assert (row["attempts"], row["channel_id"], int(row["cost_micros"])) == (2, pair.backup_id, cost(usage))


def test_a_stream_fails_over_before_its_first_byte(deployment: Deployment, pair: Pair) -> None:
    _, key = fund_user(deployment, 10_000_000)
    pair.primary.configure(fail_status=503, fail_count=1)
    with httpx.stream(
        "POST",
        f"{deployment.relay_url}/v1/chat/completions",
        json={"model": pair.model, "messages": [{"role": "user", "content": "x"}], "stream": True},
        headers={"authorization": f"Bearer {key}"},
        timeout=10,
    ) as response:
        assert response.status_code == 200
        assert b"".join(response.iter_raw()).endswith(b"data: [DONE]\n\n")
    assert (calls(pair.primary), calls(pair.backup)) == (1, 1)


def test_caller_errors_are_never_retried(deployment: Deployment, pair: Pair) -> None:
    user_id, key = fund_user(deployment, 10_000_000)
    pair.primary.configure(fail_status=400, fail_count=1)
    response = chat(deployment, key, pair.model)
    assert response.status_code == 400
    assert response.json()["error"]["message"] == "Injected bad request."
    assert (calls(pair.primary), calls(pair.backup)) == (1, 0)
    assert balance(deployment, user_id)["balance_micros"] == 10_000_000
    (row,) = logged(deployment, user_id, 1)
    assert row["error_type"] == "caller"


def test_when_every_channel_fails_nothing_is_billed(deployment: Deployment, pair: Pair) -> None:
    user_id, key = fund_user(deployment, 10_000_000)
    pair.primary.configure(fail_status=500, fail_count=-1)
    pair.backup.configure(fail_status=502, fail_count=-1)
    response = chat(deployment, key, pair.model)
    assert response.status_code == 502
    after = settled_balance(deployment, user_id)
    assert (after["balance_micros"], after["reserved_micros"]) == (10_000_000, 0)
    (row,) = logged(deployment, user_id, 1)
    assert (row["error_type"], row["end_reason"], row["attempts"]) == ("provider", "upstream_error", 2)


def test_the_breaker_opens_half_opens_and_closes(deployment: Deployment, pair: Pair) -> None:
    user_id, key = fund_user(deployment, 100_000_000)
    pair.primary.configure(fail_status=500, fail_count=-1)

    # Three failures out of three attempts, answered to two keys: the primary's breaker opens.
    for caller in (key, another_key(deployment, user_id), key):
        assert chat(deployment, caller, pair.model).status_code == 200
    assert calls(pair.primary) == 3
    assert breaker_state(deployment, pair.primary_name) == 2

    # While open, requests go straight to the backup.
    for _ in range(5):
        assert chat(deployment, key, pair.model).status_code == 200
    assert calls(pair.primary) == 3

    # After the cool-down one probe goes to the primary; it fails, so the breaker reopens for longer.
    time.sleep(1.1)
    assert chat(deployment, key, pair.model).status_code == 200
    assert calls(pair.primary) == 4
    assert breaker_state(deployment, pair.primary_name) == 2
    time.sleep(1.1)
    assert chat(deployment, key, pair.model).status_code == 200
    assert calls(pair.primary) == 4  # the doubled cool-down (2 s) is not over yet

    # The primary recovers: the next probe succeeds and the breaker closes.
    pair.primary.configure(fail_status=None)
    time.sleep(1.0)
    before_backup = calls(pair.backup)
    for _ in range(3):
        assert chat(deployment, key, pair.model).status_code == 200
    assert calls(pair.primary) == 7
    assert calls(pair.backup) == before_backup
    assert breaker_state(deployment, pair.primary_name) == 0

    # 13 requests, each billed once; no hold left.
    rows = logged(deployment, user_id, 13)
    assert len(rows) == 13
    after = balance(deployment, user_id)
    assert after["reserved_micros"] == 0
    assert 100_000_000 - after["balance_micros"] == sum(int(r["cost_micros"]) for r in rows)


def test_an_open_breaker_on_every_channel_answers_503_at_once(deployment: Deployment, pair: Pair) -> None:
    user_id, key = fund_user(deployment, 100_000_000)
    pair.primary.configure(fail_status=500, fail_count=-1)
    pair.backup.configure(fail_status=500, fail_count=-1)
    for caller in (key, another_key(deployment, user_id), key):
        assert chat(deployment, caller, pair.model).status_code == 500
    before = (calls(pair.primary), calls(pair.backup))
    response = chat(deployment, key, pair.model)
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "no_upstream_available"
    assert int(response.headers["retry-after"]) >= 1
    assert (calls(pair.primary), calls(pair.backup)) == before


def test_one_key_getting_5xx_answers_does_not_open_the_breaker(deployment: Deployment, pair: Pair) -> None:
    _, key = fund_user(deployment, 100_000_000)
    pair.primary.configure(fail_status=500, fail_count=-1)
    for _ in range(6):
        assert chat(deployment, key, pair.model).status_code == 200  # each one fails over
    assert breaker_state(deployment, pair.primary_name) == 0
    assert calls(pair.primary) == 6


def test_one_key_whose_streams_break_does_not_open_the_breaker(deployment: Deployment, pair: Pair) -> None:
    _, key = fund_user(deployment, 100_000_000)
    pair.primary.configure(drop_after_chunks=2)
    for _ in range(6):
        broken = chat(deployment, key, pair.model, stream=True)
        assert broken.status_code == 200 and b"error" in broken.content
    assert breaker_state(deployment, pair.primary_name) == 0
    assert calls(pair.primary) == 6


def test_overload_does_not_open_the_breaker(deployment: Deployment, pair: Pair) -> None:
    _, key = fund_user(deployment, 100_000_000)
    pair.primary.configure(fail_status=429, retry_after=0, fail_count=-1)
    for _ in range(6):
        assert chat(deployment, key, pair.model).status_code == 200
    assert breaker_state(deployment, pair.primary_name) == 0
    assert calls(pair.primary) == 6
