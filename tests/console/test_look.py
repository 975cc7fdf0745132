"""What the console looks like, checked in the browser at the two laptop sizes it is laid out for: body
text contrast (WCAG AA: 4.5:1, 3:1 for large text) computed in the page over every visible text
element, nothing wider than the window, and nothing moving when a panel opens or a page refreshes. On
the session's shared deployment."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from playwright.async_api import Browser, Page, expect

from tests.console.browser import open_page, sign_in
from tests.console.conftest import LOCALE, TIMEZONE
from tests.e2e.stack import Deployment, fund_user

pytestmark = pytest.mark.shared_stack

VIEWPORTS = [(1280, 800), (1440, 900)]
PAGES = ["overview", "keys", "usage", "logs", "channels", "prices"]

# Every visible element with text of its own: its colour over the background it is drawn on (the first
# opaque background up its ancestors, translucent ones blended in), as WCAG 2 computes contrast.
CONTRAST = """() => {
  const rgba = (text) => {
    const m = text.match(/rgba?\\(([^)]+)\\)/);
    if (!m) return null;
    const p = m[1].split(/[\\s,\\/]+/).filter(Boolean).map(Number);
    return { r: p[0], g: p[1], b: p[2], a: p.length > 3 ? p[3] : 1 };
  };
  const over = (top, bottom) => ({
    r: top.r * top.a + bottom.r * (1 - top.a),
    g: top.g * top.a + bottom.g * (1 - top.a),
    b: top.b * top.a + bottom.b * (1 - top.a),
    a: 1,
  });
  const luminance = ({ r, g, b }) => {
    const f = (v) => ((v /= 255) <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4);
    return 0.2126 * f(r) + 0.7152 * f(g) + 0.0722 * f(b);
  };
  const background = (el) => {
    const layers = [];
    for (let e = el; e; e = e.parentElement) {
      const c = rgba(getComputedStyle(e).backgroundColor);
      if (c && c.a > 0) {
        layers.push(c);
        if (c.a >= 1) break;
      }
    }
    return layers.reverse().reduce((below, layer) => over(layer, below), { r: 255, g: 255, b: 255, a: 1 });
  };
  const shown = (el) => {
    for (let e = el; e; e = e.parentElement) {
      const s = getComputedStyle(e);
      if (s.display === "none" || s.visibility === "hidden" || Number(s.opacity) === 0) return false;
    }
    const r = el.getBoundingClientRect();
    return r.width > 0 && r.height > 0 && r.right > 0 && r.bottom > 0;
  };
  const found = [];
  let checked = 0;
  for (const el of document.querySelectorAll("body *")) {
    const own = [...el.childNodes].filter((n) => n.nodeType === 3).map((n) => n.textContent).join("");
    if (!/\\S/.test(own)) continue;
    if (el.disabled || !shown(el)) continue;
    const style = getComputedStyle(el);
    const bg = background(el);
    const fg = over(rgba(style.color), bg);
    const [hi, lo] = [luminance(fg), luminance(bg)].sort((a, b) => b - a);
    const ratio = (hi + 0.05) / (lo + 0.05);
    const size = parseFloat(style.fontSize);
    const large = size >= 24 || (Number(style.fontWeight) >= 700 && size >= 18.66);
    checked += 1;
    if (ratio < (large ? 3 : 4.5)) {
      const what = `${el.tagName.toLowerCase()}${el.id ? "#" + el.id : ""}.${el.className}`;
      found.push(`${what} "${own.trim().slice(0, 30)}": ${ratio.toFixed(2)}`);
    }
  }
  return { checked, found };
}"""


@pytest.fixture(params=VIEWPORTS, ids=lambda v: f"{v[0]}x{v[1]}")
async def sized_page(request: pytest.FixtureRequest, browser: Browser) -> AsyncIterator[Page]:
    width, height = request.param
    context = await browser.new_context(
        timezone_id=TIMEZONE, locale=LOCALE, viewport={"width": width, "height": height}
    )
    context.set_default_timeout(10_000)
    try:
        yield await context.new_page()
    finally:
        await context.close()


async def _painted(page: Page) -> None:
    """Wait until the page has drawn what the last answer changed (two animation frames)."""
    await page.evaluate(
        "() => new Promise((done) => requestAnimationFrame(() => requestAnimationFrame(done)))"
    )


async def _top(page: Page, selector: str) -> float:
    """Where the element starts on the page (not in the window: opening a panel may scroll)."""
    top: float = await page.locator(selector).first.evaluate(
        "el => el.getBoundingClientRect().top + window.scrollY"
    )
    return top


async def test_text_contrast_and_width_on_every_page(sized_page: Page, deployment: Deployment) -> None:
    page = sized_page
    fund_user(deployment, 1_000_000)  # at least one user and key on the lists
    await sign_in(page, deployment.relay_url, deployment.admin_key)
    await page.wait_for_selector("main[data-page=overview][data-ready]")
    # The check itself: grey #949494 on white is 3.03:1, too faint for body text.
    await page.evaluate(
        """() => document.getElementById("main").append(Object.assign(document.createElement("p"),
            { id: "faint", textContent: "faint text", style: "color: #949494; background: #fff" }))"""
    )
    assert any(f.startswith('p#faint. "faint text": 3.03') for f in (await page.evaluate(CONTRAST))["found"])
    problems: dict[str, list[str]] = {}
    for name in PAGES:
        await open_page(page, name)
        result = await page.evaluate(CONTRAST)
        assert result["checked"] > 10, name
        if result["found"]:
            problems[name] = result["found"]
        overflow = await page.evaluate("() => document.documentElement.scrollWidth - window.innerWidth")
        if overflow > 0:
            problems.setdefault(name, []).append(f"{overflow}px wider than the window")
    # The sign-in page too.
    await page.get_by_role("button", name="Sign out").click()
    await expect(page.locator("#signin")).to_be_visible()
    result = await page.evaluate(CONTRAST)
    if result["found"]:
        problems["sign-in"] = result["found"]
    assert problems == {}


async def test_nothing_moves_when_a_panel_opens_or_a_page_refreshes(
    sized_page: Page, deployment: Deployment
) -> None:
    page = sized_page
    user_id, _ = fund_user(deployment, 1_000_000)
    await sign_in(page, deployment.relay_url, deployment.admin_key)
    await page.wait_for_selector("main[data-page=overview][data-ready]")

    await open_page(page, "keys")
    async with page.expect_response(lambda r: "/console/api/users?" in r.url and "q=" in r.url):
        await page.locator("#user-search").fill(user_id)
    await expect(page.locator("#users tbody tr")).to_have_count(1)
    await _painted(page)
    before = {s: await _top(page, s) for s in ("#users table", "#keys table")}
    await page.locator("#users tbody tr").first.click()
    await expect(page.locator("#user-panel")).to_be_visible()
    assert {s: await _top(page, s) for s in before} == before
    await page.get_by_role("dialog").get_by_role("button", name="Close").click()
    await page.locator("#keys tbody tr").first.get_by_role("button", name="Edit").click()
    await expect(page.get_by_role("dialog")).to_be_visible()
    assert {s: await _top(page, s) for s in before} == before
    await page.get_by_role("dialog").get_by_role("button", name="Close").click()

    await open_page(page, "usage")
    before = {s: await _top(page, s) for s in ("#usage-chart", "#usage-table table")}
    async with page.expect_response(lambda r: "/console/api/usage" in r.url):
        await page.get_by_role("button", name="Show").click()
    await _painted(page)
    assert {s: await _top(page, s) for s in before} == before

    await open_page(page, "logs")
    before = {"#logs-table table": await _top(page, "#logs-table table")}
    rows = page.locator("#logs-table tbody tr.clickable")
    if await rows.count():
        await rows.first.click()
        await expect(page.locator("#log-detail")).to_be_visible()
        assert {"#logs-table table": await _top(page, "#logs-table table")} == before
        await page.get_by_role("dialog").get_by_role("button", name="Close").click()
    async with page.expect_response(lambda r: "/console/api/logs" in r.url):
        await page.get_by_role("button", name="Filter").click()
    await _painted(page)
    assert {"#logs-table table": await _top(page, "#logs-table table")} == before
