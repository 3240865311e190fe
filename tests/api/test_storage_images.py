"""The appliance's images through the api, on a real builder and Docker Engine: each listed
with its size and users, and a prune that removes only an appliance image nobody uses, never
one an endpoint or a container uses, and never an image that is not the appliance's.

Every image here is made by the test under a name of its own (a tiny `docker import`), and
the settings name them, so no image anyone else uses is ever a candidate."""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.api.test_tenancy import team_key
from tests.harness import Appliance, wait_until

GGUF = b"GGUF" + b"\0" * 1000


def docker(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["docker", *args], capture_output=True, text=True, check=False)


def import_image(name: str) -> None:
    """A tiny image of its own (an empty file system with a label that makes it unique)."""
    empty = subprocess.run(["tar", "-cf", "-", "--files-from", "/dev/null"], capture_output=True)
    made = subprocess.run(
        ["docker", "import", "--change", f"LABEL appliance-test={uuid.uuid4().hex}", "-", name],
        input=empty.stdout,
        capture_output=True,
        check=False,
    )
    assert made.returncode == 0, made.stderr


def present(name: str) -> bool:
    return docker("image", "inspect", name).returncode == 0


@pytest.fixture
def images() -> Iterator[dict[str, str]]:
    tag = uuid.uuid4().hex[:8]
    names = {
        "unused": f"appliance-test-prune/unused:{tag}",
        "container": f"appliance-test-prune/container:{tag}",
        "endpoint": f"appliance-test-prune/endpoint:{tag}",
        "absent": f"appliance-test-prune/absent:{tag}",
        "approved": f"appliance-test-prune/approved:{tag}",
        "foreign": f"appliance-test-prune/foreign:{tag}",  # not the appliance's
        # a second name of the container's image: Docker alone would untag a name of an image
        # with two, container or not; the appliance must not
        "alias": f"appliance-test-prune/alias:{tag}",
    }
    for key in ("unused", "container", "endpoint", "approved", "foreign"):
        import_image(names[key])
    assert docker("tag", names["container"], names["alias"]).returncode == 0
    made = docker("create", "--name", f"prune-user-{tag}", names["container"], "/nothing")
    assert made.returncode == 0, made.stderr
    yield names
    docker("rm", "-f", f"prune-user-{tag}")
    docker("rmi", *(names[k] for k in names if present(names[k])))


def by_image(client: httpx.Client) -> dict[str, dict[str, Any]]:
    reply = client.get("/v1/storage/images")
    assert reply.status_code == 200, reply.text
    return {item["image"]: item for item in reply.json()["data"]}


def test_images_listed_and_only_unused_ones_pruned(
    make_appliance: Callable[..., Appliance], images: dict[str, str], tmp_path: Path
) -> None:
    models = tmp_path / "models"
    models.mkdir()
    (models / "tiny.gguf").write_bytes(GGUF)
    appliance = make_appliance(
        APPLIANCE_MODELS_DIR=str(models),
        APPLIANCE_VLLM_IMAGE=images["unused"],
        APPLIANCE_VLLM_CPU_IMAGE=images["container"],
        APPLIANCE_LLAMACPP_IMAGE=images["endpoint"],
        APPLIANCE_LLAMACPP_CUDA_IMAGE=images["absent"],
        APPLIANCE_APPROVED_IMAGES=json.dumps([images["approved"]]),
    )
    admin = appliance.client()
    body = {
        "name": "idle-gguf",  # no replica: min 0 and no requests; it still uses its image
        "model_name": "tiny.gguf",
        "inference_framework": "llamacpp",
        "gpus": 0,
        "min_workers": 0,
        "max_workers": 1,
        "per_worker": 1,
        "labels": {},
        "metadata": {},
    }
    assert admin.post("/v1/llm/model-endpoints", json=body).status_code == 200

    listed = wait_until(
        lambda: (found := by_image(admin)) and found[images["unused"]]["present"] and found,
        60,
        "the builder to publish the images",
    )
    assert images["foreign"] not in listed
    assert listed[images["absent"]]["present"] is False
    unused, used = listed[images["unused"]], listed[images["endpoint"]]
    assert unused["size_bytes"] is not None and unused["sources"] == ["vllm_image"]
    assert (unused["used_by"], unused["containers"]) == ([], 0)
    assert [u["name"] for u in used["used_by"]] == ["idle-gguf"]
    assert listed[images["container"]]["containers"] == 1
    assert listed[images["approved"]]["sources"] == ["approved"]

    team = httpx.Client(base_url=appliance.url, headers={"x-api-key": team_key(admin, "red")})
    assert team.get("/v1/storage/images").status_code == 200  # `manage` reads the list
    assert team.post("/v1/storage/images/prune").status_code == 403  # admins prune

    queued = admin.post("/v1/storage/images/prune")
    assert queued.status_code == 202, queued.text
    prune_id = queued.json()["id"]
    result = wait_until(
        lambda: (
            (r := admin.get(f"/v1/storage/images/prune/{prune_id}").json())["status"] != "queued"
            and r
        ),
        60,
        "the prune to finish",
    )
    assert result["status"] == "done", result
    removed = sorted(r["image"] for r in result["removed"])
    assert removed == sorted([images["unused"], images["approved"]])
    kept = {k["image"]: k for k in result["kept"]}
    assert "container" in kept[images["container"]]["reason"]
    assert [u["name"] for u in kept[images["endpoint"]]["used_by"]] == ["idle-gguf"]
    assert not present(images["unused"]) and not present(images["approved"])
    assert present(images["container"]) and present(images["endpoint"])
    assert present(images["alias"])
    assert present(images["foreign"])  # never the appliance's: untouched
    wait_until(
        lambda: by_image(admin)[images["unused"]]["present"] is False,
        30,
        "the list to show the pruned image gone",
    )
