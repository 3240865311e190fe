"""The Models page in a browser, on a private models directory: upload the Gemma 3 270M GGUF
with the page's form (its sha256 shown), deploy a llama.cpp endpoint from it with the endpoint
form until it is READY and answers, see sizes and "used by", find the used file's delete
refused, and delete an unused file. The page is screenshot and checked at 1280 px and 390 px."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.harness import (
    ADMIN_KEY,
    GEMMA_FILE,
    LLAMACPP_IMAGE,
    MODELS_DIR,
    Appliance,
    wait_until,
)
from tests.web.browser import check_page, sign_in
from web.views import size

READY_WITHIN_MS = 180_000
GEMMA = MODELS_DIR / GEMMA_FILE


def upload_with_form(page: Any, path: Path, save_as: str = "") -> str:
    """Upload through the page's form; returns the sha256 the page showed."""
    page.set_input_files("#u-file", str(path))
    page.fill("#u-name", save_as)
    page.click("[data-upload-button]")
    page.wait_for_function(
        "() => document.querySelector('[data-upload-state]').dataset.sha256", timeout=120_000
    )
    sha256 = str(page.get_attribute("[data-upload-state]", "data-sha256"))
    page.wait_for_load_state("load")
    return sha256


def row(page: Any, name: str) -> Any:
    return page.locator(f'tr[data-file="{name}"]')


def test_upload_deploy_and_delete_on_the_models_page(
    make_appliance: Callable[..., Appliance], page: Any, tmp_path: Path
) -> None:
    models = tmp_path / "models"
    models.mkdir()
    appliance = make_appliance(
        APPLIANCE_MODELS_DIR=str(models), APPLIANCE_HF_CACHE_DIR=str(tmp_path / "hf")
    )
    base, api = appliance.url, appliance.client()
    sign_in(page, base, ADMIN_KEY)
    page.click("nav >> text=Models")
    page.wait_for_url(base + "/ui/models")
    assert "No model files yet" in page.inner_text("#model-files")
    assert "free" in page.inner_text('[data-disk="models"]')
    check_page(page, "models-empty")

    # Upload the real model, and a small spare file under a name of our choosing.
    shown = upload_with_form(page, GEMMA)
    assert shown == hashlib.sha256(GEMMA.read_bytes()).hexdigest()
    page.wait_for_selector(f'tr[data-file="{GEMMA_FILE}"]')
    assert (models / GEMMA_FILE).read_bytes() == GEMMA.read_bytes()
    not_gguf = tmp_path / "notes.gguf"
    not_gguf.write_bytes(b"just text, not a model\n")
    page.set_input_files("#u-file", str(not_gguf))
    page.click("[data-upload-button]")
    page.wait_for_function(
        "() => document.querySelector('[data-upload-state]').textContent.includes('not a GGUF')"
    )
    assert "notes.gguf" not in os.listdir(models)
    spare = tmp_path / "spare-source.gguf"
    spare.write_bytes(b"GGUF" + os.urandom(40_000))
    upload_with_form(page, spare, save_as="spare.gguf")
    page.wait_for_selector('tr[data-file="spare.gguf"]')
    gemma_row = row(page, GEMMA_FILE)
    assert gemma_row.locator('[data-col="size"]').inner_text() == size(GEMMA.stat().st_size)
    assert row(page, "spare.gguf").locator('[data-col="size"]').inner_text() == size(40_004)
    assert gemma_row.locator('[data-col="used-by"]').inner_text() == "unused"
    assert sorted(os.listdir(models)) == sorted([GEMMA_FILE, "spare.gguf"])  # nothing partial

    # Deploy it: the form comes filled in with the file and llama.cpp.
    gemma_row.locator("[data-deploy]").click()
    assert page.input_value("#f-model") == GEMMA_FILE
    assert page.input_value("#f-framework") == "llamacpp"
    offered = page.eval_on_selector_all("#model-files option", "els => els.map(e => e.value)")
    assert offered == [GEMMA_FILE, "spare.gguf"]
    page.fill("#f-name", "gemma-uploaded")
    page.click("button.primary[type=submit]")
    page.wait_for_selector("ol.steps")
    endpoint_id = page.url.rsplit("/", 1)[1]
    page.wait_for_selector('[data-status="READY"]', timeout=READY_WITHIN_MS)
    reply = api.post(
        "/v1/chat/completions",
        json={
            "model": "gemma-uploaded",
            "messages": [{"role": "user", "content": "Say hi."}],
            "max_tokens": 8,
        },
    )
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["message"]["content"]

    # The page names the user; the used file cannot be deleted, the spare one can.
    page.click("nav >> text=Models")
    used = row(page, GEMMA_FILE).locator('[data-col="used-by"]')
    assert used.inner_text() == "gemma-uploaded"
    assert used.locator("a").get_attribute("href") == f"/ui/endpoints/{endpoint_id}"
    assert row(page, GEMMA_FILE).locator("button.danger").is_disabled()
    assert row(page, "spare.gguf").locator('[data-col="used-by"]').inner_text() == "unused"
    image_row = page.locator(f'tr[data-image="{LLAMACPP_IMAGE}"]')

    def image_reported() -> bool:
        page.reload()
        return "yes" in image_row.inner_text() and "gemma-uploaded" in image_row.inner_text()

    wait_until(image_reported, 60, "the builder to report the llama.cpp image", every_s=2)
    assert image_row.locator('[data-col="size"]').inner_text().endswith("B")
    check_page(page, "models")
    row(page, "spare.gguf").locator("button.danger").click()  # the confirmation is accepted
    page.wait_for_url(base + "/ui/models")
    assert row(page, "spare.gguf").count() == 0
    assert os.listdir(models) == [GEMMA_FILE]
    refused = api.delete(f"/v1/storage/model-files/{GEMMA_FILE}")
    assert refused.status_code == 409 and "gemma-uploaded" in refused.json()["detail"]
