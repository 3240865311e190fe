"""OpenAI's Batch API through the real `openai` SDK: a batch with one bad line is refused whole
(no batch, no task), and the refusal starts by naming the line and its custom_id, for the
input file's own checks and every admission check alike; LLM Engine's batch completions name
the prompt. While SQLite's write lock is held elsewhere, a batch waits for it off the event
loop: the api keeps answering. Against a fake replica; api and worker, no Docker."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.api.test_admission import MINE, THEIRS, Bed, _seed, auth, chat_body, running_bed

CHAT = "/v1/chat/completions"
CAP = 10


@pytest.fixture(scope="module")
def bed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bed]:
    env = {"APPLIANCE_SWEEP_INTERVAL_S": "0.5", "APPLIANCE_ROUTING_REFRESH_S": "0.5"}
    with running_bed(tmp_path_factory.mktemp("batches"), env, _seed) as made:
        yield made


def sdk(bed: Bed, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=bed.appliance.url + "/v1", api_key=key, max_retries=0)


def line(custom_id: str, model: str = MINE, **tokens: Any) -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": CHAT, "body": chat_body(model, tokens)}


def five_lines(third: dict[str, Any]) -> bytes:
    """Five good lines of team t1's endpoint, but the third."""
    lines = [line(f"req-{n}", max_tokens=1) for n in range(1, 6)]
    lines[2] = third
    return b"".join(json.dumps(x).encode() + b"\n" for x in lines)


def create(oai: openai.OpenAI, content: bytes) -> Any:
    source = oai.files.create(file=("in.jsonl", content), purpose="batch")
    return oai.batches.create(input_file_id=source.id, endpoint=CHAT, completion_window="24h")


def refusal(oai: openai.OpenAI, content: bytes) -> openai.APIStatusError:
    with pytest.raises(openai.APIStatusError) as refused:
        create(oai, content)
    return refused.value


def message(error: openai.APIStatusError) -> str:
    return str(error.body["message"])  # type: ignore[index]


def test_a_bad_line_is_named_and_no_batch_is_made(bed: Bed) -> None:
    oai = sdk(bed, bed.key())  # team t1: no batch of its team is ever accepted in this module
    negative = refusal(oai, five_lines(line("req-3", max_tokens=-5)))
    assert negative.status_code == 400, negative.body
    assert message(negative).startswith("line 3 (custom_id 'req-3'): max_tokens=-5 is below 0")
    assert negative.body["param"] == "max_tokens"  # type: ignore[index]

    unknown = refusal(oai, five_lines(line("req-3", model="nowhere")))
    assert unknown.status_code == 404, unknown.body
    assert message(unknown) == "line 3 (custom_id 'req-3'): The model `nowhere` does not exist."
    invisible = refusal(oai, five_lines(line("req-3", model=THEIRS)))  # team t2's
    assert invisible.status_code == 404, invisible.body
    assert message(invisible).startswith("line 3 (custom_id 'req-3'): The model `theirs`")

    no_model = line("req-3")
    del no_model["body"]["model"]
    assert message(refusal(oai, five_lines(no_model))).startswith("line 3 (custom_id 'req-3'): ")
    wrong_url = line("req-3") | {"url": "/v1/completions"}
    assert message(refusal(oai, five_lines(wrong_url))).startswith("line 3 (custom_id 'req-3'): ")
    again = refusal(oai, five_lines(line("req-1")))
    assert message(again).startswith("line 3 (custom_id 'req-1'): custom_id must be unique")
    assert again.body["param"] == "input_file_id"  # type: ignore[index]  # where the line is

    with pytest.raises(openai.NotFoundError) as missing:
        oai.batches.create(input_file_id="file-nope", endpoint=CHAT, completion_window="24h")
    assert missing.value.body["param"] == "input_file_id"  # type: ignore[index]
    assert oai.batches.list().data == []


def test_an_input_nested_past_what_json_reads_is_a_400_naming_it(bed: Bed) -> None:
    """An input file nested thousands deep (a line of /v1/batches, or batch completions'
    `content`) is no JSON the appliance reads: a 400 naming the line or the file, as the
    same body sent to its route directly, where the standard library's reader ended in a
    RecursionError and a 500."""
    key = bed.key()
    deep = b"[" * 5000 + b"]" * 5000
    bad_line = (
        b'{"custom_id": "req-3", "method": "POST", "url": "%s", "body": {"messages": %s}}'
        % (
            CHAT.encode(),
            deep,
        )
    )
    lines = five_lines(line("req-3", max_tokens=1)).split(b"\n")
    lines[2] = bad_line
    refused = refusal(sdk(bed, key), b"\n".join(lines))
    assert refused.status_code == 400, refused.body
    assert message(refused).startswith(  # what is wrong, and where on the line
        "line 3 of the input file is not valid JSON: depth limit exceeded at column "
    ), refused.body
    source = sdk(bed, key).files.create(
        file=("deep.json", b'{"prompts": ' + deep + b"}"), purpose="batch"
    )
    reply = httpx.post(
        bed.appliance.url + "/v1/llm/batch-completions",
        json={
            "model_config": {"model": MINE},
            "input_data_path": source.id,
            "output_data_path": "o",
        },
        headers=auth(key),
        timeout=30,
    )
    assert reply.status_code == 400, reply.text
    assert "input file must hold the JSON of `content`" in reply.json()["detail"], reply.text


