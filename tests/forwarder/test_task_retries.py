"""A sync or streaming task whose replica answers 429 or 503 is sent again, as LLM Engine's
gateways do: `num_retries` more times (8 when unset), with waits of 1 s and up, while
`timeout_seconds` (10 s when unset) has not passed; what the client gets is the answer of the
last send. Through a real api process, Redis and SQLite, and a fake OpenAI backend."""

from __future__ import annotations

import json
import threading
from typing import Any

from tests.forwarder import test_async_support as support
from tests.forwarder.test_async_support import FakeBackend, seed_endpoint
from tests.harness import Appliance

backend = support.backend  # fixtures
bare_appliance = support.bare_appliance

ARGS = {"prompt": "say hi", "max_tokens": 4}


def sync_task(appliance: Appliance, endpoint_id: str, **fields: Any) -> dict[str, Any]:
    reply = appliance.client().post(
        f"/v1/sync-tasks?model_endpoint_id={endpoint_id}", json={"args": ARGS, **fields}
    )
    assert reply.status_code == 200, reply.text
    answer: dict[str, Any] = reply.json()
    return answer


def test_a_sync_task_is_sent_again_while_its_replica_answers_503(
    bare_appliance: Appliance, backend: FakeBackend
) -> None:
    endpoint_id = seed_endpoint(bare_appliance.data_dir, "fake", backend.address)

    backend.fail_first = 2  # two 503s, then the answer
    answer = sync_task(bare_appliance, endpoint_id)
    assert answer["status"] == "SUCCESS", answer
    assert "say hi" in json.loads(answer["result"]["result"])["choices"][0]["text"]
    assert sum(backend.seen.values()) == 3

    backend.fail_first, backend.seen = 2, backend.seen.__class__()
    answer = sync_task(bare_appliance, endpoint_id, num_retries=0)  # the client's own choice
    assert answer["status"] == "FAILURE" and answer["status_code"] == 503, answer
    assert sum(backend.seen.values()) == 1

    backend.fail_first, backend.seen = 5, backend.seen.__class__()
    answer = sync_task(bare_appliance, endpoint_id, num_retries=1)
    assert answer["status"] == "FAILURE" and answer["status_code"] == 503, answer
    assert sum(backend.seen.values()) == 2

    # no wait of 1 s fits in a timeout of half a second: one send
    backend.fail_first, backend.seen = 2, backend.seen.__class__()
    answer = sync_task(bare_appliance, endpoint_id, timeout_seconds=0.5)
    assert answer["status"] == "FAILURE" and answer["status_code"] == 503, answer
    assert sum(backend.seen.values()) == 1


def test_a_streaming_task_is_sent_again_before_its_stream_begins(
    bare_appliance: Appliance, backend: FakeBackend
) -> None:
    endpoint_id = seed_endpoint(bare_appliance.data_dir, "fake", backend.address)
    backend.fail_first = 1
    reply = bare_appliance.client().post(
        f"/v1/streaming-tasks?model_endpoint_id={endpoint_id}", json={"args": ARGS}
    )
    assert reply.status_code == 200, reply.text
    events = [json.loads(line[6:]) for line in reply.text.splitlines() if line[:6] == "data: "]
    assert events and all(e["status"] == "SUCCESS" for e in events), events
    assert sum(backend.seen.values()) == 2


def test_a_sync_task_waits_out_a_replica_that_cannot_be_reached_yet(
    bare_appliance: Appliance,
) -> None:
    late = FakeBackend()  # its port takes no connection until it starts
    endpoint_id = seed_endpoint(bare_appliance.data_dir, "late", late.address)
    url = f"/v1/sync-tasks?model_endpoint_id={endpoint_id}"
    once = bare_appliance.client().post(url, json={"args": ARGS, "num_retries": 0})
    assert once.status_code == 502 and "accepted" in once.json()["detail"], once.text
    starter = threading.Timer(1.5, late.start)
    starter.start()
    try:
        answer = sync_task(bare_appliance, endpoint_id)
        assert answer["status"] == "SUCCESS", answer
        assert sum(late.seen.values()) == 1
    finally:
        starter.join()
        late.stop()
