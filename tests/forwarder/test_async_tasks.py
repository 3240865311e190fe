"""Async tasks and batches through real api and worker processes, real Redis and SQLite, a fake
OpenAI backend (no Docker): results stored, routes chosen by shape, teams kept apart, backlog
published, Redis wiped and the sweeper re-enqueues from SQLite, batches in OpenAI's format."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import time
from typing import Any

import httpx
import openai
import pytest
import redis as redis_lib
from sqlalchemy import create_engine, text

from appliance import bus
from forwarder.worker import jobs, taskstore
from forwarder.worker import runner as runner_module
from forwarder.worker.runner import _POP_AND_LEASE, Runner
from tests.forwarder import test_async_support as support
from tests.forwarder.test_async_support import FakeBackend, seed_endpoint, wait_tasks
from tests.harness import ADMIN_KEY, Appliance, RedisServer, make_key, wait_until

backend = support.backend  # fixtures
bare_appliance = support.bare_appliance


def test_tasks_reach_success_with_the_backend_answer(
    bare_appliance: Appliance, backend: FakeBackend
) -> None:
    endpoint_id = seed_endpoint(bare_appliance.data_dir, "fake", backend.address)
    bare_appliance.start_role("worker")
    client = bare_appliance.client()
    ids = []
    for i in range(30):
        args = (
            {"messages": [{"role": "user", "content": f"hi {i}"}], "max_tokens": 4}
            if i % 2
            else {"prompt": f"say {i}", "max_tokens": 4}
        )
        reply = client.post(f"/v1/async-tasks?model_endpoint_id={endpoint_id}", json={"args": args})
        assert reply.status_code == 200, reply.text
        ids.append(reply.json()["task_id"])
    done = wait_tasks(client, ids, 60)
    for i, task_id in enumerate(ids):
        body = done[task_id]
        assert body["status"] == "SUCCESS", body
        assert body["status_code"] == 200
        answer = json.loads(body["result"]["result"])  # a JSON string, as in LLM Engine
        assert answer["model"] == "fake"  # the endpoint's name, filled in for the replica
        if i % 2:
            assert f"hi {i}" in answer["choices"][0]["message"]["content"]
        else:
            assert f"say {i}" in answer["choices"][0]["text"]
    assert backend.seen["/v1/chat/completions"] == 15
    assert backend.seen["/v1/completions"] == 15

    other = make_key(bare_appliance, "other")
    stranger = bare_appliance.client(other)
    assert stranger.get(f"/v1/async-tasks/{ids[0]}").status_code == 404
    reply = stranger.post(f"/v1/async-tasks?model_endpoint_id={endpoint_id}", json={"args": {}})
    assert reply.status_code == 404


def test_tasks_whose_args_fit_no_route_are_refused_unless_the_image_is_custom(
    bare_appliance: Appliance, backend: FakeBackend
) -> None:
    """vLLM and llama.cpp replicas serve only their OpenAI routes: args with no prompt,
    messages or input and no route are refused on every task entry, before anything is queued
    or sent; a custom image's predict route takes any args."""
    vllm = seed_endpoint(bare_appliance.data_dir, "fake", backend.address)
    custom = seed_endpoint(bare_appliance.data_dir, "own", backend.address, framework="custom")
    bare_appliance.start_role("worker")
    client = bare_appliance.client()
    odd = {"args": {"text": "The sky is", "max_tokens": 3}}
    for entry in ("async-tasks", "sync-tasks", "streaming-tasks"):
        reply = client.post(f"/v1/{entry}?model_endpoint_id={vllm}", json=odd)
        assert reply.status_code == 400, (entry, reply.text)
        detail = reply.json()["detail"]
        assert "args need prompt" in detail and "input" in detail and "route" in detail, detail
    assert sum(backend.seen.values()) == 0
    named = client.post(
        f"/v1/async-tasks?model_endpoint_id={vllm}", json={**odd, "route": "/v1/completions"}
    )
    assert named.status_code == 200, named.text

    sync = client.post(f"/v1/sync-tasks?model_endpoint_id={custom}", json=odd)
    assert sync.status_code == 200 and sync.json()["status"] == "SUCCESS", sync.text
    made = client.post(f"/v1/async-tasks?model_endpoint_id={custom}", json=odd)
    assert made.status_code == 200, made.text
    # a prompt goes to the custom image's predict route too, untouched, as a sync task's does
    prompt = client.post(
        f"/v1/async-tasks?model_endpoint_id={custom}", json={"args": {"prompt": "p"}}
    )
    ids = [named.json()["task_id"], made.json()["task_id"], prompt.json()["task_id"]]
    done = wait_tasks(client, ids, 60)
    assert [done[i]["status"] for i in ids] == ["SUCCESS"] * 3, done
    assert backend.seen["/predict"] == 3 and backend.seen["/v1/completions"] == 1
    assert {"prompt": "p"} in backend.bodies


