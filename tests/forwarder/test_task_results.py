"""How each task entry wraps its result, through real api and worker processes, real Redis and
SQLite, a fake OpenAI backend (no Docker): `{"result": "<json>"}` for sync and async tasks,
`{"result": <object>}` for a stream's events, as LLM Engine's forwarder does; a request's
`serialize_results_as_string` (in its body or its args) picks the other, never reaches the
replica, and is a 400 naming it when it is not a boolean."""

from __future__ import annotations

import json
from typing import Any

import httpx

from tests.forwarder import test_async_support as support
from tests.forwarder.test_async_support import FakeBackend, seed_endpoint, wait_tasks
from tests.harness import Appliance

backend = support.backend  # fixtures
bare_appliance = support.bare_appliance

KEY = "serialize_results_as_string"
ARGS = {"prompt": "say hi", "max_tokens": 4}


def asks(where: str, value: Any) -> dict[str, Any]:
    """A task body asking for `value` in its body ("body"), its args ("args"), or not at all."""
    if where == "body":
        return {"args": dict(ARGS), KEY: value}
    if where == "args":
        return {"args": {**ARGS, KEY: value}}
    return {"args": dict(ARGS)}


def never_sent(backend: FakeBackend) -> None:
    assert backend.bodies, "the replica got nothing"
    assert all(KEY not in body for body in backend.bodies), backend.bodies


def sync_result(client: httpx.Client, endpoint_id: str, body: dict[str, Any]) -> Any:
    reply = client.post(f"/v1/sync-tasks?model_endpoint_id={endpoint_id}", json=body)
    assert reply.status_code == 200 and reply.json()["status"] == "SUCCESS", reply.text
    return reply.json()["result"]["result"]


def stream_results(client: httpx.Client, endpoint_id: str, body: dict[str, Any]) -> list[Any]:
    reply = client.post(f"/v1/streaming-tasks?model_endpoint_id={endpoint_id}", json=body)
    assert reply.status_code == 200, reply.text
    lines = [line[6:] for line in reply.text.splitlines() if line.startswith("data: ")]
    events = [json.loads(line) for line in lines]
    assert events and all(e["status"] == "SUCCESS" for e in events), events
    return [e["result"]["result"] for e in events]


def test_a_sync_task_result_is_a_json_string_unless_the_request_asks_for_an_object(
    bare_appliance: Appliance, backend: FakeBackend
) -> None:
    endpoint_id = seed_endpoint(bare_appliance.data_dir, "fake", backend.address)
    client = bare_appliance.client()
    default = sync_result(client, endpoint_id, asks("none", None))
    assert isinstance(default, str) and "say hi" in json.loads(default)["choices"][0]["text"]
    for where in ("body", "args"):
        got = sync_result(client, endpoint_id, asks(where, False))
        assert isinstance(got, dict) and "say hi" in got["choices"][0]["text"], (where, got)
        assert isinstance(sync_result(client, endpoint_id, asks(where, True)), str), where
    # the body's own key wins over the one in args, as in LLM Engine's forwarder
    both = {"args": {**ARGS, KEY: True}, KEY: False}
    assert isinstance(sync_result(client, endpoint_id, both), dict)
    never_sent(backend)


def test_a_streaming_task_sends_objects_unless_the_request_asks_for_strings(
    bare_appliance: Appliance, backend: FakeBackend
) -> None:
    endpoint_id = seed_endpoint(bare_appliance.data_dir, "fake", backend.address)
    client = bare_appliance.client()
    default = stream_results(client, endpoint_id, asks("none", None))
    assert all(isinstance(r, dict) for r in default), default
    for where in ("body", "args"):
        got = stream_results(client, endpoint_id, asks(where, True))
        assert all(isinstance(r, str) for r in got), (where, got)
        assert [json.loads(r) for r in got] == default, where
        again = stream_results(client, endpoint_id, asks(where, False))
        assert all(isinstance(r, dict) for r in again), (where, again)
    never_sent(backend)


def test_an_async_task_result_is_a_json_string_unless_the_request_asks_for_an_object(
    bare_appliance: Appliance, backend: FakeBackend
) -> None:
    endpoint_id = seed_endpoint(bare_appliance.data_dir, "fake", backend.address)
    bare_appliance.start_role("worker")
    client = bare_appliance.client()
    bodies = [asks("none", None), asks("body", False), asks("args", False), asks("args", True)]
    ids = []
    for body in bodies:
        reply = client.post(f"/v1/async-tasks?model_endpoint_id={endpoint_id}", json=body)
        assert reply.status_code == 200, reply.text
        ids.append(reply.json()["task_id"])
    done = wait_tasks(client, ids, 60)
    results = [done[i]["result"]["result"] for i in ids]
    assert [type(r) for r in results] == [str, dict, dict, str], results
    assert "say hi" in json.loads(results[0])["choices"][0]["text"]
    assert "say hi" in results[1]["choices"][0]["text"]
    never_sent(backend)


def test_a_serialize_results_as_string_that_is_no_boolean_is_a_400_on_every_entry(
    bare_appliance: Appliance, backend: FakeBackend
) -> None:
    endpoint_id = seed_endpoint(bare_appliance.data_dir, "fake", backend.address)
    client = bare_appliance.client()
    for entry in ("sync-tasks", "streaming-tasks", "async-tasks"):
        for where, value in (("body", "true"), ("args", 1), ("body", {"a": True})):
            url = f"/v1/{entry}?model_endpoint_id={endpoint_id}"
            reply = client.post(url, json=asks(where, value))
            assert reply.status_code == 400, (entry, where, reply.text)
            detail = reply.json()["detail"]
            named = KEY if where == "body" else f"args.{KEY}"
            assert detail.startswith(f"{named} must be true or false"), (entry, detail)
    assert sum(backend.seen.values()) == 0
