"""The `openai` SDK and LLM Engine's client on the same install: files in both clients' shapes
on the same routes (their errors too), OpenAI's model object, and OpenAI's error envelope for
batches and unknown paths."""

from __future__ import annotations

import json
import threading
import time
from datetime import datetime
from pathlib import Path

import httpx
import openai
import pytest

from tests.api.test_llmengine_compat import client, seed
from tests.harness import ADMIN_KEY, Appliance

LINES = b'{"custom_id": "1"}\n{"custom_id": "2"}\n'


def sdk(appliance: Appliance) -> openai.OpenAI:
    return openai.OpenAI(base_url=appliance.url + "/v1", api_key=ADMIN_KEY, max_retries=0)


def test_files_with_both_clients(api_only: Appliance, tmp_path: Path) -> None:
    oai = sdk(api_only)
    theirs = oai.files.create(file=("openai.jsonl", LINES), purpose="batch")
    mine_path = tmp_path / "engine.txt"
    mine_path.write_text("hello from llmengine\n")
    seen = client(api_only, "files", theirs.id, str(mine_path))
    mine_id = seen["mine"][0]
    assert seen["mine"] == [mine_id, "engine.txt", 21, "hello from llmengine\n"]
    assert seen["theirs"] == ["openai.jsonl", len(LINES), LINES.decode()]
    assert seen["listed"] == sorted([theirs.id, mine_id])
    assert seen["deleted"] is True
    # one error body both clients read: LLM Engine's `detail` beside OpenAI's `error`
    assert seen["missing"] == ["NotFoundError", f"no file with id {theirs.id!r}"]
    # OpenAI's SDK sees LLM Engine's upload as its own kind of file, and the bytes as they are
    got = oai.files.retrieve(mine_id)
    assert (got.filename, got.bytes, got.purpose) == ("engine.txt", 21, "batch")
    assert oai.files.content(mine_id).content == b"hello from llmengine\n"
    assert [f.id for f in oai.files.list()] == [mine_id]  # the other was deleted
    assert oai.files.delete(mine_id).deleted is True
    with pytest.raises(openai.NotFoundError) as gone:
        oai.files.retrieve(mine_id)
    assert gone.value.body["message"] == f"no file with id {mine_id!r}"  # type: ignore[index]
    with pytest.raises(openai.NotFoundError) as batch:
        oai.batches.retrieve("batch_nope")
    assert "batch_nope" in batch.value.body["message"]  # type: ignore[index]


def test_models_retrieve_and_unknown_routes(api_only: Appliance) -> None:
    seed(api_only)
    oai = sdk(api_only)
    model = oai.models.retrieve("llama")
    assert (model.id, model.object, model.owned_by) == ("llama", "model", "admin")
    made = api_only.client().get("/v1/model-endpoints/end_llama").json()["created_at"]
    created = int(datetime.fromisoformat(made).timestamp())
    time.sleep(1.1)  # `created` is when the endpoint was made, not when it is asked about
    assert oai.models.retrieve("llama").created == created
    assert {m.id: m.created for m in oai.models.list()}["llama"] == created
    with pytest.raises(openai.NotFoundError) as missing:
        oai.models.retrieve("nowhere")
    assert missing.value.body == {  # the SDK hands over the envelope's `error`
        "message": "The model `nowhere` does not exist.",
        "type": "not_found_error",
        "param": "model",
        "code": 404,
    }
    with pytest.raises(openai.NotFoundError) as unknown:
        oai.get("/no/such/route", cast_to=object)
    assert unknown.value.body["message"] == "Invalid URL (GET /v1/no/such/route)"  # type: ignore[index]


def test_the_sdk_at_v2_lists_models_and_hears_unknown_paths_in_its_envelope(
    api_only: Appliance,
) -> None:
    """/v2's chat and completions are OpenAI's: the SDK pointed at .../v2 lists models there,
    and a path that is not there is OpenAI's 404, not FastAPI's bare one."""
    seed(api_only)
    v2 = openai.OpenAI(base_url=api_only.url + "/v2", api_key=ADMIN_KEY, max_retries=0)
    assert v2.models.retrieve("llama").id == "llama"  # a miss reloads the table: then listed
    assert "llama" in [m.id for m in v2.models.list()]
    with pytest.raises(openai.NotFoundError) as missing:
        v2.models.retrieve("nowhere")
    assert missing.value.body["type"] == "not_found_error"  # type: ignore[index]
    with pytest.raises(openai.NotFoundError) as unknown:
        v2.get("/no/such/route", cast_to=object)
    assert unknown.value.body["message"] == "Invalid URL (GET /v2/no/such/route)"  # type: ignore[index]


