"""Hugging Face weights downloaded by the builder before a vLLM replica starts, through the
loopback hub (`tests/hub.py`, serving the HF-format Gemma as `appliance-test/gemma-3-270m`):
progress in events and the endpoint's GET, the startup timeout counted from when the weights
are present, one download for two endpoints of a model, a download ahead of time that an
endpoint then uses without fetching again, the disk checked first, the hub's refusals in
words, and (on the real vLLM) a builder killed mid-download that resumes without fetching
finished files again."""

from __future__ import annotations

import json
import signal
import subprocess
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from builder.specs import HF_CACHE_MOUNT
from tests.e2e.lifecycle import ON_FAKE_GPUS, create, describe, standin_body, wait_status
from tests.e2e.real_vllm import READY_TIMEOUT_S, completion, vllm_body
from tests.harness import GEMMA_HF, MODELS_DIR, Appliance, wait_until
from tests.hub import Hub

REPO = "appliance-test/gemma-3-270m"
SMALL_FILES = ("config.json", "generation_config.json", "tokenizer_config.json", "tokenizer.json")


@pytest.fixture(scope="module")
def hub_server(docker_ready: None) -> Iterator[Hub]:
    server = Hub.serving({REPO: MODELS_DIR / GEMMA_HF})
    yield server
    server.stop()


@pytest.fixture
def hub(hub_server: Hub) -> Hub:
    """The module's hub with its switches off and an empty access log."""
    hub_server.rate_bytes_s, hub_server.answer, hub_server.cuts = None, None, 0
    hub_server.log.clear()
    return hub_server


def with_hub(hub: Hub, **env: str) -> dict[str, str]:
    return {
        **ON_FAKE_GPUS,
        "APPLIANCE_HF_DOWNLOAD_WEIGHTS": "true",
        "APPLIANCE_HF_ENDPOINT": hub.url,
        **env,
    }


def events(client: httpx.Client, endpoint_id: str) -> list[str]:
    found = client.get(f"/v1/model-endpoints/{endpoint_id}/events").json()["events"]
    return [f"{e['kind']}: {e['message']}" for e in found]


def file_requests(hub: Hub) -> list[str]:
    return [e.path for e in hub.log if "/resolve/" in e.path or "/_cdn/" in e.path]


def replica_env(appliance: Appliance) -> dict[str, dict[str, str]]:
    """Each of the appliance's containers' environment."""
    found = {}
    for container in appliance.containers():
        out = subprocess.run(
            ["docker", "inspect", "-f", "{{json .Config.Env}}", container],
            capture_output=True,
            text=True,
            check=True,
        )
        found[container] = dict(item.split("=", 1) for item in json.loads(out.stdout))
    return found


def test_progress_while_downloading_then_ready_with_the_timeout_counted_from_the_weights(
    make_appliance: Callable[..., Appliance], hub: Hub
) -> None:
    hub.rate_bytes_s = 20e6  # the 0.57 GB take about 30 s
    appliance = make_appliance(**with_hub(hub))
    client = appliance.client()
    endpoint_id = create(
        client, standin_body("hub-gemma", model_name=REPO, startup_timeout_seconds=10)
    )

    def downloading() -> dict[str, Any] | None:
        now = describe(client, endpoint_id)
        progress = now.get("progress") or {}
        return now if progress.get("done_bytes", 0) > 0 else None

    seen = wait_until(downloading, 60, "download progress in the endpoint's GET")
    second = create(client, standin_body("hub-gemma-2", model_name=REPO))  # the same weights
    assert seen["progress"]["kind"] == "weights" and seen["progress"]["total_parts"] == 6
    assert seen["progress"]["total_bytes"] > 500e6
    assert (seen["status_reason"] or "").startswith(f"downloading weights {REPO}")
    assert appliance.containers() == [], "a replica started before its weights were there"
    ready = wait_status(client, endpoint_id, "READY", timeout_s=180)
    assert ready["progress"] is None
    timeline = events(client, endpoint_id)
    milestones = [e for e in timeline if " of 569.6 MB, " in e and " of 6 files" in e]
    assert len(milestones) >= 2, timeline  # a quarter at least, never one per tick
    assert any(f"downloaded weights {REPO}@main: 569.6 MB in " in e for e in timeline), timeline
    wait_status(client, second, "READY", timeout_s=60)
    for name in (*SMALL_FILES, "model.safetensors"):  # one download for both endpoints
        assert len(hub.gets(f"/{name}")) == 1, (name, hub.gets(f"/{name}"))
    assert any(f"downloaded weights {REPO}@main" in e for e in events(client, second))
    assert {v["HF_HUB_OFFLINE"] for v in replica_env(appliance).values()} == {"1"}


