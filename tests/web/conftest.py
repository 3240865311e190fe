"""Fixtures of the UI tests: one headless Chromium per module (Debian's, see ENVIRONMENT.md).
Not per session: Playwright's sync API keeps an event loop running on the thread while it is
open, and tests that run after it in the same process (pytest-xdist mixes modules) call
`asyncio.run`."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.web.browser import CHROMIUM, CHROMIUM_ARGS


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not Path(CHROMIUM).exists():
        why = f"{CHROMIUM} is missing (scripts/setup-host installs Debian's chromium)"
        if os.environ.get("APPLIANCE_TEST_REQUIRE_DOCKER") == "1":
            pytest.fail(why)
        pytest.skip(why)
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
        )
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(15_000)
    tab = context.new_page()
    tab.on("dialog", lambda dialog: dialog.accept())  # the delete and revoke confirmations
    yield tab
    context.close()