def test_the_sdk_without_v1_in_its_base_url_is_told_where_the_routes_are(
    api_only: Appliance,
) -> None:
    """A base_url without /v1 (the commonest mistake) sends the SDK to /chat/completions: its
    404 is OpenAI's, and says where the routes are, not FastAPI's bare "Not Found"."""
    seed(api_only)
    bare = openai.OpenAI(base_url=api_only.url, api_key=ADMIN_KEY, max_retries=0)
    with pytest.raises(openai.NotFoundError) as chat:
        bare.chat.completions.create(model="llama", messages=[{"role": "user", "content": "x"}])
    assert chat.value.body["message"] == (  # type: ignore[index]
        "Invalid URL (POST /chat/completions): OpenAI's routes are under /v1; "
        f"set the client's base_url to {api_only.url}/v1"
    )
    with pytest.raises(openai.NotFoundError) as models:
        bare.models.list()
    assert "/v1" in models.value.body["message"]  # type: ignore[index]
    with pytest.raises(openai.NotFoundError) as files:
        bare.files.retrieve("file_x")
    assert f"{api_only.url}/v1" in files.value.body["message"]  # type: ignore[index]


def test_unknown_paths_outside_v1_keep_fastapis_shape(api_only: Appliance) -> None:
    reply = httpx.get(api_only.url + "/v9/nothing", headers={"x-api-key": ADMIN_KEY})
    assert reply.status_code == 404
    assert reply.json() == {"detail": "Not Found"}
    wrong = httpx.get(api_only.url + "/v1/chat/completions", headers={"x-api-key": ADMIN_KEY})
    assert wrong.status_code == 405
    assert wrong.json()["error"]["type"] == "invalid_request_error"


def test_the_sdk_pages_through_files(api_only: Appliance) -> None:
    oai = sdk(api_only)
    made = [oai.files.create(file=(f"{n}.jsonl", LINES), purpose="batch").id for n in range(3)]
    page = oai.files.list(limit=2)
    assert (len(page.data), page.has_more) == (2, True)
    assert [f.id for f in page] == made[::-1]  # every page, newest first
    assert [f.id for f in oai.files.list(order="asc", limit=1)] == made


def test_a_bad_query_field_is_the_errors_param(api_only: Appliance) -> None:
    """A bad field the route's model refuses is OpenAI's `param`, as the SDK reads it
    (`e.param`), not only in the message."""
    oai = sdk(api_only)
    for call, param in (
        (lambda: oai.files.list(order="sideways"), "order"),  # type: ignore[arg-type]
        (lambda: oai.files.list(limit=0), "limit"),
        (lambda: oai.batches.list(limit=0), "limit"),
    ):
        with pytest.raises(openai.BadRequestError) as refused:
            call()
        assert refused.value.param == param, refused.value.body
        assert param in refused.value.message


def test_a_file_for_another_purpose_is_told_what_files_are_for(api_only: Appliance) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        sdk(api_only).files.create(file=("t.jsonl", LINES), purpose="fine-tune")
    assert refused.value.param == "purpose"
    assert "'fine-tune'" in refused.value.message and "'batch'" in refused.value.message
    assert "does not fine-tune" in refused.value.message
    with pytest.raises(openai.BadRequestError) as refused:
        sdk(api_only).files.create(file=("t.jsonl", LINES), purpose="assistants")
    assert "'assistants'" in refused.value.message and "fine-tune" not in refused.value.message


def test_a_file_asking_to_expire_is_told_files_are_kept_until_deleted(api_only: Appliance) -> None:
    """OpenAI's `expires_after` would delete the file after its seconds; the appliance keeps
    files until they are deleted, so an upload asking for it is a 400 naming it, as a batch's
    `output_expires_after` is, where the file was kept without a word. An upload without it
    is made as before."""
    oai = sdk(api_only)
    with pytest.raises(openai.BadRequestError) as refused:
        oai.files.create(
            file=("t.jsonl", LINES),
            purpose="batch",
            expires_after={"anchor": "created_at", "seconds": 3600},
        )
    assert refused.value.param == "expires_after", refused.value.body
    assert "DELETE /v1/files/" in refused.value.message
    assert not [f for f in oai.files.list() if f.filename == "t.jsonl"]
    assert oai.files.create(file=("t.jsonl", LINES), purpose="batch").filename == "t.jsonl"


