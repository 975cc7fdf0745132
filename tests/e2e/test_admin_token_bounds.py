"""Admin tokens are bound to their key: its address restriction applies to the exchange and to every
use, and revoking, disabling or rotating it ends the token on every relay within a second."""

from __future__ import annotations

import time
import uuid

import httpx
import pytest

from tests.e2e.stack import Deployment, ok

pytestmark = pytest.mark.shared_stack


def admin_key(deployment: Deployment, **key_fields: object) -> tuple[str, str]:
    """A new admin user's key: (key id, plaintext)."""
    with deployment.admin() as admin:
        user = ok(
            admin.post("/admin/v1/users", json={"name": f"admin-{uuid.uuid4().hex[:6]}", "admin": True})
        )
        key = ok(admin.post("/admin/v1/keys", json={"user_id": user["user_id"], **key_fields}))
    return str(key["key"]["key_id"]), str(key["api_key"])


def exchange(url: str, key: str) -> httpx.Response:
    return httpx.post(f"{url}/admin/v1/tokens", headers={"authorization": f"Bearer {key}"}, timeout=10)


def users_status(url: str, token: str) -> int:
    response = httpx.get(f"{url}/admin/v1/users", headers={"authorization": f"Bearer {token}"}, timeout=5)
    return response.status_code


@pytest.fixture(scope="module")
def second_relay(deployment: Deployment) -> str:
    """One more relay process on the same services (stopped with the deployment)."""
    return deployment.stack.add_relay()


def test_the_exchange_and_every_use_apply_the_keys_allowed_cidrs(deployment: Deployment) -> None:
    _, elsewhere = admin_key(deployment, allowed_cidrs=["203.0.113.0/24"])
    refused = exchange(deployment.relay_url, elsewhere)
    assert refused.status_code == 403, refused.text

    key_id, loopback = admin_key(deployment, allowed_cidrs=["127.0.0.0/8"])
    issued = exchange(deployment.relay_url, loopback)
    assert issued.status_code == 201, issued.text
    token = issued.json()["token"]
    assert users_status(deployment.relay_url, token) == 200

    with deployment.admin() as admin:
        ok(admin.patch(f"/admin/v1/keys/{key_id}", json={"allowed_cidrs": ["203.0.113.0/24"]}))
    assert users_status(deployment.relay_url, token) == 403


@pytest.mark.parametrize("change", ["revoke", "disable", "rotate"])
def test_changing_the_key_ends_its_token_on_every_relay_within_a_second(
    deployment: Deployment, second_relay: str, change: str
) -> None:
    relays = [deployment.relay_url, second_relay]
    key_id, key = admin_key(deployment)
    token = exchange(deployment.relay_url, key).json()["token"]
    for url in relays:
        assert users_status(url, token) == 200

    with deployment.admin() as admin:
        changed_at = time.monotonic()
        if change == "revoke":
            ok(admin.post(f"/admin/v1/keys/{key_id}/revoke"))
        elif change == "disable":
            ok(admin.patch(f"/admin/v1/keys/{key_id}", json={"enabled": False}))
        else:
            ok(admin.post(f"/admin/v1/keys/{key_id}/rotate"))

    for url in relays:
        while users_status(url, token) != 401:
            assert time.monotonic() - changed_at < 1.0, f"{url} still accepts the token after {change}"
            time.sleep(0.02)
    assert time.monotonic() - changed_at < 1.0
