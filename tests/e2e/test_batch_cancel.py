"""Cancelling a batch stops the requests a worker has already sent: OpenAI's
`/v1/batches/{id}/cancel` and LLM Engine's `Completion.cancel_batch_completion` (through its
own client), on a real llama.cpp replica busy with long generations. The replica stops
generating them (its own count of requests in flight falls to none, and its log says it
cancelled them), and those lines end as cancelled, neither completed nor failed."""

from __future__ import annotations

import json
import re
import subprocess

import httpx

from tests.e2e.test_batch_completions import client
from tests.e2e.test_first_slice import create_gemma, wait_ready
from tests.harness import Appliance, wait_until

PARALLEL = 4  # the replica's slots: the worker sends it this many of a batch's lines at once
LONG = {"max_tokens": 4000, "ignore_eos": True}  # minutes of work for a batch of them


def published(container: str) -> str:
    ports = subprocess.run(["docker", "port", container], capture_output=True, text=True).stdout
    found = re.search(r"127\.0\.0\.1:(\d+)", ports)
    assert found, ports
    return f"http://127.0.0.1:{found.group(1)}"


class Replica:
    """The llama.cpp replica, asked directly with its own key."""

    def __init__(self, appliance: Appliance) -> None:
        [self.container] = appliance.containers("status=running")
        self.url = published(self.container)
        self.key = appliance.replica_key(self.container)

    def processing(self) -> float:
        """llama.cpp's own count of requests it is generating."""
        reply = httpx.get(
            self.url + "/metrics", headers={"authorization": f"Bearer {self.key}"}, timeout=60
        )
        found = re.search(r"^llamacpp:requests_processing ([\d.]+)$", reply.text, re.M)
        assert found, reply.text
        return float(found.group(1))

    def cancelled(self) -> int:
        """How many requests its log says it cancelled (a dropped connection does that)."""
        logs = subprocess.run(
            ["docker", "logs", self.container], capture_output=True, text=True, check=True
        )
        return (logs.stdout + logs.stderr).count("cancel task")


def openai_lines(n: int) -> bytes:
    lines = [
        {
            "custom_id": f"story-{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": "gemma",
                "messages": [{"role": "user", "content": f"Tell a story number {i}"}],
                **LONG,
            },
        }
        for i in range(n)
    ]
    return "".join(json.dumps(line) + "\n" for line in lines).encode()


def test_cancel_stops_the_requests_a_replica_is_generating(appliance: Appliance) -> None:
    appliance.start_role("worker")
    admin = appliance.client()
    create_gemma(admin, "gemma", per_worker=PARALLEL)
    wait_ready(admin, "gemma", 300)  # a busy machine starts it slowly
    replica = Replica(appliance)
    assert replica.processing() == 0

    # OpenAI's Batch API: 30 lines, all taken by the worker, 4 generating at once
    file_id = admin.post(
        "/v1/files", files={"file": ("in.jsonl", openai_lines(30))}, data={"purpose": "batch"}
    ).json()["id"]
    batch = admin.post(
        "/v1/batches",
        json={"input_file_id": file_id, "endpoint": "/v1/chat/completions"},
    )
    assert batch.status_code == 200, batch.text
    batch_id = batch.json()["id"]
    wait_until(lambda: replica.processing() == PARALLEL, 180, "the replica to generate", 2)
    before = replica.cancelled()
    cancel = admin.post(f"/v1/batches/{batch_id}/cancel")
    assert cancel.status_code == 200, cancel.text
    wait_until(lambda: replica.processing() == 0, 180, "the replica to stop generating", 2)
    assert replica.cancelled() >= before + PARALLEL
    final = wait_until(
        lambda: (b := admin.get(f"/v1/batches/{batch_id}").json())["status"] == "cancelled" and b,
        30,
        "the batch to be cancelled",
    )
    assert final["request_counts"] == {"total": 30, "completed": 0, "failed": 0}
    assert final["error_file_id"] is None

    # LLM Engine's batch completions, through its client
    prompts = [{"prompt": f"Tell a story number {i}", **LONG} for i in range(20)]
    job_id = client(appliance, "v2-completions", json.dumps(prompts))
    wait_until(lambda: replica.processing() == PARALLEL, 180, "the replica to generate", 2)
    before = replica.cancelled()
    assert client(appliance, "cancel", job_id) == {"success": True}
    wait_until(lambda: replica.processing() == 0, 180, "the replica to stop generating", 2)
    assert replica.cancelled() >= before + PARALLEL
    job = client(appliance, "wait", job_id, "cancelled", "60")
    counts = {k: job["metadata"][k] for k in ("total", "completed", "failed")}
    assert counts == {"total": "20", "completed": "0", "failed": "0"}
