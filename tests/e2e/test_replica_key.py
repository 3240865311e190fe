"""Replicas are reachable only through the appliance: every vLLM and llama.cpp replica demands
the install's replica key (`appliance/install.replica_key`), which only the api and the worker
present, so a request sent straight to a replica's published port is refused. With a real
llama.cpp replica serving the test model."""

from __future__ import annotations

import re
import subprocess

import httpx

from tests.e2e.test_first_slice import create_gemma
from tests.harness import Appliance, wait_until

CHAT = {"messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 4}


def test_a_request_straight_to_a_replica_is_refused(appliance: Appliance) -> None:
    client = appliance.client()
    create_gemma(client, "direct")
    wait_until(
        lambda: client.get("/v1/llm/model-endpoints/direct").json()["status"] == "READY",
        180,
        "the endpoint to be READY",
    )
    [container] = appliance.containers("status=running")
    ports = subprocess.run(["docker", "port", container], capture_output=True, text=True).stdout
    found = re.search(r"127\.0\.0\.1:(\d+)", ports)
    assert found, ports
    replica = f"http://127.0.0.1:{found.group(1)}"

    straight = httpx.post(replica + "/v1/chat/completions", json=CHAT, timeout=60)
    assert straight.status_code == 401, straight.text
    guessed = httpx.post(
        replica + "/v1/chat/completions",
        json=CHAT,
        headers={"authorization": "Bearer mea_000000000001_testadminkeytestadminkey0"},
        timeout=60,
    )
    assert guessed.status_code == 401  # not even with the appliance's own admin key
    through = client.post("/v1/chat/completions", json={**CHAT, "model": "direct"})
    assert through.status_code == 200, through.text
