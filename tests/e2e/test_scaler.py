"""The scaler with real containers: Gemma replicas follow a burst up and come back down after
the window; an endpoint at zero stays there through an edit of its labels and answers its next
request; GPU pressure evicts an idle
lower-priority replica for a higher-priority endpoint. GPUs come from an injected inventory."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from tests.e2e.lifecycle import (
    EIGHT_GPUS,
    ON_FAKE_GPUS,
    create,
    describe,
    live_replicas,
    standin_body,
    wait_status,
)
from tests.harness import GEMMA_FILE, LLAMACPP_IMAGE, Appliance, wait_until


def ready_count(client: httpx.Client, endpoint_id: str) -> int:
    return int(describe(client, endpoint_id)["deployment_state"]["available_workers"])


def gemma_body(name: str, **fields: object) -> dict[str, object]:
    return {
        "name": name,
        "model_name": "gemma",
        "inference_framework": "llamacpp",
        "checkpoint_path": GEMMA_FILE,
        "gpus": 1,
        "per_worker": 2,
        "labels": {},
        "metadata": {},
        **fields,
    }


def chat(client: httpx.Client, model: str, tokens: int) -> httpx.Response:
    return client.post(
        "/v1/chat/completions",
        json={
            "model": model,
            "max_tokens": tokens,
            "temperature": 0,
            "messages": [{"role": "user", "content": "Tell me a long story about the sea."}],
        },
    )


def test_gemma_follows_a_burst_up_then_down_and_wakes_from_zero(
    make_appliance: Callable[..., Appliance],
) -> None:
    appliance = make_appliance(**ON_FAKE_GPUS, APPLIANCE_LLAMACPP_CUDA_IMAGE=LLAMACPP_IMAGE)
    client = appliance.client()
    endpoint_id = create(
        client, gemma_body("bursty", min_workers=1, max_workers=3, scale_down_window_seconds=15)
    )
    wait_status(client, endpoint_id, "READY", timeout_s=60)

    results: list[int | str] = []
    stop = threading.Event()

    def hammer() -> None:
        worker = appliance.client()
        while not stop.is_set():
            try:
                results.append(chat(worker, "bursty", 32).status_code)
            except httpx.HTTPError as exc:
                results.append(repr(exc))

    threads = [threading.Thread(target=hammer) for _ in range(6)]
    for thread in threads:
        thread.start()
    at_peak: list[dict[str, Any]] = []  # the replicas when three are ready, under the load

    def three_ready() -> bool:
        live = live_replicas(client, endpoint_id)
        at_peak[:] = live
        return sum(r["state"] == "ready" for r in live) == 3

    try:
        wait_until(three_ready, 90, "three ready replicas")
    finally:
        stop.set()
        for thread in threads:
            thread.join(300)
    assert results and set(results) == {200}, results
    gpus = [g for r in at_peak if r["state"] == "ready" for g in r["gpus"]]
    assert len(gpus) == len(set(gpus)) == 3, at_peak
    wait_until(
        lambda: ready_count(client, endpoint_id) == 1 and len(appliance.containers()) == 1,
        90,
        "the endpoint back at one replica",
    )
    kinds = [
        e["message"]
        for e in client.get(f"/v1/model-endpoints/{endpoint_id}/events").json()["events"]
        if e["kind"] == "scaled"
    ]
    assert any("to 3" in m and "load" in m for m in kinds), kinds
    assert any("to 1" in m for m in kinds), kinds

    sleepy = create(
        client, gemma_body("sleepy", min_workers=0, max_workers=1, idle_timeout_seconds=5)
    )
    wait_until(
        lambda: (
            describe(client, sleepy)["deployment_state"]["desired_workers"] == 0
            and not live_replicas(client, sleepy)
        ),
        90,
        "the idle endpoint at zero",
    )
    # an edit that leaves its container as it is wakes nothing (a roll would: a new generation)
    edited = client.put(f"/v1/model-endpoints/{sleepy}", json={"labels": {"team": "ml"}})
    assert edited.status_code == 200, edited.text
    for _ in range(8):  # several builder ticks
        time.sleep(0.5)
        assert describe(client, sleepy)["deployment_state"]["desired_workers"] == 0
        assert not live_replicas(client, sleepy)
    woke = chat(client, "sleepy", 8)
    assert woke.status_code == 200, woke.text
    assert woke.json()["choices"][0]["message"]["content"]


def test_an_idle_lower_priority_replica_makes_room_for_a_higher_priority_one(
    make_appliance: Callable[..., Appliance],
    tmp_path: Path,
) -> None:
    inventory = json.loads(Path(EIGHT_GPUS).read_text())
    inventory["gpus"], inventory["links"] = inventory["gpus"][:1], []
    one_gpu = tmp_path / "one-gpu.json"
    one_gpu.write_text(json.dumps(inventory))
    appliance = make_appliance(
        APPLIANCE_GPU_INVENTORY_FILE=str(one_gpu), APPLIANCE_DOCKER_GPU_RUNTIME="false"
    )
    client = appliance.client()
    low = create(client, standin_body("batch-low", min_workers=0, max_workers=1, priority=0))
    wait_status(client, low, "READY")
    assert ready_count(client, low) == 1
    high = create(client, standin_body("chat-high", min_workers=1, max_workers=1, priority=10))
    wait_status(client, high, "READY", timeout_s=60)
    assert ready_count(client, high) == 1
    assert live_replicas(client, low) == []
    assert describe(client, low)["deployment_state"]["desired_workers"] == 0
    events = client.get(f"/v1/model-endpoints/{low}/events").json()["events"]
    assert any("evicted for chat-high" in e["message"] for e in events)