def test_tasks_and_batch_lines_to_a_route_the_server_never_registered_fail_saying_so(
    bare_appliance: Appliance, backend: FakeBackend
) -> None:
    """A replica's 404 for a path it never registered (vLLM's chat on an embedding model, its
    embeddings on a generative one) fails an async task and a batch line at once, as a 400
    that names the route the caller asked for: the answer the sync routes give, not a bare
    "replica answered 404"."""
    endpoint_id = seed_endpoint(bare_appliance.data_dir, "fake", backend.address)
    bare_appliance.start_role("worker")
    client = bare_appliance.client()
    args = {"prompt": "p", "unregistered": True}
    plain = client.post(f"/v1/async-tasks?model_endpoint_id={endpoint_id}", json={"args": args})
    routed = client.post(
        f"/v1/async-tasks?model_endpoint_id={endpoint_id}",
        json={"args": {"input": "p", "unregistered": True}, "route": "/v1/embeddings"},
    )
    ids = [plain.json()["task_id"], routed.json()["task_id"]]
    done = wait_tasks(client, ids, 60)
    for task_id, asked in zip(ids, ("/v1/async-tasks", "/v1/embeddings"), strict=True):
        task = done[task_id]
        assert (task["status"], task["status_code"]) == ("FAILURE", 400), task
        said = f"endpoint 'fake' does not serve {asked}: its server has no such route (404"
        assert said in task["traceback"], task

    line = {
        "custom_id": "only",
        "method": "POST",
        "url": "/v1/embeddings",
        "body": {"model": "fake", "input": "p", "unregistered": True},
    }
    batch = submit_batch(client, json.dumps(line).encode() + b"\n", "/v1/embeddings")
    final = batch_ended(client, batch.json()["id"], "completed", 60)
    assert final["request_counts"] == {"total": 1, "completed": 0, "failed": 1}, final
    assert final["output_file_id"] is None  # nothing succeeded: OpenAI's batch has none
    errors = client.get(f"/v1/files/{final['error_file_id']}/content").text.splitlines()
    error = json.loads(errors[0])
    assert error["response"]["status_code"] == 400, error
    assert "endpoint 'fake' does not serve /v1/embeddings" in error["error"]["message"], error
    assert backend.seen["/v1/completions"] == 1 and backend.seen["/v1/embeddings"] == 2


OVER_CONTEXT = "the request exceeds the available context size, try increasing it"


def test_a_batch_line_the_replica_refuses_says_what_the_replica_said(
    bare_appliance: Appliance, backend: FakeBackend
) -> None:
    """A line the replica refuses (llama.cpp's 400 for a prompt past its context) goes to the
    error file with the status and the replica's words in OpenAI's `error` (`code`,
    `message`), where its message said only "replica answered 400"; its `response` keeps the
    replica's answer whole. An async task refused so says the same in its traceback."""
    endpoint_id = seed_endpoint(bare_appliance.data_dir, "fake", backend.address)
    bare_appliance.start_role("worker")
    client = bare_appliance.client()
    lines = [json.loads(line) for line in batch_lines("fake", 3).splitlines()]
    lines[1]["body"] |= {"status": 400, "refusal": OVER_CONTEXT}
    lines[2]["body"] |= {"status": 422}  # in vLLM's older envelope: {"object": "error", ...}
    batch = submit_batch(client, b"".join(json.dumps(x).encode() + b"\n" for x in lines))
    final = batch_ended(client, batch.json()["id"], "completed", 60)
    assert final["request_counts"] == {"total": 3, "completed": 1, "failed": 2}, final
    content = client.get(f"/v1/files/{final['error_file_id']}/content").text
    errors = {(line := json.loads(text))["custom_id"]: line for text in content.splitlines()}
    over = errors["req-1"]
    assert over["error"] == {
        "code": "request_failed",
        "message": f"replica answered 400: {OVER_CONTEXT}",
    }, over
    assert over["response"]["status_code"] == 400, over
    assert over["response"]["body"]["error"]["message"] == OVER_CONTEXT, over
    assert errors["req-2"]["error"]["message"] == "replica answered 422: refused", errors

    args = {"prompt": "p", "status": 400, "refusal": OVER_CONTEXT}
    made = client.post(f"/v1/async-tasks?model_endpoint_id={endpoint_id}", json={"args": args})
    task = wait_tasks(client, [made.json()["task_id"]], 60)[made.json()["task_id"]]
    assert (task["status"], task["status_code"]) == ("FAILURE", 400), task
    assert task["traceback"] == f"replica answered 400: {OVER_CONTEXT}", task


def test_backlog_is_published_and_redis_wipe_loses_no_task(
    bare_appliance: Appliance, backend: FakeBackend
) -> None:
    endpoint_id = seed_endpoint(bare_appliance.data_dir, "fake", backend.address)
    client = bare_appliance.client()
    ids = [
        client.post(
            f"/v1/async-tasks?model_endpoint_id={endpoint_id}", json={"args": {"prompt": str(i)}}
        ).json()["task_id"]
        for i in range(40)
    ]
    r = redis_lib.Redis.from_url(bare_appliance.redis.url)
    r.flushall()  # every job is gone before any worker saw it; SQLite still has the rows
    bare_appliance.start_role("worker")
    wait_until(lambda: r.hget(bus.BACKLOG_KEY, endpoint_id) in (b"40",), 10, "the backlog of 40")
    done = wait_tasks(client, ids, 60)
    assert all(body["status"] == "SUCCESS" for body in done.values())
    wait_until(lambda: r.hget(bus.BACKLOG_KEY, endpoint_id) is None, 10, "an empty backlog")


def test_tasks_still_waiting_when_their_endpoint_is_deleted_fail_saying_so(
    bare_appliance: Appliance, backend: FakeBackend
) -> None:
    """Tasks queued (or handed back by a replica that stopped) when the builder removes their
    endpoint's row end FAILURE, with their callbacks, rather than stay PENDING for ever in a
    queue no worker takes from."""
    endpoint_id = seed_endpoint(bare_appliance.data_dir, "fake", backend.address)
    client = bare_appliance.client()
    url = f"/v1/async-tasks?model_endpoint_id={endpoint_id}"
    ids = [client.post(url, json={"args": {"prompt": str(i)}}).json()["task_id"] for i in range(3)]
    engine = create_engine(f"sqlite:///{bare_appliance.data_dir / 'appliance.db'}")
    with engine.begin() as conn:  # as the builder does once a deleted endpoint's replicas are gone
        conn.execute(text("DELETE FROM replica WHERE endpoint_id = :id"), {"id": endpoint_id})
        conn.execute(text("DELETE FROM endpoint WHERE id = :id"), {"id": endpoint_id})
    engine.dispose()
    bare_appliance.start_role("worker")
    done = wait_tasks(client, ids, 20)
    assert [(t["status"], t["traceback"]) for t in done.values()] == [
        ("FAILURE", "the endpoint was deleted")
    ] * 3
    assert sum(backend.seen.values()) == 0