def test_downloaded_ahead_of_time_an_endpoint_starts_without_fetching_again(
    make_appliance: Callable[..., Appliance], hub: Hub
) -> None:
    appliance = make_appliance(**with_hub(hub))
    client = appliance.client()
    asked = client.post("/v1/storage/hf-downloads", json={"repository": REPO})
    assert asked.status_code == 202, asked.text
    assert asked.json()["state"] == "pending"
    path = f"/v1/storage/hf-downloads/{REPO}"
    done = wait_until(
        lambda: (r := client.get(path).json())["state"] in ("done", "failed") and r, 120, "done"
    )
    assert done["state"] == "done", done
    assert done["progress"]["done_bytes"] == done["progress"]["total_bytes"] > 500e6
    listed = client.get("/v1/storage/hf-downloads").json()["downloads"]
    assert [(d["repository"], d["revision"], d["state"]) for d in listed] == [
        (REPO, "main", "done")
    ]
    fetched = len(hub.log)
    endpoint_id = create(client, standin_body("hub-ahead", model_name=REPO))
    wait_status(client, endpoint_id, "READY", timeout_s=90)
    assert hub.log[fetched:] == [], "the endpoint fetched what was already in the cache"
    missing = client.get("/v1/storage/hf-downloads/acme/never-asked")
    assert missing.status_code == 404
    refused = client.post("/v1/storage/hf-downloads", json={"repository": "no slash"})
    assert refused.status_code == 422 and "repository" in refused.text


def test_a_model_larger_than_the_allowed_space_is_refused_before_any_download(
    make_appliance: Callable[..., Appliance], hub: Hub
) -> None:
    appliance = make_appliance(**with_hub(hub, APPLIANCE_HF_CACHE_MAX_BYTES="300000000"))
    client = appliance.client()
    endpoint_id = create(client, standin_body("too-big", model_name=REPO))
    failed = wait_status(client, endpoint_id, "UPDATE_FAILED", timeout_s=60)
    assert "it needs 569.6 MB, 300.0 MB free" in failed["status_reason"], failed["status_reason"]
    assert file_requests(hub) == []
    assert appliance.containers() == []


def test_hub_refusals_end_update_failed_in_words(
    make_appliance: Callable[..., Appliance], hub: Hub
) -> None:
    appliance = make_appliance(**with_hub(hub, APPLIANCE_HF_TOKEN="hf_not_a_valid_token"))
    client = appliance.client()
    unknown = create(client, standin_body("unknown", model_name="appliance-test/no-such-model"))
    failed = wait_status(client, unknown, "UPDATE_FAILED", timeout_s=60)
    assert f"{hub.url} has no model 'appliance-test/no-such-model'" in failed["status_reason"]
    assert "check the name" in failed["status_reason"]
    hub.answer = 401
    refused = create(client, standin_body("refused", model_name=REPO))
    failed = wait_status(client, refused, "UPDATE_FAILED", timeout_s=60)
    assert "refused the Hugging Face token (401" in failed["status_reason"]
    assert "set a valid APPLIANCE_HF_TOKEN" in failed["status_reason"]
    assert file_requests(hub) == []
    assert appliance.containers() == []
    hub.answer = None  # the hub takes the token again: a restart downloads and starts
    assert client.post(f"/v1/model-endpoints/{refused}/restart").status_code == 200
    wait_status(client, refused, "READY", timeout_s=120)


@pytest.mark.timeout(2 * READY_TIMEOUT_S)
def test_builder_killed_mid_download_resumes_and_the_real_vllm_serves(
    make_appliance: Callable[..., Appliance], hub: Hub
) -> None:
    hub.rate_bytes_s = 25e6
    appliance = make_appliance(**with_hub(hub), APPLIANCE_ACTIVATION_TIMEOUT_S=str(READY_TIMEOUT_S))
    client = appliance.client()
    body = vllm_body("gemma-hub", model_name=REPO, checkpoint_path=None)
    endpoint_id = create(client, body)
    blobs = appliance.data_dir / "hf-cache/hub/models--appliance-test--gemma-3-270m/blobs"

    def partial() -> int:
        return sum(p.stat().st_size for p in blobs.glob("*.incomplete"))

    wait_until(lambda: partial() > 100e6, 120, "100 MB of the weights on disk")
    appliance.stop_role("builder", signal.SIGKILL)
    cut_at = partial()
    assert appliance.containers() == []
    hub.rate_bytes_s = None
    appliance.start_role("builder")
    wait_status(client, endpoint_id, "READY", timeout_s=READY_TIMEOUT_S)

    for name in SMALL_FILES:  # finished before the kill: never fetched again
        assert len(hub.gets(f"/{name}")) == 1, (name, hub.gets(f"/{name}"))
    first, again = hub.gets("/model.safetensors")
    print(f"killed at {cut_at} bytes on disk; first GET sent {first.sent}, resumed {again}")
    assert first.range is None and again.status == 206, (first, again)
    assert again.range is not None and int(again.range[6:-1]) >= cut_at - 10 * 2**20
    assert first.sent + again.sent < 1.1 * 536223056
    assert [e["HF_HUB_OFFLINE"] for e in replica_env(appliance).values()] == ["1"]
    # the cache every team's replicas share is read-only to one that never asks the hub
    (replica,) = appliance.containers()
    mounts = subprocess.run(
        ["docker", "inspect", "-f", "{{json .Mounts}}", replica],
        capture_output=True,
        text=True,
        check=True,
    )
    cache = next(m for m in json.loads(mounts.stdout) if m["Destination"] == HF_CACHE_MOUNT)
    assert cache["RW"] is False, cache
    answer = completion(client, "gemma-hub", "The capital of France is", 8)
    assert answer["choices"][0]["text"].strip()
    timeline = events(client, endpoint_id)
    print("\n".join(timeline))
    assert any(f"downloaded weights {REPO}@main: 569.6 MB in " in e for e in timeline), timeline
