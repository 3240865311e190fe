"""Helpers for the endpoint lifecycle tests: create, inspect and wait on endpoints by id."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import httpx

from tests.harness import wait_until

EIGHT_GPUS = str(Path(__file__).parents[1] / "gpu" / "eight_h100.json")
ON_FAKE_GPUS = {"APPLIANCE_GPU_INVENTORY_FILE": EIGHT_GPUS, "APPLIANCE_DOCKER_GPU_RUNTIME": "false"}


def standin_body(name: str, **fields: Any) -> dict[str, Any]:
    """A vLLM endpoint on the stand-in image: fast to start, deterministic."""
    return {
        "name": name,
        "model_name": "acme/standin-1b",
        "inference_framework": "vllm",
        "gpus": 1,
        "min_workers": 1,
        "max_workers": 1,
        "per_worker": 4,
        "labels": {},
        "metadata": {},
        **fields,
    }


def create(client: httpx.Client, body: dict[str, Any]) -> str:
    reply = client.post("/v1/model-endpoints", json=body)
    assert reply.status_code == 200, reply.text
    return str(reply.json()["endpoint_creation_task_id"])


def describe(client: httpx.Client, endpoint_id: str) -> dict[str, Any]:
    reply = client.get(f"/v1/model-endpoints/{endpoint_id}")
    assert reply.status_code == 200, reply.text
    body: dict[str, Any] = reply.json()
    return body


def wait_status(
    client: httpx.Client,
    endpoint_id: str,
    status: str,
    timeout_s: float = 60,
    generation: int | None = None,
) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        now = describe(client, endpoint_id)
        fits = generation is None or now["generation"] == generation
        return now if now["status"] == status and fits else None

    found: dict[str, Any] = wait_until(check, timeout_s, f"{endpoint_id} to be {status}")
    return found


def live_replicas(client: httpx.Client, endpoint_id: str) -> list[dict[str, Any]]:
    return [r for r in describe(client, endpoint_id)["replicas"] if r["state"] != "failed"]


def container_state(name_or_id: str) -> str:
    out = subprocess.run(
        ["docker", "inspect", "-f", "{{.Id}} {{.State.StartedAt}}", name_or_id],
        capture_output=True,
        text=True,
    )
    return out.stdout.strip()
