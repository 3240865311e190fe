"""One admission for every inference entry: each limit a key can have, and the tenancy rule,
answer the same on every entry (the same status, in the entry's family of error envelope):
OpenAI's v1 routes (the Responses API's too) and LLM Engine's v2 routes, LLM Engine's
completions, sync, streaming and async tasks, batch lines and the playground. A key's token
cap holds however a body asks for tokens (`max_tokens`, `max_completion_tokens`,
`max_output_tokens`, `max_new_tokens`, `n_predict`, as a float) and becomes the limit of a
request that names none in its route's own field; what a request asks per token (log-probs,
sequences) is bounded for every key. Against a fake replica; api and worker, no Docker."""

from __future__ import annotations

import asyncio
import json
import re
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from api.limits import Limiter, Release
from appliance.errors import RateLimitedError
from appliance.keys import Caller, KeyLimits
from tests.api.test_fuzz_hostile import as_json
from tests.api.test_fuzz_hostile import values as hostile_values
from tests.forwarder.test_async_support import FakeBackend, seed_endpoint, start_api, stop_all
from tests.harness import Appliance, RedisServer, wait_until

CAP = 10
MINE, THEIRS = "mine", "theirs"
LLAMA_CPP = "mine-llamacpp"
Json = dict[str, Any]


@dataclass
class Bed:
    appliance: Appliance
    backend: FakeBackend
    admin: httpx.Client
    file_seq: list[int]

    def key(self, **limits: Any) -> str:
        body = {"name": "k", "team": "t1", "user": "u1", **limits}
        made = self.admin.post("/v1/api-keys", json=body)
        assert made.status_code == 201, made.text
        return str(made.json()["key"])


@contextmanager
def running_bed(
    base: Path, env: dict[str, str], seed: Callable[[Path, str], None]
) -> Iterator[Bed]:
    """An api and a worker in front of a fake replica, with the endpoints `seed` writes (given
    the data directory and the replica's address); afterwards the logs, and all stopped."""
    backend = FakeBackend(delay_s=0.0).start()
    redis = RedisServer(base / "redis").start()
    appliance = Appliance(base / "appliance", redis, env_extra=env)
    try:
        start_api(appliance)
        seed(appliance.data_dir, backend.address)
        appliance.start_role("worker")
        with appliance.client() as admin:
            yield Bed(appliance, backend, admin, [0])
    finally:
        print(appliance.logs())
        stop_all(appliance)
        redis.stop()
        backend.stop()


def _seed(data_dir: Path, address: str) -> None:
    seed_endpoint(data_dir, MINE, address, owner="t1", endpoint_type="sync")
    seed_endpoint(data_dir, THEIRS, address, owner="t2")
    seed_endpoint(
        data_dir, LLAMA_CPP, address, owner="t1", endpoint_type="sync", framework="llamacpp"
    )


@pytest.fixture(scope="module")
def bed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bed]:
    env = {
        "APPLIANCE_SWEEP_INTERVAL_S": "0.5",
        "APPLIANCE_ROUTING_REFRESH_S": "0.5",
        "APPLIANCE_MAX_KEYS_PER_TEAM": "0",  # a key a test: past the 100 a team may have
    }
    with running_bed(tmp_path_factory.mktemp("admission"), env, _seed) as made:
        yield made


# Each entry: how to send a request with these token fields to this endpoint, with this key.
Send = Callable[[Bed, str, str, Json], httpx.Response]


def chat_body(model: str, tokens: Json, **extra: Any) -> Json:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], **tokens, **extra}


def openai(path: str, kind: str) -> Send:
    def send(bed: Bed, key: str, model: str, tokens: Json) -> httpx.Response:
        if kind == "chat":
            body = chat_body(model, tokens)
        elif kind == "prompt":
            body = {"model": model, "prompt": "hi", **tokens}
        elif kind == "response":
            body = {"model": model, "input": [{"role": "user", "content": "hi"}], **tokens}
        else:
            body = {"model": model, "input": "hi", **tokens}
        return httpx.post(bed.appliance.url + path, json=body, headers=auth(key), timeout=30)

    return send


def llm_completion(path: str) -> Send:
    def send(bed: Bed, key: str, model: str, tokens: Json) -> httpx.Response:
        body = {"prompt": "hi", "temperature": 0, **tokens}
        return httpx.post(
            bed.appliance.url + path,
            params={"model_endpoint_name": model},
            json=body,
            headers=auth(key),
            timeout=30,
        )

    return send


def task(path: str) -> Send:
    def send(bed: Bed, key: str, model: str, tokens: Json) -> httpx.Response:
        return httpx.post(
            bed.appliance.url + path,
            params={"model_endpoint_id": f"end_{model}"},
            json={"args": {"prompt": "hi", **tokens}},
            headers=auth(key),
            timeout=30,
        )

    return send


def batch(bed: Bed, key: str, model: str, tokens: Json) -> httpx.Response:
    client = httpx.Client(base_url=bed.appliance.url, headers=auth(key), timeout=30)
    bed.file_seq[0] += 1
    line = {"custom_id": "1", "method": "POST", "url": "/v1/chat/completions"}
    line["body"] = chat_body(model, tokens, seq=bed.file_seq[0])
    uploader = auth(bed.key())  # the team's; the batch is admitted for `key`
    upload = httpx.post(
        bed.appliance.url + "/v1/files",
        headers=uploader,
        data={"purpose": "batch"},
        files={"file": ("in.jsonl", json.dumps(line).encode() + b"\n")},
    )
    assert upload.status_code == 200, upload.text
    return client.post(
        "/v1/batches",
        json={"input_file_id": upload.json()["id"], "endpoint": "/v1/chat/completions"},
    )


def playground(bed: Bed, key: str, model: str, tokens: Json) -> httpx.Response:
    client = httpx.Client(base_url=bed.appliance.url, timeout=30)
    form = client.get("/ui/sign-in")
    token = re.search(r'name="csrf" value="([^"]+)"', form.text)
    assert token
    signed = client.post("/ui/sign-in", data={"csrf": token[1], "key": key, "next": "/ui/keys"})
    if signed.status_code != 303:  # a key that may not sign in
        return signed
    csrf = re.search(r'name="csrf" content="([^"]+)"', client.get("/ui/keys").text)
    assert csrf
    body = {"endpoint": model, "messages": [{"role": "user", "content": "hi"}], **tokens}
    return client.post("/ui/playground/chat", json=body, headers={"x-csrf-token": csrf[1]})


