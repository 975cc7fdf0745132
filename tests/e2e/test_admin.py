"""The admin surface end to end: tokens and scopes, the `relaygate admin` command line, key rotation,
and no plaintext key in any service log."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import httpx

from tests.e2e.stack import MODEL, Deployment


def cli(deployment: Deployment, *args: str) -> Any:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "services.cli",
            "admin",
            "--url",
            deployment.relay_url,
            "--key",
            deployment.admin_key,
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def chat_status(deployment: Deployment, key: str) -> int:
    response = httpx.post(
        f"{deployment.relay_url}/v1/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
        headers={"authorization": f"Bearer {key}"},
        timeout=10,
    )
    return response.status_code


def test_admin_api_needs_a_token_with_the_right_scope(deployment: Deployment) -> None:
    url = f"{deployment.relay_url}/admin/v1/users"
    key_as_bearer = httpx.get(url, headers={"authorization": f"Bearer {deployment.admin_key}"}, timeout=10)
    assert key_as_bearer.status_code == 401
    assert "/admin/v1/tokens" in key_as_bearer.json()["error"]["message"]
    assert httpx.get(url, timeout=10).status_code == 401
    assert httpx.get(url, headers={"authorization": "Bearer not.a.token"}, timeout=10).status_code == 401

    read_only = httpx.post(
        f"{deployment.relay_url}/admin/v1/tokens",
        json={"scopes": ["admin:read"], "ttl_seconds": 60},
        headers={"authorization": f"Bearer {deployment.admin_key}"},
        timeout=10,
    )
    assert read_only.status_code == 201, read_only.text
    headers = {"authorization": f"Bearer {read_only.json()['token']}"}
    assert httpx.get(url, headers=headers, timeout=10).status_code == 200
    denied = httpx.post(url, json={"name": "nope"}, headers=headers, timeout=10)
    assert denied.status_code == 403
    assert denied.json()["error"]["code"] == "permission_denied"


def test_cli_manages_keys_and_rotation_takes_effect(deployment: Deployment) -> None:
    user = cli(deployment, "users", "create", "--name", "cli-user", "--rpm", "100")
    assert user["limits"]["rpm"] in ("100", 100)
    cli(deployment, "topup", user["user_id"], "2000000", "--reason", "cli test")
    assert int(cli(deployment, "balance", user["user_id"])["balance_micros"]) == 2_000_000
    created = cli(deployment, "keys", "create", "--user", user["user_id"], "--name", "cli", "--models", MODEL)
    first_key = created["api_key"]
    assert chat_status(deployment, first_key) == 200

    rotated = cli(deployment, "keys", "rotate", created["key"]["key_id"])
    second_key = rotated["api_key"]
    assert second_key != first_key
    assert chat_status(deployment, first_key) == 401
    assert chat_status(deployment, second_key) == 200

    listed = cli(deployment, "keys", "list", "--user", user["user_id"])
    assert [k["key_id"] for k in listed["keys"]] == [created["key"]["key_id"]]
    assert "api_key" not in json.dumps(listed)

    cli(deployment, "keys", "revoke", created["key"]["key_id"])
    assert chat_status(deployment, second_key) == 401

    patched = httpx.patch(
        f"{deployment.relay_url}/admin/v1/keys/{created['key']['key_id']}",
        json={"name": "renamed"},
        headers={"authorization": f"Bearer {deployment.admin_token()}"},
        timeout=10,
    )
    assert patched.status_code == 200, patched.text
    assert patched.json()["name"] == "renamed"

    secrets = [first_key, second_key, deployment.admin_key]
    for secret in secrets:
        # The parts too: a log must not carry the secret half of a key on its own either.
        for fragment in (secret, secret.rsplit("-", 1)[-1]):
            for process in deployment.stack.processes:
                assert fragment not in process.log_path.read_text(errors="replace"), process.name


def test_budget_set_through_the_admin_api_refuses_and_the_books_reconcile(deployment: Deployment) -> None:
    from tests.e2e.stack import fund_user

    user_id, key = fund_user(deployment, 10_000_000)
    headers = {"authorization": f"Bearer {deployment.admin_token()}"}
    budget_url = f"{deployment.relay_url}/admin/v1/budgets/user/{user_id}"
    # A request holds ~34 micro-units (its prompt bound and 2 output tokens) and is charged ~20.
    response = httpx.put(f"{budget_url}/day", json={"limit_micros": 100}, headers=headers, timeout=10)
    assert response.status_code == 200, response.text

    statuses = [chat_status(deployment, key) for _ in range(12)]
    assert statuses[0] == 200
    assert 429 in statuses
    refused = httpx.post(
        f"{deployment.relay_url}/v1/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
        headers={"authorization": f"Bearer {key}"},
        timeout=10,
    )
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "budget_exceeded"

    status = httpx.get(budget_url, params={"consistent": "true"}, headers=headers, timeout=10).json()
    day = next(b for b in status["budgets"] if b["period"] == "day")
    assert 0 < int(day["spent_micros"]) <= 100
    assert int(day["reserved_micros"]) == 0

    books = httpx.get(
        f"{deployment.relay_url}/admin/v1/reconcile",
        params={"consistent": "true"},
        headers=headers,
        timeout=60,
    )
    assert books.status_code == 200, books.text
    assert books.json().get("discrepancies", []) == []


def test_channel_status_and_breaker_reset(deployment: Deployment) -> None:
    from tests.e2e.stack import fund_user

    _, key = fund_user(deployment, 1_000_000)
    assert chat_status(deployment, key) == 200
    headers = {"authorization": f"Bearer {deployment.admin_token()}"}
    status = httpx.get(f"{deployment.relay_url}/admin/v1/channels/status", headers=headers, timeout=10)
    assert status.status_code == 200, status.text
    [channel] = status.json()["channels"]
    reset = httpx.post(
        f"{deployment.relay_url}/admin/v1/channels/{channel['channel_id']}/breaker/reset",
        headers=headers,
        timeout=10,
    )
    assert reset.status_code == 200, reset.text
    missing = httpx.post(
        f"{deployment.relay_url}/admin/v1/channels/ch_missing/breaker/reset", headers=headers, timeout=10
    )
    assert missing.status_code == 404
