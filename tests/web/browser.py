"""Helpers for the UI tests: Debian's Chromium through Playwright, sign-in, and the layout
check every page gets at 1280 px and 390 px (screenshot, no horizontal overflow, no overlap)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from playwright.sync_api import Page

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SCREENSHOTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "screenshots"
WIDTHS = (1280, 390)
HEIGHT = 900

# Key elements that must not overlap one another (unless one contains the other).
OVERLAP_JS = """
() => {
  const selectors = ['.top > *', '.page-head > *', 'main .card', '.charts > *', '.grid > *',
                     '.cols > *', '.playground > *', '.steps > li', '.composer > *'];
  const seen = new Set();
  const items = [];
  for (const sel of selectors) {
    for (const el of document.querySelectorAll(sel)) {
      if (seen.has(el)) continue;
      seen.add(el);
      const r = el.getBoundingClientRect();
      const style = getComputedStyle(el);
      if (r.width < 1 || r.height < 1 || style.visibility === 'hidden') continue;
      items.push({el, r, name: sel + ' ' + (el.id || el.className || el.tagName)});
    }
  }
  const clashes = [];
  for (let i = 0; i < items.length; i++) {
    for (let j = i + 1; j < items.length; j++) {
      const a = items[i], b = items[j];
      if (a.el.contains(b.el) || b.el.contains(a.el)) continue;
      const w = Math.min(a.r.right, b.r.right) - Math.max(a.r.left, b.r.left);
      const h = Math.min(a.r.bottom, b.r.bottom) - Math.max(a.r.top, b.r.top);
      if (w > 1 && h > 1) clashes.push(a.name + ' <> ' + b.name);
    }
  }
  return clashes;
}
"""

OVERFLOW_JS = """
() => ({scroll: document.documentElement.scrollWidth, inner: window.innerWidth,
        wide: [...document.querySelectorAll('body *')].filter(el => {
          const r = el.getBoundingClientRect();
          return r.right > window.innerWidth + 1 && !el.closest('.table-wrap, .nav, pre');
        }).slice(0, 5).map(el => el.tagName + '.' + el.className)})
"""


def check_page(page: Page, name: str) -> None:
    """Screenshot the page at each width; fail on horizontal overflow or overlapping parts."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    for width in WIDTHS:
        page.set_viewport_size({"width": width, "height": HEIGHT})
        page.wait_for_timeout(150)  # one layout pass after the resize
        page.screenshot(path=str(SCREENSHOTS / f"{name}-{width}.png"), full_page=True)
        sizes: dict[str, Any] = page.evaluate(OVERFLOW_JS)
        assert sizes["scroll"] <= sizes["inner"], f"{name} at {width} px overflows: {sizes}"
        assert not sizes["wide"], f"{name} at {width} px: elements past the edge {sizes}"
        clashes = page.evaluate(OVERLAP_JS)
        assert not clashes, f"{name} at {width} px: overlapping elements {clashes}"
    page.set_viewport_size({"width": WIDTHS[0], "height": HEIGHT})


def sign_in(page: Page, base_url: str, key: str) -> None:
    page.goto(base_url + "/ui/endpoints")
    page.fill("#f-key", key)
    page.click("button[type=submit]")
    page.wait_for_url(base_url + "/ui/endpoints")


def field_error(page: Page, field: str) -> str:
    """The message shown next to a form field ("" for the form as a whole)."""
    return page.locator(f'[data-error-for="{field}"]').inner_text().strip()
