"""The response cache through the whole stack: opt-in by header or key metadata, deterministic
requests only, scoped to the key, hits free and marked, and Redis trouble never failing a request."""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest

from devinfra.backing import BackingServices
from tests.e2e.stack import MODEL, Deployment, fund_user, settled_balance

pytestmark = pytest.mark.shared_stack


@pytest.fixture(autouse=True)
def _fresh_upstream(deployment: Deployment) -> None:
    deployment.upstream.reset()
    deployment.upstream.configure(deterministic=True)


def post(deployment: Deployment, key: str, path: str, body: dict[str, Any], **headers: str) -> httpx.Response:
    return httpx.post(
        f"{deployment.relay_url}/v1/{path}",
        json=body,
        headers={"authorization": f"Bearer {key}", **headers},
        timeout=10,
    )


def chat(content: str, **extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 6, **extra}


def calls(deployment: Deployment) -> int:
    return deployment.upstream.stats()["requests_total"]


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


def test_a_repeated_deterministic_request_is_served_from_the_cache_for_free(deployment: Deployment) -> None:
    user_id, key = fund_user(deployment, 10_000_000)
    body = chat("cache me", temperature=0)

    first = post(deployment, key, "chat/completions", body, **{"x-relaygate-cache": "on"})
    charged = 10_000_000 - settled_balance(deployment, user_id)["balance_micros"]
    second = post(deployment, key, "chat/completions", body, **{"x-relaygate-cache": "on"})

    assert (first.status_code, second.status_code) == (200, 200)
    assert first.headers["x-relaygate-cache"] == "miss"
    assert second.headers["x-relaygate-cache"] == "hit"
    assert second.content == first.content
    assert calls(deployment) == 1
    assert charged > 0
    assert 10_000_000 - settled_balance(deployment, user_id)["balance_micros"] == charged
    rows = sorted(logged(deployment, user_id, 2), key=lambda r: r["event_id"])
    assert [r.get("cached", False) for r in rows] == [False, True]
    assert int(rows[1].get("cost_micros", 0)) == 0
    assert rows[1]["usage"] == rows[0]["usage"]


def test_key_metadata_opts_in_and_the_header_opts_out(deployment: Deployment) -> None:
    _, key = fund_user(deployment, 10_000_000, metadata={"cache": "on"})
    body = chat("by metadata", temperature=0)
    assert post(deployment, key, "chat/completions", body).headers["x-relaygate-cache"] == "miss"
    assert post(deployment, key, "chat/completions", body).headers["x-relaygate-cache"] == "hit"
    bypass = post(deployment, key, "chat/completions", body, **{"x-relaygate-cache": "off"})
    assert "x-relaygate-cache" not in bypass.headers
    assert calls(deployment) == 2


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param({}, id="temperature-absent"),
        pytest.param({"temperature": 0.7}, id="temperature-nonzero"),
        pytest.param({"temperature": 0, "n": 2}, id="several-choices"),
    ],
)
def test_non_deterministic_requests_are_never_cached(deployment: Deployment, extra: dict[str, Any]) -> None:
    _, key = fund_user(deployment, 10_000_000)
    body = chat("not cacheable", **extra)
    for _ in range(2):
        response = post(deployment, key, "chat/completions", body, **{"x-relaygate-cache": "on"})
        assert response.status_code == 200
        assert "x-relaygate-cache" not in response.headers
    assert calls(deployment) == 2


def test_entries_are_scoped_to_the_key(deployment: Deployment) -> None:
    _, first = fund_user(deployment, 10_000_000)
    _, second = fund_user(deployment, 10_000_000)
    body = chat("scoped", temperature=0)
    post(deployment, first, "chat/completions", body, **{"x-relaygate-cache": "on"})
    assert (
        post(deployment, second, "chat/completions", body, **{"x-relaygate-cache": "on"}).headers[
            "x-relaygate-cache"
        ]
        == "miss"
    )
    assert calls(deployment) == 2


def test_embeddings_are_cacheable(deployment: Deployment) -> None:
    _, key = fund_user(deployment, 10_000_000)
    body = {"model": MODEL, "input": ["same", "text"]}
    first = post(deployment, key, "embeddings", body, **{"x-relaygate-cache": "on"})
    second = post(deployment, key, "embeddings", body, **{"x-relaygate-cache": "on"})
    assert second.headers["x-relaygate-cache"] == "hit"
    assert second.json() == first.json()
    assert calls(deployment) == 1


def test_redis_down_is_a_miss_not_a_failure(deployment: Deployment, backing: BackingServices) -> None:
    _, key = fund_user(deployment, 10_000_000)
    body = chat("redis away", temperature=0)
    post(deployment, key, "chat/completions", body, **{"x-relaygate-cache": "on"})
    backing.stop_redis()
    try:
        response = post(deployment, key, "chat/completions", body, **{"x-relaygate-cache": "on"})
    finally:
        backing.start_redis()
    assert response.status_code == 200, response.text
    assert response.headers["x-relaygate-cache"] == "miss"
    assert calls(deployment) == 2
