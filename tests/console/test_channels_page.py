"""The console's Overview and Channels pages read the whole deployment, server-side: the traffic
chart's minutes hold every request sent in them (1,500 sent within a minute or two, not the at most
1,000 log rows the page used to count), stream TTFB shows a p95, the charts refresh by themselves; a
channel is created, tested (billed to no one, in no usage), has its breaker reset and is deleted from
the page."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
from playwright.async_api import Page, expect

from tests.console.browser import open_page, screenshot, sign_in
from tests.e2e.stack import MODEL, PRICE, Deployment, fund_user, ok

BURST = 1500


async def send(
    client: httpx.AsyncClient, url: str, key: str, *, stream: bool = False, model: str = MODEL
) -> int:
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
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


async def test_overview_counts_every_request_of_a_minute(
    console_page: Page, deployment: Deployment, screenshots: Path
) -> None:
    page = console_page
    _, key = fund_user(deployment, 1_000_000_000)
    await sign_in(page, deployment.relay_url, deployment.admin_key)
    await page.wait_for_selector("main[data-page=overview][data-ready]")

    started_ms = int(time.time() * 1000)
    statuses = await burst(deployment.relay_url, key, BURST)
    assert statuses == [200] * BURST
    ended_ms = int(time.time() * 1000)

    # The server's series counts every request in the minute(s) the burst took, and so does the page:
    # its table's points add up to 1,500 (and its chart's data, which the page exposes).
    with deployment.admin() as admin:
        view = ok(admin.get("/admin/v1/performance"))
    points = [m for m in view["minutes"] if m["requests"]]
    assert sum(m["requests"] for m in points) == BURST
    assert all(started_ms - 60_000 < m["at_ms"] <= ended_ms for m in points)
    await page.locator("details summary", has_text="Per-minute figures").click()
    await expect(page.locator("#traffic-chart")).to_have_attribute(
        "data-requests", str(BURST), timeout=15_000
    )
    cells = page.locator("#minutes-table tbody tr td:nth-child(2)")
    await expect(cells).to_have_count(len(points))
    shown = [int((await cell.inner_text()).replace(",", "")) for cell in await cells.all()]
    assert shown == [m["requests"] for m in reversed(points)]
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
    await expect(result).not_to_contain_text("null")
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

    # Callers' failures open its breaker (five 5xx answers to two keys); the page resets it.
    with deployment.admin() as admin:
        ok(admin.put(f"/admin/v1/prices/{model}", json=PRICE))
    user_id, key = fund_user(deployment, 100_000_000)
    with deployment.admin() as admin:
        other = str(ok(admin.post("/admin/v1/keys", json={"user_id": user_id, "name": "b"}))["api_key"])
    deployment.upstream.configure(fail_status=500, fail_count=-1)
    async with httpx.AsyncClient(timeout=10) as client:
        for caller in (key, other) * 3:
            assert await send(client, deployment.relay_url, caller, model=model) >= 500
    deployment.upstream.configure(fail_status=None)
    reset = row.get_by_role("button", name="Reset breaker")
    await expect(row).to_contain_text("failing (breaker open)", timeout=10_000)
    await expect(reset).to_be_enabled()
    await reset.click()
    await expect(page.locator("#toast")).to_contain_text("Breaker closed on 1 relay.")
    await expect(reset).to_be_disabled()
    await screenshot(page, screenshots, "channel-breaker-reset")

    await row.get_by_role("button", name="Delete").click()
    await expect(row).to_have_count(0)
    with deployment.admin() as admin:
        assert name not in {c["name"] for c in ok(admin.get("/admin/v1/channels"))["channels"]}
    await screenshot(page, screenshots, "channels-after-delete")
