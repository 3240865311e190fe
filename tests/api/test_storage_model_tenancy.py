"""Whose the files of the models directory are, on a real api process (real Redis and SQLite,
a private models directory; no builder): a file a team uploaded is that team's, listed, served
and downloaded for it and administrators alone, and to any other team it does not exist; files
an administrator uploaded or the operator put there are every team's."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.api.test_storage import GGUF, LIMIT_BYTES, listed, models_dir, started_store, upload
from tests.harness import Appliance, make_key

ENDPOINTS = "/v1/llm/model-endpoints"


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Appliance]:
    with started_store(tmp_path, LIMIT_BYTES) as appliance:
        yield appliance


def endpoint_on(name: str, model: str) -> dict[str, Any]:
    return {
        "name": name,
        "model_name": model,
        "inference_framework": "llamacpp",
        "gpus": 0,
        "min_workers": 0,
        "max_workers": 1,
        "per_worker": 1,
        "labels": {},
        "metadata": {},
    }


def change_row(store: Appliance, name: str, **columns: str) -> None:
    """Write the endpoint's row as no route would (the builder's status; a model it had before
    files were a team's)."""
    sets = ", ".join(f"{column} = ?" for column in columns)
    with sqlite3.connect(store.data_dir / "appliance.db") as db:
        db.execute(f"UPDATE endpoint SET {sets} WHERE name = ?", (*columns.values(), name))


def refusal(reply: httpx.Response) -> str:
    assert reply.status_code == 400, reply.text
    return str(reply.json()["detail"])


def test_a_teams_upload_is_its_own_and_the_boxs_files_are_everyones(store: Appliance) -> None:
    admin = store.client()
    red = store.client(make_key(store, "red"))
    blue = store.client(make_key(store, "blue"))
    assert upload(red, "red-tune.gguf", GGUF).status_code == 201
    assert upload(admin, "box.gguf", GGUF).status_code == 201
    (models_dir(store) / "operator.gguf").write_bytes(GGUF)

    assert sorted(listed(red)) == ["box.gguf", "operator.gguf", "red-tune.gguf"]
    assert sorted(listed(blue)) == ["box.gguf", "operator.gguf"]
    assert sorted(listed(admin)) == ["box.gguf", "operator.gguf", "red-tune.gguf"]
    # quotas count as before: each team its own uploads, the administrator's team too
    assert admin.get("/v1/storage/model-files").json()["team_bytes"] == len(GGUF)
    assert red.get("/v1/storage/model-files").json()["team_bytes"] == len(GGUF)
    assert blue.get("/v1/storage/model-files").json()["team_bytes"] == 0

    # to blue, red's file is missing: the same words as a file that is not there, no hint
    for asked, missing in [
        ("red-tune.gguf", "nope.gguf"),
        ("red-tune", "nope"),
        ("/models/red-tune.gguf", "/models/nope.gguf"),
    ]:
        theirs = refusal(blue.post(ENDPOINTS, json=endpoint_on("blue-x", asked)))
        none = refusal(blue.post(ENDPOINTS, json=endpoint_on("blue-x", missing)))
        assert theirs == none.replace(missing, asked), theirs
        assert "red" not in theirs.replace("red-tune", "")
    checkpoint = {**endpoint_on("blue-x", "red-tune"), "checkpoint_path": "/models/red-tune.gguf"}
    assert "does not exist" in refusal(blue.post(ENDPOINTS, json=checkpoint))

    for name, team, model in [
        ("red-own", red, "red-tune.gguf"),
        ("red-box", red, "box.gguf"),
        ("blue-box", blue, "box.gguf"),
        ("blue-operator", blue, "operator.gguf"),
        ("admin-red", admin, "red-tune.gguf"),
    ]:
        made = team.post(ENDPOINTS, json=endpoint_on(name, model))
        assert made.status_code == 200, made.text

    # an update to red's file is refused to blue as a create is
    change_row(store, "blue-box", status="READY")
    moved = blue.put(f"{ENDPOINTS}/blue-box", json={"model_name": "red-tune.gguf"})
    assert moved.status_code == 400 and "does not exist" in moved.json()["detail"], moved.text
    assert blue.get(f"{ENDPOINTS}/blue-box").json()["model_name"] == "box.gguf"

    # an upload under red's name is refused to blue without naming red
    again = upload(blue, "red-tune.gguf", GGUF)
    assert again.status_code == 409 and "red" not in again.json()["detail"].replace("red-tune", "")


