"""Teams share no cached prompt prefix on a vLLM endpoint: vLLM answers a prompt whose prefix
it has cached sooner, so a team timing its requests on another team's public endpoint could
tell which prompts that team sent. Every entry sends another team's request with a
`cache_salt` of that team's own (vLLM keys its prefix cache by it); the owner's requests pass
as they were sent, and a salt a client sends is made its team's too, so no team can name
another's. Against a fake replica; api and worker, no Docker."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.api.test_admission import ENTRIES, Bed, Json, auth, chat_body, running_bed
from tests.forwarder.test_async_support import seed_endpoint
from tests.harness import wait_until

SHARED, LLAMA_CPP = "shared", "shared-llamacpp"
# LLM Engine's completions take their own fields alone: a salt sent there is a 400 naming it
TAKES_A_SALT = [e for e in ENTRIES if not e.startswith("/v1/llm/") and e != "playground"]


def _seed(data_dir: Path, address: str) -> None:
    for name, framework in ((SHARED, "vllm"), (LLAMA_CPP, "llamacpp")):
        seed_endpoint(
            data_dir,
            name,
            address,
            owner="owners",
            endpoint_type="sync",
            framework=framework,
            public=True,
        )


@pytest.fixture(scope="module")
def bed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bed]:
    env = {"APPLIANCE_SWEEP_INTERVAL_S": "0.5", "APPLIANCE_ROUTING_REFRESH_S": "0.5"}
    with running_bed(tmp_path_factory.mktemp("salt"), env, _seed) as made:
        yield made


def key_of(bed: Bed, team: str) -> str:
    made = bed.admin.post("/v1/api-keys", json={"name": "k", "team": team, "user": "u"})
    assert made.status_code == 201, made.text
    return str(made.json()["key"])


def received(bed: Bed, entry: str, key: str, model: str = SHARED, **fields: Any) -> Any:
    """The body the replica got for a request sent on `entry` (what the worker sends, for a
    task or a batch line)."""
    send = batch if entry == "batch lines" else ENTRIES[entry][0]
    if entry.startswith("/v1/llm/"):  # LLM Engine's completions name their tokens
        fields["max_new_tokens"] = 5
    seen = len(bed.backend.bodies)
    reply: httpx.Response = send(bed, key, model, fields)
    assert reply.status_code == 200, reply.text
    wait_until(lambda: len(bed.backend.bodies) > seen, 30, "the replica to get the request")
    return bed.backend.bodies[-1]


def batch(bed: Bed, key: str, model: str, fields: Json) -> httpx.Response:
    """A batch of one chat line, its file uploaded with the same key (the batch's team)."""
    client = httpx.Client(base_url=bed.appliance.url, headers=auth(key), timeout=30)
    line = {"custom_id": "1", "method": "POST", "url": "/v1/chat/completions"}
    line["body"] = chat_body(model, fields)
    upload = client.post(
        "/v1/files",
        data={"purpose": "batch"},
        files={"file": ("in.jsonl", json.dumps(line).encode() + b"\n")},
    )
    assert upload.status_code == 200, upload.text
    return client.post(
        "/v1/batches",
        json={"input_file_id": upload.json()["id"], "endpoint": "/v1/chat/completions"},
    )


@pytest.mark.parametrize("entry", list(ENTRIES))
def test_another_teams_requests_share_no_cached_prefix_with_the_owners(
    bed: Bed, entry: str
) -> None:
    guest, other_guest, owner = key_of(bed, "guests"), key_of(bed, "guests"), key_of(bed, "owners")
    salt = received(bed, entry, guest).get("cache_salt")
    assert isinstance(salt, str) and 0 < len(salt) <= 128, salt  # vLLM's bound
    assert received(bed, entry, other_guest)["cache_salt"] == salt  # the team's, whoever sends
    assert received(bed, entry, key_of(bed, "others"))["cache_salt"] != salt
    assert "cache_salt" not in received(bed, entry, owner)  # as it was sent
    # llama.cpp has no salt: its body is as sent
    assert "cache_salt" not in received(bed, entry, guest, model=LLAMA_CPP)


@pytest.mark.parametrize("entry", TAKES_A_SALT)
def test_a_salt_a_client_sends_is_its_teams(bed: Bed, entry: str) -> None:
    guest, owner = key_of(bed, "guests"), key_of(bed, "owners")
    owners = received(bed, entry, owner, cache_salt="mine")["cache_salt"]
    guests = received(bed, entry, guest, cache_salt="mine")["cache_salt"]
    assert len({owners, guests, "mine"}) == 3
    assert received(bed, entry, owner, cache_salt="mine")["cache_salt"] == owners
    assert received(bed, entry, guest, cache_salt="other")["cache_salt"] != guests
    assert guests != received(bed, entry, guest)["cache_salt"]  # no salt: another one again
    send = batch if entry == "batch lines" else ENTRIES[entry][0]
    reply = send(bed, guest, SHARED, {"cache_salt": 7})
    assert reply.status_code == 400 and "cache_salt" in reply.text, reply.text
