"""Replicas are reachable only through the appliance: every vLLM and llama.cpp replica demands
its own replica key (`appliance/install.replica_key`, from the key secret and the replica id),
which only the api and the worker present. A request sent straight to a replica's published
port is refused, and so is one carrying the key another replica holds in its environment (code
running in one tenant's replica can read it). With real llama.cpp replicas serving the test
model."""

from __future__ import annotations

import re
import subprocess

import httpx

from tests.e2e.test_first_slice import create_gemma
from tests.harness import Appliance, wait_until

CHAT = {"messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 4}


def ready(client: httpx.Client, name: str) -> None:
    wait_until(
        lambda: client.get(f"/v1/llm/model-endpoints/{name}").json()["status"] == "READY",
        180,
        f"{name} to be READY",
    )


def published(container: str) -> str:
    ports = subprocess.run(["docker", "port", container], capture_output=True, text=True).stdout
    found = re.search(r"127\.0\.0\.1:(\d+)", ports)
    assert found, ports
    return f"http://127.0.0.1:{found.group(1)}"


def key_in_env(container: str) -> str:
    """LLAMA_API_KEY as a process inside the container reads it."""
    env = subprocess.run(
        ["docker", "inspect", "-f", "{{json .Config.Env}}", container],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    found = re.search(r'"LLAMA_API_KEY=([0-9a-f]+)"', env)
    assert found, env
    return found.group(1)


def chat(replica: str, key: str | None) -> int:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    return httpx.post(
        replica + "/v1/chat/completions", json=CHAT, headers=headers, timeout=60
    ).status_code


def test_a_request_straight_to_a_replica_is_refused(appliance: Appliance) -> None:
    client = appliance.client()
    create_gemma(client, "direct")
    ready(client, "direct")
    [container] = appliance.containers("status=running")
    replica = published(container)

    assert chat(replica, None) == 401
    # not even with the appliance's own admin key
    assert chat(replica, "mea_000000000001_testadminkeytestadminkey0") == 401
    through = client.post("/v1/chat/completions", json={**CHAT, "model": "direct"})
    assert through.status_code == 200, through.text


def test_the_key_one_replica_holds_opens_no_other(appliance: Appliance) -> None:
    client = appliance.client()
    create_gemma(client, "alice", labels={"team": "alice"})
    create_gemma(client, "bob", labels={"team": "bob"})
    ready(client, "alice")
    ready(client, "bob")
    first, second = appliance.containers("status=running")
    keys = {c: key_in_env(c) for c in (first, second)}
    assert keys[first] != keys[second]
    assert keys == {c: appliance.replica_key(c) for c in (first, second)}

    # what code inside one replica can do with the key it reads: nothing at the other's port
    assert chat(published(first), keys[second]) == 401
    assert chat(published(second), keys[first]) == 401
    assert chat(published(first), keys[first]) == 200  # its own key is the one it demands
    # the appliance still reaches both, each with its own key
    for name in ("alice", "bob"):
        through = client.post("/v1/chat/completions", json={**CHAT, "model": name})
        assert through.status_code == 200, through.text
