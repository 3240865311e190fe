"""Which Hugging Face downloads and cached models each team sees, on a real api process (real
Redis and SQLite, a private HF cache; no builder, so downloads stay pending): a team sees the
downloads it asked for and the cached models it asked for or may call an endpoint of; an
administrator sees every one, with the teams that asked."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from tests.api.test_storage import LIMIT_BYTES, fake_hub_repo, started_store
from tests.api.test_team_limits import signed_in
from tests.e2e.lifecycle import standin_body
from tests.harness import Appliance, make_key

DOWNLOADS = "/v1/storage/hf-downloads"


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Appliance]:
    with started_store(tmp_path, LIMIT_BYTES) as appliance:
        yield appliance


def asked(client: httpx.Client, repository: str) -> None:
    reply = client.post(DOWNLOADS, json={"repository": repository})
    assert reply.status_code == 202, reply.text


def downloads(client: httpx.Client) -> dict[str, list[str]]:
    """Repository -> the teams shown as having asked for it."""
    reply = client.get(DOWNLOADS)
    assert reply.status_code == 200, reply.text
    return {d["repository"]: d["requested_by"] for d in reply.json()["downloads"]}


def cached(client: httpx.Client) -> list[str]:
    reply = client.get("/v1/storage/hf-models")
    assert reply.status_code == 200, reply.text
    return [r["repo_id"] for r in reply.json()["data"]]


def test_a_team_sees_only_the_downloads_it_asked_for(tmp_path: Path) -> None:
    """Asking again for a repository another team asked for adds the team to the one
    download; each team's open downloads count against its own limit alone."""
    with started_store(tmp_path, LIMIT_BYTES, APPLIANCE_MAX_DOWNLOADS_PER_TEAM="2") as store:
        admin = store.client()
        red = store.client(make_key(store, "red"))
        blue = store.client(make_key(store, "blue"))
        asked(red, "acme/red-1b")
        asked(blue, "acme/blue-1b")
        asked(red, "acme/both-1b")
        asked(blue, "acme/both-1b")

        assert downloads(red) == {"acme/red-1b": ["red"], "acme/both-1b": ["red"]}
        assert downloads(blue) == {"acme/blue-1b": ["blue"], "acme/both-1b": ["blue"]}
        assert downloads(admin) == {
            "acme/red-1b": ["red"],
            "acme/blue-1b": ["blue"],
            "acme/both-1b": ["blue", "red"],
        }

        theirs = red.get(f"{DOWNLOADS}/acme/blue-1b")
        nowhere = red.get(f"{DOWNLOADS}/acme/none-1b")
        assert theirs.status_code == nowhere.status_code == 404, theirs.text
        assert theirs.json()["detail"] == nowhere.json()["detail"].replace("none-1b", "blue-1b")
        mine = red.get(f"{DOWNLOADS}/acme/both-1b")
        assert mine.status_code == 200, mine.text
        assert (mine.json()["state"], mine.json()["requested_by"]) == ("pending", ["red"])
        assert admin.get(f"{DOWNLOADS}/acme/blue-1b").json()["requested_by"] == ["blue"]

        # each team has its two open: a third is refused to red, blue's own asks still count
        refused = red.post(DOWNLOADS, json={"repository": "acme/three-1b"})
        assert refused.status_code == 409, refused.text
        assert "team 'red' has 2 Hugging Face downloads" in refused.json()["detail"]
        asked(blue, "acme/both-1b")  # again: counts once
        page = signed_in(store, make_key(store, "blue")).get("/ui/models")
        assert page.status_code == 200, page.text
        assert "acme/blue-1b" in page.text and "acme/both-1b" in page.text
        assert "acme/red-1b" not in page.text


CACHED = ("red-asked", "red-private", "red-public", "blue-asked", "nobody")


def test_a_team_sees_the_cached_models_it_asked_for_or_may_call(store: Appliance) -> None:
    admin = store.client()
    red = store.client(make_key(store, "red"))
    blue_key = make_key(store, "blue")
    blue = store.client(blue_key)
    hub = Path(store.env()["APPLIANCE_HF_CACHE_DIR"]) / "hub"
    for name in CACHED:
        fake_hub_repo(hub, f"acme/{name}-1b", b"w" * 100)
    asked(red, "acme/red-asked-1b")
    asked(blue, "acme/blue-asked-1b")
    for name, public in (("red-private", False), ("red-public", True)):
        body = standin_body(
            name, model_name=f"acme/{name}-1b", gpus=0, min_workers=0, public_inference=public
        )
        made = red.post("/v1/llm/model-endpoints", json=body)
        assert made.status_code == 200, made.text

    assert cached(admin) == sorted(f"acme/{name}-1b" for name in CACHED)
    assert cached(red) == ["acme/red-asked-1b", "acme/red-private-1b", "acme/red-public-1b"]
    seen = blue.get("/v1/storage/hf-models").json()["data"]
    assert [r["repo_id"] for r in seen] == ["acme/blue-asked-1b", "acme/red-public-1b"]
    assert (seen[1]["used_by"], seen[1]["used_by_other_teams"]) == ([], 1)

    page = signed_in(store, blue_key).get("/ui/models")
    assert page.status_code == 200, page.text
    assert "acme/red-public-1b" in page.text
    for hidden in ("red-asked", "red-private", "nobody"):
        assert f"acme/{hidden}-1b" not in page.text

    # deleting stays an administrator's; the refusal reads the same whatever the cache holds
    answers = {
        (reply.status_code, reply.json()["detail"])
        for reply in (
            blue.delete(f"/v1/storage/hf-models/acme/{name}-1b")
            for name in ("red-private", "blue-asked", "never-cached")
        )
    }
    assert len(answers) == 1 and next(iter(answers))[0] == 403, answers


def test_a_download_asked_for_before_teams_were_remembered_stays_its_team_s(
    store: Appliance,
) -> None:
    """A request Redis kept from before names one team (`requested_by`): that team, and an
    administrator, still see it, and another team asking adds itself to it."""
    old = {"repository": "acme/old-1b", "revision": "main", "requested_at": 1.0}
    redis.Redis.from_url(store.redis.url).hset(
        "appliance:hf-downloads", "acme/old-1b@main", json.dumps({**old, "requested_by": "red"})
    )
    red = store.client(make_key(store, "red"))
    blue = store.client(make_key(store, "blue"))
    assert downloads(red) == {"acme/old-1b": ["red"]}
    assert downloads(blue) == {}
    asked(blue, "acme/old-1b")
    assert downloads(store.client()) == {"acme/old-1b": ["blue", "red"]}
    assert red.get(f"{DOWNLOADS}/acme/old-1b").json()["requested_at"] == 1.0
