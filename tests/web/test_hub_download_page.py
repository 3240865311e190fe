"""Downloading a Hugging Face model ahead of time from the Models page, through the loopback
hub: the form asks the builder, the page shows the download's state until it is done, and the
model then appears in the Hugging Face cache with its size; a malformed repository id is
refused on the page, naming the field."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness import ADMIN_KEY, GEMMA_HF, MODELS_DIR, Appliance, wait_until
from tests.hub import Hub
from tests.web.browser import check_page, sign_in

REPO = "appliance-test/gemma-3-270m"


@pytest.fixture
def hub(docker_ready: None) -> Iterator[Hub]:
    server = Hub.serving({REPO: MODELS_DIR / GEMMA_HF})
    yield server
    server.stop()


def test_download_ahead_from_the_models_page(
    make_appliance: Callable[..., Appliance], page: Any, hub: Hub, tmp_path: Path
) -> None:
    appliance = make_appliance(
        APPLIANCE_MODELS_DIR=str(tmp_path / "models"),
        APPLIANCE_HF_CACHE_DIR=str(tmp_path / "hf"),
        APPLIANCE_HF_DOWNLOAD_WEIGHTS="true",
        APPLIANCE_HF_ENDPOINT=hub.url,
    )
    sign_in(page, appliance.url, ADMIN_KEY)
    page.goto(appliance.url + "/ui/models")
    page.fill("#hf-repository", "not a repository")
    page.click("#hub-download button[type=submit]")
    assert "repository" in page.inner_text("#models-error")

    page.fill("#hf-repository", REPO)
    page.click("#hub-download button[type=submit]")
    row = page.locator(f'tr[data-download="{REPO}"]')
    assert row.locator('[data-col="state"]').inner_text().split()[0] in (
        "pending",
        "downloading",
        "done",
    )

    def done() -> bool:
        page.reload()
        return bool(row.locator('[data-col="state"]').inner_text().startswith("done"))

    wait_until(done, 180, "the download to be done", every_s=2)
    assert "of" in row.locator('[data-col="progress"]').inner_text()  # bytes of the total
    assert REPO in page.inner_text("#hf-models")
    check_page(page, "models-hub-download")
