"""The whole path, real end to end: a llama.cpp endpoint for Gemma created through the api is
started by the builder, answers a chat completion with generated text, rolls to a new
generation on an edit and on a restart, and is deleted."""

from __future__ import annotations

import subprocess
import time

import httpx

from tests.harness import GEMMA_FILE, Appliance, wait_until

READY_WITHIN_S = 60


def create_gemma(client: httpx.Client, name: str, **fields: object) -> None:
    body = {
        "name": name,
        "model_name": "gemma-3-270m",
        "inference_framework": "llamacpp",
        "checkpoint_path": GEMMA_FILE,
        "min_workers": 1,
        "max_workers": 1,
        "per_worker": 2,
        "labels": {"team": "test"},
        "metadata": {},
        **fields,
    }
    reply = client.post("/v1/llm/model-endpoints", json=body)
    assert reply.status_code == 200, reply.text
    assert reply.json()["endpoint_creation_task_id"].startswith("end_")


def status_of(client: httpx.Client, name: str) -> str:
    reply = client.get(f"/v1/llm/model-endpoints/{name}")
    assert reply.status_code == 200, reply.text
    return str(reply.json()["status"])


def wait_ready(client: httpx.Client, name: str, timeout_s: float = READY_WITHIN_S) -> None:
    wait_until(lambda: status_of(client, name) == "READY", timeout_s, f"{name} to be READY")


def test_gemma_endpoint_serves_chat_then_deletes_cleanly(appliance: Appliance) -> None:
    client = appliance.client()
    create_gemma(client, "gemma")
    assert status_of(client, "gemma") in {"UPDATE_PENDING", "UPDATE_IN_PROGRESS"}
    wait_ready(client, "gemma")
    assert len(appliance.containers("status=running")) == 1

    sent_at = time.time()
    reply = client.post(
        "/v1/chat/completions",
        json={
            "model": "gemma",
            "max_tokens": 16,
            "temperature": 0,
            "messages": [{"role": "user", "content": "Name three colours."}],
        },
    )
    assert reply.status_code == 200, reply.text
    answer = reply.json()
    assert answer["choices"][0]["message"]["content"].strip()
    assert answer["usage"]["prompt_tokens"] > 0
    assert answer["usage"]["completion_tokens"] > 0
    wait_until(
        lambda: (last_request_at(client, "gemma") or 0) >= sent_at - 1,
        30,
        "the GET to say when the endpoint last served",
    )

    # an edit that changes the server's flags rolls the replica to a new generation
    updated = client.put("/v1/llm/model-endpoints/gemma", json={"max_model_len": 1024})
    assert updated.status_code == 200, updated.text
    wait_until(lambda: generation_ready(client, "gemma", 2), READY_WITHIN_S, "generation 2")
    wait_until(lambda: len(appliance.containers()) == 1, 30, "the old replica to go")
    assert "--ctx-size" in container_args(appliance)
    assert chat(client).status_code == 200

    endpoint_id = client.get("/v1/llm/model-endpoints/gemma").json()["id"]
    assert client.post(f"/v1/model-endpoints/{endpoint_id}/restart").json() == {"restarted": True}
    wait_until(lambda: generation_ready(client, "gemma", 3), READY_WITHIN_S, "generation 3")
    assert chat(client).status_code == 200

    assert client.delete("/v1/llm/model-endpoints/gemma").json() == {"deleted": True}
    wait_until(
        lambda: client.get("/v1/llm/model-endpoints/gemma").status_code == 404,
        30,
        "the endpoint row to go",
    )
    assert appliance.containers() == []


def chat(client: httpx.Client) -> httpx.Response:
    return client.post(
        "/v1/chat/completions",
        json={"model": "gemma", "max_tokens": 8, "messages": [{"role": "user", "content": "Hi"}]},
    )


def last_request_at(client: httpx.Client, name: str) -> float | None:
    spec = client.get(f"/v1/llm/model-endpoints/{name}").json()["spec"]
    found: float | None = spec["deployment_state"]["last_request_at"]
    return found


def generation_ready(client: httpx.Client, name: str, generation: int) -> bool:
    spec = client.get(f"/v1/llm/model-endpoints/{name}").json()["spec"]
    return bool(
        spec["status"] == "READY"
        and spec["generation"] == generation
        and spec["deployment_state"]["available_workers"] == 1
    )


def container_args(appliance: Appliance) -> str:
    [container] = appliance.containers()
    return subprocess.run(
        ["docker", "inspect", "-f", "{{json .Args}}", container],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
