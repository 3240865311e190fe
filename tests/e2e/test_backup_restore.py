"""Backup and restore with the real CLI on a real Gemma endpoint: a backup taken while
requests and async tasks flow, restored into a fresh data directory with a fresh Redis, after
the first install and its containers are gone: the same endpoints come up on their own and
the same keys work."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import httpx

from tests.e2e.test_first_slice import create_gemma, wait_ready
from tests.harness import Appliance, RedisServer, make_key, wait_until

CHAT = {"model": "gemma", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}


def cli(appliance: Appliance, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "appliance", *args],
        env=appliance.env(),
        capture_output=True,
        text=True,
        timeout=120,
    )


def load(
    appliance: Appliance, key: str, endpoint_id: str, stop: threading.Event, seen: list[int]
) -> None:
    """Requests and async tasks until stopped; `seen` gets the statuses they got."""
    with appliance.client(key) as client:
        while not stop.is_set():
            seen.append(client.post("/v1/chat/completions", json=CHAT).status_code)
            task = client.post(
                f"/v1/async-tasks?model_endpoint_id={endpoint_id}", json={"args": CHAT}
            )
            seen.append(task.status_code)


def test_a_backup_under_load_restores_endpoints_and_keys(
    make_appliance: Callable[..., Appliance], tmp_path: Path
) -> None:
    first = make_appliance()
    first.start_role("worker")
    admin = first.client()
    create_gemma(admin, "gemma", public_inference=False)
    red_key = make_key(first, "red")
    admin_view = admin.get("/v1/llm/model-endpoints").json()["model_endpoints"]
    wait_ready(admin, "gemma")
    endpoint_id = admin.get("/v1/llm/model-endpoints/gemma").json()["id"]
    made = admin.post("/v1/api-keys", json={"name": "ci", "team": "admin", "user": "ci"})
    ci_key = made.json()["key"]
    config = admin.get("/v1/config").json()

    stop = threading.Event()
    statuses: list[int] = []
    worker = threading.Thread(target=load, args=(first, ci_key, endpoint_id, stop, statuses))
    worker.start()
    wait_until(lambda: len(statuses) >= 4, 60, "the load to flow")
    archive = tmp_path / "backup.tar.gz"
    made_backup = cli(first, "backup", str(archive))
    stop.set()
    worker.join(60)
    assert made_backup.returncode == 0, made_backup.stderr
    assert statuses and set(statuses) == {200}, statuses[-10:]

    # The first install goes away with its containers; a second one starts from the backup.
    first.stop()
    redis = RedisServer(tmp_path / "redis-restored").start()
    second = Appliance(tmp_path / "restored", redis)
    try:
        refused = cli(second, "restore", str(archive), "--data-dir", str(tmp_path))
        assert refused.returncode != 0 and "not empty" in refused.stderr
        restored = cli(second, "restore", str(archive))
        assert restored.returncode == 0, restored.stderr
        second.start()
        second.start_role("worker")
        wait_ready(second.client(), "gemma")
        listed = second.client().get("/v1/llm/model-endpoints").json()["model_endpoints"]
        assert [e["id"] for e in listed] == [e["id"] for e in admin_view]
        assert second.client().get("/v1/config").json() == config
        for key in (red_key, ci_key):
            reply = httpx.post(
                second.url + "/v1/chat/completions",
                json=CHAT,
                headers={"Authorization": f"Bearer {key}"},
                timeout=120,
            )
            expected = 200 if key == ci_key else 404  # red may not see admin's private endpoint
            assert reply.status_code == expected, reply.text
        assert second.client(red_key).get("/v1/api-keys").status_code == 200
    finally:
        print(second.logs())
        second.stop()
        redis.stop()
