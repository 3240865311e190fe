"""Redis stopped under a running api (restarting, say): a change the database took is answered
as taken (the builder's tick finds it without the nudge), never a 500."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import Any

from tests.e2e.lifecycle import ON_FAKE_GPUS, standin_body, wait_status
from tests.harness import Appliance, wait_until


def rows(appliance: Appliance, name: str) -> list[Any]:
    with sqlite3.connect(appliance.data_dir / "appliance.db") as db:
        return db.execute("SELECT status FROM endpoint WHERE name = ?", (name,)).fetchall()


def test_a_change_taken_while_redis_is_down_is_answered_and_carried_out(
    make_appliance: Callable[..., Appliance],
) -> None:
    """A delete or a restart committed, then failed to nudge the builder: a 500 for a change
    that was made. It is answered as made, and the builder carries it out on its tick."""
    appliance = make_appliance(**ON_FAKE_GPUS)
    client = appliance.client()
    body = standin_body("idle", min_workers=0)
    made = client.post("/v1/model-endpoints", json=body)
    assert made.status_code == 200, made.text
    endpoint_id = made.json()["endpoint_creation_task_id"]
    kept = client.post("/v1/llm/model-endpoints", json=standin_body("kept", min_workers=0))
    assert kept.status_code == 200, kept.text
    kept_id = kept.json()["endpoint_creation_task_id"]
    wait_status(client, kept_id, "READY", timeout_s=30)
    appliance.redis.stop()

    restarted = client.post(f"/v1/model-endpoints/{kept_id}/restart")
    assert restarted.status_code == 200, restarted.text
    deleted = client.delete(f"/v1/model-endpoints/{endpoint_id}")
    assert deleted.status_code == 200, deleted.text
    assert deleted.json() == {"deleted": True}

    appliance.redis.start()
    wait_until(lambda: rows(appliance, "idle") == [], 30, "the builder to delete the endpoint")
    wait_status(client, kept_id, "READY", timeout_s=30)
