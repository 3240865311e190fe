"""The api's group-commit submit path under concurrent POSTs (real api, worker, Redis, SQLite):
every task id the api answered is committed and queued, even when the api is killed with
SIGKILL right after and Redis is wiped; refusals in a group store nothing and fail no
neighbour; the queued-task limits (a key's, a team's) hold exactly under a burst."""

from __future__ import annotations

import json
import signal
import sqlite3
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import redis as redis_lib

from forwarder.worker import jobs
from tests.forwarder import test_async_support as support
from tests.forwarder.test_async_support import FakeBackend, seed_endpoint
from tests.harness import Appliance, RedisServer, make_key, wait_until

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
    queued = {i.decode() for i in r.lrange(jobs.queue_key(endpoint_id, "admin", low=False), 0, -1)}
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


TEAM_QUEUED = 6
TEAM_TASK_BYTES = 100_000


@pytest.fixture
def team_limited(tmp_path: Path, redis_server: RedisServer) -> Iterator[Appliance]:
    """The api alone (no worker: accepted tasks stay queued), a team's queued tasks limited."""
    env = {
        "APPLIANCE_MAX_QUEUED_TASKS_PER_TEAM": str(TEAM_QUEUED),
        "APPLIANCE_MAX_TASK_BYTES_PER_TEAM": str(TEAM_TASK_BYTES),
    }
    appliance = Appliance(tmp_path / "appliance", redis_server, env_extra=env)
    support.start_api(appliance)
    yield appliance
    print(appliance.logs())
    support.stop_all(appliance)


def batch_of(client: httpx.Client, model: str, lines: int, prompt: str = "x") -> httpx.Response:
    body = "".join(
        json.dumps(
            {
                "custom_id": str(i),
                "method": "POST",
                "url": "/v1/completions",
                "body": {"model": model, "prompt": prompt},
            }
        )
        + "\n"
        for i in range(lines)
    )
    made = client.post("/v1/files", files={"file": ("in.jsonl", body.encode())})
    assert made.status_code == 200, made.text
    sent = {
        "input_file_id": made.json()["id"],
        "endpoint": "/v1/completions",
        "completion_window": "24h",
    }
    return client.post("/v1/batches", json=sent)


def test_a_team_has_at_most_its_queued_tasks_whichever_keys_send_them(
    team_limited: Appliance, backend: FakeBackend
) -> None:
    """Tasks and batch requests of every key and user of one team count together: one team
    cannot queue millions (batch after batch) into Redis and the shared workers' queues."""
    red_id = seed_endpoint(team_limited.data_dir, "fake", backend.address, owner="red")
    blue_id = seed_endpoint(team_limited.data_dir, "blue", backend.address, owner="blue")
    admin = team_limited.client()
    keys = [
        admin.post("/v1/api-keys", json={"name": f"r{i}", "team": "red", "user": f"red-{i}"})
        for i in range(3)
    ]
    red = [team_limited.client(k.json()["key"]) for k in keys]
    task = {"args": {"prompt": "x"}}
    path = f"/v1/async-tasks?model_endpoint_id={red_id}"

    with ThreadPoolExecutor(CLIENTS) as pool:
        replies = list(pool.map(lambda i: red[i % 3].post(path, json=task), range(30)))
    assert sorted(r.status_code for r in replies) == [200] * TEAM_QUEUED + [429] * 24
    said = next(r for r in replies if r.status_code == 429).json()["detail"]
    assert "APPLIANCE_MAX_QUEUED_TASKS_PER_TEAM" in said and "team 'red'" in said, said
    assert len(task_rows(team_limited)) == TEAM_QUEUED

    waiting = batch_of(red[0], "fake", 1)  # a batch's every line counts too
    assert waiting.status_code == 429, waiting.text
    assert "APPLIANCE_MAX_QUEUED_TASKS_PER_TEAM" in waiting.json()["error"]["message"]
    never = batch_of(red[1], "fake", TEAM_QUEUED + 1)  # no wait admits it: split it
    assert never.status_code == 400, never.text
    assert "split it" in never.json()["error"]["message"]

    blue = team_limited.client(make_key(team_limited, "blue"))
    reply = blue.post(f"/v1/async-tasks?model_endpoint_id={blue_id}", json=task)
    assert reply.status_code == 200, reply.text  # another team's room is its own
    assert admin.post(path, json=task).status_code == 200  # an administrator is never refused


def test_a_team_holds_at_most_its_bytes_of_task_requests(
    team_limited: Appliance, backend: FakeBackend
) -> None:
    """A task holds up to 2 MiB of request in the database until its result expires: one
    team's tasks count against APPLIANCE_MAX_TASK_BYTES_PER_TEAM, so a few thousand large
    ones (33 MB a second from one client here) cannot fill the disk to the reserve every
    team's tasks and files share."""
    red_id = seed_endpoint(team_limited.data_dir, "fake", backend.address, owner="red")
    blue_id = seed_endpoint(team_limited.data_dir, "blue", backend.address, owner="blue")
    red = team_limited.client(make_key(team_limited, "red"))
    large = {"args": {"prompt": "x" * 40_000}}
    path = f"/v1/async-tasks?model_endpoint_id={red_id}"
    assert [red.post(path, json=large).status_code for _ in range(2)] == [200, 200]
    refused = red.post(path, json=large)
    assert refused.status_code == 429, refused.text
    said = refused.json()["detail"]
    assert "APPLIANCE_MAX_TASK_BYTES_PER_TEAM" in said and "team 'red'" in said, said
    assert len(task_rows(team_limited)) == 2

    big = batch_of(red, "fake", 1, prompt="x" * 120_000)  # never fits: split it
    assert big.status_code == 400, big.text
    assert "split it" in big.json()["error"]["message"]
    waits = batch_of(red, "fake", 1, prompt="x" * 30_000)
    assert waits.status_code == 429, waits.text

    blue = team_limited.client(make_key(team_limited, "blue"))
    reply = blue.post(f"/v1/async-tasks?model_endpoint_id={blue_id}", json=large)
    assert reply.status_code == 200, reply.text  # another team's room is its own
    assert team_limited.client().post(path, json=large).status_code == 200  # an administrator
