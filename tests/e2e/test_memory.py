"""The box's memory bounds the replicas' memory limits: a replica that would pass it is not
started, its endpoint says how much it needs and how much is free, and a higher-priority
endpoint takes the memory of an idle one. Real builder, Docker Engine and llama.cpp on CPU, with
a small bound set for the install (the planner's own rules are in tests/builder)."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from typing import Any

from builder.docker_engine import DockerEngine
from tests.e2e.lifecycle import create, describe, live_replicas, wait_status
from tests.harness import GEMMA_FILE, Appliance, wait_until

GIB = 2**30
READY_WITHIN_S = 90


def gemma(name: str, **fields: Any) -> dict[str, Any]:
    """A llama.cpp endpoint on CPU with a 2 GiB limit; a new one starts a replica at once."""
    return {
        "name": name,
        "model_name": "gemma-3-270m",
        "inference_framework": "llamacpp",
        "checkpoint_path": GEMMA_FILE,
        "gpus": 0,
        "memory": "2Gi",
        "min_workers": 0,
        "max_workers": 1,
        "per_worker": 1,
        "labels": {},
        "metadata": {},
        **fields,
    }


def test_a_replica_waits_for_memory_and_a_higher_priority_one_evicts_an_idle_one(
    make_appliance: Callable[..., Appliance],
) -> None:
    appliance = make_appliance(APPLIANCE_REPLICA_MEMORY_BYTES=str(3 * GIB))
    client = appliance.client()
    first = create(client, gemma("first"))
    wait_status(client, first, "READY", READY_WITHIN_S)

    # the Docker adapter reads the box's memory and each container's limit
    docker = DockerEngine(None, appliance.install_id())
    try:
        [running] = docker.list_managed()
        assert running.memory_bytes == 2 * GIB
        info = ["docker", "info", "--format", "{{.MemTotal}}"]
        assert docker.memory_bytes() == int(subprocess.check_output(info, text=True))
    finally:
        docker.close()

    second = create(client, gemma("second"))
    why = "waiting for memory: needs 2.0 GiB, 1.0 GiB of the box's 3.0 GiB are free"
    wait_until(lambda: describe(client, second)["status_reason"] == why, 30, "the memory wait")
    assert describe(client, second)["status"] == "UPDATE_IN_PROGRESS"
    assert live_replicas(client, second) == []
    assert len(appliance.containers()) == 1

    # a higher-priority endpoint (an administrator's) takes the first one's idle replica's
    # memory; the second, of the first one's priority, keeps waiting
    urgent = create(client, gemma("urgent", priority=10))
    wait_status(client, urgent, "READY", READY_WITHIN_S)
    assert live_replicas(client, first) == []
    assert describe(client, first)["status"] == "READY"  # evicted to zero, back on demand
    assert describe(client, second)["status_reason"] == why
    assert len(appliance.containers()) == 1
