"""The admin console in real headless Chromium against one deployment: an operator's day (sign in,
create a user and a key, top up, requests through the relay seen in the logs and usage, revoke the key
and see the relay refuse it, disable a channel); then who may use it and what leaks: a wrong or
non-admin key cannot sign in, a read-only session cannot write (the admin API refuses it even when the
page is bypassed), writes need the CSRF token, and neither the admin key nor the admin token appears in
the page or the relay's log."""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from pathlib import Path

import httpx
import pytest
from playwright.async_api import BrowserContext, Locator, Page, expect

from tests.console.browser import open_page, screenshot, sign_in
from tests.e2e.stack import MODEL, Deployment, fund_user, ok


@pytest.fixture(scope="module")
def relay_env() -> dict[str, str]:
    """Behind a proxy that sets X-Forwarded-For: the console's sign-in must pass the caller's address on."""
    return {"RELAYGATE_TRUST_FORWARDED_FOR": "true"}


CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hello console"}], "max_tokens": 16}


async def chat(deployment: Deployment, key: str, model: str = MODEL) -> int:
    async with httpx.AsyncClient(timeout=10) as client:
        response = await client.post(
            f"{deployment.relay_url}/v1/chat/completions",
            json={**CHAT, "model": model},
            headers={"authorization": f"Bearer {key}"},
        )
    return response.status_code


