"""The console's tests: one deployment per module (the e2e fixtures) and Debian's chromium driven by
Playwright's async API (the sync one runs an event loop of its own, which pytest-asyncio's loop cannot
share), launched from its system path (never a browser Playwright downloads)."""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from playwright.async_api import Browser, BrowserContext, Page, async_playwright

__all__ = ["browser", "console_page", "screenshots"]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# The viewer's zone and locale the pages must honour (times and thousands separators).
TIMEZONE = "Europe/Berlin"
LOCALE = "en-US"


@pytest.fixture(scope="session")
async def browser() -> AsyncIterator[Browser]:
    if not os.access(CHROMIUM, os.X_OK):
        reason = f"{CHROMIUM} is missing; bash tests/infra/setup.sh installs Debian's chromium"
        if os.environ.get("RELAYGATE_REQUIRE_INFRA") == "1":
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
        )
        try:
            yield launched
        finally:
            await launched.close()


@pytest.fixture
async def context(browser: Browser) -> AsyncIterator[BrowserContext]:
    """A fresh browser profile per test: no cookie or session carries over."""
    created = await browser.new_context(
        timezone_id=TIMEZONE, locale=LOCALE, viewport={"width": 1440, "height": 900}
    )
    created.set_default_timeout(10_000)
    try:
        yield created
    finally:
        await created.close()


@pytest.fixture
async def console_page(context: BrowserContext) -> Page:
    page = await context.new_page()
    # Every confirm() (revoke, rotate) is accepted: the tests mean the action.
    page.on("dialog", lambda dialog: dialog.accept())
    return page


@pytest.fixture(scope="session")
def screenshots(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[Path]:
    """Where the tests write a screenshot of each page, for review; the folder is printed at the end
    (``RELAYGATE_CONSOLE_SCREENSHOTS=<dir>`` copies them there too)."""
    folder = tmp_path_factory.mktemp("console") / "screenshots"
    folder.mkdir()
    yield folder
    copy_to = os.environ.get("RELAYGATE_CONSOLE_SCREENSHOTS")
    if copy_to:
        shutil.copytree(folder, copy_to, dirs_exist_ok=True)
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None and any(folder.iterdir()):
        reporter.write_line(f"console screenshots: {folder}" + (f" (copied to {copy_to})" if copy_to else ""))
