"""A key's in-flight slots heal: an api killed mid-stream on a `max_concurrent_requests: 1`
key does not lock that key out; once the api is back, the key is served again within the
lease (`APPLIANCE_INFLIGHT_LEASE_S`), however often the client retried meanwhile. And the
api's routes heal after Redis restarts: replicas replaced since are served."""

from __future__ import annotations

import signal
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.forwarder.test_async_support import FakeBackend, seed_endpoint, start_api, stop_all
from tests.harness import ADMIN_KEY, Appliance, RedisServer, wait_until

LEASE_S = 8  # longer than the api takes to restart here, so the test sees refused retries


@pytest.fixture
def bed(tmp_path: Path) -> Iterator[tuple[Appliance, FakeBackend]]:
    backend = FakeBackend(delay_s=0.0).start()
    redis = RedisServer(tmp_path / "redis").start()
    appliance = Appliance(
        tmp_path / "appliance",
        redis,
        env_extra={
            "APPLIANCE_INFLIGHT_LEASE_S": str(LEASE_S),
            "APPLIANCE_ROUTING_REFRESH_S": "0.5",
        },
    )
    try:
        start_api(appliance)
        seed_endpoint(appliance.data_dir, "echo", backend.address, owner="t1")
        yield appliance, backend
    finally:
        print(appliance.logs())
        stop_all(appliance)
        redis.stop()
        backend.stop()


def chat(appliance: Appliance, key: str, **extra: object) -> httpx.Response:
    body = {"model": "echo", "messages": [{"role": "user", "content": "hi"}], **extra}
    return httpx.post(
        appliance.url + "/v1/chat/completions",
        json=body,
        headers={"authorization": f"Bearer {key}"},
        timeout=60,
    )


def test_a_key_is_served_again_after_the_api_died_mid_stream(
    bed: tuple[Appliance, FakeBackend],
) -> None:
    appliance, backend = bed
    made = appliance.client().post(
        "/v1/api-keys",
        json={"name": "one", "team": "t1", "user": "u1", "max_concurrent_requests": 1},
    )
    assert made.status_code == 201, made.text
    key = made.json()["key"]
    assert chat(appliance, key).status_code == 200

    def stream() -> None:
        try:
            with httpx.stream(
                "POST",
                appliance.url + "/v1/chat/completions",
                json={"model": "echo", "messages": [], "stream": True, "delay_s": LEASE_S},
                headers={"authorization": f"Bearer {key}"},
                timeout=120,
            ) as reply:
                for _ in reply.iter_bytes():
                    pass
        except httpx.HTTPError:
            pass  # the api is killed under it

    streaming = threading.Thread(target=stream)
    streaming.start()
    wait_until(lambda: backend.busy > 0, 10, "the stream to reach the replica")
    assert chat(appliance, key).status_code == 429  # its one slot is taken

    appliance.stop_role("api", signal.SIGKILL)
    streaming.join()
    start_api(appliance)
    back = time.monotonic()
    answers: list[int] = []

    def served() -> bool:
        answers.append(chat(appliance, key).status_code)  # each refused try is a retry
        return answers[-1] == 200

    wait_until(served, LEASE_S * 5, "the key to be served again", every_s=0.3)
    print(
        f"served again {time.monotonic() - back:.1f} s after the api was back, after "
        f"{len(answers) - 1} refused tries; lease {LEASE_S} s"
    )
    assert set(answers[:-1]) <= {429}, answers
    wait_until(lambda: backend.busy == 0, 30, "the replica to finish the killed api's stream")


def test_replicas_replaced_after_redis_restarted_are_served(
    bed: tuple[Appliance, FakeBackend],
) -> None:
    """Redis restarting killed the api's route refresher for good (its subscription broke and
    nothing started it again): a replica replaced afterwards (crashed, killed, rolled) was
    never seen by that api, whose requests went to the old address (a 502), then waited for
    a replica it could not see."""
    appliance, _ = bed
    assert chat(appliance, ADMIN_KEY).status_code == 200
    appliance.redis.stop()
    time.sleep(3)  # six refreshes while Redis is away
    appliance.redis.start()
    successor = FakeBackend(delay_s=0.0).start()
    try:
        with sqlite3.connect(appliance.data_dir / "appliance.db") as db:
            db.execute("UPDATE replica SET address = ?", (successor.address,))

        def served() -> bool:
            body = {"model": "echo", "messages": [{"role": "user", "content": "hi"}]}
            headers = {"authorization": f"Bearer {ADMIN_KEY}"}
            try:
                reply = httpx.post(
                    appliance.url + "/v1/chat/completions", json=body, headers=headers, timeout=3
                )
            except httpx.TimeoutException:
                return False
            return reply.status_code == 200 and sum(successor.seen.values()) > 0

        wait_until(served, 15, "the replica's successor to be served")
    finally:
        successor.stop()
    assert "Traceback" not in (appliance.workdir / "api.log").read_text()
