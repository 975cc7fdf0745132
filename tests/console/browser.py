"""What the console's browser tests do often: sign in, open a page and wait for its data, screenshot."""

from __future__ import annotations

from pathlib import Path

from playwright.async_api import Page


async def sign_in(page: Page, relay_url: str, key: str, *, read_only: bool = False) -> None:
    await page.goto(f"{relay_url}/console/")
    await page.get_by_label("Admin key").fill(key)
    if read_only:
        await page.get_by_label("Read only").check()
    await page.get_by_role("button", name="Sign in").click()


async def open_page(page: Page, name: str) -> None:
    """Go to ``#/<name>`` and wait until the page has loaded its data."""
    await page.evaluate("name => { location.hash = '#/' + name; }", name)
    await page.wait_for_selector(f"main[data-page={name}][data-ready]")


async def unlabelled_controls(page: Page) -> list[str]:
    """The form controls of the page that have no accessible name (a label or aria-label)."""
    found: list[str] = await page.evaluate(
        """() => [...document.querySelectorAll("input, select, textarea")]
            .filter((el) => el.type !== "hidden" && el.offsetParent !== null)
            .filter((el) => !(el.labels && el.labels.length) && !el.getAttribute("aria-label"))
            .map((el) => el.id || el.name || el.outerHTML)"""
    )
    return found


async def screenshot(page: Page, folder: Path, name: str) -> Path:
    """Written for review; every page screenshotted is also checked for unlabelled controls."""
    assert await unlabelled_controls(page) == []
    path = folder / f"{name}.png"
    await page.screenshot(path=str(path), full_page=True)
    return path
