"""The admin surface end to end: tokens and scopes, the `relaygate admin` command line, key rotation,
and no plaintext key in any service log."""

from __future__ import annotations

import contextlib
import io
import json
import sys
import time
from typing import Any

import httpx
import pytest

from devinfra.processes import ManagedProcess, wait_until
from services.cli import main
from tests.e2e.stack import MODEL, Deployment

pytestmark = pytest.mark.shared_stack


def cli(deployment: Deployment, *args: str) -> Any:
    """``relaygate admin --json ARGS``: the command line's own entry point, called in this process (a
    Python start per call would cost a second or more of the module's time each)."""
    out, err = io.StringIO(), io.StringIO()
    argv = ["admin", "--url", deployment.relay_url, "--key", deployment.admin_key, "--json", *args]
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    assert code == 0, err.getvalue()
    return json.loads(out.getvalue())


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

    def settled_day() -> dict[str, Any]:
        """The day budget once the usage events settled every hold (shortly after the responses)."""
        deadline = time.monotonic() + 20
        while True:
            status = httpx.get(budget_url, params={"consistent": "true"}, headers=headers, timeout=10).json()
            day: dict[str, Any] = next(b for b in status["budgets"] if b["period"] == "day")
            if int(day["reserved_micros"]) == 0 or time.monotonic() > deadline:
                return day
            time.sleep(0.1)

    statuses = [chat_status(deployment, key) for _ in range(12)]
    assert statuses[0] == 200
    assert 429 in statuses
    # Some of those were refused for holds still in flight; with every hold settled, what was spent
    # alone decides: requests are served until less than one request's hold is left, then refused.
    for _ in range(10):
        settled_day()
        refused = httpx.post(
            f"{deployment.relay_url}/v1/chat/completions",
            json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
            headers={"authorization": f"Bearer {key}"},
            timeout=10,
        )
        if refused.status_code != 200:
            break
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "budget_exceeded"

    day = settled_day()
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


def budget_caps(deployment: Deployment, scope: str, scope_id: str) -> dict[str, int]:
    shown = cli(deployment, "budgets", "show", scope, scope_id)
    return {b["period"]: int(b["limit_micros"]) for b in shown["budgets"]}


def test_budgets_given_with_a_key_or_user_are_quotas_budgets(deployment: Deployment) -> None:
    """Operators set a key's or user's budget where they create or change it (flags, or
    ``limits.*_budget_micros``); quota's budgets are the one record, shown by both routes."""
    user = cli(
        deployment, "users", "create", "--name", "capped", "--rpm", "50", "--daily-budget-micros", "900"
    )
    assert (user["limits"]["rpm"], user["limits"]["daily_budget_micros"]) == ("50", "900")
    assert user["limits"]["monthly_budget_micros"] == "0"
    assert budget_caps(deployment, "user", user["user_id"]) == {"day": 900, "month": 0}
    cli(deployment, "topup", user["user_id"], "1000000")

    created = cli(deployment, "keys", "create", "--user", user["user_id"], "--monthly-budget-micros", "1")
    key_id = created["key"]["key_id"]
    assert created["key"]["limits"]["monthly_budget_micros"] == "1"
    assert budget_caps(deployment, "key", key_id) == {"day": 0, "month": 1}
    # The key's monthly budget (1 micro-unit) is smaller than any request: refused before any upstream.
    refused = httpx.post(
        f"{deployment.relay_url}/v1/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
        headers={"authorization": f"Bearer {created['api_key']}"},
        timeout=10,
    )
    assert refused.status_code == 429, refused.text
    assert (refused.json()["error"]["code"], refused.json()["error"]["param"]) == (
        "budget_exceeded",
        "budgets.key.month",
    )

    with deployment.admin() as admin:
        url = f"/admin/v1/keys/{key_id}"
        both = admin.patch(url, json={"limits": {"rpm": 7, "daily_budget_micros": "500"}})
        assert both.status_code == 200, both.text
        limits = both.json()["limits"]
        assert (limits["rpm"], limits["daily_budget_micros"], limits["monthly_budget_micros"]) == (
            "7",
            "500",
            "1",
        )
        # Limits without budget fields change the rate limits only: the budgets stay.
        rates = admin.patch(url, json={"limits": {"rpm": 8}})
        assert rates.status_code == 200, rates.text
        assert rates.json()["limits"]["rpm"] == "8"
        assert budget_caps(deployment, "key", key_id) == {"day": 500, "month": 1}
        removed = admin.patch(url, json={"limits": {"rpm": 8, "monthly_budget_micros": 0}})
        assert removed.status_code == 200, removed.text
        assert removed.json()["limits"]["monthly_budget_micros"] == "0"
        assert chat_status(deployment, created["api_key"]) == 200

        # A budget quota would refuse is refused before auth creates anything.
        for bad in (-1, "lots", 10**16, True):
            answer = admin.post(
                "/admin/v1/keys", json={"user_id": user["user_id"], "limits": {"daily_budget_micros": bad}}
            )
            assert answer.status_code == 400, (bad, answer.text)
            assert answer.json()["error"]["param"] == "limits.daily_budget_micros"
        unknown = admin.patch("/admin/v1/keys/key_missing", json={"limits": {"daily_budget_micros": 5}})
        assert unknown.status_code == 404, unknown.text
    listed = cli(deployment, "keys", "list", "--user", user["user_id"])
    assert [k["key_id"] for k in listed["keys"]] == [key_id]
    assert budget_caps(deployment, "key", "key_missing") == {"day": 0, "month": 0}


