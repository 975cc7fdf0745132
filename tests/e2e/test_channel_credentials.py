"""Channel credentials are write-only through the admin API and the command line: never echoed or
listed in plain text, while the relay still sends the real values upstream."""

from __future__ import annotations

import contextlib
import io
import json
from typing import Any

import httpx
import pytest

from services.cli import main
from tests.e2e.stack import PRICE, Deployment, fund_user, ok

pytestmark = pytest.mark.shared_stack

MODEL = "gpt-credentials"
API_KEY = "sk-live-0123456789abcdefghijklmnopqrstuvwxyz"
HEADERS = {
    "api-key": "azure-0123456789abcdefghijklmnop",
    "x-api-key": "short-secret",
    "x-session-token": "tok-abcdefghijklmnopqrstuvwxyz",
    "x-proxy": "Bearer proxy-credential-0123456789",
    "anthropic-version": "2023-06-01",
}
SECRETS = [API_KEY, *(value for name, value in HEADERS.items() if name != "anthropic-version")]


def shows_no_secret(text: str) -> None:
    for secret in SECRETS:
        assert secret not in text
        # Not even most of it: a mask keeps at most 3 + 4 characters.
        assert secret[3:-4] not in text, secret


def upstream_headers(deployment: Deployment, key: str) -> dict[str, str]:
    response = httpx.post(
        f"{deployment.relay_url}/v1/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
        headers={"authorization": f"Bearer {key}"},
        timeout=10,
    )
    assert response.status_code == 200, response.text
    last = deployment.upstream.stats()["last_request"]
    assert last is not None
    return last["headers"]


def cli(deployment: Deployment, *args: str) -> tuple[str, Any]:
    """``relaygate admin --json ARGS`` (the command line's entry point, called in this process): all it
    printed, and its answer."""
    out, err = io.StringIO(), io.StringIO()
    argv = ["admin", "--url", deployment.relay_url, "--key", deployment.admin_key, "--json", *args]
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    assert code == 0, err.getvalue()
    return out.getvalue() + err.getvalue(), json.loads(out.getvalue())


def test_credentials_are_masked_in_answers_and_lists_but_reach_the_upstream(deployment: Deployment) -> None:
    channel = {
        "name": "credentials",
        "base_url": deployment.upstream.base_url,
        "api_key": API_KEY,
        "models": [MODEL],
        "headers": HEADERS,
        "enabled": True,
    }
    with deployment.admin() as admin:
        created = admin.post("/admin/v1/channels", json=channel)
        ok(admin.put(f"/admin/v1/prices/{MODEL}", json=PRICE))
        listed = admin.get("/admin/v1/channels")
    assert created.status_code == 201, created.text
    shows_no_secret(created.text)
    shows_no_secret(listed.text)
    shown = next(c for c in listed.json()["channels"] if c["channel_id"] == created.json()["channel_id"])
    assert shown == created.json()
    assert shown["api_key"] == "sk-…wxyz"
    assert shown["headers"] == {
        "api-key": "azu…mnop",
        "x-api-key": "…",
        "x-session-token": "tok…wxyz",
        "x-proxy": "Bea…6789",
        "anthropic-version": "2023-06-01",
    }

    _, key = fund_user(deployment, 1_000_000)
    sent = upstream_headers(deployment, key)
    assert sent["authorization"] == f"Bearer {API_KEY}"
    assert {name: sent[name] for name in HEADERS} == HEADERS

    # The listed channel sent back with a change keeps its stored credentials.
    with deployment.admin() as admin:
        ok(admin.post("/admin/v1/channels", json={**shown, "weight": 7}))
        relisted = ok(admin.get("/admin/v1/channels"))
    assert next(c for c in relisted["channels"] if c["channel_id"] == shown["channel_id"])["weight"] == 7
    sent = upstream_headers(deployment, key)
    assert sent["authorization"] == f"Bearer {API_KEY}"
    assert {name: sent[name] for name in HEADERS} == HEADERS


def test_a_mask_that_is_not_the_channels_own_is_refused(deployment: Deployment) -> None:
    with deployment.admin() as admin:
        copied = admin.post(
            "/admin/v1/channels",
            json={
                "name": "copied-mask",
                "base_url": deployment.upstream.base_url,
                "api_key": "sk-…wxyz",
                "models": ["gpt-copied"],
            },
        )
        in_url = admin.post(
            "/admin/v1/channels",
            json={
                "name": "url-credentials",
                "base_url": deployment.upstream.base_url.replace("http://", "http://user:hunter2@"),
                "models": ["gpt-url"],
            },
        )
        key_in_query = admin.post(
            "/admin/v1/channels",
            json={
                "name": "query-credentials",
                "base_url": deployment.upstream.base_url + "?api_key=hunter2",
                "models": ["gpt-url"],
            },
        )
    assert copied.status_code == 400 and copied.json()["error"]["param"] == "api_key"
    assert in_url.status_code == 400 and "hunter2" not in in_url.text
    assert key_in_query.status_code == 400 and "hunter2" not in key_in_query.text


def test_the_command_line_shows_only_masks(deployment: Deployment) -> None:
    output, added = cli(
        deployment,
        "channels",
        "add",
        "--name",
        "cli-credentials",
        "--base-url",
        deployment.upstream.base_url,
        "--models",
        "gpt-cli",
        "--api-key",
        API_KEY,
        "--header",
        f"x-api-key={HEADERS['x-api-key']}",
        "--header",
        "anthropic-version=2023-06-01",
    )
    shows_no_secret(output)
    assert added["api_key"] == "sk-…wxyz"
    assert added["headers"] == {"x-api-key": "…", "anthropic-version": "2023-06-01"}
    output, listing = cli(deployment, "channels", "list")
    shows_no_secret(output)
    assert {c["api_key"] for c in listing["channels"] if c["name"] == "cli-credentials"} == {"sk-…wxyz"}