def test_batch_completions_say_what_their_input_must_be(bed: Bed) -> None:
    """LLM Engine's batch completions read their input from a file uploaded to /v1/files (its
    id), or from `content`: an object-storage path, as LLM Engine takes, or no prompt at all is
    a 400 saying what to send instead."""
    key = bed.key()

    def create(**fields: object) -> httpx.Response:
        body = {"model_config": {"model": MINE}, "output_data_path": "o", **fields}
        return httpx.post(
            bed.appliance.url + "/v1/llm/batch-completions", json=body, headers=auth(key)
        )

    reply = create(input_data_path="s3://bucket/prompts.json")
    assert reply.status_code == 400, reply.text
    assert "upload it to /v1/files" in reply.json()["detail"], reply.text
    reply = create(content={"prompts": [], "max_new_tokens": 1})
    assert reply.status_code == 400, reply.text
    assert reply.json()["detail"] == "content.prompts must hold at least one prompt", reply.text


def test_a_line_over_the_keys_token_cap_is_named_with_the_status_of_the_request_alone(
    bed: Bed,
) -> None:
    key = bed.key(max_tokens_per_request=CAP)
    alone = httpx.post(
        bed.appliance.url + CHAT, json=chat_body(MINE, {"max_tokens": CAP + 1}), headers=auth(key)
    )
    assert alone.status_code in (400, 429), alone.text
    over = refusal(sdk(bed, key), five_lines(line("req-3", max_tokens=CAP + 1)))
    assert over.status_code == alone.status_code, over.body
    assert message(over) == f"line 3 (custom_id 'req-3'): {alone.json()['error']['message']}"
    if alone.status_code == 429:
        assert over.response.headers["retry-after"] == alone.headers["retry-after"]
    assert sdk(bed, key).batches.list().data == []


def test_batch_completions_name_the_prompt(bed: Bed) -> None:
    content = [{"prompt": "hi", "max_tokens": 1}, {"prompt": "hi", "max_tokens": -5}]
    reply = httpx.post(
        bed.appliance.url + "/v2/batch-completions",
        json={"model_config": {"model": MINE}, "content": content, "output_data_path": "out"},
        headers=auth(bed.key()),
        timeout=30,
    )
    assert reply.status_code == 400, reply.text
    assert reply.json()["detail"].startswith("content[1]: max_tokens=-5 is below 0"), reply.text


def test_batch_completions_over_the_bound_are_refused_before_any_prompt_is_read(
    bed: Bed,
) -> None:
    """A batch holds at most 50,000 prompts: an input file of a million (5 MB; a file may hold
    512 MB) is refused at once, where each prompt was made a request first (seconds of the
    api's time and hundreds of MB for these, its memory for a large file)."""
    many = 1_000_000
    v1 = {"prompts": ["a"] * many, "max_new_tokens": 1, "temperature": 0}
    v2 = [{"prompt": "a"}] * many
    key = bed.key()
    for route, content in (("/v1/llm/batch-completions", v1), ("/v2/batch-completions", v2)):
        source = sdk(bed, key).files.create(
            file=("prompts.json", json.dumps(content).encode()), purpose="batch"
        )
        began = time.monotonic()
        reply = httpx.post(
            bed.appliance.url + route,
            json={
                "model_config": {"model": MINE},
                "input_data_path": source.id,
                "output_data_path": "o",
            },
            headers=auth(key),
            timeout=60,
        )
        took = time.monotonic() - began
        assert reply.status_code == 400, reply.text
        assert "a batch holds at most 50000 prompts" in reply.json()["detail"], reply.text
        assert took < 2.5, (route, took)


