"""The console's Keys & users page in real headless Chromium, on the session's shared deployment (the
module only creates users and keys of its own): budgets that survive a partial edit, the create-key
form's fields, search and paging on the server, rotation, the copy button."""

from __future__ import annotations

import re
import time
import uuid
from datetime import datetime
from zoneinfo import ZoneInfo

import httpx
import pytest
from playwright.async_api import BrowserContext, Page, expect

from tests.console.browser import open_page, sign_in
from tests.console.conftest import TIMEZONE
from tests.e2e.stack import MODEL, Deployment, fund_user, ok

pytestmark = pytest.mark.shared_stack


def _user(deployment: Deployment, name: str) -> str:
    with deployment.admin() as admin:
        return str(ok(admin.post("/admin/v1/users", json={"name": name}))["user_id"])


def _budgets(deployment: Deployment, scope: str, scope_id: str) -> dict[str, int]:
    with deployment.admin() as admin:
        listing = ok(admin.get(f"/admin/v1/budgets/{scope}/{scope_id}", params={"consistent": "true"}))
    return {b["period"]: int(b["limit_micros"]) for b in listing.get("budgets", []) if int(b["limit_micros"])}


async def _keys_page(page: Page, deployment: Deployment) -> None:
    await sign_in(page, deployment.relay_url, deployment.admin_key)
    await page.wait_for_selector("main[data-page=overview][data-ready]")
    await open_page(page, "keys")


async def _open_user(page: Page, deployment: Deployment, name: str) -> None:
    await _keys_page(page, deployment)
    await page.locator("#user-search").fill(name)
    await page.locator("#user-search").press("Enter")
    row = page.locator("#users tbody tr", has_text=name)
    await row.click()
    await expect(page.locator("#user-panel")).to_be_visible()


async def test_setting_the_daily_budget_keeps_the_monthly_one(
    console_page: Page, deployment: Deployment
) -> None:
    """The user's budget form shows the stored budgets and writes only what the operator changed."""
    name = f"budgets-{uuid.uuid4().hex[:6]}"
    user_id = _user(deployment, name)
    with deployment.admin() as admin:
        ok(admin.put(f"/admin/v1/budgets/user/{user_id}/month", json={"limit_micros": 50_000_000}))
    page = console_page
    await _open_user(page, deployment, name)
    form = page.get_by_role("form", name="User budgets")
    await expect(form.get_by_label("Monthly budget (units)")).to_have_value("50")
    await form.get_by_label("Daily budget (units)").fill("5")
    await form.get_by_role("button", name="Save budgets").click()
    await expect(page.locator("#user-panel table")).to_contain_text("5.00")
    assert _budgets(deployment, "user", user_id) == {"day": 5_000_000, "month": 50_000_000}
    # Clearing a field is a change too: it removes that budget and only that one.
    form = page.get_by_role("form", name="User budgets")
    await form.get_by_label("Monthly budget (units)").fill("")
    await form.get_by_role("button", name="Save budgets").click()
    await expect(page.locator("#user-panel table")).not_to_contain_text("50.00")
    assert _budgets(deployment, "user", user_id) == {"day": 5_000_000}


def _key(deployment: Deployment, key_id: str) -> dict[str, object]:
    with deployment.admin() as admin:
        listed = ok(admin.get("/admin/v1/keys", params={"q": key_id}))["keys"]
    found: dict[str, object] = next(k for k in listed if k["key_id"] == key_id)
    return found


async def chat(deployment: Deployment, key: str) -> int:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
    async with httpx.AsyncClient(timeout=10) as client:
        response = await client.post(
            f"{deployment.relay_url}/v1/chat/completions",
            json=body,
            headers={"authorization": f"Bearer {key}"},
        )
    return response.status_code


