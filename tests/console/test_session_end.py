"""How a console session ends, in real headless Chromium with the page's clock under the test's control:
the token lasts as long as auth allows (not the 15-minute default), the page says when the session
ends before it does, and then asks to sign in again on the page that was open. On the session's shared
deployment (auth's RELAYGATE_ADMIN_TOKEN_MAX_TTL_S at its default, 1 h)."""

from __future__ import annotations

import time

import pytest
from playwright.async_api import Page, expect

from services.auth.settings import AuthSettings
from tests.e2e.stack import Deployment

pytestmark = pytest.mark.shared_stack

DEFAULT_MAX_TTL_S = AuthSettings.model_fields["admin_token_max_ttl_s"].default


async def _token(page: Page) -> str:
    cookies = await page.context.cookies()
    return next((c["value"] for c in cookies if c["name"] == "rg_console_token"), "")


async def _sign_in_on(page: Page, deployment: Deployment, hash_: str) -> None:
    await page.goto(f"{deployment.relay_url}/console/{hash_}")
    await page.get_by_label("Admin key").fill(deployment.admin_key)
    await page.get_by_role("button", name="Sign in").click()


async def test_the_session_lasts_and_ends_gracefully(console_page: Page, deployment: Deployment) -> None:
    page = console_page
    started_ms = int(time.time() * 1000)
    await page.clock.install(time=started_ms / 1000)
    await _sign_in_on(page, deployment, "#/prices")
    await page.wait_for_selector("main[data-page=prices][data-ready]")
    expires_at = int(await page.evaluate("async () => (await (await fetch('session')).json()).expires_at"))
    # Asked for a working day; auth grants its maximum (the default lifetime is 15 minutes).
    assert expires_at - started_ms / 1000 >= DEFAULT_MAX_TTL_S - 60
    await expect(page.locator("#whoami")).to_contain_text("session until")
    note = page.locator("#session-note")
    await expect(note).to_be_hidden()

    # Five minutes before the end, the page says so and offers to sign in again.
    await page.clock.fast_forward(expires_at * 1000 - started_ms - 4 * 60_000)
    await expect(note).to_be_visible()
    await expect(note).to_contain_text("Your session ends at")
    old_token = await _token(page)
    await note.get_by_role("button", name="Sign in again").click()
    await expect(page.locator("#signin")).to_be_visible()
    await page.get_by_label("Admin key").fill(deployment.admin_key)
    await page.get_by_role("button", name="Sign in").click()
    # Back where the operator was, with a new session.
    await page.wait_for_selector("main[data-page=prices][data-ready]")
    assert await _token(page) not in ("", old_token)


async def test_an_ended_session_asks_to_sign_in_again(console_page: Page, deployment: Deployment) -> None:
    page = console_page
    started_ms = int(time.time() * 1000)
    await page.clock.install(time=started_ms / 1000)
    await _sign_in_on(page, deployment, "#/prices")
    await page.wait_for_selector("main[data-page=prices][data-ready]")
    await page.clock.fast_forward(DEFAULT_MAX_TTL_S * 1000 + 60_000)
    await expect(page.locator("#signin")).to_be_visible()
    await expect(page.locator("#signin-error")).to_contain_text("Your session ended at")
    await expect(page.locator("#shell")).to_be_hidden()