def test_a_batch_waiting_for_the_write_lock_leaves_the_api_answering(bed: Bed) -> None:
    oai = sdk(bed, bed.key(team="t2"))  # the endpoint `theirs`; apart from team t1's batches
    source = oai.files.create(
        file=("in.jsonl", json.dumps(line("1", THEIRS)).encode()), purpose="batch"
    )
    database = Path(bed.appliance.data_dir) / "appliance.db"
    holder = sqlite3.connect(database, isolation_level=None, timeout=30)
    outcome: list[Any] = []

    def post() -> None:
        try:
            outcome.append(
                oai.batches.create(
                    input_file_id=source.id, endpoint=CHAT, completion_window="24h", timeout=60
                )
            )
        except Exception as exc:  # the assertion below shows it
            outcome.append(exc)

    holder.execute("BEGIN IMMEDIATE")  # what a long write elsewhere holds
    try:
        sender = threading.Thread(target=post)
        sender.start()
        for _ in range(4):  # each while the batch waits for the lock
            assert httpx.get(bed.appliance.url + "/healthz", timeout=5).status_code == 200
            sender.join(0.5)
        assert sender.is_alive(), outcome  # it did wait for the lock
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    sender.join(60)
    assert len(outcome) == 1 and not isinstance(outcome[0], Exception), outcome
    assert outcome[0].status == "in_progress"


def test_listing_batches_pages_exactly_and_refuses_a_bad_limit(bed: Bed) -> None:
    """`limit` is OpenAI's 1 to 100, refused outside it with a 400 naming it (it was clamped
    in silence, so `limit=500` answered 100 batches with `has_more: false`), and `has_more`
    says whether another page exists, not whether this one is full."""
    key = bed.key(team="t2")
    oai = sdk(bed, key)
    source = oai.files.create(
        file=("in.jsonl", json.dumps(line("1", THEIRS)).encode()), purpose="batch"
    )
    made = [
        oai.batches.create(input_file_id=source.id, endpoint=CHAT, completion_window="24h").id
        for _ in range(3)
    ]
    client = httpx.Client(base_url=bed.appliance.url, headers=auth(key), timeout=30)
    first = client.get("/v1/batches", params={"limit": 2}).json()
    assert [b["id"] for b in first["data"]] == made[::-1][:2] and first["has_more"] is True
    rest = client.get("/v1/batches", params={"limit": 100, "after": first["last_id"]}).json()
    assert rest["data"][0]["id"] == made[0] and rest["has_more"] is False
    every = len(rest["data"]) + 2
    whole = client.get("/v1/batches", params={"limit": every}).json()
    assert len(whole["data"]) == every and whole["has_more"] is False
    for bad in ("0", "-1", "101", "500", "9" * 30, "x"):
        refused = client.get("/v1/batches", params={"limit": bad})
        assert refused.status_code == 400, (bad, refused.text)
        assert "limit" in refused.json()["error"]["message"], refused.text
    # a cursor that is no batch of the caller's is a 404 naming it, as /v1/files's: it gave
    # a page from wherever the id sorted
    for stray in ("batch_nope", "zzz"):
        unknown = client.get("/v1/batches", params={"after": stray})
        assert unknown.status_code == 404, (stray, unknown.text)
        assert unknown.json()["error"]["param"] == "after", unknown.text


def test_a_batch_takes_openais_fields_within_openais_bounds(bed: Bed) -> None:
    """A field the Batch API has not, or one the appliance would not honour
    (`output_expires_after`: output files are kept by the appliance's own rules), is a 400
    naming it, and `metadata` holds at most 16 pairs of 64-character keys and 512-character
    values, as OpenAI's does: before, both were taken and unknown fields ignored, and a team
    stored megabytes of metadata in every batch."""
    key = bed.key(team="t2")
    oai = sdk(bed, key)
    source = oai.files.create(
        file=("in.jsonl", json.dumps(line("1", THEIRS)).encode()), purpose="batch"
    )
    body = {"input_file_id": source.id, "endpoint": CHAT, "completion_window": "24h"}
    client = httpx.Client(base_url=bed.appliance.url, headers=auth(key), timeout=60)
    most = {f"k{i:02d}" + "k" * 61: "v" * 512 for i in range(16)}
    assert client.post("/v1/batches", json={**body, "metadata": most}).status_code == 200
    refused: list[tuple[dict[str, Any], str]] = [
        ({"surprise": 1}, "surprise"),
        ({"output_expires_after": {"anchor": "created_at", "seconds": 3600}}, "output_expires"),
        ({"metadata": {**most, "one-more": "v"}}, "metadata"),
        ({"metadata": {"k" * 65: "v"}}, "metadata"),
        ({"metadata": {"k": "v" * 513}}, "metadata"),
    ]
    for extra, field in refused:
        reply = client.post("/v1/batches", json={**body, **extra})
        assert reply.status_code == 400, (field, reply.text)
        assert field in reply.json()["error"]["message"], (field, reply.text)