async def eventually(check: Locator, page: Page, *, refresh: str, timeout_s: float = 15.0) -> None:
    """Wait for ``check`` to be visible, pressing the ``refresh`` button between tries (request logs
    and usage rollups arrive through Kafka a moment after the request)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            await expect(check).to_be_visible(timeout=1000)
            return
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            await page.get_by_role("button", name=refresh, exact=True).click()


async def test_operator_day(console_page: Page, deployment: Deployment, screenshots: Path) -> None:
    page = console_page
    # Script errors, and anything the Content-Security-Policy blocked, fail the test at its end.
    problems: list[str] = []
    page.on("pageerror", lambda error: problems.append(str(error)))
    page.on("console", lambda m: problems.append(m.text) if "Content Security Policy" in m.text else None)
    await sign_in(page, deployment.relay_url, deployment.admin_key)
    await page.wait_for_selector("main[data-page=overview][data-ready]")
    await expect(page.locator("#whoami")).to_contain_text("read and write")

    # A user and a key for them; the key's plaintext is shown once.
    await open_page(page, "keys")
    user_name = f"alice-{uuid.uuid4().hex[:6]}"
    await page.locator("#new-user-name").fill(user_name)
    await page.locator("#new-user-email").fill(f"{user_name}@example.com")
    await page.get_by_role("button", name="Create user").click()
    user_row = page.locator("#users tr", has_text=user_name)
    await expect(user_row).to_be_visible()
    user_id = await page.locator("#new-key-user option", has_text=user_name).get_attribute("value")
    assert user_id
    await page.locator("#new-key-user").select_option(user_id)
    await page.locator("#new-key-name").fill("laptop")
    await page.get_by_role("button", name="Create key").click()
    secret = page.locator("#new-key-plaintext")
    await expect(secret).to_have_text(re.compile(r"^rg-"))
    api_key = await secret.inner_text()
    await screenshot(page, screenshots, "keys-created")
    await page.get_by_role("dialog").get_by_role("button", name="Close").click()
    await expect(page.locator("dialog")).to_have_count(0)
    assert api_key not in await page.content()

    # Credit, shown in units with thousands separators (the browser's en-US locale); the user is
    # opened from the keyboard.
    await user_row.focus()
    await page.keyboard.press("Enter")
    await page.locator("#topup-amount").fill("12345.5")
    await page.locator("#topup-reason").fill("first credit")
    await page.get_by_role("button", name="Top up", exact=True).click()
    await expect(page.locator("#user-balance")).to_have_text("12,345.50")
    await screenshot(page, screenshots, "keys-and-users")
    await page.get_by_role("dialog").get_by_role("button", name="Close").click()

    # The key's limits and budget, edited; the budget in force is read back from quota.
    key_row = page.locator("#keys tr", has_text="laptop").filter(has_text=user_name)
    await key_row.get_by_role("button", name="Edit").click()
    editing = page.get_by_role("dialog")
    await editing.get_by_label("Requests per minute").fill("1200")
    await editing.get_by_label("Daily budget (units)").fill("10")
    await editing.get_by_role("button", name="Save").click()
    await expect(key_row).to_contain_text("1,200")
    await key_row.get_by_role("button", name="Edit").click()
    await expect(page.get_by_role("dialog").locator("table")).to_contain_text("10.00")
    await screenshot(page, screenshots, "key-edit")
    await page.get_by_role("dialog").get_by_role("button", name="Close").click()

    for _ in range(3):
        assert await chat(deployment, api_key) == 200
    # And one the caller got wrong: a model nobody serves.
    assert await chat(deployment, api_key, model="no-such-model") == 404
    with deployment.admin() as admin:
        keys = ok(admin.get("/admin/v1/keys", params={"limit": 1000}))["keys"]
    key_id = next(k["key_id"] for k in keys if k["name"] == "laptop" and not k["revoked"])

    # The four requests in the logs (the caller's mistake found by its fault class), times in the
    # viewer's zone (Europe/Berlin in December: GMT+1).
    await open_page(page, "logs")
    await page.locator("#logs-key").fill(key_id)
    await page.get_by_role("button", name="Filter").click()
    rows = page.locator("#logs-table tbody tr.clickable")
    await eventually(rows.nth(3), page, refresh="Filter")
    await expect(rows).to_have_count(4)
    await page.locator("#logs-fault").select_option("caller")
    await page.get_by_role("button", name="Filter").click()
    await expect(rows).to_have_count(1)
    await expect(rows.first).to_contain_text("no-such-model")
    await page.locator("#logs-fault").select_option("")
    await page.get_by_role("button", name="Filter").click()
    await expect(rows).to_have_count(4)
    await expect(rows.first).to_contain_text("GMT+1")
    await rows.first.click()
    await expect(page.locator("#log-detail")).to_contain_text(key_id)
    await screenshot(page, screenshots, "request-log-detail")
    await page.get_by_role("dialog").get_by_role("button", name="Close").click()
    await screenshot(page, screenshots, "request-logs")

    # Usage by key: table, chart and CSV.
    await open_page(page, "usage")
    await page.locator("#usage-group").select_option("key")
    await page.get_by_role("button", name="Show").click()
    await eventually(page.locator("#usage-table tr", has_text=key_id), page, refresh="Show")
    await expect(page.locator("#usage-chart canvas")).to_be_visible()
    assert int(await page.locator("#usage-chart").get_attribute("data-points") or 0) >= 1
    async with page.expect_download() as download:
        await page.get_by_role("button", name="Export CSV").click()
    exported = Path(await (await download.value).path()).read_text()
    assert exported.startswith("Start,Group,Requests") and key_id in exported
    await screenshot(page, screenshots, "usage")

    await open_page(page, "overview")
    await expect(page.locator("#ov-spend")).not_to_have_text("0.00")
    # Live figures from the relay's performance view: the requests are in its 1-minute window.
    await expect(page.locator("#overview-source")).to_contain_text("performance view")
    await expect(page.locator("#percentiles tr", has_text="Latency").first).not_to_contain_text("\N{EN DASH}")
    await screenshot(page, screenshots, "overview")

    # Revoked in the console, refused by the relay.
    await open_page(page, "keys")
    await key_row.get_by_role("button", name="Revoke").click()
    await expect(key_row).to_contain_text("revoked")
    deadline = time.monotonic() + 5
    while (status := await chat(deployment, api_key)) == 200 and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert status == 401

    # A new version of the price, and the model's history with both, newest first.
    await open_page(page, "prices")
    await page.locator("#prices-table tbody tr", has_text=MODEL).click()
    history = page.locator("#price-history tbody tr")
    await expect(history).to_have_count(1)
    await page.locator("#price-input").fill("3.5")
    await page.get_by_role("button", name="Save price").click()
    await expect(history).to_have_count(2)
    await expect(history.first).to_contain_text("3.50")
    await expect(history.nth(1)).to_contain_text("2.00")
    await screenshot(page, screenshots, "prices")

    # A channel edited (its key left empty: the stored one stays), then disabled.
    await open_page(page, "channels")
    channel_row = page.locator("#channels-table tbody tr", has_text="fake")
    await channel_row.get_by_role("button", name="Edit").click()
    await page.get_by_role("dialog").get_by_label("Weight").fill("3")
    await page.get_by_role("dialog").get_by_role("button", name="Save").click()
    await expect(page.locator("dialog")).to_have_count(0)
    await channel_row.get_by_role("button", name="Disable").click()
    await expect(channel_row).to_contain_text("disabled")
    with deployment.admin() as admin:
        listed = ok(admin.get("/admin/v1/channels"))["channels"]
    assert [(c["enabled"], c["weight"]) for c in listed if c["name"] == "fake"] == [(False, 3)]
    await screenshot(page, screenshots, "channels")
    assert problems == []


async def test_wrong_key_cannot_sign_in(
    console_page: Page, context: BrowserContext, deployment: Deployment
) -> None:
    await sign_in(console_page, deployment.relay_url, "rg-notakey_" + "x" * 40)
    await expect(console_page.locator("#signin-error")).not_to_be_empty()
    await expect(console_page.locator("#shell")).to_be_hidden()
    assert await context.cookies() == []


async def test_non_admin_key_cannot_sign_in(
    console_page: Page, context: BrowserContext, deployment: Deployment
) -> None:
    _, user_key = fund_user(deployment, 1_000_000)
    await sign_in(console_page, deployment.relay_url, user_key)
    await expect(console_page.locator("#signin-error")).to_contain_text("admin")
    await expect(console_page.locator("#shell")).to_be_hidden()
    assert await context.cookies() == []


async def test_read_only_session_cannot_write(
    console_page: Page, deployment: Deployment, screenshots: Path
) -> None:
    page = console_page
    await sign_in(page, deployment.relay_url, deployment.admin_key, read_only=True)
    await expect(page.locator("#whoami")).to_contain_text("read only")
    await open_page(page, "keys")
    await expect(page.get_by_role("button", name="Create user")).to_be_hidden()
    await expect(page.locator("#users table")).to_be_visible()
    await screenshot(page, screenshots, "keys-read-only")
    # Past the page: the admin API itself refuses the write for the token's scopes.
    status = await page.evaluate(
        """async () => {
            const csrf = document.cookie.split("; ")
                .find((c) => c.startsWith("rg_console_csrf=")).split("=")[1];
            const r = await fetch("api/users", {method: "POST", headers: {"content-type": "application/json",
                "x-console-csrf": csrf}, body: JSON.stringify({name: "should-not-exist"})});
            return r.status;
        }"""
    )
    assert status == 403
    with deployment.admin() as admin:
        names = [u["name"] for u in admin.get("/admin/v1/users", params={"limit": 1000}).json()["users"]]
    assert "should-not-exist" not in names


async def test_no_secret_in_page_or_log(
    console_page: Page, context: BrowserContext, deployment: Deployment
) -> None:
    page = console_page
    await sign_in(page, deployment.relay_url, deployment.admin_key)
    await page.wait_for_selector("main[data-page=overview][data-ready]")
    for name in ("keys", "channels", "logs"):
        await open_page(page, name)
    token = next(c for c in await context.cookies() if c["name"] == "rg_console_token")
    assert token["httpOnly"] and token["sameSite"] == "Strict" and token["path"] == "/console/"
    seen = await page.content() + await page.evaluate(
        "() => document.cookie + JSON.stringify(localStorage) + JSON.stringify(sessionStorage)"
    )
    assert token["value"] not in seen
    assert deployment.admin_key not in seen
    logs = "".join(p.read_text(errors="replace") for p in deployment.stack.log_dir.glob("*.log"))
    assert token["value"] not in logs
    assert deployment.admin_key not in logs

    # Signing out ends the session: the cookies go, and the token itself is refused from then on (a
    # copy of it, from another tab or a leaked cookie, is no use).
    with httpx.Client(base_url=deployment.relay_url, timeout=10) as client:
        bearer = {"authorization": f"Bearer {token['value']}"}
        assert client.get("/admin/v1/users", headers=bearer).status_code == 200
        await page.get_by_role("button", name="Sign out").click()
        await expect(page.locator("#signin")).to_be_visible()
        assert [c["name"] for c in await context.cookies()] == []
        refused = client.get("/admin/v1/users", headers=bearer)
        assert refused.status_code == 401 and "signed out" in refused.text
        cookie = {"cookie": f"rg_console_token={token['value']}"}
        assert client.get("/console/api/users", headers=cookie).status_code == 401


def test_writes_need_the_csrf_token_and_the_same_origin(deployment: Deployment) -> None:
    with httpx.Client(base_url=deployment.relay_url, timeout=10) as client:
        signed_in = client.post("/console/session", json={"key": deployment.admin_key})
        assert signed_in.status_code == 200, signed_in.text
        assert "token" not in signed_in.json()
        csrf = client.cookies["rg_console_csrf"]
        body = {"name": "csrf-probe"}
        assert client.post("/console/api/users", json=body).status_code == 403
        assert (
            client.post("/console/api/users", json=body, headers={"x-console-csrf": "wrong"}).status_code
            == 403
        )
        foreign = {"x-console-csrf": csrf, "origin": "https://evil.example"}
        assert client.post("/console/api/users", json=body, headers=foreign).status_code == 403
        # A sign-in posted from another site is refused too.
        assert (
            client.post("/console/session", json={"key": deployment.admin_key}, headers=foreign).status_code
            == 403
        )
        assert client.get("/console/api/users").status_code == 200
        created = client.post("/console/api/users", json=body, headers={"x-console-csrf": csrf})
        assert created.status_code == 201, created.text
        # The console forwards to the admin API only, never to the token exchange.
        assert client.post("/console/api/tokens", headers={"x-console-csrf": csrf}).status_code == 404
        client.cookies.clear()
        assert client.get("/console/api/users").status_code == 401


def test_pages_and_files(deployment: Deployment) -> None:
    with httpx.Client(base_url=deployment.relay_url, timeout=10) as client:
        moved = client.get("/console")
        assert moved.status_code == 308 and moved.headers["location"] == "/console/"
        index = client.get("/console/")
        assert index.status_code == 200 and index.headers["content-type"].startswith("text/html")
        assert "script-src 'self'" in index.headers["content-security-policy"]
        assert index.headers["x-frame-options"] == "DENY"
        # Every file the page names is served from the package, none from elsewhere.
        for src in re.findall(r'(?:src|href)="(static/[^"]+)"', index.text):
            assert client.get(f"/console/{src}").status_code == 200, src
        assert "http" not in "".join(re.findall(r'(?:src|href)="([^"]+)"', index.text))
        head = client.head("/console/static/app.js")
        assert head.status_code == 200 and head.content == b"" and int(head.headers["content-length"]) > 0
        assert client.get("/console/static/vendor/uPlot.LICENSE").text.startswith("The MIT License")
        for missing in ("/console/static/nothing.js", "/console/static/../__init__.py", "/console/elsewhere"):
            assert client.get(missing).status_code == 404, missing
        assert client.post("/console/").status_code == 404


def test_sign_in_over_https_sets_secure_cookies(deployment: Deployment) -> None:
    """TLS usually ends at an ingress: the browser's https origin is what tells the console."""
    with httpx.Client(base_url=deployment.relay_url, timeout=10) as client:
        host = httpx.URL(deployment.relay_url).netloc.decode()
        signed_in = client.post(
            "/console/session", json={"key": deployment.admin_key}, headers={"origin": f"https://{host}"}
        )
        assert signed_in.status_code == 200, signed_in.text
        cookies = signed_in.headers.get_list("set-cookie")
        assert len(cookies) == 2 and all("; Secure" in c for c in cookies)
        plain = client.post("/console/session", json={"key": deployment.admin_key})
        assert not any("Secure" in c for c in plain.headers.get_list("set-cookie"))
        assert client.post("/console/session", json={"key": "rg-\u00e9t\u00e9"}).status_code == 400


def test_sign_in_passes_the_callers_address_on(deployment: Deployment) -> None:
    """An admin key limited to some addresses signs in from them only (X-Forwarded-For, trusted here)."""
    with deployment.admin() as admin:
        user_id = ok(admin.post("/admin/v1/users", json={"name": "netadmin", "admin": True}))["user_id"]
        created = admin.post(
            "/admin/v1/keys", json={"user_id": user_id, "name": "office", "allowed_cidrs": ["203.0.113.0/24"]}
        )
        key = ok(created)["api_key"]
    with httpx.Client(base_url=deployment.relay_url, timeout=10) as client:
        inside = client.post(
            "/console/session", json={"key": key}, headers={"x-forwarded-for": "203.0.113.7"}
        )
        assert inside.status_code == 200, inside.text
        outside = client.post(
            "/console/session", json={"key": key}, headers={"x-forwarded-for": "198.51.100.7"}
        )
        assert outside.status_code == 403, outside.text
        assert "set-cookie" not in outside.headers
