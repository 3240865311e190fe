"""The builder killed with SIGKILL in the middle of a create and of an update: after a restart
the end state matches the spec, one container per replica, no GPU claimed twice, and nothing
that was already running is restarted."""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterable

import httpx

from tests.e2e.lifecycle import (
    ON_FAKE_GPUS,
    container_state,
    create,
    describe,
    live_replicas,
    standin_body,
    wait_status,
)
from tests.harness import Appliance, wait_until

SLOW_START = {"VLLM_STANDIN_STARTUP_DELAY_S": "4"}
NEVER_STARTED = "0001-01-01T00:00:00Z"  # Docker's StartedAt for a container never started


def kill_builder_when(
    appliance: Appliance, client: httpx.Client, endpoint_id: str, generation: int
) -> list[str]:
    """SIGKILL the builder once a replica of `generation` has a container; returns containers."""
    wait_until(
        lambda: any(
            r["generation"] == generation and r["state"] == "starting"
            for r in live_replicas(client, endpoint_id)
        ),
        30,
        f"a starting replica of generation {generation}",
    )
    wait_until(lambda: len(appliance.containers()) >= 1, 30, "a container")
    appliance.stop_role("builder", signal.SIGKILL)
    return appliance.containers()


def had_started(containers: Iterable[str]) -> dict[str, str]:
    """Containers that had started, with their start time. One the builder created but was
    killed before starting is replaced (it may lack its secret files), not adopted."""
    states = {cid: container_state(cid) for cid in containers}
    return {cid: s for cid, s in states.items() if s and not s.endswith(NEVER_STARTED)}


def assert_converged(
    appliance: Appliance, client: httpx.Client, endpoint_id: str, replicas: int, generation: int
) -> None:
    wait_until(lambda: len(appliance.containers()) == replicas, 60, f"{replicas} containers")
    state = describe(client, endpoint_id)
    live = live_replicas(client, endpoint_id)
    assert len(live) == replicas and all(r["generation"] == generation for r in live), live
    assert all(r["state"] == "ready" for r in live)
    claimed = [g for r in live for g in r["gpus"]]
    assert len(claimed) == len(set(claimed)), f"a GPU is claimed twice: {claimed}"
    assert state["deployment_state"]["available_workers"] == replicas


def test_builder_killed_mid_create_and_mid_update_converges(
    make_appliance: Callable[..., Appliance],
) -> None:
    appliance = make_appliance(**ON_FAKE_GPUS)
    client = appliance.client()
    endpoint_id = create(
        client, standin_body("sturdy", min_workers=2, max_workers=2, env=SLOW_START)
    )
    during_create = kill_builder_when(appliance, client, endpoint_id, generation=1)
    survivors = had_started(during_create)
    appliance.start_role("builder")
    wait_status(client, endpoint_id, "READY", timeout_s=90)
    assert_converged(appliance, client, endpoint_id, replicas=2, generation=1)
    for cid, started in survivors.items():  # adopted, not restarted or replaced
        assert container_state(cid) == started

    ready_before = {cid: container_state(cid) for cid in appliance.containers()}
    reply = client.put(f"/v1/model-endpoints/{endpoint_id}", json={"max_model_len": 4096})
    assert reply.status_code == 200, reply.text
    during_update = kill_builder_when(appliance, client, endpoint_id, generation=2)
    new_ones = had_started(cid for cid in during_update if cid not in ready_before)
    appliance.start_role("builder")
    wait_status(client, endpoint_id, "READY", timeout_s=90, generation=2)
    assert_converged(appliance, client, endpoint_id, replicas=2, generation=2)
    for cid, started in new_ones.items():
        assert container_state(cid) == started
