"""Model uploads the Models page refuses: saved under a name with a folder in it
("models/x.gguf", "../x.gguf"), the page and the API say what a file name may be, not "Not
Found"; sent after the session ended in another tab, the page says to sign in again."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.harness import ADMIN_KEY, Appliance
from tests.web.browser import sign_in

GGUF_HEAD = b"GGUF" + bytes(60)  # a name refused before any of the body is read


def upload_refused(page: Any, model: Path, save_as: str) -> str:
    """What the page says of an upload that fails."""
    page.set_input_files("#u-file", str(model))
    page.fill("#u-name", save_as)
    page.click("[data-upload-button]")
    page.wait_for_function(
        "() => !document.querySelector('[data-upload-button]').disabled"
        " && !document.querySelector('[data-upload-state]').textContent.startsWith('Upload')"
    )
    return str(page.inner_text("[data-upload-state]"))


def test_a_name_with_a_folder_is_refused_with_the_name_rule(
    api_only: Appliance, page: Any, tmp_path: Path
) -> None:
    model = tmp_path / "tiny.gguf"
    model.write_bytes(GGUF_HEAD)
    sign_in(page, api_only.url, ADMIN_KEY)
    page.goto(api_only.url + "/ui/models")
    for save_as in ("models/tiny.gguf", "../tiny.gguf"):
        said = upload_refused(page, model, save_as)
        assert "is not a model file name" in said and "no '/'" in said, (save_as, said)

    api = api_only.client()
    for name in ("models%2Ftiny.gguf", "..%2Ftiny.gguf"):
        reply = api.put(f"/v1/storage/model-files/{name}", content=GGUF_HEAD)
        assert reply.status_code == 422, (name, reply.status_code, reply.text)
        assert "is not a model file name" in reply.json()["detail"], reply.text


def test_an_upload_after_signing_out_elsewhere_says_to_sign_in(
    api_only: Appliance, page: Any, tmp_path: Path
) -> None:
    model = tmp_path / "tiny.gguf"
    model.write_bytes(GGUF_HEAD)
    sign_in(page, api_only.url, ADMIN_KEY)
    page.goto(api_only.url + "/ui/models")
    other = page.context.new_page()  # the same browser signs out in another tab
    other.goto(api_only.url + "/ui/endpoints")
    other.click("text=Sign out")
    other.wait_for_url("**/ui/sign-in**")
    said = upload_refused(page, model, "")
    assert "sign in again" in said, said
