"""The api's group-commit submit path under concurrent POSTs (real api, worker, Redis, SQLite):
every task id the api answered is committed and queued, even when the api is killed with
SIGKILL right after and Redis is wiped; refusals in a group store nothing and fail no
neighbour; the queued-task limit holds exactly under a burst."""

from __future__ import annotations

import signal
import sqlite3
from concurrent.futures import ThreadPoolExecutor

import redis as redis_lib

from forwarder.worker import jobs
from tests.forwarder import test_async_support as support
from tests.forwarder.test_async_support import FakeBackend, seed_endpoint
from tests.harness import Appliance, make_key, wait_until

backend = support.backend  # fixtures
bare_appliance = support.bare_appliance

BURST = 200
CLIENTS = 32


def task_rows(appliance: Appliance) -> dict[str, str]:
    with sqlite3.connect(appliance.data_dir / "appliance.db", timeout=30) as db:
        return dict(db.execute("SELECT id, status FROM task").fetchall())


def test_every_answered_task_survives_an_api_kill_and_a_redis_wipe(
    bare_appliance: Appliance, backend: FakeBackend
) -> None:
    endpoint_id = seed_endpoint(bare_appliance.data_dir, "fake", backend.address)
    admin = bare_appliance.client()
    stranger = bare_appliance.client(make_key(bare_appliance, "other"))
    path = f"/v1/async-tasks?model_endpoint_id={endpoint_id}"

    def post(i: int) -> tuple[int, str | None]:
        if i % 10 == 0:  # refused in the middle of the groups: 404, nothing stored
            reply = stranger.post(path, json={"args": {"prompt": str(i)}})
            return reply.status_code, None
        reply = admin.post(path, json={"args": {"prompt": str(i), "max_tokens": 4}})
        return reply.status_code, reply.json().get("task_id")

    with ThreadPoolExecutor(CLIENTS) as pool:
        answers = list(pool.map(post, range(BURST)))
    assert sorted({code for code, _ in answers}) == [200, 404]
    answered = [task_id for code, task_id in answers if code == 200 and task_id]
    assert len(answered) == BURST - BURST // 10

    bare_appliance.stop_role("api", signal.SIGKILL)  # no shutdown: only what was committed
    assert task_rows(bare_appliance) == dict.fromkeys(answered, "PENDING")
    r = redis_lib.Redis.from_url(bare_appliance.redis.url)
    queued = {i.decode() for i in r.lrange(jobs.queue_key(endpoint_id, low=False), 0, -1)}
    assert queued == set(answered)  # each one queued too, after its commit

    r.flushall()  # jobs gone; the sweeper queues them again from SQLite
    bare_appliance.start_role("worker")
    wait_until(
        lambda: set(task_rows(bare_appliance).values()) == {"SUCCESS"},
        90,
        "every answered task to end SUCCESS",
        every_s=0.5,
    )
    assert sorted(task_rows(bare_appliance)) == sorted(answered)
    assert backend.seen["/v1/completions"] >= len(answered)


def test_queued_task_limit_holds_under_a_burst(
    bare_appliance: Appliance, backend: FakeBackend
) -> None:
    endpoint_id = seed_endpoint(bare_appliance.data_dir, "fake", backend.address, owner="red")
    admin = bare_appliance.client()
    made = admin.post(
        "/v1/api-keys",
        json={"name": "red", "team": "red", "user": "red-1", "max_queued_tasks": 5},
    )
    assert made.status_code == 201, made.text
    red = bare_appliance.client(made.json()["key"])
    path = f"/v1/async-tasks?model_endpoint_id={endpoint_id}"

    with ThreadPoolExecutor(CLIENTS) as pool:  # no worker: every accepted task stays queued
        task = {"args": {"prompt": "x"}}
        codes = list(pool.map(lambda i: red.post(path, json=task).status_code, range(40)))
    assert sorted(codes) == [200] * 5 + [429] * 35
    assert len(task_rows(bare_appliance)) == 5