def test_the_worker_tells_the_builder_what_it_has_in_flight(
    bare_appliance: Appliance, backend: FakeBackend
) -> None:
    """A replica drains (its endpoint deleted, updated, scaled down) until no request is in
    flight to it: the worker's tasks count there as the api's requests do."""
    endpoint_id = seed_endpoint(bare_appliance.data_dir, "fake", backend.address)
    bare_appliance.start_role("worker")
    client = bare_appliance.client()
    r = redis_lib.Redis.from_url(bare_appliance.redis.url)
    body = {"args": {"prompt": "slow", "delay_s": 4}}
    url = f"/v1/async-tasks?model_endpoint_id={endpoint_id}"
    ids = [client.post(url, json=body).json()["task_id"] for _ in range(2)]
    wait_until(lambda: bus.inflight(r).get("rep_fake") == 2, 10, "2 requests in flight")
    done = wait_tasks(client, ids, 30)
    assert all(task["status"] == "SUCCESS" for task in done.values())
    wait_until(lambda: "rep_fake" not in bus.inflight(r), 5, "none in flight")


def test_a_second_finish_stores_nothing(bare_appliance: Appliance) -> None:
    engine = create_engine(f"sqlite:///{bare_appliance.data_dir / 'appliance.db'}")
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO task (id, endpoint_id, owner, created_by, status, payload, attempts, "
                "priority, created_at) VALUES ('tsk_1', 'end_x', 'admin', 'a', 'STARTED', '{}', 1, "
                "0, 0)"
            )
        )
    first = dict(status="SUCCESS", status_code=200, traceback=None, now=1.0, keep_s=60)
    with engine.begin() as conn:
        assert taskstore.finish(conn, "tsk_1", result={"n": 1}, **first) is True
    with engine.begin() as conn:
        assert taskstore.finish(conn, "tsk_1", result={"n": 2}, **first) is False
        assert taskstore.claim(conn, "tsk_1") is None  # a duplicate job does not run
        assert taskstore.start(conn, "tsk_1", 2.0) is False  # nor is sent to a replica
    with engine.begin() as conn:
        row = conn.execute(text("SELECT result, attempts FROM task WHERE id='tsk_1'")).one()
    assert json.loads(row[0]) == {"n": 1} and row[1] == 1
    engine.dispose()


def batch_lines(model: str, n: int) -> bytes:
    return b"".join(
        json.dumps(
            {
                "custom_id": f"req-{i}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {
                    "model": model,
                    "max_tokens": 4,
                    "messages": [{"role": "user", "content": f"question {i}"}],
                },
            }
        ).encode()
        + b"\n"
        for i in range(n)
    )


def submit_batch(client: Any, lines: bytes, endpoint: str = "/v1/chat/completions") -> Any:
    """Upload `lines` as a batch file and create a batch of them: the create's reply."""
    upload = client.post(
        "/v1/files", files={"file": ("in.jsonl", lines)}, data={"purpose": "batch"}
    )
    assert upload.status_code == 200, upload.text
    assert upload.json()["bytes"] > 0
    batch = client.post(
        "/v1/batches",
        json={
            "input_file_id": upload.json()["id"],
            "endpoint": endpoint,
            "completion_window": "24h",
        },
    )
    assert batch.status_code == 200, batch.text
    return batch


def batch_ended(client: Any, batch_id: str, status: str, timeout_s: float) -> dict[str, Any]:
    """The batch's GET body once its status is `status`."""
    return wait_until(  # type: ignore[no-any-return]
        lambda: (b := client.get(f"/v1/batches/{batch_id}").json())["status"] == status and b,
        timeout_s,
        f"the batch to be {status}",
    )


def test_batch_of_100_chat_requests_writes_openai_output(
    bare_appliance: Appliance, backend: FakeBackend
) -> None:
    seed_endpoint(bare_appliance.data_dir, "fake", backend.address)
    bare_appliance.start_role("worker")
    client = bare_appliance.client()
    batch = submit_batch(client, batch_lines("fake", 100))
    batch_id = batch.json()["id"]
    assert batch.json()["request_counts"]["total"] == 100
    final = batch_ended(client, batch_id, "completed", 60)
    assert final["request_counts"] == {"total": 100, "completed": 100, "failed": 0}
    assert final["error_file_id"] is None
    content = client.get(f"/v1/files/{final['output_file_id']}/content")
    assert content.status_code == 200
    lines = [json.loads(line) for line in content.text.splitlines()]
    assert len(lines) == 100
    assert {line["custom_id"] for line in lines} == {f"req-{i}" for i in range(100)}
    for line in lines:
        assert line["id"].startswith("batch_req_") and line["error"] is None
        assert line["response"]["status_code"] == 200
        body = line["response"]["body"]
        number = line["custom_id"].split("-")[1]
        assert f"question {number}" in body["choices"][0]["message"]["content"]
    listed = client.get("/v1/batches").json()
    assert [b["id"] for b in listed["data"]] == [batch_id]
    assert make_key(bare_appliance, "other")
    stranger = bare_appliance.client(make_key(bare_appliance, "third"))
    assert stranger.get(f"/v1/batches/{batch_id}").status_code == 404
    assert stranger.get(f"/v1/files/{final['output_file_id']}/content").status_code == 404