def auth(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


# entry -> (send, envelope family, the token fields it knows besides max_tokens)
ENTRIES: dict[str, tuple[Send, str, tuple[str, ...]]] = {
    "/v1/chat/completions": (openai("/v1/chat/completions", "chat"), "openai", ("n_predict",)),
    "/v1/completions": (openai("/v1/completions", "prompt"), "openai", ("n_predict",)),
    "/v1/embeddings": (openai("/v1/embeddings", "input"), "openai", ()),
    "/v1/responses": (openai("/v1/responses", "response"), "openai", ("n_predict",)),
    "/v2/chat/completions": (
        openai("/v2/chat/completions", "chat"),
        "openai",
        ("max_completion_tokens",),
    ),
    "/v2/completions": (openai("/v2/completions", "prompt"), "openai", ()),
    "/v1/llm/completions-sync": (llm_completion("/v1/llm/completions-sync"), "detail", ()),
    "/v1/llm/completions-stream": (llm_completion("/v1/llm/completions-stream"), "detail", ()),
    "/v1/sync-tasks": (task("/v1/sync-tasks"), "detail", ("max_completion_tokens",)),
    "/v1/streaming-tasks": (task("/v1/streaming-tasks"), "detail", ("n_predict",)),
    "/v1/async-tasks": (task("/v1/async-tasks"), "detail", ("n_predict",)),
    "batch lines": (batch, "openai", ("max_completion_tokens",)),
    "playground": (playground, "detail", ()),
}
ASYNC = ("/v1/async-tasks", "batch lines")  # admitted when submitted, run by the worker


def tokens_field(entry: str) -> str:
    if entry == "/v1/responses":
        return "max_output_tokens"
    return "max_new_tokens" if entry.startswith("/v1/llm/") else "max_tokens"


def refused(reply: httpx.Response, status: int, family: str) -> None:
    assert reply.status_code == status, reply.text
    body = reply.json()
    if family == "openai":
        assert set(body) == {"error"} and body["error"]["code"] == status, body
    else:
        assert set(body) == {"detail"} and isinstance(body["detail"], str), body
    if status == 429:
        assert int(reply.headers["retry-after"]) >= 1


def served(reply: httpx.Response) -> None:
    assert reply.status_code == 200, reply.text


@pytest.mark.parametrize("entry", list(ENTRIES))
def test_a_token_cap_holds_however_it_is_asked(bed: Bed, entry: str) -> None:
    send, family, aliases = ENTRIES[entry]
    key = bed.key(max_tokens_per_request=CAP)
    field = tokens_field(entry)
    reply = send(bed, key, MINE, {field: CAP * 10})
    refused(reply, 400, family)
    assert f"{field}={CAP * 10}" in reply.text  # named as the client sent it
    refused(send(bed, key, MINE, {field: float(CAP * 10)}), 400, family)  # 100.0
    for alias in aliases:
        refused(send(bed, key, MINE, {alias: CAP + 1}), 400, family)
        if alias == "n_predict":  # llama.cpp's -1: until the context is full
            refused(send(bed, key, MINE, {alias: -1}), 400, family)
    if family == "openai" and entry != "/v1/embeddings":  # the cap holds for every sequence
        refused(send(bed, key, MINE, {field: CAP, "n": 2}), 400, family)
    served(send(bed, key, MINE, {field: CAP}))


@pytest.mark.parametrize("entry", list(ENTRIES))
def test_a_negative_token_count_is_refused_naming_it(bed: Bed, entry: str) -> None:
    send, family, _ = ENTRIES[entry]
    for key in (bed.key(), bed.key(max_tokens_per_request=CAP)):  # with no cap, and with one
        reply = send(bed, key, MINE, {tokens_field(entry): -1})
        if reply.status_code != 422:  # the playground's typed body: 422
            refused(reply, 400, family)
        assert tokens_field(entry) in reply.text, reply.text


@pytest.mark.parametrize("entry", list(ENTRIES))
def test_a_fraction_of_a_token_is_refused_naming_it(bed: Bed, entry: str) -> None:
    """2.5 tokens is no count OpenAI or vLLM take (llama.cpp truncated it): a 400 naming the
    field on every entry, with or without a cap; 2.0 is 2 tokens."""
    send, family, _ = ENTRIES[entry]
    for key in (bed.key(), bed.key(max_tokens_per_request=CAP)):
        reply = send(bed, key, MINE, {tokens_field(entry): 2.5})
        if reply.status_code != 422:  # the playground's typed body: 422
            refused(reply, 400, family)
        assert tokens_field(entry) in reply.text, reply.text
    served(send(bed, bed.key(), MINE, {tokens_field(entry): 2.0}))


@pytest.mark.parametrize("entry", list(ENTRIES))
def test_a_token_count_past_any_float_is_a_400_naming_it(bed: Bed, entry: str) -> None:
    """A count with 400 digits is JSON a parser reads as an integer (pydantic's, the standard
    library's) that no float holds: a 400 on every entry, with or without a cap, never a 500,
    naming the field, or where orjson (OpenAI's bodies and batch lines) stopped reading; the
    replica gets nothing."""
    send, family, _ = ENTRIES[entry]
    before = len(bed.backend.bodies)
    for key in (bed.key(), bed.key(max_tokens_per_request=CAP)):
        reply = send(bed, key, MINE, {tokens_field(entry): 10**400})
        if reply.status_code != 422:  # the playground's typed body: 422
            refused(reply, 400, family)
        if family == "openai":
            assert "number is infinity when parsed as double" in reply.text, reply.text
            assert "column" in reply.text, reply.text
        else:
            assert tokens_field(entry) in reply.text, reply.text
    assert len(bed.backend.bodies) == before


@pytest.mark.parametrize(
    "entry", [e for e in ENTRIES if not e.startswith("/v1/llm/") and e != "/v1/embeddings"]
)
def test_a_request_that_names_no_limit_gets_the_keys_cap(bed: Bed, entry: str) -> None:
    send, _, _ = ENTRIES[entry]
    key = bed.key(max_tokens_per_request=CAP)
    seen = len(bed.backend.bodies)
    served(send(bed, key, MINE, {}))
    wait_until(lambda: len(bed.backend.bodies) > seen, 20, "the replica to get the request")
    assert bed.backend.bodies[-1][tokens_field(entry)] == CAP
    if entry in ("/v1/chat/completions", "/v1/completions"):
        served(send(bed, key, MINE, {"n": 2}))  # two sequences share the cap
        wait_until(lambda: len(bed.backend.bodies) > seen + 1, 20, "the second request")
        assert bed.backend.bodies[-1]["max_tokens"] == CAP // 2


@pytest.mark.parametrize("entry", ["/v1/chat/completions", "/v1/responses", "batch lines"])
def test_a_limit_in_another_servers_field_still_gets_the_keys_cap(bed: Bed, entry: str) -> None:
    """A server reads its own limit field alone: vLLM's chat ignores llama.cpp's `n_predict`,
    its responses `max_tokens`. A request naming only such a field (within the cap) still gets
    the key's cap in the route's own field, so it cannot generate past it."""
    send, _, _ = ENTRIES[entry]
    key = bed.key(max_tokens_per_request=CAP)
    seen = len(bed.backend.bodies)
    served(send(bed, key, MINE, {"n_predict": 5}))
    wait_until(lambda: len(bed.backend.bodies) > seen, 20, "the replica to get the request")
    assert bed.backend.bodies[-1][tokens_field(entry)] == CAP
    assert bed.backend.bodies[-1]["n_predict"] == 5  # the client's own, as sent
    served(send(bed, key, MINE, {tokens_field(entry): 3}))  # its own field: as sent
    wait_until(lambda: len(bed.backend.bodies) > seen + 1, 20, "the second request")
    assert bed.backend.bodies[-1][tokens_field(entry)] == 3


@pytest.mark.parametrize(
    "entry", [e for e in ENTRIES if not e.startswith("/v1/llm/") and e != "playground"]
)
def test_the_work_a_token_asks_is_bounded_for_every_key(bed: Bed, entry: str) -> None:
    """A million top log-probs a token exhausts a llama.cpp replica's memory, which bounds
    none: OpenAI's bounds hold on every entry that passes such fields on, with or without a
    cap (the typed LLM Engine completions and the playground take none of these fields)."""
    send, family, _ = ENTRIES[entry]
    key = bed.key()
    for name, asked in (
        ("top_logprobs", 1_000_000),
        ("logprobs", 100_000),
        ("n_probs", 21),
        ("n", 129),
        ("best_of", "1000"),
        ("top_logprobs", 1e9),
    ):
        reply = send(bed, key, MINE, {tokens_field(entry): 1, name: asked})
        refused(reply, 400, family)
        assert name in reply.text, reply.text
    served(send(bed, key, MINE, {tokens_field(entry): 1, "top_logprobs": 20, "n": 2}))


PROMPT_ENTRIES = ["/v1/completions", "/v2/completions", "/v1/async-tasks", "/v1/streaming-tasks"]


@pytest.mark.parametrize("entry", PROMPT_ENTRIES)
def test_a_list_of_prompts_counts_as_that_many_requests(bed: Bed, entry: str) -> None:
    """Each prompt of a list generates its own sequences: a key's cap holds for all of them,
    and no key asks for more than 128 sequences at once (20,000 one-token prompts held a
    llama.cpp replica for minutes after their client had gone)."""
    send, family, _ = ENTRIES[entry]
    capped = bed.key(max_tokens_per_request=CAP)
    reply = send(bed, capped, MINE, {"max_tokens": CAP, "prompt": ["a", "b"]})
    refused(reply, 400, family)
    assert "for each of 2 sequences" in reply.text, reply.text
    served(send(bed, capped, MINE, {"max_tokens": CAP // 2, "prompt": ["a", "b"]}))
    served(send(bed, capped, MINE, {"max_tokens": CAP, "prompt": [1] * 50}))  # one, as ids
    key = bed.key()
    for prompt in (["a"] * 129, [[1, 2]] * 129, ["a"] * 20_000):
        reply = send(bed, key, MINE, {"max_tokens": 1, "prompt": prompt})
        refused(reply, 400, family)
        assert f"prompt: {len(prompt)} prompts ask for" in reply.text, reply.text
    reply = send(bed, key, MINE, {"max_tokens": 1, "prompt": ["a"] * 16, "n": 16})
    refused(reply, 400, family)
    assert "16 prompts of 16 sequences each ask for 256 sequences" in reply.text, reply.text
    served(send(bed, key, MINE, {"max_tokens": 1, "prompt": ["a"] * 128}))


@pytest.mark.parametrize(
    "entry", ["/v1/chat/completions", "/v2/completions", "/v1/sync-tasks", "batch lines"]
)
def test_a_sequence_count_as_a_float_or_a_text_counts_as_that_many(bed: Bed, entry: str) -> None:
    """llama.cpp reads `n: 2.0` as 2 sequences and vLLM reads `"2"` so too: the key's cap holds
    for each of them however `n` is written, and a fraction of a sequence (which llama.cpp
    would truncate) is a 400 naming the field."""
    send, family, _ = ENTRIES[entry]
    capped = bed.key(max_tokens_per_request=CAP)
    for name, asked in (("n", 2.0), ("n", "2"), ("best_of", 2.0), ("n_cmpl", "2")):
        reply = send(bed, capped, MINE, {"max_tokens": CAP, name: asked})
        refused(reply, 400, family)
        assert "for each of 2 sequences" in reply.text, reply.text
    for asked in (2.5, "2.5"):
        reply = send(bed, bed.key(), MINE, {"max_tokens": 1, "n": asked})
        refused(reply, 400, family)
        assert f"n={asked} is not a whole number of sequences" in reply.text, reply.text
    served(send(bed, capped, MINE, {"max_tokens": CAP // 2, "n": 2.0}))


@pytest.mark.parametrize("entry", ["/v1/chat/completions", "/v1/completions", "batch lines"])
def test_llamacpps_own_name_for_n_counts_as_n(bed: Bed, entry: str) -> None:
    """llama.cpp's server takes `n_cmpl` as `n` (its completions for one prompt): the key's cap
    holds for each of them, and at most 128 are asked."""
    send, family, _ = ENTRIES[entry]
    reply = send(bed, bed.key(max_tokens_per_request=CAP), MINE, {"max_tokens": CAP, "n_cmpl": 2})
    refused(reply, 400, family)
    assert "for each of 2 sequences" in reply.text, reply.text
    reply = send(bed, bed.key(), MINE, {"max_tokens": 1, "n_cmpl": 129})
    refused(reply, 400, family)
    assert "n_cmpl=129 is over the most" in reply.text, reply.text


def test_an_embeddings_request_embeds_at_most_2048_inputs(bed: Bed) -> None:
    send, family, _ = ENTRIES["/v1/embeddings"]
    key = bed.key()
    for inputs in (["a"] * 2049, [[1]] * 2049):
        reply = send(bed, key, MINE, {"input": inputs})
        refused(reply, 400, family)
        assert "input: 2049 inputs are over the most" in reply.text, reply.text
    served(send(bed, key, MINE, {"input": ["a"] * 2048}))
    served(send(bed, key, MINE, {"input": [1] * 3000}))  # one input, as token ids


@pytest.mark.parametrize("entry", list(ENTRIES))
def test_requests_per_minute(bed: Bed, entry: str) -> None:
    send, family, _ = ENTRIES[entry]
    key = bed.key(requests_per_minute=1)
    served(openai("/v1/chat/completions", "chat")(bed, key, MINE, {}))
    refused(send(bed, key, MINE, {tokens_field(entry): 1}), 429, family)


def test_a_batchs_lines_count_against_the_queued_task_limit(bed: Bed) -> None:
    """A batch is refused with a 429 while the key's queued tasks leave it no room, but one
    with more lines than the limit itself is a 400 saying to split it: no wait lets it in, and
    a 429 would have clients (the OpenAI SDK) send it again and again."""
    key = bed.key(max_queued_tasks=2)

    def create(count: int, delay_s: float = 0) -> httpx.Response:
        lines = [
            {"custom_id": str(i), "method": "POST", "url": "/v1/chat/completions"}
            | {"body": chat_body(MINE, {"max_tokens": 1}, delay_s=delay_s)}
            for i in range(count)
        ]
        upload = httpx.post(
            bed.appliance.url + "/v1/files",
            headers=auth(key),
            data={"purpose": "batch"},
            files={"file": ("in.jsonl", b"".join(json.dumps(x).encode() + b"\n" for x in lines))},
        )
        assert upload.status_code == 200, upload.text
        return httpx.post(
            bed.appliance.url + "/v1/batches",
            headers=auth(key),
            json={"input_file_id": upload.json()["id"], "endpoint": "/v1/chat/completions"},
        )

    reply = create(3)
    refused(reply, 400, "openai")
    assert reply.json()["error"]["param"] == "input_file_id"
    assert "3 requests" in reply.text and "at most 2" in reply.text, reply.text
    assert "retry-after" not in reply.headers
    assert create(2, delay_s=5).status_code == 200
    reply = create(1)
    refused(reply, 429, "openai")
    assert "already has 2 tasks queued (limit 2)" in reply.text, reply.text


def test_a_key_made_by_a_limited_key_shares_its_limits_and_counts(bed: Bed) -> None:
    chat = openai("/v1/chat/completions", "chat")
    maker = bed.key(requests_per_minute=2, max_tokens_per_request=CAP)
    made = httpx.post(
        bed.appliance.url + "/v1/api-keys", json={"name": "child"}, headers=auth(maker)
    )
    assert made.status_code == 201 and made.json()["limits_from"], made.text
    child = str(made.json()["key"])
    over_cap = chat(bed, child, MINE, {"max_tokens": CAP * 10})  # counted: the window's first
    refused(over_cap, 400, "openai")
    assert "max_tokens" in over_cap.text
    served(chat(bed, maker, MINE, {"max_tokens": CAP}))  # the second, the maker's own
    over_rate = chat(bed, child, MINE, {"max_tokens": 1})
    refused(over_rate, 429, "openai")
    assert "per minute" in over_rate.text


@pytest.mark.parametrize("entry", list(ENTRIES))
def test_requests_in_flight(bed: Bed, entry: str) -> None:
    send, family, _ = ENTRIES[entry]
    key = bed.key(max_concurrent_requests=1)
    busy = bed.backend.busy
    slow = threading.Thread(
        target=lambda: httpx.post(
            bed.appliance.url + "/v1/chat/completions",
            json=chat_body(MINE, {}, delay_s=3),
            headers=auth(key),
            timeout=30,
        )
    )
    slow.start()
    try:
        wait_until(lambda: bed.backend.busy > busy, 10, "the slow request to reach the replica")
        refused(send(bed, key, MINE, {tokens_field(entry): 1}), 429, family)
    finally:
        slow.join()


@pytest.mark.parametrize("entry", list(ENTRIES))
def test_a_key_without_the_inference_scope(bed: Bed, entry: str) -> None:
    send, family, _ = ENTRIES[entry]
    key = bed.key(scopes=["manage"])
    reply = send(bed, key, MINE, {tokens_field(entry): 1})
    if entry == "playground":  # the UI refuses the page itself
        assert reply.status_code in (403, 303)
        return
    refused(reply, 403, family)


@pytest.mark.parametrize("entry", list(ENTRIES))
def test_another_teams_private_endpoint_does_not_exist(bed: Bed, entry: str) -> None:
    send, family, _ = ENTRIES[entry]
    key = bed.key()
    refused(send(bed, key, THEIRS, {tokens_field(entry): 1}), 404, family)
    if entry not in ASYNC:
        served(send(bed, key, MINE, {tokens_field(entry): 1}))


DEEP = b"[" * 100_000 + b"]" * 100_000
NOT_JSON = {
    "nested 100,000 deep": b'{"model": "mine", "prompt": "hi", "messages": ' + DEEP + b"}",
    "a lone surrogate": b'{"model": "mine", "prompt": "\\ud800"}',
    "bytes that are not UTF-8": b'{"model": "mine", "prompt": "\xff"}',
}
HTTP_ENTRIES = [entry for entry in ENTRIES if entry.startswith("/")]


# An async task's body is read by FastAPI, whose JSON takes lone surrogates and bytes that are
# not UTF-8 (as upstream LLM Engine's does): the task runs and the replica answers for them.
NOT_JSON_CASES = [
    (entry, what)
    for entry in HTTP_ENTRIES
    for what in NOT_JSON
    if entry != "/v1/async-tasks" or what.startswith("nested")
]


def _nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


# What JSON can say but the replica's request, written again by the api, cannot carry: an
# integer past 64 bits, nesting past 254 levels. Each entry puts it where the body is rewritten
# (a task's args, a completion's guided_json, an OpenAI body given the key's token cap). Only
# pydantic's JSON (LLM Engine's entries) reads such an integer (orjson, OpenAI's, reads it as a
# float), and only orjson reads such nesting (pydantic's stops at 200 levels, a 400).
UNWRITABLE = {"an integer past 64 bits": 2**70, "nesting 300 deep": _nested(300)}
REWRITTEN = {
    "/v1/sync-tasks": lambda value: {"max_tokens": 1, "x": value},
    "/v1/streaming-tasks": lambda value: {"max_tokens": 1, "x": value},
    "/v1/llm/completions-sync": lambda value: {"max_new_tokens": 1, "guided_json": {"x": value}},
    "/v1/llm/completions-stream": lambda value: {"max_new_tokens": 1, "guided_json": {"x": value}},
    "/v1/chat/completions": lambda value: {"x": value},
    "/v2/completions": lambda value: {"x": value},
}
UNWRITABLE_CASES = [
    (entry, what)
    for entry in REWRITTEN
    for what in UNWRITABLE
    if ENTRIES[entry][1] == "openai" or "integer" in what
    if ENTRIES[entry][1] != "openai" or "nesting" in what
]


@pytest.mark.parametrize(("entry", "what"), UNWRITABLE_CASES)
def test_a_value_the_replicas_request_cannot_carry_is_a_400_naming_it(
    bed: Bed, entry: str, what: str
) -> None:
    """Never a 500 or a connection closed without an answer (orjson, which writes the replica's
    request, refused it with a TypeError that nothing caught): a 400 in the entry's envelope
    that names the field, and the replica gets nothing."""
    send, family, _ = ENTRIES[entry]
    key = bed.key(max_tokens_per_request=CAP)  # OpenAI's bodies are rewritten with the cap
    before = len(bed.backend.bodies)
    reply = send(bed, key, MINE, REWRITTEN[entry](UNWRITABLE[what]))
    refused(reply, 400, family)
    named = "guided_json:" if entry.startswith("/v1/llm/") else "x:"
    assert named in reply.text, reply.text
    assert ("64 bits" if "integer" in what else "254 levels") in reply.text, reply.text
    assert len(bed.backend.bodies) == before
    served(send(bed, key, MINE, REWRITTEN[entry](_nested(100))))  # within every bound


@pytest.mark.parametrize("entry", ["/v1/embeddings", "/v1/chat/completions", "/v2/completions"])
def test_a_route_the_replica_does_not_serve_is_a_400_that_ejects_nothing(
    bed: Bed, entry: str
) -> None:
    """llama.cpp answers 501 for embeddings it was not started for: the request is wrong for
    the endpoint, so a 400 no SDK retries; and a replica's own errors never take it out of
    rotation (one caller could otherwise take it from everyone)."""
    send, family, _ = ENTRIES[entry]
    key = bed.key()
    for _ in range(4):  # more than the failures in a row that eject a replica
        reply = send(bed, key, MINE, {"status": 501})
        refused(reply, 400, family)
        assert f"does not serve {entry}: refused" in reply.text, reply.text
    for _ in range(4):  # the replica's own error, passed on as it said it
        failed = send(bed, key, MINE, {"status": 500})
        assert failed.status_code == 500 and failed.json()["message"] == "refused", failed.text
    other = send(bed, key, MINE, {"status": 404})  # a 404 with its own words: passed on
    assert other.status_code == 404 and "does not serve" not in other.text, other.text
    metrics = bed.admin.get("/metrics").text
    assert not re.search(r'appliance_replica_ejections_total\{endpoint="mine"\} [1-9]', metrics)


@pytest.mark.parametrize(("entry", "what"), NOT_JSON_CASES)
def test_a_body_that_is_not_json_is_refused_on_every_entry(bed: Bed, entry: str, what: str) -> None:
    """Never a 500 (nesting 100,000 deep once ended in a RecursionError), never passed on:
    OpenAI's routes answer 400 in their envelope, LLM Engine's in FastAPI's, as upstream."""
    params = {"model_endpoint_name": MINE, "model_endpoint_id": f"end_{MINE}"}
    before = len(bed.backend.bodies)
    reply = httpx.post(
        bed.appliance.url + entry,
        params=params if not entry.startswith("/v1/chat") else None,
        content=NOT_JSON[what],
        headers={**auth(bed.key()), "content-type": "application/json"},
        timeout=30,
    )
    family = ENTRIES[entry][1]
    if family == "openai":
        refused(reply, 400, family)
    else:  # FastAPI's answers: 422 json_invalid, or 400 where its own body parsing fails
        assert reply.status_code in (400, 422) and "detail" in reply.json(), reply.text[:300]
    assert len(bed.backend.bodies) == before


UNSERVED_ENTRIES = ["/v1/embeddings", "/v2/completions", "/v1/streaming-tasks"]


@pytest.mark.parametrize("entry", UNSERVED_ENTRIES)
def test_a_route_vllm_never_registered_is_a_400_saying_so(bed: Bed, entry: str) -> None:
    """vLLM registers /v1/embeddings only for an embedding model (and chat and completions
    only for a generative one): for any other it answers Starlette's bare 404, which OpenAI's
    SDK reads as "model not found". The caller gets the 400 llama.cpp's 501 gets."""
    send, family, _ = ENTRIES[entry]
    reply = send(bed, bed.key(), MINE, {"unregistered": True})
    refused(reply, 400, family)
    message = reply.json()["error"]["message"] if family == "openai" else reply.json()["detail"]
    said = f"endpoint 'mine' does not serve {entry}: its server has no such route (404 Not Found)"
    if entry == "/v1/embeddings":  # how a vLLM endpoint comes to serve them
        said += "; a vLLM endpoint serves embeddings for an embedding model, or for a generative"
        said += ' one run with extra_flags {"--runner": "pooling"}'
    assert message == said, reply.text


def test_a_sync_task_to_a_route_never_registered_fails_saying_so(bed: Bed) -> None:
    send, _, _ = ENTRIES["/v1/sync-tasks"]
    reply = send(bed, bed.key(), MINE, {"unregistered": True})
    assert reply.status_code == 200, reply.text  # LLM Engine's sync task: 200 with a FAILURE
    task = reply.json()
    assert (task["status"], task["status_code"]) == ("FAILURE", 400), task
    assert "'mine' does not serve /v1/sync-tasks: its server has no such route" in task["traceback"]


def test_a_stream_to_a_route_never_registered_is_the_same_400(bed: Bed) -> None:
    body = chat_body(MINE, {}, stream=True, unregistered=True)
    reply = httpx.post(
        bed.appliance.url + "/v1/chat/completions", json=body, headers=auth(bed.key()), timeout=30
    )
    refused(reply, 400, "openai")
    assert "does not serve /v1/chat/completions" in reply.text, reply.text


BODY_STREAMS = [  # the routes where the body's `stream` decides
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/responses",
    "/v2/chat/completions",
    "/v2/completions",
]


@pytest.mark.parametrize("entry", BODY_STREAMS)
def test_a_stream_asked_as_no_boolean_is_a_400_naming_it(bed: Bed, entry: str) -> None:
    """vLLM reads `stream: "true"` (or 1) as true and streams: taken for a whole reply, the
    stream was not asked for its usage, and its tokens went uncounted."""
    send, family, _ = ENTRIES[entry]
    key = bed.key()
    before = len(bed.backend.bodies)
    for value in ("true", 1):
        reply = send(bed, key, MINE, {"stream": value})
        refused(reply, 400, family)
        assert reply.json()["error"]["param"] == "stream", reply.text
    assert len(bed.backend.bodies) == before
    served(send(bed, key, MINE, {"stream": False}))


MEDIA_ENTRIES = [
    "/v1/chat/completions",
    "/v2/chat/completions",
    "/v1/sync-tasks",
    "/v1/async-tasks",
    "batch lines",
]  # the playground's messages are text only


@pytest.mark.parametrize("entry", MEDIA_ENTRIES)
def test_a_media_url_a_vllm_replica_would_fetch_is_refused_naming_it(bed: Bed, entry: str) -> None:
    """vLLM fetches a chat's image (audio, video) URLs from inside the replica, which reaches
    the appliance's network and the box's: only inline media (data: URLs) go on."""
    send, family, _ = ENTRIES[entry]
    key = bed.key()

    def chat(url: str, kind: str = "image_url") -> Json:
        media = {"type": kind, kind: {"url": url}}
        text = {"type": "text", "text": "what is this?"}
        return {"messages": [{"role": "user", "content": [text, media]}]}

    for url, kind in (
        ("http://169.254.169.254/latest/meta-data/", "image_url"),
        ("HTTPS://intranet.example/cat.png", "image_url"),
        ("file:///etc/passwd", "video_url"),
    ):
        reply = send(bed, key, MINE, chat(url, kind))
        refused(reply, 400, family)
        assert f"messages[0].content[1].{kind}.url" in reply.text, reply.text
    if entry not in ASYNC:
        served(send(bed, key, MINE, chat("data:image/png;base64,iVBORw0KGgo=")))


@pytest.mark.parametrize("entry", MEDIA_ENTRIES)
def test_a_chat_asked_to_be_kept_is_a_400_naming_the_field(bed: Bed, entry: str) -> None:
    """No replica keeps a chat completion (vLLM and llama.cpp ignore `store`, and nothing here
    serves `client.chat.completions.retrieve`): `store` other than false, and `metadata`, which
    only tags a stored completion (OpenAI refuses it without `store`), are refused naming the
    field, where they were dropped unread."""
    send, family, _ = ENTRIES[entry]
    key = bed.key()
    before = len(bed.backend.bodies)
    for fields, named in (
        ({"store": True}, "store"),
        ({"store": "true"}, "store"),  # vLLM would read it as true
        ({"metadata": {"team": "a"}}, "metadata"),
        ({"store": True, "metadata": {"team": "a"}}, "store"),
    ):
        reply = send(bed, key, MINE, {"messages": [{"role": "user", "content": "hi"}], **fields})
        refused(reply, 400, family)
        body = reply.json()
        said = body["error"]["message"] if family == "openai" else body["detail"]
        assert f"{named}: " in said and "keeps no chat completions" in said, said
        if family == "openai" and entry.startswith("/v"):
            assert body["error"]["param"] == named
    assert len(bed.backend.bodies) == before
    if entry not in ASYNC:
        chat = {"messages": [{"role": "user", "content": "hi"}]}
        served(send(bed, key, MINE, {**chat, "store": False, "metadata": None}))


CHAT_UNREAD = [  # (fields, the field named, words of the message)
    ({"functions": [{"name": "f", "parameters": {}}]}, "functions", "as a tool"),
    ({"function_call": {"name": "f"}}, "function_call", "`tool_choice`"),
    ({"function_call": "auto"}, "function_call", "`tool_choice`"),
    ({"audio": {"voice": "alloy", "format": "wav"}}, "audio", "no server makes audio"),
    ({"modalities": ["text", "audio"]}, "modalities", 'send ["text"]'),
    ({"web_search_options": {}}, "web_search_options", "no server here searches the web"),
]


@pytest.mark.parametrize(("fields", "named", "words"), CHAT_UNREAD)
@pytest.mark.parametrize("entry", ["/v1/chat/completions", "batch lines"])
def test_a_chat_field_no_server_reads_is_a_400_naming_it(
    bed: Bed, entry: str, fields: Json, named: str, words: str
) -> None:
    """OpenAI's deprecated `functions` and `function_call`, spoken replies and its web search:
    vLLM and llama.cpp drop them unread (the model never saw the functions; text came back
    where audio was asked), so they are refused naming the field before any replica sees them."""
    send, family, _ = ENTRIES[entry]
    key = bed.key()
    before = len(bed.backend.bodies)
    reply = send(bed, key, MINE, fields)
    refused(reply, 400, family)
    said = reply.json()["error"]["message"]
    assert f"{named}: " in said and words in said, said
    assert len(bed.backend.bodies) == before
    if entry == "/v1/chat/completions":
        assert reply.json()["error"]["param"] == named
        served(send(bed, key, MINE, {"modalities": ["text"], "functions": None}))


@pytest.mark.parametrize("path", ["/v1/sync-tasks", "/v1/async-tasks"])
@pytest.mark.parametrize(
    "args", ['{"prompt": "\\ud800"}', '{"prompt": "hi", "temperature": NaN}', '{"\\udc00": 1}']
)
def test_task_args_no_json_reply_carries_are_a_400_on_either_entry(
    bed: Bed, path: str, args: str
) -> None:
    """A lone surrogate or NaN is no JSON a replica reads (llama.cpp and vLLM answer 500 or
    400) and no UTF-8 reply carries: an async task took them, stored them (its UI page then
    failed with a 500) and ended FAILURE with the replica's parse error, where a sync task is
    refused at once."""
    before = len(bed.backend.bodies)
    reply = httpx.post(
        bed.appliance.url + path,
        params={"model_endpoint_id": f"end_{MINE}"},
        content=('{"args": ' + args + "}").encode(),
        headers={**auth(bed.key()), "content-type": "application/json"},
        timeout=30,
    )
    refused(reply, 400, "detail")
    assert len(bed.backend.bodies) == before


RESPONSES_REFUSED = [  # (fields, the field named, words of the message)
    ({"input": ""}, "input", "a text or at least one item"),  # answered from nothing
    ({"input": []}, "input", "a text or at least one item"),
    ({"input": None}, "input", "a text or a list of items"),
    ({"input": {"role": "user"}}, "input", "a text or a list of items"),
    ({"previous_response_id": "resp_1"}, "previous_response_id", "keeps no responses"),
    ({"conversation": "conv_1"}, "conversation", "keeps no responses"),
    ({"store": True}, "store", "leave `store` out or send false"),
    ({"background": True}, "background", "leave `background` out"),
    ({"store": "true"}, "store", "send false"),  # vLLM reads "true" and 1 as true
    ({"background": 1}, "background", "send false"),
    ({"prompt": {"id": "pmpt_1"}}, "prompt", "stored prompt templates"),
    ({"max_tokens": 5}, "max_tokens", "limits a reply with `max_output_tokens`"),
    ({"tools": [{"type": "web_search"}]}, "tools[0].type", "'web_search' is a tool the server"),
    (
        {"tools": [{"type": "function", "name": "f"}, {"type": "mcp", "server_url": "http://x"}]},
        "tools[1].type",
        "'mcp'",
    ),
    (
        {
            "input": [
                {"role": "user", "content": [{"type": "input_image", "image_url": "http://x"}]}
            ]
        },
        "input[0].content[0].image_url",
        "fetch no URL",
    ),
    (
        {"input": [{"type": "input_file", "file_url": "file:///etc/passwd"}]},
        "input[0].file_url",
        "",
    ),
    (  # a function's output as parts: vLLM reads them as a tool message's, and fetches
        {
            "input": [
                {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"},
                {
                    "type": "function_call_output",
                    "call_id": "c",
                    "output": [{"type": "input_image", "image_url": "http://169.254.169.254/"}],
                },
            ]
        },
        "input[1].output[0].image_url",
        "fetch no URL",
    ),
]


@pytest.mark.parametrize(("fields", "named", "words"), RESPONSES_REFUSED)
def test_a_response_that_needs_what_no_replica_has_is_a_400_naming_it(
    bed: Bed, fields: Json, named: str, words: str
) -> None:
    """The Responses API as served here keeps nothing and runs no server-side tool: what would
    need either (or is not that API's field) is refused, naming the field, before any replica
    sees it; the same request without it is served."""
    send, family, _ = ENTRIES["/v1/responses"]
    key = bed.key()
    before = len(bed.backend.bodies)
    reply = send(bed, key, MINE, fields)
    refused(reply, 400, family)
    error = reply.json()["error"]
    assert error["param"] == named and words in error["message"], error
    assert len(bed.backend.bodies) == before
    served(send(bed, key, MINE, {"store": False, "background": False}))
    inline = {"type": "input_image", "image_url": "data:image/png;base64,iVBORw0KGgo="}
    served(send(bed, key, MINE, {"input": [{"role": "user", "content": [inline]}]}))


def test_an_async_task_naming_the_responses_route_is_admitted_as_a_response(bed: Bed) -> None:
    """A task's args go where its `route` says; to /v1/responses they are a response: the
    key's cap fills `max_output_tokens`, and what needs a response kept is refused."""
    key = bed.key(max_tokens_per_request=CAP)

    def submit(args: Json) -> httpx.Response:
        return httpx.post(
            bed.appliance.url + "/v1/async-tasks",
            params={"model_endpoint_id": f"end_{MINE}"},
            json={"route": "/v1/responses", "args": {"input": "hi", **args}},
            headers=auth(key),
            timeout=30,
        )

    refused(submit({"previous_response_id": "resp_1"}), 400, "detail")
    seen = len(bed.backend.bodies)
    made = submit({})
    assert made.status_code == 200, made.text
    wait_until(lambda: len(bed.backend.bodies) > seen, 20, "the replica to get the task")
    sent = bed.backend.bodies[-1]
    assert sent["max_output_tokens"] == CAP and sent["model"] == MINE and sent["stream"] is False


@pytest.fixture
def limiter_redis(tmp_path: Path) -> Iterator[RedisServer]:
    redis = RedisServer(tmp_path / "redis").start()
    try:
        yield redis
    finally:
        redis.stop()


def limited(rpm: int = 0, in_flight: int = 0) -> Caller:
    return Caller("k1", "u1", "t1", frozenset({"inference"}), False, KeyLimits(rpm, in_flight))


async def answer(limiter: Limiter, caller: Caller, now: float) -> Release | int | None:
    """What the limiter says at `now`: how to release (None: nothing held), or Retry-After."""
    try:
        return await limiter.admit(caller, now=now)
    except RateLimitedError as exc:
        return exc.retry_after_s


def test_requests_per_minute_hold_across_a_minutes_boundary(limiter_redis: RedisServer) -> None:
    """N at the end of a minute and N at the start of the next: N pass in those 60 seconds,
    and the next passes when the first of them leave the window (its Retry-After)."""

    async def run() -> list[Release | int | None]:
        limiter, caller, minute = Limiter(limiter_redis.url), limited(rpm=3), 60.0 * 29_400_000
        said = [await answer(limiter, caller, minute + 59.5) for _ in range(3)]
        said += [await answer(limiter, caller, minute + 60.2) for _ in range(3)]
        said.append(await answer(limiter, caller, minute + 119.4))  # 59.5 still counted
        said.append(await answer(limiter, caller, minute + 119.5))
        await limiter.close()
        return said

    assert asyncio.run(run()) == [None, None, None, 60, 60, 60, 1, None]


def test_retry_after_says_when_the_next_request_passes(limiter_redis: RedisServer) -> None:
    async def run() -> list[Release | int | None]:
        limiter, caller, minute = Limiter(limiter_redis.url), limited(rpm=2), 60.0 * 29_400_000
        said = [await answer(limiter, caller, minute + at) for at in (10.3, 30.7, 40.0)]
        said.append(await answer(limiter, caller, minute + 70.2))  # 10.3 is still counted
        said.append(await answer(limiter, caller, minute + 40.0 + 31))
        said.append(await answer(limiter, caller, minute + 72))  # 30.7 is still in the window
        await limiter.close()
        return said

    assert asyncio.run(run()) == [None, None, 31, 1, None, 19]


def test_a_request_refused_for_concurrency_uses_none_of_the_minute(
    limiter_redis: RedisServer,
) -> None:
    async def run() -> list[str]:
        limiter, caller, now = Limiter(limiter_redis.url), limited(rpm=2, in_flight=1), 1e9
        said = []
        first = await limiter.admit(caller, now=now)
        assert first is not None
        for _ in range(5):  # refused: no slot free
            said.append(str(await answer(limiter, caller, now + 1)))
        await first()
        second = await limiter.admit(caller, now=now + 2)  # the minute's second, not its seventh
        assert second is not None
        await second()
        said.append(str(await answer(limiter, caller, now + 3)))
        await limiter.close()
        return said

    assert asyncio.run(run()) == ["1"] * 5 + ["57"]


def test_a_client_paced_at_its_limit_is_never_refused(limiter_redis: RedisServer) -> None:
    async def run() -> list[Release | int | None]:
        limiter, caller = Limiter(limiter_redis.url), limited(rpm=30)
        said = [await answer(limiter, caller, 1e9 + 2.0 * i) for i in range(90)]
        await limiter.close()
        return said

    assert asyncio.run(run()) == [None] * 90


@pytest.mark.parametrize("stream", [False, True])
def test_a_llama_cpp_response_echoing_a_deep_value_is_answered(bed: Bed, stream: bool) -> None:
    """A llama.cpp replica's response says what OpenAI's says of its request (`metadata`,
    `instructions`, `tools`...), taken from the request. A request value nested deeper than a
    reply can be written (300 levels: the request is read to 1,024) left the reply unwritten:
    the call hung unanswered, whole or streamed, until the client gave up. Now it is answered,
    the value that cannot be echoed given OpenAI's default, the others echoed."""
    deep: Any = "x"
    for _ in range(300):
        deep = {"a": deep}
    body = {"model": LLAMA_CPP, "input": "hi", "metadata": deep, "stream": stream}
    body["instructions"] = "be brief"
    reply = httpx.post(
        bed.appliance.url + "/v1/responses", json=body, headers=auth(bed.key()), timeout=10
    )
    served(reply)
    if stream:
        assert reply.text.rstrip().endswith("}") and "response.completed" in reply.text
        last = json.loads(reply.text.rstrip().rsplit("data: ", 1)[1])["response"]
    else:
        last = reply.json()
    assert last["metadata"] is None and last["instructions"] == "be brief", last


# Where a hostile value goes, per body kind: a top-level field, or a dotted path into the body
HOSTILE_FIELDS = {
    "chat": """model messages messages.0 messages.0.role messages.0.content messages.0.content.0
    messages.0.tool_calls stream stream_options n max_tokens max_completion_tokens n_predict
    best_of logprobs stop top_logprobs temperature response_format tools tool_choice seed""",
    "prompt": """model prompt prompt.0 stream max_tokens n best_of echo logprobs stop
    temperature suffix logit_bias n_predict""",
    "input": "model input input.0 encoding_format dimensions",
    "response": """model input input.0 input.0.content stream tools text max_output_tokens
    tool_choice instructions metadata temperature top_p""",
    "llm": """prompt max_new_tokens temperature stop_sequences guided_json
    return_token_log_probs top_k top_p guided_choice guided_regex""",
    "task": """args args.prompt args.max_tokens args.n args.stream args.messages args.logprobs
    callback_url return_pickled route""",
}
HOSTILE_ENTRIES = {  # entry -> (body kind, its body, where the endpoint is named)
    "/v1/chat/completions": ("chat", {"messages": [{"role": "user", "content": "hi"}]}, "model"),
    "/v2/chat/completions": ("chat", {"messages": [{"role": "user", "content": "hi"}]}, "model"),
    "/v1/completions": ("prompt", {"prompt": "hi"}, "model"),
    "/v2/completions": ("prompt", {"prompt": ["hi"]}, "model"),
    "/v1/embeddings": ("input", {"input": ["hi"]}, "model"),
    "/v1/responses": ("response", {"input": [{"role": "user", "content": "hi"}]}, "model"),
    "/v1/llm/completions-sync": ("llm", {"prompt": "hi", "max_new_tokens": 5}, "name"),
    "/v1/llm/completions-stream": ("llm", {"prompt": "hi", "max_new_tokens": 5}, "name"),
    "/v1/sync-tasks": ("task", {"args": {"prompt": "hi"}}, "id"),
    "/v1/streaming-tasks": ("task", {"args": {"prompt": "hi"}}, "id"),
    "/v1/async-tasks": ("task", {"args": {"prompt": "hi"}}, "id"),
}
DEEP_VALUES = [_nested(300), _nested(600), {"a": _nested(260)}, [[1, 2], [3]], [{"type": "text"}]]
HOSTILE = st.one_of(hostile_values, st.sampled_from(DEEP_VALUES))


def _placed(body: Json, path: str, value: Any) -> Json:
    """`body` with `value` at the dotted `path`, what lies on the way made a list or object."""
    placed = json.loads(json.dumps(body))
    steps = path.split(".")
    *on_the_way, last = steps
    here: Any = placed
    for step, after in zip(on_the_way, steps[1:], strict=True):
        fresh: Any = [] if after.isdigit() else {}
        if isinstance(here, list):
            while len(here) <= int(step):
                here.append(fresh)
            if not isinstance(here[int(step)], list | dict):
                here[int(step)] = fresh
            here = here[int(step)]
        else:
            if not isinstance(here.get(step), list | dict):
                here[step] = fresh
            here = here[step]
    if isinstance(here, list):
        while len(here) <= int(last):
            here.append(None)
        here[int(last)] = value
    else:
        here[last] = value
    return placed


def test_no_value_in_an_inference_field_gets_a_server_error(bed: Bed) -> None:
    """Numbers past any float, as digits and as text, NaN and infinity, booleans, lists and
    objects where text goes and back, lone surrogates, NUL, deep nesting, in every field of
    every inference entry, to a vLLM and a llama.cpp endpoint, with a key's token cap and
    without: each is answered, and never with a 5xx."""
    keys = [bed.key(), bed.key(max_tokens_per_request=CAP)]
    client = httpx.Client(base_url=bed.appliance.url, timeout=15)
    seen: Counter[int] = Counter()
    kinds = st.sampled_from(sorted(HOSTILE_ENTRIES))

    @settings(
        max_examples=800, deadline=None, database=None, suppress_health_check=list(HealthCheck)
    )
    @given(entry=kinds, data=st.data(), value=HOSTILE, key=st.sampled_from(keys))
    def check(entry: str, data: st.DataObject, value: Any, key: str) -> None:
        kind, body, named = HOSTILE_ENTRIES[entry]
        model = data.draw(st.sampled_from([MINE, LLAMA_CPP]))
        field = data.draw(st.sampled_from(HOSTILE_FIELDS[kind].split()))
        params = {"model_endpoint_name": model} if named == "name" else {}
        params |= {"model_endpoint_id": f"end_{model}"} if named == "id" else {}
        body = {"model": model, **body} if named == "model" else body
        sent = as_json(_placed(body, field, value))
        reply = client.post(entry, params=params, content=sent, headers=auth(key))
        seen[reply.status_code] += 1
        assert reply.status_code < 500, (entry, field, sent[:200], reply.text[:500])

    try:
        check()
    finally:
        client.close()
    print(f"statuses {dict(seen)}")


def test_a_media_url_in_an_embeddings_chat_is_refused_naming_it(bed: Bed) -> None:
    """vLLM's embeddings take a chat (`messages`) as well as `input`, and fetch its media URLs
    from inside the replica as its chats do: refused the same, on the OpenAI route and on a
    task that names the route."""
    key = bed.key()
    image = {"type": "image_url", "image_url": {"url": "http://169.254.169.254/latest/"}}
    messages = [{"role": "user", "content": [image]}]
    before = len(bed.backend.bodies)
    reply = httpx.post(
        bed.appliance.url + "/v1/embeddings",
        json={"model": MINE, "input": "hi", "messages": messages},
        headers=auth(key),
        timeout=30,
    )
    refused(reply, 400, "openai")
    assert reply.json()["error"]["param"] == "messages[0].content[0].image_url.url", reply.text
    reply = httpx.post(
        bed.appliance.url + "/v1/async-tasks",
        params={"model_endpoint_id": f"end_{MINE}"},
        json={"args": {"input": "hi", "messages": messages}, "route": "/v1/embeddings"},
        headers=auth(key),
        timeout=30,
    )
    assert reply.status_code == 400, reply.text
    assert "messages[0].content[0].image_url.url" in reply.text, reply.text
    assert len(bed.backend.bodies) == before
    inline = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
    body = {"model": MINE, "input": "hi", "messages": [{"role": "user", "content": [inline]}]}
    served(httpx.post(bed.appliance.url + "/v1/embeddings", json=body, headers=auth(key)))
