"""The console's Usage and Request logs pages in real headless Chromium, on the session's shared
deployment (the module's own user and key): usage by name with the id beside it, every hour of the
range on the chart; the logs' filters by user, model, status and time."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import httpx
import pytest
import sqlalchemy
from playwright.async_api import Page, expect

from services.common.db import Database
from services.logger.models import UsageHourly
from tests.console.browser import open_page, sign_in
from tests.console.conftest import TIMEZONE
from tests.console.test_console import eventually
from tests.e2e.stack import MODEL, Deployment, fund_user, ok

pytestmark = pytest.mark.shared_stack


def _requests(deployment: Deployment, key: str, models: list[str]) -> list[int]:
    with httpx.Client(timeout=10) as client:
        return [
            client.post(
                f"{deployment.relay_url}/v1/chat/completions",
                json={"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8},
                headers={"authorization": f"Bearer {key}"},
            ).status_code
            for model in models
        ]


def _logged(deployment: Deployment, user_id: str, count: int, timeout_s: float = 20.0) -> None:
    """Wait until the user's ``count`` requests are in the request logs (they come through Kafka)."""
    deadline = time.monotonic() + timeout_s
    with deployment.admin() as admin:
        while len(ok(admin.get("/admin/v1/logs", params={"user_id": user_id}))["logs"]) < count:
            assert time.monotonic() < deadline, "the requests were not logged"
            time.sleep(0.2)


def _local(moment: datetime) -> str:
    """As a datetime-local input takes it, in the browser's zone."""
    return moment.astimezone(ZoneInfo(TIMEZONE)).strftime("%Y-%m-%dT%H:%M")


@pytest.fixture(scope="module")
def traffic(deployment: Deployment) -> tuple[str, str, str]:
    """A user and a named key with two answered requests and one for a model nobody serves (404):
    (user id, user name, key id)."""
    user_id, key = fund_user(deployment, 10_000_000)
    with deployment.admin() as admin:
        key_id = str(ok(admin.get("/admin/v1/keys", params={"user_id": user_id}))["keys"][0]["key_id"])
        ok(admin.patch(f"/admin/v1/keys/{key_id}", json={"name": f"reporting-{uuid.uuid4().hex[:6]}"}))
    assert _requests(deployment, key, [MODEL, MODEL, "no-such-model"]) == [200, 200, 404]
    _logged(deployment, user_id, 3)
    with deployment.admin() as admin:
        users = ok(admin.get("/admin/v1/users", params={"q": user_id}))["users"]
    user_name = str(users[0]["name"])
    return user_id, user_name, key_id


async def _signed_in(page: Page, deployment: Deployment) -> None:
    await sign_in(page, deployment.relay_url, deployment.admin_key)
    await page.wait_for_selector("main[data-page=overview][data-ready]")


async def test_usage_shows_names_and_every_hour(
    console_page: Page, deployment: Deployment, traffic: tuple[str, str, str]
) -> None:
    user_id, user_name, key_id = traffic
    with deployment.admin() as admin:
        key_name = ok(admin.get("/admin/v1/keys", params={"q": key_id}))["keys"][0]["name"]
    page = console_page
    await _signed_in(page, deployment)
    await open_page(page, "usage")
    await page.locator("#usage-group").select_option("key")
    await page.get_by_role("button", name="Show").click()
    row = page.locator("#usage-table tbody tr", has_text=key_name)
    await eventually(row, page, refresh="Show")
    # The name, with the id beside it (and as the name's title).
    await expect(row.locator("td").nth(1)).to_have_text(key_name)
    await expect(row.locator("td").nth(1).locator("span")).to_have_attribute("title", key_id)
    await expect(row.locator("td").nth(2)).to_have_text(key_id)
    # One point per hour of the last 24 h, whether it had requests or not (an hour without any is a
    # zero, not a line drawn from the hour before to the next).
    assert int(await page.locator("#usage-chart").get_attribute("data-points") or 0) in (24, 25, 26)
    await expect(page.locator("#usage-chart .u-legend")).to_contain_text(key_name)

    await page.locator("#usage-group").select_option("user")
    await page.get_by_role("button", name="Show").click()
    row = page.locator("#usage-table tbody tr", has_text=user_name)
    await expect(row).to_be_visible()
    await expect(row).to_contain_text(user_id)
    await page.locator("#usage-granularity").select_option("day")
    await page.locator("#usage-range").select_option("7d")
    await page.get_by_role("button", name="Show").click()
    await expect(page.locator("#usage-chart")).to_have_attribute("data-points", "8")