def test_a_batch_running_past_the_result_ttl_keeps_every_answer(
    bare_appliance: Appliance, backend: FakeBackend
) -> None:
    """APPLIANCE_TASK_RESULT_TTL_S keeps a finished task that long; the answers of a batch
    still running are kept until its files are written, however long its other lines take."""
    seed_endpoint(bare_appliance.data_dir, "fake", backend.address)
    bare_appliance.env_extra["APPLIANCE_TASK_RESULT_TTL_S"] = "1"
    bare_appliance.start_role("worker")
    client = bare_appliance.client()
    lines = [json.loads(line) for line in batch_lines("fake", 3).splitlines()]
    lines[-1]["body"]["delay_s"] = 6  # the others end, and pass their TTL, long before it
    batch = submit_batch(client, b"".join(json.dumps(x).encode() + b"\n" for x in lines))
    final = batch_ended(client, batch.json()["id"], "completed", 30)
    assert final["request_counts"] == {"total": 3, "completed": 3, "failed": 0}
    content = client.get(f"/v1/files/{final['output_file_id']}/content")
    assert sorted(json.loads(line)["custom_id"] for line in content.text.splitlines()) == [
        "req-0",
        "req-1",
        "req-2",
    ]


def test_a_batch_of_responses_writes_each_response(
    bare_appliance: Appliance, backend: FakeBackend
) -> None:
    """OpenAI's batches take the Responses API too (`endpoint: /v1/responses`): each line is
    admitted as a response (what needs one kept is refused at submit, naming its line) and
    answered by the replica's /v1/responses."""
    seed_endpoint(bare_appliance.data_dir, "fake", backend.address)
    bare_appliance.start_role("worker")
    client = bare_appliance.client()

    def lines(**extra: Any) -> bytes:
        return b"".join(
            json.dumps(
                {
                    "custom_id": f"r-{i}",
                    "method": "POST",
                    "url": "/v1/responses",
                    "body": {"model": "fake", "input": f"question {i}", **extra},
                }
            ).encode()
            + b"\n"
            for i in range(3)
        )

    upload = client.post(
        "/v1/files", files={"file": ("in.jsonl", lines(store=True))}, data={"purpose": "batch"}
    )
    refused = client.post(
        "/v1/batches",
        json={"input_file_id": upload.json()["id"], "endpoint": "/v1/responses"},
    )
    assert refused.status_code == 400, refused.text
    assert "line 1 (custom_id 'r-0')" in refused.text and "store" in refused.text
    batch = submit_batch(client, lines(max_output_tokens=4), endpoint="/v1/responses")
    final = batch_ended(client, batch.json()["id"], "completed", 60)
    content = client.get(f"/v1/files/{final['output_file_id']}/content")
    answered = {
        (line := json.loads(text))["custom_id"]: line["response"]["body"]
        for text in content.text.splitlines()
    }
    assert set(answered) == {"r-0", "r-1", "r-2"}
    for custom_id, body in answered.items():
        assert body["object"] == "response" and body["usage"]["output_tokens"] == 4
        text = body["output"][0]["content"][0]["text"]
        assert f"question {custom_id[2:]}" in text, body


def test_batch_cancel_stops_pending_requests(
    bare_appliance: Appliance, backend: FakeBackend
) -> None:
    seed_endpoint(bare_appliance.data_dir, "fake", backend.address)
    client = bare_appliance.client()  # no worker yet: every request is still pending
    batch_id = submit_batch(client, batch_lines("fake", 20)).json()["id"]
    cancelled = client.post(f"/v1/batches/{batch_id}/cancel")
    assert cancelled.json()["status"] == "cancelling"
    bare_appliance.start_role("worker")
    final = batch_ended(client, batch_id, "cancelled", 30)
    assert final["request_counts"] == {"total": 20, "completed": 0, "failed": 0}
    assert final["output_file_id"] is None and final["error_file_id"] is None  # as OpenAI's
    time.sleep(1)
    assert backend.seen["/v1/chat/completions"] == 0
    # an ended batch stays ended: the SDK is told not to send the cancel again (it retries 409s)
    sent: list[str] = []
    hooks = {"request": [lambda request: sent.append(request.url.path)]}
    sdk = openai.OpenAI(
        base_url=bare_appliance.url + "/v1",
        api_key=ADMIN_KEY,
        http_client=httpx.Client(event_hooks=hooks),
    )
    with pytest.raises(openai.ConflictError) as again:
        sdk.batches.cancel(batch_id)
    assert "is cancelled; it cannot be cancelled" in again.value.message
    assert again.value.response.headers["x-should-retry"] == "false"
    assert sent == [f"/v1/batches/{batch_id}/cancel"]


