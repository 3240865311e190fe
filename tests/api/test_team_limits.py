"""A team cannot fill the box for everyone: it has at most APPLIANCE_MAX_ENDPOINTS_PER_TEAM
endpoints and APPLIANCE_MAX_KEYS_PER_TEAM active keys, whichever way it makes them (LLM
Engine's routes, the UI's forms, `/v1/config/apply`), told which limit and how to free room;
an administrator is never refused, and what it made for the team counts."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.api import test_hostile as hostile
from tests.harness import Appliance, RedisServer, make_key
from tests.web.test_forms_and_sign_in import csrf_of

LIMITS = {
    "APPLIANCE_MAX_ENDPOINTS_PER_TEAM": "2",
    "APPLIANCE_MAX_KEYS_PER_TEAM": "3",
    "APPLIANCE_MAX_FILE_BYTES_PER_TEAM": "10000",
}


@pytest.fixture
def limited(tmp_path: Path) -> Iterator[Appliance]:
    """The api alone, with small team limits."""
    redis = RedisServer(tmp_path / "redis").start()
    appliance = Appliance(tmp_path / "install", redis, env_extra=LIMITS).start(roles=("api",))
    yield appliance
    print(appliance.logs())
    appliance.stop()
    redis.stop()


def body(name: str) -> dict[str, Any]:
    return hostile.body(name, memory="1Gi")


def signed_in(appliance: Appliance, key: str) -> httpx.Client:
    client = httpx.Client(base_url=appliance.url, timeout=30)
    token = csrf_of(client.get("/ui/sign-in").text)
    reply = client.post("/ui/sign-in", data={"csrf": token, "key": key, "next": "/ui/endpoints"})
    assert reply.status_code == 303, reply.text
    return client


def names(client: httpx.Client) -> set[str]:
    listed = client.get("/v1/llm/model-endpoints").json()["model_endpoints"]
    return {e["name"] for e in listed}


def test_a_team_has_at_most_its_endpoints_whichever_way_it_makes_them(
    limited: Appliance,
) -> None:
    red = limited.client(make_key(limited, "red"))
    assert red.post("/v1/llm/model-endpoints", json=body("r1")).status_code == 200
    assert red.post("/v1/model-endpoints", json=body("r2")).status_code == 200

    for path in ("/v1/llm/model-endpoints", "/v1/model-endpoints"):  # LLM Engine's 400
        refused = red.post(path, json=body("r3"))
        assert refused.status_code == 400, refused.text
        said = refused.json()["detail"]
        assert "APPLIANCE_MAX_ENDPOINTS_PER_TEAM" in said and "delete" in said, said
    applied = red.post("/v1/config/apply", json={"endpoints": [body("r1"), body("r3")]})
    assert applied.status_code == 409, applied.text  # the appliance's own route
    assert "APPLIANCE_MAX_ENDPOINTS_PER_TEAM" in applied.json()["detail"]

    browser = signed_in(limited, make_key(limited, "red"))
    form = browser.get("/ui/endpoints/new")
    sent = {
        "csrf": csrf_of(form.text),
        "name": "r4",
        "framework": "vllm",
        "model": "acme/standin-1b",
        "gpus": "0",
        "min_replicas": "0",
        "max_replicas": "1",
        "concurrency": "2",
        "endpoint_type": "streaming",
        "memory": "1Gi",
    }
    page = browser.post("/ui/endpoints/new", data=sent)
    assert page.status_code == 422 and "APPLIANCE_MAX_ENDPOINTS_PER_TEAM" in page.text
    assert names(red) == {"r1", "r2"}  # nothing made by the refused tries

    blue = limited.client(make_key(limited, "blue"))  # another team is not held back
    assert blue.post("/v1/llm/model-endpoints", json=body("b1")).status_code == 200

    admin = limited.client()  # an administrator may still make one for red, which counts
    made = admin.post("/v1/config/apply", json={"endpoints": [{"team": "red", **body("r5")}]})
    assert made.status_code == 200, made.text
    assert names(red) == {"r1", "r2", "r5"}
    assert red.delete("/v1/llm/model-endpoints/r1").status_code == 200
    assert red.post("/v1/llm/model-endpoints", json=body("r6")).status_code == 400
    assert red.delete("/v1/llm/model-endpoints/r2").status_code == 200  # room for one
    assert red.post("/v1/llm/model-endpoints", json=body("r6")).status_code == 200


def test_a_team_has_at_most_its_active_keys(limited: Appliance) -> None:
    red = limited.client(make_key(limited, "red"))  # one active key
    made = [red.post("/v1/api-keys", json={"name": f"k{i}"}) for i in range(2)]
    assert [m.status_code for m in made] == [201, 201]
    refused = red.post("/v1/api-keys", json={"name": "k2"})
    assert refused.status_code == 409, refused.text
    said = refused.json()["detail"]
    assert "APPLIANCE_MAX_KEYS_PER_TEAM" in said and "revoke" in said, said

    browser = signed_in(limited, made[0].json()["key"])
    page = browser.get("/ui/keys")
    shown = browser.post(
        "/ui/keys", data={"csrf": csrf_of(page.text), "name": "k3", "scope_inference": "on"}
    )
    assert shown.status_code == 422 and "APPLIANCE_MAX_KEYS_PER_TEAM" in shown.text

    admin = limited.client()
    assert admin.post("/v1/api-keys", json={"name": "ops", "team": "red"}).status_code == 201
    assert red.delete(f"/v1/api-keys/{made[1].json()['id']}").status_code == 200
    assert red.post("/v1/api-keys", json={"name": "k4"}).status_code == 409  # the admin's counts
    assert admin.delete(f"/v1/api-keys/{made[0].json()['id']}").status_code == 200
    assert red.post("/v1/api-keys", json={"name": "k5"}).status_code == 201


def upload(client: httpx.Client, size: int) -> httpx.Response:
    return client.post("/v1/files", files={"file": ("in.jsonl", b"x" * size)}, data={})


def test_a_team_stores_at_most_its_quota_of_files(limited: Appliance) -> None:
    red = limited.client(make_key(limited, "red"))
    blue = limited.client(make_key(limited, "blue"))
    first = upload(red, 6000)
    assert first.status_code == 200, first.text
    refused = upload(red, 5000)
    assert refused.status_code == 409, refused.text
    assert refused.headers["x-should-retry"] == "false"  # deleting frees room, not waiting
    said = refused.json()["error"]["message"]
    assert refused.json()["detail"] == said  # both clients' envelopes
    assert "APPLIANCE_MAX_FILE_BYTES_PER_TEAM" in said and "DELETE /v1/files" in said, said
    assert "6000" in said and "10000" in said, said
    listed = red.get("/v1/files").json()
    assert [f["id"] for f in listed["data"]] == [first.json()["id"]]  # nothing left behind
    assert (listed["team_bytes"], listed["team_max_bytes"]) == (6000, 10000)
    assert len(list((limited.data_dir / "files").iterdir())) == 1

    assert upload(blue, 6000).status_code == 200  # another team's room is its own
    assert upload(limited.client(), 20000).status_code == 200  # an administrator's own
    assert red.delete(f"/v1/files/{first.json()['id']}").status_code == 200
    assert upload(red, 5000).status_code == 200
    # an empty file takes a block of the disk and a row: it counts 4 KiB
    assert upload(red, 0).status_code == 200
    assert upload(red, 0).status_code == 409
    assert red.get("/v1/files").json()["team_bytes"] == 5000 + 4096
