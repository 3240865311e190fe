"""Redis stopped under a running api (restarting, say): a change the database took is answered
as taken (the builder's tick finds it without the nudge), and a request that needs Redis is a
503 saying so, to retry, never a 500; once Redis is back the same requests are served."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import Any

import httpx

from tests.e2e.lifecycle import ON_FAKE_GPUS, standin_body, wait_status
from tests.harness import ADMIN_KEY, Appliance, wait_until
from tests.web.test_forms_and_sign_in import csrf_of


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


def test_a_request_that_needs_redis_is_a_503_to_retry(api_only: Appliance) -> None:
    """An endpoint create (it reads the box's GPUs from Redis) and a UI sign-in (sessions live
    in Redis) were 500s; each is a 503 that says Redis is unavailable, with Retry-After, in its
    route's envelope, leaves nothing made, and succeeds once Redis is back."""
    client = api_only.client()
    browser = httpx.Client(base_url=api_only.url, timeout=30)
    csrf = csrf_of(browser.get("/ui/sign-in").text)
    api_only.redis.stop()

    created = client.post("/v1/llm/model-endpoints", json=standin_body("later"))
    assert created.status_code == 503, created.text
    assert "Redis" in created.json()["detail"] and "retry" in created.json()["detail"]
    assert int(created.headers["retry-after"]) > 0
    assert rows(api_only, "later") == []

    signed = browser.post("/ui/sign-in", data={"csrf": csrf, "key": ADMIN_KEY})
    assert signed.status_code == 503, signed.text
    assert "Redis" in signed.text and int(signed.headers["retry-after"]) > 0
    assert "mea_session" not in str(browser.cookies)

    api_only.redis.start()
    wait_until(lambda: client.get("/readyz").status_code == 200, 30, "Redis back")
    again = client.post("/v1/llm/model-endpoints", json=standin_body("later"))
    assert again.status_code == 200, again.text
    signed = browser.post("/ui/sign-in", data={"csrf": csrf, "key": ADMIN_KEY})
    assert signed.status_code in (200, 303), signed.text
