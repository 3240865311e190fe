"""Async inference on the real model: 200 tasks to a Gemma endpoint (llama.cpp) all reach
SUCCESS with generated text, through api, RQ and the worker; then a batch of 100 chat
requests on the vLLM stand-in (on faked GPUs) ends with 100 answers in OpenAI's batch output
format."""

from __future__ import annotations

import json
from collections.abc import Callable

import redis

from appliance import bus
from tests.e2e.lifecycle import ON_FAKE_GPUS, create, standin_body, wait_status
from tests.e2e.test_first_slice import create_gemma, wait_ready
from tests.forwarder.test_async_support import wait_tasks
from tests.forwarder.test_async_tasks import batch_lines
from tests.harness import Appliance, wait_until

TASKS = 200


def test_200_tasks_to_gemma_all_succeed_with_model_output(appliance: Appliance) -> None:
    appliance.start_role("worker")
    client = appliance.client()
    create_gemma(client, "gemma", per_worker=4, endpoint_type="async")
    wait_ready(client, "gemma")
    endpoint_id = client.get("/v1/llm/model-endpoints/gemma").json()["id"]
    ids = []
    for i in range(TASKS):
        args = {
            "messages": [{"role": "user", "content": f"Say a colour. ({i})"}],
            "max_tokens": 4,
            "temperature": 0,
        }
        reply = client.post(f"/v1/async-tasks?model_endpoint_id={endpoint_id}", json={"args": args})
        assert reply.status_code == 200, reply.text
        ids.append(reply.json()["task_id"])
    done = wait_tasks(client, ids, 420)
    failed = {t: b for t, b in done.items() if b["status"] != "SUCCESS"}
    assert failed == {}
    for body in done.values():
        answer = json.loads(body["result"]["result"])  # a JSON string, as in LLM Engine
        assert body["status_code"] == 200
        assert answer["choices"][0]["message"]["content"].strip()
        assert answer["usage"]["completion_tokens"] > 0


def test_batch_of_100_chat_requests_on_a_container(
    make_appliance: Callable[..., Appliance],
) -> None:
    appliance = make_appliance(**ON_FAKE_GPUS)
    appliance.start_role("worker")
    client = appliance.client()
    endpoint_id = create(client, standin_body("standin", per_worker=8))
    wait_status(client, endpoint_id, "READY", timeout_s=90)
    file_id = client.post(
        "/v1/files",
        files={"file": ("requests.jsonl", batch_lines("standin", 100))},
        data={"purpose": "batch"},
    ).json()["id"]
    batch = client.post(
        "/v1/batches",
        json={
            "input_file_id": file_id,
            "endpoint": "/v1/chat/completions",
            "completion_window": "24h",
        },
    )
    assert batch.status_code == 200, batch.text
    batch_id = batch.json()["id"]
    final = wait_until(
        lambda: (b := client.get(f"/v1/batches/{batch_id}").json())["status"] == "completed" and b,
        120,
        "the batch to complete",
    )
    assert final["request_counts"] == {"total": 100, "completed": 100, "failed": 0}
    text = client.get(f"/v1/files/{final['output_file_id']}/content").text
    lines = [json.loads(line) for line in text.splitlines()]
    assert len(lines) == 100
    assert sorted(line["custom_id"] for line in lines) == sorted(f"req-{i}" for i in range(100))
    for line in lines:
        assert set(line) == {"id", "custom_id", "response", "error"}
        assert line["error"] is None and line["response"]["status_code"] == 200
        assert line["response"]["body"]["object"] == "chat.completion"
        assert line["response"]["body"]["choices"][0]["message"]["content"]


def test_an_async_task_running_when_its_endpoint_is_deleted_still_succeeds(
    make_appliance: Callable[..., Appliance],
) -> None:
    """The replica drains first: it stops once the worker's request to it has its answer, as
    it does for the api's requests (a stream, a sync request)."""
    appliance = make_appliance(**ON_FAKE_GPUS)
    appliance.start_role("worker")
    client = appliance.client()
    endpoint_id = create(client, standin_body("drained", endpoint_type="async"))
    wait_status(client, endpoint_id, "READY", timeout_s=90)
    args = {"prompt": "one two three", "max_tokens": 700}  # 7 s on the stand-in
    task = client.post(f"/v1/async-tasks?model_endpoint_id={endpoint_id}", json={"args": args})
    task_id = task.json()["task_id"]
    r = redis.Redis.from_url(appliance.redis.url)
    wait_until(lambda: bus.inflight(r), 30, "the task's request to reach the replica")
    assert client.delete(f"/v1/model-endpoints/{endpoint_id}").json() == {"deleted": True}
    done = wait_tasks(client, [task_id], 60)[task_id]
    assert done["status"] == "SUCCESS", done
    assert json.loads(done["result"]["result"])["usage"]["completion_tokens"] == 700
