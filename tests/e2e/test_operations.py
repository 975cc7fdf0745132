"""Operations end to end on one deployment with two relays: the live performance view merges both
relays' windows (and hears the logger, quota and auth processes)."""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest

from tests.e2e.stack import MODEL, Deployment, fund_user


@pytest.fixture(scope="module")
def relays(deployment: Deployment) -> list[str]:
    """The stack's relay and one more, both posting to the same Redis."""
    if len(deployment.relay_urls) < 2:
        deployment.more_relays["relay-extra"] = deployment.stack.add_relay()
    return deployment.relay_urls


def chat(url: str, key: str, *, stream: bool = False) -> None:
    response = httpx.post(
        f"{url}/v1/chat/completions",
        json={
            "model": MODEL,
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 2,
            "stream": stream,
        },
        headers={"authorization": f"Bearer {key}"},
        timeout=10,
    )
    assert response.status_code == 200, response.text


def performance(deployment: Deployment) -> dict[str, Any]:
    with deployment.admin() as admin:
        response = admin.get("/admin/v1/performance")
    assert response.status_code == 200, response.text
    return dict(response.json())


def test_performance_view_merges_every_relay(deployment: Deployment, relays: list[str]) -> None:
    _, key = fund_user(deployment, 50_000_000)
    before = performance(deployment)["windows"]["1m"]["requests"]
    for url in relays:
        for _ in range(6):
            chat(url, key)
        for _ in range(2):
            chat(url, key, stream=True)
    sent = 8 * len(relays)
    deadline = time.monotonic() + 10
    while True:
        view = performance(deployment)
        window = view["windows"]["1m"]
        # The other relay's snapshot is at most a second old.
        if window["requests"] - before >= sent or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert window["requests"] - before == sent
    services = sorted({s["service"] for s in view["sources"]})
    assert services == ["auth", "logger", "quota", "relay"], view["sources"]
    assert view["now"]["relays"] == len(relays)
    latency = window["latency_ms"]
    assert 0 < latency["p50"] <= latency["p95"] <= latency["p99"]
    assert 0 < window["overhead_ms"]["p50"] <= latency["p50"]
    assert window["stream_ttfb_ms"]["count"] >= 2 * len(relays)
    assert window["errors"]["count"] == 0
    assert window["requests_per_s"] > 0
    assert view["percentiles"]["relative_error"] <= 0.01
    assert [c["name"] for c in view["now"]["channels"]] == ["fake"]
    assert set(view["windows"]) == {"1m", "5m", "1h"}


def test_performance_view_needs_admin_read(deployment: Deployment) -> None:
    response = httpx.get(f"{deployment.relay_url}/admin/v1/performance", timeout=10)
    assert response.status_code == 401