async def test_a_key_created_with_every_field_the_admin_api_takes(
    console_page: Page, deployment: Deployment
) -> None:
    name = f"fields-{uuid.uuid4().hex[:6]}"
    user_id = _user(deployment, name)
    page = console_page
    await _keys_page(page, deployment)
    await page.locator("#user-search").fill(name)
    await page.locator("#user-search").press("Enter")
    await expect(page.locator("#users tbody tr")).to_have_count(1)
    form = page.get_by_role("form", name="Create key")
    await form.get_by_label("User").select_option(user_id)
    await form.get_by_label("Name").fill("batch-jobs")
    await form.get_by_label("Allowed models").fill("gpt-4o*, claude-sonnet")
    await form.get_by_label("Allowed addresses").fill("10.0.0.0/8, 192.0.2.7/32")
    await form.get_by_label("Expires").fill("2031-03-04T05:06")
    await form.get_by_label("Requests per minute").fill("60")
    await form.get_by_label("Tokens per minute").fill("90000")
    await form.get_by_label("Concurrent requests").fill("4")
    await form.get_by_label("Daily budget (units)").fill("2.5")
    await form.get_by_label("Monthly budget (units)").fill("40")
    await form.get_by_role("button", name="Create key").click()
    await expect(page.locator("#new-key-plaintext")).to_have_text(re.compile(r"^rg-"))
    await page.get_by_role("dialog").get_by_role("button", name="Close").click()

    with deployment.admin() as admin:
        listed = ok(admin.get("/admin/v1/keys", params={"user_id": user_id}))["keys"]
    assert len(listed) == 1
    key = listed[0]
    expiry = datetime(2031, 3, 4, 5, 6, tzinfo=ZoneInfo(TIMEZONE))
    assert int(key["expires_at"]) == int(expiry.timestamp())
    assert key["allowed_models"] == ["gpt-4o*", "claude-sonnet"]
    assert key["allowed_cidrs"] == ["10.0.0.0/8", "192.0.2.7/32"]
    assert {n: int(v) for n, v in key["limits"].items()} == {"rpm": 60, "tpm": 90000, "max_concurrency": 4}
    assert _budgets(deployment, "key", key["key_id"]) == {"day": 2_500_000, "month": 40_000_000}

    # The expiry of an existing key is edited, and leaves its budgets alone.
    await page.locator("#key-search").fill(key["key_id"])
    await page.locator("#key-search").press("Enter")
    row = page.locator("#keys tbody tr", has_text="batch-jobs")
    await expect(row).to_contain_text("2031")
    await row.get_by_role("button", name="Edit").click()
    editing = page.get_by_role("dialog")
    await expect(editing.get_by_label("Monthly budget (units)")).to_have_value("40")
    await editing.get_by_label("Expires").fill("2032-01-02T03:04")
    await editing.get_by_role("button", name="Save").click()
    await expect(row).to_contain_text("2032")
    later = datetime(2032, 1, 2, 3, 4, tzinfo=ZoneInfo(TIMEZONE))
    assert int(str(_key(deployment, str(key["key_id"]))["expires_at"])) == int(later.timestamp())
    assert _budgets(deployment, "key", key["key_id"]) == {"day": 2_500_000, "month": 40_000_000}


async def test_users_are_searched_and_paged_on_the_server(console_page: Page, deployment: Deployment) -> None:
    """More users match than a page holds: the page says so and loads the rest on request."""
    marker = f"crowd{uuid.uuid4().hex[:6]}"
    with deployment.admin() as admin:
        for i in range(205):
            ok(admin.post("/admin/v1/users", json={"name": f"{marker}-{i:03d}"}))
    page = console_page
    await _keys_page(page, deployment)
    rows = page.locator("#users tbody tr")
    await page.locator("#user-search").fill(marker.upper())
    # Typing searches by itself (once typing pauses).
    footer = page.locator("section", has=page.locator("#users")).locator(".list-footer")
    await expect(footer).to_contain_text(f"first 200 users matching “{marker.upper()}”")
    await expect(rows).to_have_count(200)
    await footer.get_by_role("button", name="Load more users").click()
    await expect(rows).to_have_count(205)
    await expect(footer).to_contain_text("205 users")
    await expect(footer.get_by_role("button")).to_be_hidden()
    await page.locator("#user-search").fill(f"{marker}-204")
    await page.locator("#user-search").press("Enter")
    await expect(rows).to_have_count(1)
    # The user select of the key form offers what the search found.
    await expect(page.locator("#new-key-user option")).to_have_count(1)
    await page.locator("#user-search").fill("no-such-user-anywhere")
    await page.locator("#user-search").press("Enter")
    await expect(rows).to_have_text(["No user matches."])


async def test_rotating_a_key_ends_the_old_secret(
    console_page: Page, context: BrowserContext, deployment: Deployment
) -> None:
    user_id, old_key = fund_user(deployment, 10_000_000)
    assert await chat(deployment, old_key) == 200
    await context.grant_permissions(["clipboard-read", "clipboard-write"], origin=deployment.relay_url)
    page = console_page
    await _keys_page(page, deployment)
    await page.locator("#key-search").fill(user_id)
    await page.locator("#key-search").press("Enter")
    row = page.locator("#keys tbody tr", has_text="e2e")
    await expect(page.locator("#keys tbody tr")).to_have_count(1)
    await row.get_by_role("button", name="Rotate").click()
    secret = page.locator("#new-key-plaintext")
    await expect(secret).to_have_text(re.compile(r"^rg-"))
    new_key = await secret.inner_text()
    assert new_key != old_key

    # The copy button puts the plaintext on the clipboard.
    await page.get_by_role("dialog").get_by_role("button", name="Copy").click()
    await expect(page.locator("#toast")).to_have_text("Copied.")
    assert await page.evaluate("() => navigator.clipboard.readText()") == new_key
    await page.get_by_role("dialog").get_by_role("button", name="Close").click()

    deadline = time.monotonic() + 5
    while (status := await chat(deployment, old_key)) == 200 and time.monotonic() < deadline:
        await page.wait_for_timeout(100)
    assert status == 401
    assert await chat(deployment, new_key) == 200
