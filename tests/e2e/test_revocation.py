"""A revoked key is refused by every relay process within a second, not after a cache TTL."""

from __future__ import annotations

import time

import httpx

from tests.e2e.stack import MODEL, Deployment, fund_user, ok


def models_status(url: str, key: str) -> int:
    return httpx.get(f"{url}/v1/models", headers={"authorization": f"Bearer {key}"}, timeout=5).status_code


def test_revocation_reaches_every_relay_within_one_second(deployment: Deployment) -> None:
    second_relay = deployment.stack.add_relay()
    relays = [deployment.relay_url, second_relay]
    _, key = fund_user(deployment, 1_000_000)
    # Both relays now hold the principal in their caches (TTL 5 s by default).
    for url in relays:
        assert models_status(url, key) == 200
        response = httpx.post(
            f"{url}/v1/chat/completions",
            json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
            headers={"authorization": f"Bearer {key}"},
            timeout=10,
        )
        assert response.status_code == 200, response.text

    with deployment.admin() as admin:
        key_id = next(
            k["key_id"]
            for k in ok(admin.get("/admin/v1/keys", params={"limit": 1000}))["keys"]
            if key.startswith(k["display_prefix"].rstrip("…"))
        )
        revoked_at = time.monotonic()
        ok(admin.post(f"/admin/v1/keys/{key_id}/revoke"))

    for url in relays:
        while models_status(url, key) != 401:
            assert time.monotonic() - revoked_at < 1.0, f"{url} still accepts a revoked key"
            time.sleep(0.02)
    assert time.monotonic() - revoked_at < 1.0