def test_cancelling_a_batch_completion_spares_the_replica_the_prompts_a_worker_holds(
    bare_appliance: Appliance,
) -> None:
    slow = FakeBackend(delay_s=0.3).start()
    try:
        cap = {"forwarder_max_concurrency": 2}
        seed_endpoint(bare_appliance.data_dir, "capped", slow.address, extra=cap)
        bare_appliance.start_role("worker")
        client = bare_appliance.client()
        job = client.post(
            "/v2/batch-completions",
            json={
                "model_config": {"model": "capped"},
                "output_data_path": "out.jsonl",
                "content": {
                    "prompts": [f"p{i}" for i in range(30)],
                    "max_new_tokens": 2,
                    "temperature": 0,
                },
            },
        )
        assert job.status_code == 200, job.text
        job_id = job.json()["job_id"]
        # the worker takes 2 prompts at a time (the replica's cap), the rest wait in Redis
        wait_until(lambda: slow.seen.total() >= 2, 30, "the first prompts to reach the replica")
        cancel = client.post(f"/v2/batch-completions/{job_id}/actions/cancel", json={})
        assert cancel.json() == {"success": True}
        sent = slow.seen.total()
        time.sleep(2)  # the replica would have been sent about 12 more by now
        assert slow.seen.total() <= sent + 2  # only those already given a slot
    finally:
        slow.stop()


def test_one_endpoints_backlog_does_not_hold_up_anothers_tasks(
    bare_appliance: Appliance,
) -> None:
    """The worker takes one task from each endpoint's queue in turn: a task of another team,
    sent after the first team queued many, runs while most of those still wait, not after
    them (the worker used to fill every slot from the first queue by endpoint id)."""
    slow = FakeBackend(delay_s=0.5).start()
    try:
        busy = seed_endpoint(bare_appliance.data_dir, "a-busy", slow.address, owner="a")
        other = seed_endpoint(bare_appliance.data_dir, "b-other", slow.address, owner="b")
        bare_appliance.env_extra["APPLIANCE_WORKER_CONCURRENCY"] = "4"
        bare_appliance.start_role("worker")
        client = bare_appliance.client()
        body = {"args": {"prompt": "hi", "max_tokens": 1}}
        queued = [
            client.post(f"/v1/async-tasks?model_endpoint_id={busy}", json=body).json()["task_id"]
            for _ in range(40)
        ]
        mine = client.post(f"/v1/async-tasks?model_endpoint_id={other}", json=body)
        assert mine.status_code == 200, mine.text
        wait_tasks(client, [mine.json()["task_id"]], 60)
        engine = create_engine(f"sqlite:///{bare_appliance.data_dir / 'appliance.db'}")
        with engine.connect() as conn:
            waiting = conn.execute(
                text("SELECT COUNT(*) FROM task WHERE endpoint_id = :e AND status = 'PENDING'"),
                {"e": busy},
            ).scalar_one()
        engine.dispose()
        assert waiting > 4, f"only {waiting} of the first team's 40 tasks were still queued"
        wait_tasks(client, queued, 120)
    finally:
        slow.stop()


def test_one_teams_backlog_on_a_shared_endpoint_does_not_hold_up_anothers_task(
    bare_appliance: Appliance,
) -> None:
    """On a public llama.cpp endpoint each team's tasks wait in a queue of their own, the
    worker takes one from each team in turn, and no more than the replica's slots at once
    (at the worker's default concurrency): team b's task, sent after team a queued 24, ends
    while most of a's still wait (it used to be sent to the replica behind all of them, which
    ran them first-come), and a's run in the order a sent them."""
    slow = FakeBackend(delay_s=0.5, slots=2).start()
    try:
        shared = seed_endpoint(
            bare_appliance.data_dir,
            "shared",
            slow.address,
            public=True,
            framework="llamacpp",
            per_worker=2,
        )
        bare_appliance.start_role("worker")
        team_a = bare_appliance.client(make_key(bare_appliance, "a"))
        team_b = bare_appliance.client(make_key(bare_appliance, "b"))
        url = f"/v1/async-tasks?model_endpoint_id={shared}"
        first = team_a.post(url, json={"args": {"prompt": "warm", "max_tokens": 1}})
        assert wait_tasks(team_a, [first.json()["task_id"]], 60)  # the worker is taking tasks
        queued = []
        for i in range(24):
            reply = team_a.post(url, json={"args": {"prompt": f"a {i}", "max_tokens": 1}})
            assert reply.status_code == 200, reply.text
            queued.append(reply.json()["task_id"])
        time.sleep(0.5)
        mine = team_b.post(url, json={"args": {"prompt": "b", "max_tokens": 1}})
        assert mine.status_code == 200, mine.text
        assert wait_tasks(team_b, [mine.json()["task_id"]], 60)
        wait_tasks(team_a, queued, 120)
        ended = [b["prompt"] for b in slow.answered if b["prompt"] != "warm"]
        assert ended.index("b") < 12, ended  # fewer than half of a's ended first
        assert slow.most_busy <= 2
        prompts = [b["prompt"] for b in slow.bodies if b["prompt"].startswith("a ")]
        started = [int(p.split()[1]) for p in prompts]
        # taken in order, two at a time: the two sent together may reach the replica swapped
        assert all(b > a - 2 for a, b in itertools.pairwise(started)), started
    finally:
        slow.stop()