def test_an_endpoint_on_another_teams_file_keeps_running_but_does_not_download_it(
    store: Appliance,
) -> None:
    red = store.client(make_key(store, "red"))
    blue = store.client(make_key(store, "blue"))
    assert upload(red, "red-tune.gguf", GGUF).status_code == 201
    (models_dir(store) / "operator.gguf").write_bytes(GGUF)
    for name, team in [("red-own", red), ("blue-old", blue)]:
        model = "red-tune.gguf" if team is red else "operator.gguf"
        made = team.post(ENDPOINTS, json=endpoint_on(name, model))
        assert made.status_code == 200, made.text
    # made before the file was red's alone
    change_row(store, "blue-old", model="/models/red-tune.gguf", status="READY")

    mine = red.get(f"{ENDPOINTS}/red-own/files/red-tune.gguf")
    assert mine.status_code == 200 and mine.content == GGUF
    urls = red.post(f"{ENDPOINTS}/download", json={"model_name": "red-own"})
    assert list(urls.json()["urls"]) == ["red-tune.gguf"], urls.text

    theirs = blue.get(f"{ENDPOINTS}/blue-old/files/red-tune.gguf")
    assert theirs.status_code == 400 and theirs.content != GGUF, theirs.text
    assert "does not exist" in theirs.json()["detail"]
    assert blue.post(f"{ENDPOINTS}/download", json={"model_name": "blue-old"}).status_code == 400
    # what runs does not change, and the endpoint's other fields still change
    kept = blue.put(f"{ENDPOINTS}/blue-old", json={"max_workers": 2})
    assert kept.status_code == 200, kept.text
    shown = blue.get(f"{ENDPOINTS}/blue-old").json()
    assert shown["spec"]["deployment_state"]["max_workers"] == 2
    assert shown["checkpoint_path"] == "/models/red-tune.gguf"


def vllm_on(name: str, **fields: Any) -> dict[str, Any]:
    return {**endpoint_on(name, "org/model"), "inference_framework": "vllm", **fields}


def test_no_server_setting_names_another_teams_file(store: Appliance) -> None:
    """Every vLLM setting that names a file (the tokenizer, the generation config, a draft
    model in the speculative config, a model id that is a path relative to the container's
    folder) is held to the model's rule: another team's upload is answered as a missing file,
    in the same words, and the team's own file or the box's is taken. Before, only the model
    was: a replica could load another team's file, and whether it started told whether the
    file was there."""
    red = store.client(make_key(store, "red"))
    blue = store.client(make_key(store, "blue"))
    assert upload(red, "red-tune.gguf", GGUF).status_code == 201
    (models_dir(store) / "operator.gguf").write_bytes(GGUF)

    def draft(path: str) -> dict[str, Any]:
        config = {"model": path, "num_speculative_tokens": 2}
        return {"extra_flags": {"--speculative-config": json.dumps(config)}}

    ways = {
        "tokenizer": lambda path: {"tokenizer": path},
        "relative tokenizer": lambda path: {"tokenizer": path.removeprefix("/")},
        "climbing tokenizer": lambda path: {"tokenizer": "../.." + path},
        "generation config": lambda path: {"extra_flags": {"--generation-config": path}},
        "draft model": draft,
        "model id": lambda path: {"model_name": path.removeprefix("/")},
    }
    for n, (why, setting) in enumerate(ways.items()):
        theirs = blue.post(ENDPOINTS, json=vllm_on("blue-x", **setting("/models/red-tune.gguf")))
        none = blue.post(ENDPOINTS, json=vllm_on("blue-x", **setting("/models/nope.gguf")))
        assert theirs.status_code == 400, (why, theirs.text)
        assert "does not exist" in refusal(theirs), (why, theirs.text)
        assert refusal(theirs) == refusal(none).replace("nope", "red-tune"), why
        mine = red.post(ENDPOINTS, json=vllm_on(f"red-{n}", **setting("/models/red-tune.gguf")))
        if why == "model id":  # a GGUF file is no model vLLM loads: said so, to its team alone
            assert "is a GGUF file" in refusal(mine), mine.text
        else:
            assert mine.status_code == 200, (why, mine.text)
    box = blue.post(ENDPOINTS, json=vllm_on("blue-box", tokenizer="/models/operator.gguf"))
    assert box.status_code == 200, box.text
    # an update is held to it as a create is, and changes nothing when refused
    change_row(store, "blue-box", status="READY")
    for setting in ways["draft model"]("/models/red-tune.gguf"), {"tokenizer": "models/red-tune"}:
        moved = blue.put(f"{ENDPOINTS}/blue-box", json=setting)
        assert "does not exist" in refusal(moved), moved.text
    with sqlite3.connect(store.data_dir / "appliance.db") as db:
        (args,) = db.execute("SELECT args FROM endpoint WHERE name = 'blue-box'").fetchone()
    assert json.loads(args) == {"tokenizer": "/models/operator.gguf"}
