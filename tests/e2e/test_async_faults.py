"""Async tasks survive faults, end to end on real containers (the vLLM stand-in): a worker
killed with SIGKILL mid-task, Redis restarted during a run, Redis wiped during a run, a worker
stopped with tasks waiting for a replica. Every accepted task ends SUCCESS, and a killed task's
result is stored and called back once."""

from __future__ import annotations

import json
import signal
import sqlite3
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import redis as redis_lib

from tests.e2e.lifecycle import (
    ON_FAKE_GPUS,
    create,
    describe,
    live_replicas,
    standin_body,
    wait_status,
)
from tests.forwarder.test_async_support import wait_tasks
from tests.forwarder.test_callbacks import Receiver
from tests.harness import Appliance, wait_until

FAST = {
    "APPLIANCE_TASK_LEASE_S": "3",
    "APPLIANCE_SWEEP_INTERVAL_S": "0.5",
    "APPLIANCE_WORKER_CONCURRENCY": "16",  # so some tasks wait on the queue
}


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    made = Receiver().start()
    yield made
    made.stop()


@pytest.fixture
def running(
    make_appliance: Callable[..., Appliance], receiver: Receiver
) -> tuple[Appliance, httpx.Client, str]:
    appliance = make_appliance(
        **FAST,
        **ON_FAKE_GPUS,
        APPLIANCE_CALLBACK_ALLOWED_HOSTS=json.dumps([f"127.0.0.1:{receiver.port}"]),
    )
    appliance.start_role("worker")
    client = appliance.client()
    body = standin_body("standin", endpoint_type="async", per_worker=8)
    endpoint_id = create(client, body)
    wait_status(client, endpoint_id, "READY", timeout_s=90)
    return appliance, client, endpoint_id


def submit(client: httpx.Client, endpoint_id: str, tokens: int, **extra: Any) -> str:
    args = {"messages": [{"role": "user", "content": "tell a story"}], "max_tokens": tokens}
    reply = client.post(
        f"/v1/async-tasks?model_endpoint_id={endpoint_id}", json={"args": args, **extra}
    )
    assert reply.status_code == 200, reply.text
    return str(reply.json()["task_id"])


def test_worker_killed_mid_task_still_succeeds_once(
    running: tuple[Appliance, httpx.Client, str], receiver: Receiver
) -> None:
    appliance, client, endpoint_id = running
    # 300 tokens at the stand-in's 10 ms each: about 3 s in the replica
    task_id = submit(client, endpoint_id, 300, callback_url=receiver.url)
    wait_until(
        lambda: client.get(f"/v1/async-tasks/{task_id}").json()["status"] == "STARTED",
        30,
        "the task to start",
        every_s=0.05,
    )
    appliance.stop_role("worker", signal.SIGKILL)
    appliance.start_role("worker")
    body = wait_tasks(client, [task_id], 60)[task_id]
    assert body["status"] == "SUCCESS", body
    assert json.loads(body["result"]["result"])["usage"]["completion_tokens"] == 300
    wait_until(lambda: receiver.got, 20, "the callback")
    with sqlite3.connect(appliance.data_dir / "appliance.db") as db:
        attempts = db.execute("SELECT attempts FROM task WHERE id = ?", (task_id,)).fetchone()[0]
    assert attempts == 2  # the killed run, then the sweeper's re-run
    time.sleep(2)  # room for a duplicate delivery, were there one
    delivered = [json.loads(b)["task_id"] for _, b in receiver.got]
    assert delivered == [task_id]  # stored once, called back once


def test_a_task_waiting_for_a_cold_start_is_pending_until_a_replica_takes_it(
    running: tuple[Appliance, httpx.Client, str],
) -> None:
    """A task sent to an endpoint at zero replicas showed STARTED for the whole cold start,
    while no replica ran it: it is PENDING until its request is sent to a replica, then
    STARTED, then SUCCESS, as LLM Engine's statuses mean."""
    _, client, _ = running
    slow = {"VLLM_STANDIN_STARTUP_DELAY_S": "6"}
    body = standin_body(
        "sleepy", endpoint_type="async", min_workers=0, idle_timeout_seconds=2, env=slow
    )
    endpoint_id = create(client, body)
    wait_until(
        lambda: (
            describe(client, endpoint_id)["deployment_state"]["desired_workers"] == 0
            and not live_replicas(client, endpoint_id)
        ),
        90,
        "the endpoint at zero replicas",
    )
    task_id = submit(client, endpoint_id, 300)  # about 3 s in the replica
    seen: list[tuple[str, bool]] = []  # (the task's status, whether a replica was ready)

    def ended() -> bool:
        ready = any(r["state"] == "ready" for r in live_replicas(client, endpoint_id))
        status = client.get(f"/v1/async-tasks/{task_id}").json()["status"]
        seen.append((status, ready))
        return status in ("SUCCESS", "FAILURE")

    wait_until(ended, 90, "the task to end", every_s=0.1)
    assert seen[-1][0] == "SUCCESS", seen[-1]
    assert {s for s, ready in seen if not ready and s != "SUCCESS"} == {"PENDING"}, seen
    assert ("PENDING", False) in seen and ("STARTED", True) in seen, seen