def test_channel_status_and_breaker_reset(deployment: Deployment) -> None:
    from tests.e2e.stack import fund_user

    _, key = fund_user(deployment, 1_000_000)
    assert chat_status(deployment, key) == 200
    headers = {"authorization": f"Bearer {deployment.admin_token()}"}
    status = httpx.get(f"{deployment.relay_url}/admin/v1/channels/status", headers=headers, timeout=10)
    assert status.status_code == 200, status.text
    [channel] = [c for c in status.json()["channels"] if c["name"] == "fake"]
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


def test_a_key_whose_budget_cannot_be_stored_is_revoked(deployment: Deployment) -> None:
    """Quota down between auth creating the key and its budget being stored: the key must not stay
    usable without its cap. (Last in the module: it stops and restarts quota.)"""
    user = cli(deployment, "users", "create", "--name", "no-quota")
    stack = deployment.stack
    old = next(p for p in stack.processes if p.name == "quota")
    stack.stop_service("quota")
    try:
        with deployment.admin() as admin:
            created = admin.post(
                "/admin/v1/keys", json={"user_id": user["user_id"], "limits": {"daily_budget_micros": 100}}
            )
            assert created.status_code == 503, created.text
            assert "it was revoked" in created.json()["error"]["message"]
            assert created.headers.get("retry-after")
            capped = admin.post("/admin/v1/users", json={"name": "x", "limits": {"monthly_budget_micros": 5}})
            assert capped.status_code == 503, capped.text
            assert "PUT /admin/v1/budgets/user/" in capped.json()["error"]["message"]
    finally:
        env = stack.process_env("quota", stack.extra_env.get("quota", {}))
        new = ManagedProcess(
            "quota", [sys.executable, "-m", "services.quota"], old.log_path, env=env, port=old.port
        )
        stack.processes[stack.processes.index(old)] = new
        new.wait_listening(timeout=60)
        # Listening is not enough for the modules after this one on the shared stack: the relay's
        # channel to quota may still be backing off from the outage.
        with deployment.admin() as admin:
            wait_until(
                lambda: admin.get(f"/admin/v1/users/{user['user_id']}/balance").status_code == 200,
                timeout=30,
                what="the relay reaching quota again",
            )
    [key] = cli(deployment, "keys", "list", "--user", user["user_id"])["keys"]
    assert key["revoked"] is True