def test_the_worker_takes_each_teams_tasks_in_turn_and_what_an_upgrade_left_queued(
    redis_server: RedisServer,
) -> None:
    """The pop script on a real Redis: single tasks before batch requests, the teams of an
    endpoint one task each in turn, each team's in the order sent; what waited in the
    endpoint's one queue before each team had its own is still taken; a team whose queue is
    found empty leaves the endpoint's set, and comes back with its next task."""
    r = redis_lib.Redis.from_url(redis_server.url)
    pop = r.register_script(_POP_AND_LEASE)
    r.rpush(jobs.endpoint_queue_key("end_x", low=False), "old1")  # queued before the upgrade
    jobs.enqueue(r, [(f"a{i}", "end_x", "a") for i in range(5)], low=False)
    jobs.enqueue(r, [("b0", "end_x", "b"), ("b1", "end_x", "b")], low=False)
    jobs.enqueue(r, [("batch0", "end_x", "c")], low=True)
    keys = [
        key
        for low in (False, True)
        for key in (jobs.teams_key("end_x", low=low), jobs.endpoint_queue_key("end_x", low=low))
    ]
    taken = [i.decode() for i in pop(keys=keys, args=[6, 1000, "lease:", 1, 0, 6])]
    assert taken == ["old1", "a0", "b0", "a1", "b1", "a2"]
    assert r.exists("lease:a2")
    assert r.smembers(jobs.teams_key("end_x", low=False)) == {b"a", b"b"}
    taken = [i.decode() for i in pop(keys=keys, args=[6, 1000, "lease:", 1, 1, 6])]
    assert taken == ["a3", "a4", "batch0"]
    assert not r.exists(jobs.teams_key("end_x", low=False))  # every queue was found empty
    assert not r.exists(jobs.teams_key("end_x", low=True))
    jobs.enqueue(r, [("b2", "end_x", "b")], low=False)
    assert [i.decode() for i in pop(keys=keys, args=[6, 1000, "lease:", 1, 2, 6])] == ["b2"]


def test_the_worker_takes_no_more_of_an_endpoints_tasks_than_its_room(
    redis_server: RedisServer,
) -> None:
    """The pop script takes at most each endpoint's room (its single tasks and batch requests
    together) and leaves the rest queued: another endpoint's batch requests are taken in the
    same pop, not after the first endpoint's whole backlog of single tasks."""
    r = redis_lib.Redis.from_url(redis_server.url)
    pop = r.register_script(_POP_AND_LEASE)
    jobs.enqueue(r, [(f"x{i}", "end_x", "a") for i in range(10)], low=False)
    jobs.enqueue(r, [(f"xb{i}", "end_x", "c") for i in range(3)], low=True)
    jobs.enqueue(r, [(f"yb{i}", "end_y", "d") for i in range(5)], low=True)
    keys = [
        key
        for low in (False, True)
        for e in ("end_x", "end_y")
        for key in (jobs.teams_key(e, low=low), jobs.endpoint_queue_key(e, low=low))
    ]

    def take(turn: int, room_x: int, room_y: int) -> list[str]:
        args = [64, 1000, "lease:", 2, turn, room_x, room_y]
        return [i.decode() for i in pop(keys=keys, args=args)]

    assert take(0, 3, 4) == ["x0", "x1", "x2", "yb0", "yb1", "yb2", "yb3"]
    assert not r.exists("lease:x3")
    assert take(1, 0, 1) == ["yb4"]
    assert take(2, 8, 0) == [f"x{i}" for i in range(3, 10)] + ["xb0"]
    assert take(3, 0, 5) == []
    assert take(4, 5, 5) == ["xb1", "xb2"]


def test_task_fields_the_appliance_would_not_honour_are_refused_naming_them(
    bare_appliance: Appliance, backend: FakeBackend
) -> None:
    """An async task's body takes LLM Engine's fields as its clients send them (nulls and
    defaults), but a field that would be dropped unread is a 400 naming it: an input `url`, a
    pickle, a destination, `return_pickled`, a field no such request has, and a callback's
    credentials the worker could not send (mTLS, a user name with a colon, or what HTTP Basic
    cannot carry). Before, all of them were taken and ignored; the callback then went out
    without the credentials asked for, or never went."""
    endpoint_id = seed_endpoint(bare_appliance.data_dir, "fake", backend.address)
    client = bare_appliance.client()
    submit = f"/v1/async-tasks?model_endpoint_id={endpoint_id}"
    args = {"prompt": "p", "max_tokens": 1}
    defaults = {"url": None, "cloudpickle": None, "return_pickled": False, "callback_auth": None}
    assert client.post(submit, json={"args": args, **defaults}).status_code == 200
    basic = {"kind": "basic", "username": "u", "password": "p"}
    assert client.post(submit, json={"args": args, "callback_auth": basic}).status_code == 200
    refused: list[tuple[dict[str, Any], str]] = [
        ({"url": "https://example.com/input.json"}, "url"),
        ({"cloudpickle": "gASVAAAA"}, "cloudpickle"),
        ({"destination_path": "s3://bucket/out"}, "destination_path"),
        ({"return_pickled": True}, "return_pickled"),
        ({"surprise": 1}, "surprise"),
        ({"callback_auth": {"kind": "mtls", "cert": "c", "key": "k"}}, "callback_auth"),
        ({"callback_auth": {**basic, "username": "a:b"}}, "callback_auth"),
        ({"callback_auth": {"kind": "basic", "username": "u"}}, "callback_auth"),
        ({"callback_auth": {**basic, "password": "\u20ac"}}, "callback_auth"),
        ({"callback_auth": {**basic, "extra": "x"}}, "callback_auth"),
    ]
    for extra, field in refused:
        reply = client.post(submit, json={"args": args, **extra})
        assert reply.status_code == 400, (extra, reply.text)
        assert field in reply.json()["detail"], (extra, reply.text)
    mtls = {"kind": "mtls", "cert": "c", "key": "k"}
    update = client.put(f"/v1/model-endpoints/{endpoint_id}", json={"default_callback_auth": mtls})
    assert update.status_code == 400 and "default_callback_auth" in update.text, update.text