def test_redis_restarted_during_a_run_loses_no_task(
    running: tuple[Appliance, httpx.Client, str],
) -> None:
    appliance, client, endpoint_id = running
    before = [submit(client, endpoint_id, 100) for _ in range(40)]
    appliance.redis.stop()  # SIGTERM: Redis writes its append-only file and exits
    appliance.redis.start()  # same port and directory: the AOF brings the queues back
    after = [submit(client, endpoint_id, 20) for _ in range(20)]
    done = wait_tasks(client, before + after, 120)
    assert [t for t, b in done.items() if b["status"] != "SUCCESS"] == []


def test_redis_wiped_during_a_run_every_task_ends(
    running: tuple[Appliance, httpx.Client, str],
) -> None:
    appliance, client, endpoint_id = running
    ids = [submit(client, endpoint_id, 200) for _ in range(60)]  # 2 s each, 16 at a time
    r = redis_lib.Redis.from_url(appliance.redis.url)
    wait_until(
        lambda: client.get(f"/v1/async-tasks/{ids[0]}").json()["status"] != "PENDING",
        30,
        "the run to begin",
    )
    r.flushall()  # queues, jobs and leases gone; SQLite keeps every accepted task
    ids += [submit(client, endpoint_id, 20) for _ in range(10)]
    done = wait_tasks(client, ids, 180)
    assert [t for t, b in done.items() if b["status"] != "SUCCESS"] == []


def test_a_stopped_worker_finishes_what_the_replica_runs_and_leaves_the_rest_queued(
    running: tuple[Appliance, httpx.Client, str],
) -> None:
    appliance, client, _ = running
    body = standin_body("capped", endpoint_type="async", per_worker=8, forwarder_max_concurrency=8)
    endpoint_id = create(client, body)
    wait_status(client, endpoint_id, "READY", timeout_s=90)
    # the worker takes 8 (the replica's room: its cap), the other 8 wait in their queue
    ids = [submit(client, endpoint_id, 300) for _ in range(16)]  # about 3 s each

    def statuses() -> list[str]:
        return sorted(client.get(f"/v1/async-tasks/{t}").json()["status"] for t in ids)

    def taken() -> int:
        with sqlite3.connect(appliance.data_dir / "appliance.db") as db:
            marks = ",".join("?" * len(ids))
            query = f"SELECT COUNT(*) FROM task WHERE attempts = 1 AND id IN ({marks})"
            return int(db.execute(query, ids).fetchone()[0])

    wait_until(
        lambda: statuses() == ["PENDING"] * 8 + ["STARTED"] * 8,
        30,
        "8 tasks started",
        every_s=0.05,
    )
    time.sleep(0.5)
    assert taken() == 8  # no more than the replica runs at once
    appliance.stop_role("worker")  # SIGTERM; returns once the worker has exited
    # the 8 on the replica finished; the 8 no replica took still wait, untried
    assert statuses() == ["PENDING"] * 8 + ["SUCCESS"] * 8
    assert taken() == 8
    appliance.start_role("worker")
    done = wait_tasks(client, ids, 60)
    assert [t for t, b in done.items() if b["status"] != "SUCCESS"] == []
    with sqlite3.connect(appliance.data_dir / "appliance.db") as db:
        marks = ",".join("?" * len(ids))
        attempts = db.execute(f"SELECT attempts FROM task WHERE id IN ({marks})", ids).fetchall()
    assert sorted(a for (a,) in attempts) == [1] * 16  # a task left queued counts no attempt


def test_redis_down_is_a_line_a_tick_not_a_traceback(
    make_appliance: Callable[..., Appliance],
) -> None:
    """With Redis down (restarting, say) the builder printed two tracebacks a second and the
    worker's sweeper one a sweep, burying what else the log said: each says in one line that
    Redis is unavailable, and carries on once it is back."""
    appliance = make_appliance(APPLIANCE_SWEEP_INTERVAL_S="0.5")
    appliance.start_role("worker")
    wait_until(
        lambda: "worker running" in (appliance.workdir / "worker.log").read_text(),
        30,
        "the worker to start",
    )
    appliance.redis.stop()
    time.sleep(3)  # three builder ticks, six sweeps
    appliance.redis.start()
    for role in ("builder", "worker"):
        said = (appliance.workdir / f"{role}.log").read_text()
        assert "Redis unavailable" in said, said[-3000:]
        assert "Traceback" not in said, said[-3000:]
    wait_until(lambda: appliance.client().get("/readyz").status_code == 200, 30, "Redis back")