async def test_logs_filter_by_user_model_status_and_time(
    console_page: Page, deployment: Deployment, traffic: tuple[str, str, str]
) -> None:
    user_id, _, _ = traffic
    page = console_page
    await _signed_in(page, deployment)
    await open_page(page, "logs")
    rows = page.locator("#logs-table tbody tr.clickable")
    filter_button = page.get_by_role("button", name="Filter")

    await page.locator("#logs-user").fill(user_id)
    await filter_button.click()
    await expect(rows).to_have_count(3)
    await page.locator("#logs-model").fill(MODEL)
    await filter_button.click()
    await expect(rows).to_have_count(2)
    await page.locator("#logs-model").fill("")
    await page.locator("#logs-status").fill("404")
    await filter_button.click()
    await expect(rows).to_have_count(1)
    await expect(rows.first).to_contain_text("no-such-model")
    await page.locator("#logs-status").fill("")

    now = datetime.now(ZoneInfo(TIMEZONE))
    await page.locator("#logs-since").fill(_local(now - timedelta(hours=1)))
    await filter_button.click()
    await expect(rows).to_have_count(3)
    await page.locator("#logs-since").fill(_local(now + timedelta(minutes=2)))
    await filter_button.click()
    await expect(page.locator("#logs-table tbody")).to_have_text("No request matches.")
    await page.locator("#logs-since").fill("")
    await page.locator("#logs-until").fill(_local(now - timedelta(hours=1)))
    await filter_button.click()
    await expect(page.locator("#logs-table tbody")).to_have_text("No request matches.")
    await page.locator("#logs-until").fill(_local(now + timedelta(minutes=2)))
    await filter_button.click()
    await expect(rows).to_have_count(3)


HOUR_MS = 3_600_000
# Spread over days 8 to 29 before now: inside the 30-day range, outside the 24 h and 7 d ones the other
# tests read. 19 models x 528 hours: more buckets than one page of the usage API (10,000).
BULK_MODELS = 19
BULK_HOURS = range(8 * 24, 30 * 24)


@pytest.fixture
async def bulk_usage(deployment: Deployment) -> AsyncIterator[str]:
    """10,032 hourly rollup rows of made-up models (written to the rollups, as the logger would), removed
    afterwards; their models' common prefix."""
    prefix = f"bulk-{uuid.uuid4().hex[:6]}-"
    now_hour = int(time.time() * 1000) // HOUR_MS * HOUR_MS
    rows = [
        {
            "hour_ms": now_hour - h * HOUR_MS,
            "key_id": "key_bulk",
            "user_id": "usr_bulk",
            "model": f"{prefix}{m:02d}",
            "requests": 1,
            "cost_micros": 1,
        }
        for m in range(BULK_MODELS)
        for h in BULK_HOURS
    ]
    db = Database(deployment.db.settings())
    await db.start()
    try:
        async with db.transaction() as session:
            await session.execute(sqlalchemy.insert(UsageHourly), rows)
        yield prefix
    finally:
        async with db.transaction() as session:
            await session.execute(sqlalchemy.delete(UsageHourly).where(UsageHourly.model.startswith(prefix)))
        await db.close()


async def test_usage_reads_every_page_of_buckets(
    console_page: Page, deployment: Deployment, bulk_usage: str
) -> None:
    page = console_page
    await _signed_in(page, deployment)
    await open_page(page, "usage")
    await page.locator("#usage-range").select_option("30d")
    await page.get_by_role("button", name="Show").click()
    expected = BULK_MODELS * len(BULK_HOURS)
    await expect(page.locator("#usage-count")).to_contain_text("the table shows the first 1,000")
    async with page.expect_download() as download:
        await page.get_by_role("button", name="Export CSV").click()
    exported = Path(await (await download.value).path()).read_text().splitlines()
    assert sum(1 for line in exported if f",{bulk_usage}" in line) == expected
    await expect(page.locator("#usage-table tbody tr")).to_have_count(1000)
    await expect(page.locator("#usage-note")).to_be_empty()