def test_a_reply_too_large_to_keep_fails_its_task_saying_so(
    bare_appliance: Appliance, backend: FakeBackend
) -> None:
    """The worker gathers a task's reply whole before it stores it: a reply over
    APPLIANCE_TASK_RESULT_MAX_BYTES (many sequences of many logprobs over many tokens reach
    gigabytes, on a GPU in minutes) ends its task FAILURE saying so, once, with no retry and
    nothing stored; before, every such reply was held in the worker's memory (64 at once)
    and then stored. A reply within the bound is kept as ever."""
    bare_appliance.env_extra["APPLIANCE_TASK_RESULT_MAX_BYTES"] = str(2 * 2**20)
    endpoint_id = seed_endpoint(bare_appliance.data_dir, "fake", backend.address)
    bare_appliance.start_role("worker")
    client = bare_appliance.client()
    submit = f"/v1/async-tasks?model_endpoint_id={endpoint_id}"
    ids = [
        client.post(submit, json={"args": {"prompt": "p", "pad_bytes": size}}).json()["task_id"]
        for size in (100_000, 5 * 2**20)
    ]
    done = wait_tasks(client, ids, 60)
    kept, dropped = done[ids[0]], done[ids[1]]
    assert kept["status"] == "SUCCESS", kept
    assert dropped["status"] == "FAILURE" and dropped["result"] is None, dropped
    assert "APPLIANCE_TASK_RESULT_MAX_BYTES" in dropped["traceback"], dropped
    assert backend.seen["/v1/completions"] == 2  # no retry


def test_sync_and_streaming_tasks_refuse_what_they_would_drop(
    bare_appliance: Appliance, backend: FakeBackend
) -> None:
    """The same rule on the sync and streaming task entries, which send no callbacks either:
    a `callback_url` or `callback_auth` there was taken and never called."""
    endpoint_id = seed_endpoint(bare_appliance.data_dir, "fake", backend.address)
    client = bare_appliance.client()
    args = {"prompt": "p", "max_tokens": 1}
    defaults = {"url": None, "cloudpickle": None, "return_pickled": False, "callback_url": None}
    basic = {"kind": "basic", "username": "u", "password": "p"}
    for entry in ("sync-tasks", "streaming-tasks"):
        submit = f"/v1/{entry}?model_endpoint_id={endpoint_id}"
        assert client.post(submit, json={"args": args, **defaults}).status_code == 200, entry
        for extra, field in (
            ({"url": "https://example.com/input.json"}, "url"),
            ({"cloudpickle": "gASVAAAA"}, "cloudpickle"),
            ({"return_pickled": True}, "return_pickled"),
            ({"callback_url": "https://example.com/hook"}, "callback_url"),
            ({"callback_auth": basic}, "callback_auth"),
            ({"surprise": 1}, "surprise"),
        ):
            reply = client.post(submit, json={"args": args, **extra})
            assert reply.status_code == 400, (entry, extra, reply.text)
            assert field in reply.json()["detail"], (entry, extra, reply.text)
    assert backend.seen["/v1/completions"] == 2


def test_a_result_that_would_leave_the_disk_less_than_its_reserve_is_not_stored(
    bare_appliance: Appliance, backend: FakeBackend
) -> None:
    """A result is a row of the database too: with less free than APPLIANCE_DISK_RESERVE_BYTES
    when its reply comes (here: a worker started with more reserve than any disk has), the
    task ends FAILURE saying so and nothing of the reply is stored; before, results were
    written whatever the disk held, up to a reply's whole length each."""
    endpoint_id = seed_endpoint(bare_appliance.data_dir, "fake", backend.address)
    client = bare_appliance.client()
    submit = f"/v1/async-tasks?model_endpoint_id={endpoint_id}"
    made = client.post(submit, json={"args": {"prompt": "p", "pad_bytes": 100_000}})
    assert made.status_code == 200, made.text
    bare_appliance.env_extra["APPLIANCE_DISK_RESERVE_BYTES"] = str(2**50)
    bare_appliance.start_role("worker")
    task_id = made.json()["task_id"]
    done = wait_tasks(client, [task_id], 60)[task_id]
    assert done["status"] == "FAILURE" and done["result"] is None, done
    assert "APPLIANCE_DISK_RESERVE_BYTES" in done["traceback"], done


def test_llm_engine_completions_refuse_a_field_they_would_drop(
    bare_appliance: Appliance, backend: FakeBackend
) -> None:
    """The same rule on `/v1/llm/completions-sync` and `-stream`: a field LLM Engine's
    completion has not (`seed`, `n`, `logprobs`...) was read and dropped, so the request ran
    without it; now a 400 naming it. A null one is still taken, as on the task entries, and
    every field the client sends (`CompletionSyncV1Request(...).dict()`) is served."""
    seed_endpoint(bare_appliance.data_dir, "fake", backend.address)
    client = bare_appliance.client()
    sent = {
        "prompt": "p",
        "max_new_tokens": 1,
        "temperature": 0.0,
        "stop_sequences": None,
        "return_token_log_probs": False,
        "presence_penalty": None,
        "frequency_penalty": None,
        "top_k": None,
        "top_p": None,
        "include_stop_str_in_output": None,
        "guided_json": None,
        "guided_regex": None,
        "guided_choice": None,
        "guided_grammar": None,
        "skip_special_tokens": True,
    }
    for entry in ("completions-sync", "completions-stream"):
        submit = f"/v1/llm/{entry}?model_endpoint_name=fake"
        assert client.post(submit, json=sent).status_code == 200, entry
        assert client.post(submit, json={**sent, "seed": None}).status_code == 200, entry
        for field, value in (("seed", 7), ("n", 2), ("logprobs", 5), ("max_tokens", 3)):
            reply = client.post(submit, json={**sent, field: value})
            assert reply.status_code == 400, (entry, field, reply.text)
            assert field in reply.json()["detail"], (entry, field, reply.text)
    assert backend.seen["/v1/completions"] == 4