def _upload_named(appliance: Appliance, name: bytes) -> httpx.Response:
    """An upload whose multipart head carries `name` as it is (clients escape some bytes)."""
    body = (
        b'--b\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
        b'--b\r\nContent-Disposition: form-data; name="file"; filename="' + name + b'"\r\n'
        b"Content-Type: application/jsonl\r\n\r\n" + LINES + b"\r\n--b--\r\n"
    )
    return httpx.post(
        appliance.url + "/v1/files",
        content=body,
        headers={
            "authorization": f"Bearer {ADMIN_KEY}",
            "content-type": "multipart/form-data; boundary=b",
        },
    )


@pytest.mark.parametrize(
    "name",
    [b"a\x00b.jsonl", b"a\x1b[31mred.jsonl", b"a\x7f.jsonl", "\u202egnp.jsonl".encode()],
    ids=["NUL", "terminal escape", "DEL", "right-to-left override"],
)
def test_a_file_name_with_control_characters_is_refused_naming_it(
    api_only: Appliance, name: bytes
) -> None:
    """A file's name comes back in every listing, the audit log and Content-Disposition: one
    holding a control character (a NUL, a terminal's escape sequence) or a direction override
    (which shows 'gnp.jsonl' as 'lnosj.png') is a 400 naming the file, and nothing is kept.
    Any other name, in any script, is kept as sent."""
    client = httpx.Client(base_url=api_only.url, headers={"authorization": f"Bearer {ADMIN_KEY}"})
    before = client.get("/v1/files").json()["data"]
    reply = _upload_named(api_only, name)
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"] == "file", reply.text
    assert client.get("/v1/files").json()["data"] == before
    kept = _upload_named(api_only, "résumé 履歴.jsonl".encode())
    assert kept.status_code == 200 and kept.json()["filename"] == "résumé 履歴.jsonl", kept.text


def test_a_list_after_an_unknown_file_names_after(api_only: Appliance) -> None:
    """The cursor of a files list that names no file of the team is a 404 whose param is the
    query's `after`, where it said `file_id`, a field the list call has not."""
    with pytest.raises(openai.NotFoundError) as refused:
        sdk(api_only).files.list(after="file-nope")
    assert refused.value.param == "after", refused.value.body
    assert "file-nope" in refused.value.message


def test_a_file_read_as_json_is_sent_as_it_is_read(api_only: Appliance, tmp_path: Path) -> None:
    """LLM Engine's client reads a file as `{"id", "content"}`. The api read the whole file,
    decoded it and wrote it as JSON before sending a byte: a few concurrent reads of a large
    file (files may hold 512 MB) held several times their size each and could exhaust the
    api's memory. Now the JSON is written as the file is read, its bytes the same."""
    text = "".join(
        f'{{"custom_id": "{i}", "note": "caf\u00e9 \\"q\\"\\n\u2603"}}\n'
        for i in range(1, 1_000_000)
    )
    path = tmp_path / "large.jsonl"
    path.write_text(text)
    size = path.stat().st_size
    with api_only.client() as c, path.open("rb") as f:
        made = c.post("/v1/files", files={"file": ("large.jsonl", f)}, data={"purpose": "batch"})
    assert made.status_code == 200, made.text
    status = Path(f"/proc/{api_only.procs['api'].pid}/status")

    def rss() -> int:
        line = next(x for x in status.read_text().splitlines() if x.startswith("VmRSS:"))
        return int(line.split()[1]) * 1024

    before = peak = rss()
    done = threading.Event()

    def watch() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, rss())
            time.sleep(0.01)

    watcher = threading.Thread(target=watch)
    watcher.start()
    body = b""
    try:
        headers = {"x-api-key": ADMIN_KEY}
        url = f"{api_only.url}/v1/files/{made.json()['id']}/content"
        with httpx.stream("GET", url, headers=headers, timeout=60) as reply:
            assert reply.status_code == 200
            assert reply.headers["content-type"] == "application/json"
            for chunk in reply.iter_bytes():
                body += chunk
                time.sleep(0.001)
    finally:
        done.set()
        watcher.join()
    assert json.loads(body) == {"id": made.json()["id"], "content": text}
    assert body.startswith(b'{"id":"') and b'","content":"{\\"custom_id\\"' in body[:80]
    grew = peak - before
    print(f"a {size >> 20} MiB file read as JSON: the api grew {grew >> 20} MiB")
    assert grew < size, (grew, size)  # it grew 6 times the size, reading it whole
