"""A model upload saved under a name with a folder in it ("models/x.gguf", "../x.gguf"): the
Models page and the API say what a file name may be, not "Not Found"."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.harness import ADMIN_KEY, Appliance
from tests.web.browser import sign_in

GGUF_HEAD = b"GGUF" + bytes(60)  # a name refused before any of the body is read


def test_a_name_with_a_folder_is_refused_with_the_name_rule(
    api_only: Appliance, page: Any, tmp_path: Path
) -> None:
    model = tmp_path / "tiny.gguf"
    model.write_bytes(GGUF_HEAD)
    sign_in(page, api_only.url, ADMIN_KEY)
    page.goto(api_only.url + "/ui/models")
    for save_as in ("models/tiny.gguf", "../tiny.gguf"):
        page.set_input_files("#u-file", str(model))
        page.fill("#u-name", save_as)
        page.click("[data-upload-button]")
        page.wait_for_function(
            "() => !document.querySelector('[data-upload-button]').disabled"
            " && !document.querySelector('[data-upload-state]').textContent.startsWith('Upload')"
        )
        said = page.inner_text("[data-upload-state]")
        assert "is not a model file name" in said and "no '/'" in said, (save_as, said)

    api = api_only.client()
    for name in ("models%2Ftiny.gguf", "..%2Ftiny.gguf"):
        reply = api.put(f"/v1/storage/model-files/{name}", content=GGUF_HEAD)
        assert reply.status_code == 422, (name, reply.status_code, reply.text)
        assert "is not a model file name" in reply.json()["detail"], reply.text
