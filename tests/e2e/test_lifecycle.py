"""Endpoint lifecycle against the real Docker Engine: create, update, restart, delete, rolling
updates under load, a crashed replica replaced, and a missing model file reported."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import httpx

from tests.e2e.lifecycle import (
    ON_FAKE_GPUS,
    create,
    describe,
    live_replicas,
    standin_body,
    wait_status,
)
from tests.harness import Appliance, wait_until


class Traffic:
    """Sends chat requests without pause until stopped; counts what failed."""

    def __init__(self, appliance: Appliance, model: str, workers: int = 3) -> None:
        self.client = appliance.client()
        self.model = model
        self.ok = 0
        self.failed: list[str] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self.run) for _ in range(workers)]

    def __enter__(self) -> Traffic:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(30)

    def run(self) -> None:
        body = {
            "model": self.model,
            "max_tokens": 4,
            "messages": [{"role": "user", "content": "ping"}],
        }
        while not self.stop.is_set():
            try:
                reply = self.client.post("/v1/chat/completions", json=body)
                if reply.status_code == 200:
                    self.ok += 1
                else:
                    self.failed.append(f"{reply.status_code} {reply.text[:200]}")
            except httpx.HTTPError as exc:
                self.failed.append(repr(exc))


def test_standin_rolls_updates_and_restarts_without_a_failed_request(
    make_appliance: Callable[..., Appliance],
) -> None:
    appliance = make_appliance(**ON_FAKE_GPUS)
    client = appliance.client()
    endpoint_id = create(client, standin_body("echo", min_workers=2, max_workers=2))
    ready = wait_status(client, endpoint_id, "READY")
    assert ready["deployment_state"]["available_workers"] == 2
    gpus = [r["gpus"] for r in ready["replicas"]]
    assert len({g[0] for g in gpus}) == 2, f"two replicas share a GPU: {gpus}"
    first = {r["container_name"] for r in ready["replicas"]}

    with Traffic(appliance, "echo") as traffic:
        wait_until(lambda: traffic.ok >= 5, 30, "traffic to flow")
        reply = client.put(f"/v1/model-endpoints/{endpoint_id}", json={"max_model_len": 2048})
        assert reply.status_code == 200, reply.text
        busy = client.put(f"/v1/model-endpoints/{endpoint_id}", json={"max_model_len": 1024})
        assert busy.status_code == 409
        wait_status(client, endpoint_id, "READY", generation=2)
        wait_until(lambda: len(appliance.containers()) == 2, 30, "old replicas to go")
        rolled = describe(client, endpoint_id)
        assert client.post(f"/v1/model-endpoints/{endpoint_id}/restart").json() == {
            "restarted": True
        }
        wait_status(client, endpoint_id, "READY", generation=3)
        wait_until(lambda: len(appliance.containers()) == 2, 30, "old replicas to go")
        restarted = describe(client, endpoint_id)
        before = traffic.ok
        wait_until(lambda: traffic.ok > before + 5, 30, "traffic after the restart")
    assert traffic.failed == []
    names = {r["container_name"] for r in restarted["replicas"]}
    assert not names & first and not names & {r["container_name"] for r in rolled["replicas"]}
    assert all(r["generation"] == 3 for r in restarted["replicas"])

    kinds = [
        e["kind"] for e in client.get(f"/v1/model-endpoints/{endpoint_id}/events").json()["events"]
    ]
    for kind in ("created", "placed", "started", "ready", "draining", "removed", "restart"):
        assert kind in kinds
    logs = client.get(f"/v1/model-endpoints/{endpoint_id}/logs", params={"tail": 2000})
    assert "Application startup complete" in logs.text

    held = [g for g in client.get("/v1/gpus").json()["gpus"] if g["replicas"]]
    assert len(held) == 2 and all(g["claimed_fraction"] == 1.0 for g in held)

    assert client.delete(f"/v1/model-endpoints/{endpoint_id}").json() == {"deleted": True}
    wait_until(
        lambda: client.get(f"/v1/model-endpoints/{endpoint_id}").status_code == 404,
        30,
        "the endpoint to be deleted",
    )
    assert appliance.containers() == []


def test_a_killed_replica_is_replaced(make_appliance: Callable[..., Appliance]) -> None:
    appliance = make_appliance(**ON_FAKE_GPUS)
    client = appliance.client()
    endpoint_id = create(client, standin_body("victim"))
    wait_status(client, endpoint_id, "READY")
    [before] = appliance.containers()
    import subprocess

    subprocess.run(["docker", "kill", before], check=True, capture_output=True)
    wait_until(
        lambda: [c for c in appliance.containers("status=running") if c != before],
        60,
        "a replacement container",
    )
    wait_until(
        lambda: describe(client, endpoint_id)["deployment_state"]["available_workers"] == 1,
        60,
        "the replacement to be ready",
    )
    events = client.get(f"/v1/model-endpoints/{endpoint_id}/events").json()["events"]
    assert any(e["kind"] == "crashed" and "exited" in e["message"] for e in events)
    assert before not in appliance.containers()


def test_a_missing_model_file_fails_the_endpoint_with_its_error(
    make_appliance: Callable[..., Appliance], tmp_path: Path
) -> None:
    models = tmp_path / "models"
    models.mkdir()
    (models / "ghost.gguf").write_bytes(b"GGUF")
    appliance = make_appliance(
        **ON_FAKE_GPUS,
        APPLIANCE_MODELS_DIR=str(models),
        APPLIANCE_LLAMACPP_CUDA_IMAGE="appliance-test/llama.cpp:server",
    )
    client = appliance.client()
    endpoint_id = create(
        client,
        {
            "name": "ghost",
            "model_name": "ghost",
            "inference_framework": "llamacpp",
            "checkpoint_path": "ghost.gguf",
            "gpus": 1,
            "min_workers": 0,
            "max_workers": 0,
            "per_worker": 1,
            "labels": {},
            "metadata": {},
        },
    )
    wait_status(client, endpoint_id, "READY")
    (models / "ghost.gguf").unlink()
    reply = client.put(
        f"/v1/model-endpoints/{endpoint_id}", json={"min_workers": 1, "max_workers": 1}
    )
    assert reply.status_code == 200, reply.text
    failed = wait_status(client, endpoint_id, "UPDATE_FAILED", timeout_s=90)
    assert "crashed 3 times" in failed["status_reason"]
    assert "ghost.gguf" in failed["status_reason"]  # the server's own complaint, from its logs
    assert live_replicas(client, endpoint_id) == []
    assert all(not g["replicas"] for g in client.get("/v1/gpus").json()["gpus"])
    assert appliance.containers() == []
