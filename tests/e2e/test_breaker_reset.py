"""Breakers across relays: each relay trips its own breaker, the performance view shows every relay's,
and one reset call to any relay closes the breaker on all of them (published on Redis, followed by
each relay over the subscription that follows auth's key changes)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from devinfra.backing import BackingServices
from tests.db_fixtures import DbUrls
from tests.e2e.stack import MODEL, Deployment, deploy, fund_user, ok

# Three failed attempts answered to two keys open a breaker; it stays open for the whole test.
BREAKER_ENV = {
    "RELAYGATE_BREAKER_MIN_REQUESTS": "3",
    "RELAYGATE_BREAKER_MIN_CALLERS": "2",
    "RELAYGATE_BREAKER_OPEN_S": "120",
    "RELAYGATE_BREAKER_MAX_OPEN_S": "120",
    "RELAYGATE_CREDIT_LEASES": "false",
}


@pytest.fixture(scope="module")
def deployment(
    backing: BackingServices, migrated_db: DbUrls, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Deployment]:
    """Two relay processes on one deployment, both with :data:`BREAKER_ENV`."""
    with deploy(
        backing, migrated_db, tmp_path_factory.mktemp("breaker-logs"), service_env=BREAKER_ENV
    ) as running:
        running.more_relays["relay-b"] = running.stack.add_relay()
        yield running


def chat(url: str, key: str) -> int:
    response = httpx.post(
        f"{url}/v1/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": "trip"}], "max_tokens": 2},
        headers={"authorization": f"Bearer {key}"},
        timeout=10,
    )
    return response.status_code


def relay_breakers(deployment: Deployment, headers: dict[str, str]) -> list[str]:
    """The fake channel's breaker on each relay, asked of each relay itself."""
    found = []
    for url in deployment.relay_urls:
        status = ok(httpx.get(f"{url}/admin/v1/channels/status", headers=headers, timeout=10))
        [channel] = [c for c in status["channels"] if c["name"] == "fake"]
        found.append(str(channel["breaker"]))
    return found


def wait_for(check: Callable[[], Any], what: str, timeout_s: float = 15.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        found = check()
        if found:
            return found
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


def fake_channel_in_view(deployment: Deployment, headers: dict[str, str]) -> dict[str, Any]:
    view = ok(httpx.get(f"{deployment.relay_url}/admin/v1/performance", headers=headers, timeout=10))
    [channel] = [c for c in view["now"]["channels"] if c["name"] == "fake"]
    return dict(channel)


def test_one_reset_closes_the_breaker_on_every_relay(deployment: Deployment) -> None:
    assert len(deployment.relay_urls) == 2
    user_id, key = fund_user(deployment, 100_000_000)
    with deployment.admin() as admin:
        other = str(ok(admin.post("/admin/v1/keys", json={"user_id": user_id, "name": "b"}))["api_key"])
        [channel] = [c for c in ok(admin.get("/admin/v1/channels"))["channels"] if c["name"] == "fake"]
    headers = {"authorization": f"Bearer {deployment.admin_token()}"}

    deployment.upstream.configure(fail_status=500, fail_count=-1)
    for url in deployment.relay_urls:
        for caller in (key, other, key):
            assert chat(url, caller) >= 500
    assert relay_breakers(deployment, headers) == ["open", "open"]
    # The performance view shows both relays' breakers (each posts its snapshot every second).
    shown = wait_for(
        lambda: (c := fake_channel_in_view(deployment, headers))["breakers"]["open"] == 2 and c,
        "the performance view never showed both breakers open",
    )
    assert shown["channel_id"] == channel["channel_id"]
    assert sorted(r["breaker"] for r in shown["by_relay"]) == ["open", "open"]
    assert len({r["instance"] for r in shown["by_relay"]}) == 2

    deployment.upstream.configure(fail_status=None)
    # One call, to the first relay only.
    reset = httpx.post(
        f"{deployment.relay_url}/admin/v1/channels/{channel['channel_id']}/breaker/reset",
        headers=headers,
        timeout=10,
    )
    assert reset.status_code == 200, reset.text
    assert reset.json() == {"reset": True, "relays": 2}
    # The other relay applies the reset when it hears it: a round trip through Redis.
    wait_for(lambda: relay_breakers(deployment, headers) == ["closed", "closed"], "a breaker stayed open")
    for url in deployment.relay_urls:
        assert chat(url, key) == 200
    shown = wait_for(
        lambda: (c := fake_channel_in_view(deployment, headers))["breakers"]["closed"] == 2 and c,
        "the performance view never showed both breakers closed",
    )
    assert shown["breakers"]["open"] == 0


def test_resetting_an_unknown_channel_is_a_404(deployment: Deployment) -> None:
    headers = {"authorization": f"Bearer {deployment.admin_token()}"}
    missing = httpx.post(
        f"{deployment.relay_url}/admin/v1/channels/ch_missing/breaker/reset", headers=headers, timeout=10
    )
    assert missing.status_code == 404, missing.text
