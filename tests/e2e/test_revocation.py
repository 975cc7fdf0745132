"""A key changed through the admin API is refused by every relay process within a second, although relays
that follow auth's invalidations trust a verified key for minutes (``RELAYGATE_AUTH_CACHE_TTL_S``)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest

from tests.e2e.stack import MODEL, Deployment, fund_user, ok

pytestmark = pytest.mark.shared_stack

FOLLOWED = "relaygate_relay_key_invalidations_followed"


def chat_status(url: str, key: str) -> int:
    response = httpx.post(
        f"{url}/v1/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
        headers={"authorization": f"Bearer {key}"},
        timeout=10,
    )
    return response.status_code


def follows_invalidations(url: str) -> bool:
    metrics = httpx.get(f"{url}/metrics", timeout=5).text
    return any(line.split() == [FOLLOWED, "1.0"] for line in metrics.splitlines())


@pytest.fixture(scope="module")
def relays(deployment: Deployment) -> Iterator[list[str]]:
    """Two relay processes of one deployment, both following auth's invalidations (so on the long TTL)."""
    urls = [deployment.relay_url, deployment.stack.add_relay()]
    deadline = time.monotonic() + 10
    while not all(follows_invalidations(url) for url in urls):
        assert time.monotonic() < deadline, "a relay does not follow key invalidations"
        time.sleep(0.05)
    yield urls


def key_id_of(deployment: Deployment, key: str) -> str:
    with deployment.admin() as admin:
        listed = ok(admin.get("/admin/v1/keys", params={"limit": 1000}))["keys"]
    return next(str(k["key_id"]) for k in listed if key.startswith(k["display_prefix"].rstrip("…")))


def refused_everywhere_within_a_second(relays: list[str], key: str, status: int, changed_at: float) -> None:
    for url in relays:
        while chat_status(url, key) != status:
            assert time.monotonic() - changed_at < 1.0, f"{url} still serves the key as it was"
            time.sleep(0.02)
    assert time.monotonic() - changed_at < 1.0


def test_revocation_reaches_every_relay_within_one_second(deployment: Deployment, relays: list[str]) -> None:
    _, key = fund_user(deployment, 1_000_000)
    for url in relays:  # each relay now holds the principal in its cache
        assert chat_status(url, key) == 200
    key_id = key_id_of(deployment, key)

    with deployment.admin() as admin:
        revoked_at = time.monotonic()
        ok(admin.post(f"/admin/v1/keys/{key_id}/revoke"))

    refused_everywhere_within_a_second(relays, key, 401, revoked_at)


def test_a_narrowed_model_list_reaches_every_relay_within_one_second(
    deployment: Deployment, relays: list[str]
) -> None:
    _, key = fund_user(deployment, 1_000_000)
    for url in relays:
        assert chat_status(url, key) == 200
    key_id = key_id_of(deployment, key)

    with deployment.admin() as admin:
        changed_at = time.monotonic()
        ok(admin.patch(f"/admin/v1/keys/{key_id}", json={"allowed_models": ["some-other-model"]}))

    refused_everywhere_within_a_second(relays, key, 403, changed_at)
