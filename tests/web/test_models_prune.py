"""The Models page's prune in a browser, on images of the test's own (the settings name them):
the button asks the builder, the page follows the prune until it is done, and shows what went
and what stayed and why."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.api.test_storage_images import images, present  # noqa: F401 - the fixture
from tests.harness import ADMIN_KEY, Appliance, wait_until
from tests.web.browser import check_page, sign_in


def test_prune_from_the_models_page(
    make_appliance: Callable[..., Appliance],
    page: Any,
    images: dict[str, str],  # noqa: F811
    tmp_path: Path,
) -> None:
    appliance = make_appliance(
        APPLIANCE_MODELS_DIR=str(tmp_path / "models"),
        APPLIANCE_VLLM_IMAGE=images["unused"],
        APPLIANCE_VLLM_CPU_IMAGE=images["container"],
        APPLIANCE_LLAMACPP_IMAGE=images["endpoint"],
        APPLIANCE_LLAMACPP_CUDA_IMAGE=images["absent"],
    )
    sign_in(page, appliance.url, ADMIN_KEY)
    page.goto(appliance.url + "/ui/models")
    unused = page.locator(f'tr[data-image="{images["unused"]}"]')

    def reported() -> bool:
        page.reload()
        return "yes" in unused.inner_text()

    wait_until(reported, 60, "the builder to report the images", every_s=2)
    page.click("#prune-images")  # the confirmation is accepted
    page.wait_for_selector('[data-prune-state="done"]', timeout=60_000)
    outcome = page.inner_text("#prune")
    assert images["unused"] in outcome.split("Kept:")[0]
    assert f"{images['container']} (used by 1 container(s))" in outcome
    assert not present(images["unused"]) and present(images["container"])
    check_page(page, "models-pruned")
