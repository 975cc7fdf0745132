"""The console's Overview and Channels pages read the whole deployment, server-side: the traffic chart's
minute holds every request sent in it (1,500 in a minute, not the at most 1,000 log rows the page
used to count), stream TTFB shows a p95, the charts refresh by themselves; a channel is created, tested
(billed to no one, in no usage) and deleted from the page."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
from playwright.async_api import Page, expect

from tests.console.browser import open_page, screenshot, sign_in
from tests.e2e.stack import MODEL, Deployment, fund_user, ok

BURST = 1500
# Seconds into a minute by which the burst must have started, so that it ends inside that minute.
LATEST_START_S = 30


async def send(client: httpx.AsyncClient, url: str, key: str, *, stream: bool = False) -> int:
    body: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    if stream:
        body["stream"] = True
    response = await client.post(
        f"{url}/v1/chat/completions", json=body, headers={"authorization": f"Bearer {key}"}
    )
    return response.status_code


async def burst(url: str, key: str, count: int) -> list[int]:
    """``count`` requests, the first a stream, 32 at a time."""
    gate = asyncio.Semaphore(32)
    async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=32)) as client:

        async def one(i: int) -> int:
            async with gate:
                return await send(client, url, key, stream=i == 0)

        return list(await asyncio.gather(*(one(i) for i in range(count))))


def minute_of(view: dict[str, Any], at_ms: int) -> dict[str, Any]:
    return dict(next(m for m in view["minutes"] if m["at_ms"] == at_ms))


async def test_overview_counts_every_request_of_a_minute(
    console_page: Page, deployment: Deployment, screenshots: Path
) -> None:
    page = console_page
    _, key = fund_user(deployment, 1_000_000_000)
    await sign_in(page, deployment.relay_url, deployment.admin_key)
    await page.wait_for_selector("main[data-page=overview][data-ready]")

    into = time.time() % 60
    if into > LATEST_START_S:
        await asyncio.sleep(60 - into + 0.5)
    started = time.time()
    minute_ms = int(started // 60) * 60_000
    statuses = await burst(deployment.relay_url, key, BURST)
    assert statuses == [200] * BURST
    assert time.time() < minute_ms / 1000 + 59, "the burst outlasted its minute; the machine is too slow"

    # The server's series, then the page's: the minute's point says 1,500.
    with deployment.admin() as admin:
        assert minute_of(ok(admin.get("/admin/v1/performance")), minute_ms)["requests"] == BURST
    await page.locator("details summary", has_text="Per-minute figures").click()
    row = page.locator("#minutes-table tbody tr", has_text=f"{BURST:,}")
    await expect(row).to_have_count(1, timeout=15_000)
    await expect(page.locator("#traffic-chart")).to_have_attribute("data-requests", str(BURST))
    await expect(page.locator("#traffic-chart canvas")).to_be_visible()

    # Stream time to first byte has the p95 the table shows (it had p50 and p99 only).
    ttfb = page.locator("#percentiles tr", has_text="Time to first byte")
    for column in (1, 2, 3):
        await expect(ttfb.locator("td").nth(column)).not_to_have_text("\N{EN DASH}")
    await screenshot(page, screenshots, "overview-minutes")

    # A new request reaches the chart without reloading the page (it refreshes every 5 s).
    async with httpx.AsyncClient(timeout=10) as client:
        assert await send(client, deployment.relay_url, key) == 200
    await expect(page.locator("#traffic-chart")).to_have_attribute(
        "data-requests", str(BURST + 1), timeout=15_000
    )


async def test_channel_create_test_and_delete(
    console_page: Page, deployment: Deployment, screenshots: Path
) -> None:
    page = console_page
    await sign_in(page, deployment.relay_url, deployment.admin_key)
    await page.wait_for_selector("main[data-page=overview][data-ready]")
    await open_page(page, "channels")

    # The deployment's channel carried the first test's traffic: its figures are the view's.
    fake = page.locator("#channels-table tbody tr", has_text="fake")
    await expect(fake).to_contain_text("healthy")
    await expect(fake).to_contain_text("closed")
    await expect(page.locator("#channels-source")).to_contain_text("every relay")

    name = f"probe-{uuid.uuid4().hex[:6]}"
    model = f"gpt-probe-{uuid.uuid4().hex[:6]}"
    secret = f"sk-probe-{uuid.uuid4().hex}"
    await page.get_by_role("button", name="New channel").click()
    form = page.get_by_role("dialog")
    await form.get_by_label("Name").fill(name)
    await form.get_by_label("Type").select_option("openai")
    await form.get_by_label("Base URL").fill(deployment.upstream.base_url)
    await form.get_by_label("Models").fill(model)
    await form.get_by_label("Model map").fill(f"{model}={MODEL}")
    await form.get_by_label("Priority").fill("5")
    await form.get_by_label("Weight").fill("2")
    await form.get_by_label("API key").fill(secret)
    await screenshot(page, screenshots, "channel-new")
    await form.get_by_role("button", name="Create channel").click()
    await expect(page.locator("dialog")).to_have_count(0)
    row = page.locator("#channels-table tbody tr", has_text=name)
    await expect(row).to_contain_text(model)
    with deployment.admin() as admin:
        [stored] = [c for c in ok(admin.get("/admin/v1/channels"))["channels"] if c["name"] == name]
        requests_before = ok(admin.get("/admin/v1/performance"))["windows"]["1h"]["requests"]
    assert (stored["model_map"], stored["priority"], stored["weight"]) == ({model: MODEL}, 5, 2)
    assert secret not in await page.content()

    # Test: one request reaches the upstream, under the mapped model name.
    upstream_before = deployment.upstream.stats()["requests_total"]
    await row.get_by_role("button", name="Test").click()
    result = page.locator("#channel-test-result")
    await expect(result).to_contain_text(f"OK: {name}")
    await expect(result).to_contain_text("status 200")
    assert deployment.upstream.stats()["requests_total"] == upstream_before + 1
    await screenshot(page, screenshots, "channel-tested")
    # A failing upstream: its status and error body are shown.
    deployment.upstream.configure(fail_status=500, fail_count=1)
    await row.get_by_role("button", name="Test").click()
    await expect(result).to_contain_text(f"Failed: {name}")
    await expect(result).to_contain_text("status 500")
    # The probes went through no request path: not counted, billed or logged.
    with deployment.admin() as admin:
        assert ok(admin.get("/admin/v1/performance"))["windows"]["1h"]["requests"] == requests_before
        logged = ok(admin.get("/admin/v1/logs", params={"model": model}))["logs"]
    assert logged == []

    await row.get_by_role("button", name="Delete").click()
    await expect(row).to_have_count(0)
    with deployment.admin() as admin:
        assert name not in {c["name"] for c in ok(admin.get("/admin/v1/channels"))["channels"]}
    await screenshot(page, screenshots, "channels-after-delete")