def test_llm_engine_completions_and_tasks_take_no_boolean_for_a_number(
    bare_appliance: Appliance, backend: FakeBackend
) -> None:
    """JSON's true is not 1 on LLM Engine's inference entries either (api/body.Body): a
    completion's max_new_tokens, temperature or top_k, a sync task's timeout_seconds or
    num_retries sent as a bool is a 400 naming it, and the replica gets nothing."""
    endpoint_id = seed_endpoint(bare_appliance.data_dir, "fake", backend.address)
    client = bare_appliance.client()
    completion = {"prompt": "p", "max_new_tokens": 1, "temperature": 0.0}
    task = {"args": {"prompt": "p", "max_tokens": 1}}
    cases = [
        (f"/v1/llm/{entry}?model_endpoint_name=fake", completion, field)
        for entry in ("completions-sync", "completions-stream")
        for field in ("max_new_tokens", "temperature", "top_k")
    ] + [
        (f"/v1/{entry}?model_endpoint_id={endpoint_id}", task, field)
        for entry in ("sync-tasks", "streaming-tasks")
        for field in ("timeout_seconds", "num_retries")
    ]
    for submit, body, field in cases:
        reply = client.post(submit, json={**body, field: True})
        assert reply.status_code == 400, (submit, field, reply.text)
        assert field in reply.json()["detail"] and "got true" in reply.text, (submit, reply.text)
    assert backend.seen.get("/v1/completions", 0) == 0
    assert client.post(cases[0][0], json=completion).status_code == 200


def test_a_worker_helper_failing_each_tick_logs_a_line_a_minute(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With Redis away, each of the worker's periodic helpers (routes, leases, in-flight counts)
    logged a warning every tick, several a second for as long as Redis was down. Now the first
    failure is logged, then a line a minute saying how many were not, and one when it works."""
    clock = [1000.0]
    monkeypatch.setattr(runner_module.time, "monotonic", lambda: clock[0])

    async def no_wait(stop: asyncio.Event, seconds: float) -> None:
        return None

    monkeypatch.setattr(runner_module, "_sleep_or_stop", no_wait)
    calls = itertools.count()
    stop = asyncio.Event()

    async def _publish_inflight() -> None:
        n = next(calls)
        clock[0] += 1.0
        if n == 200:
            stop.set()
        if n < 150:
            raise redis_lib.ConnectionError("Error 111 connecting to 127.0.0.1:6379")

    with caplog.at_level(logging.INFO, logger=runner_module.__name__):
        asyncio.run(Runner._every(5.0, _publish_inflight, stop))
    said = [r.getMessage() for r in caplog.records]
    assert len(said) <= 5, said  # 150 failures over 150 s: the first, two a minute on, back
    assert said[0] == "_publish_inflight failed: Error 111 connecting to 127.0.0.1:6379"
    assert "more since the last such line" in said[1]
    assert said[-1] == "_publish_inflight works again"


def test_a_task_to_a_replica_slower_than_the_upstream_timeout_fails_after_its_attempts(
    bare_appliance: Appliance, backend: FakeBackend
) -> None:
    """The worker reads the api's upstream settings: a replica silent past
    `APPLIANCE_UPSTREAM_TIMEOUT_S` is a 504, the task runs again, then fails, in seconds rather
    than after the 600 s default."""
    endpoint_id = seed_endpoint(bare_appliance.data_dir, "fake", backend.address)
    bare_appliance.env_extra["APPLIANCE_UPSTREAM_TIMEOUT_S"] = "1"
    bare_appliance.env_extra["APPLIANCE_TASK_MAX_ATTEMPTS"] = "2"
    bare_appliance.start_role("worker")
    client = bare_appliance.client()
    args = {"prompt": "slow", "max_tokens": 4, "delay_s": 6}
    reply = client.post(f"/v1/async-tasks?model_endpoint_id={endpoint_id}", json={"args": args})
    assert reply.status_code == 200, reply.text
    task_id = reply.json()["task_id"]
    body = wait_tasks(client, [task_id], 20)[task_id]
    assert body["status"] == "FAILURE", body
    why = "replica of 'fake' did not answer in time (gave up after 2 attempts)"
    assert body["traceback"] == why, body
    assert backend.seen["/v1/completions"] == 2


def test_a_worker_wait_cancelled_as_it_is_woken_ends_cancelled() -> None:
    """The worker's waits (for a free slot while every one is taken, for a helper's next tick)
    end cancelled when the cancel lands just as the wait is woken (a job ends, the worker is
    told to stop): Python 3.11's `asyncio.wait_for` dropped such a cancel, and the job taker
    went on taking jobs, a helper on ticking, after the worker had cancelled them."""
    taker = Runner.__new__(Runner)  # only what the taking loop reads while every slot is busy
    taker.concurrency, taker.running, taker._slot_free = 1, {"busy": None}, asyncio.Event()  # type: ignore[dict-item]

    async def woken(wait: asyncio.Future[None], wake: asyncio.Event) -> None:
        await asyncio.sleep(0.1)
        assert not wait.done()
        wake.set()  # and the cancel in the same step, before the wait resumes
        wait.cancel()
        await asyncio.wait([wait], timeout=2.5)
        assert wait.cancelled(), "the cancel was lost: the wait went on"

    async def tick() -> None:
        return None

    async def main() -> None:
        stop = asyncio.Event()
        await woken(asyncio.ensure_future(taker._take_jobs(stop)), taker._slot_free)
        await woken(asyncio.ensure_future(Runner._every(30.0, tick, stop)), stop)

    asyncio.run(main())
