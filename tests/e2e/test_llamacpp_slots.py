"""A real llama.cpp replica of Gemma serves `per_worker` slots (`--parallel`) and gives each
request `max_model_len` tokens of context: a prompt longer than max_model_len / per_worker
but within max_model_len is answered (llama-server splits --ctx-size among its slots, and
refused it), and a change of `per_worker` alone rolls the replica to one with that many slots
(it only changed the row, and the replica kept its old count)."""

from __future__ import annotations

import re
import subprocess
from typing import Any

import httpx

from tests.e2e.test_first_slice import create_gemma, generation_ready, wait_ready
from tests.harness import Appliance, wait_until

MAX_MODEL_LEN = 2048
ROLL_WITHIN_S = 300  # a busy machine starts a replica slowly


def props(appliance: Appliance) -> dict[str, Any]:
    """llama-server's own /props, asked directly with the replica's key."""
    [container] = appliance.containers("status=running")
    ports = subprocess.run(["docker", "port", container], capture_output=True, text=True).stdout
    found = re.search(r"127\.0\.0\.1:(\d+)", ports)
    assert found, ports
    key = appliance.replica_key(container)
    reply = httpx.get(
        f"http://127.0.0.1:{found.group(1)}/props",
        headers={"authorization": f"Bearer {key}"},
        timeout=60,
    )
    assert reply.status_code == 200, reply.text
    answer: dict[str, Any] = reply.json()
    return answer


def long_chat(client: httpx.Client, words: int) -> httpx.Response:
    return client.post(
        "/v1/chat/completions",
        json={
            "model": "gemma",
            "max_tokens": 8,
            "temperature": 0,
            "messages": [{"role": "user", "content": "Count on: " + "one two " * (words // 2)}],
        },
    )


def test_each_request_gets_max_model_len_and_per_worker_rolls(appliance: Appliance) -> None:
    client = appliance.client()
    create_gemma(client, "gemma", per_worker=3, max_model_len=MAX_MODEL_LEN)
    wait_ready(client, "gemma", ROLL_WITHIN_S)
    # more than a third of max_model_len: a slot of --ctx-size / 3 refused it
    reply = long_chat(client, 1200)
    assert reply.status_code == 200, reply.text
    prompt_tokens = reply.json()["usage"]["prompt_tokens"]
    assert MAX_MODEL_LEN / 3 < prompt_tokens < MAX_MODEL_LEN
    served = props(appliance)
    assert served["total_slots"] == 3
    assert served["default_generation_settings"]["n_ctx"] >= MAX_MODEL_LEN

    updated = client.put("/v1/llm/model-endpoints/gemma", json={"per_worker": 2})
    assert updated.status_code == 200, updated.text
    wait_until(lambda: generation_ready(client, "gemma", 2), ROLL_WITHIN_S, "generation 2")
    wait_until(lambda: len(appliance.containers()) == 1, 60, "the old replica to go")
    served = props(appliance)
    assert served["total_slots"] == 2
    assert served["default_generation_settings"]["n_ctx"] >= MAX_MODEL_LEN
    assert long_chat(client, 1200).status_code == 200
