"""An endpoint that will get no replica by waiting (UPDATE_FAILED: its image could not be
pulled, its replica crash-looped; DELETE_IN_PROGRESS) is refused at once on every inference
entry: 503 with the builder's reason and what to do, `x-should-retry: false` (OpenAI's SDKs
do not retry it) and no Retry-After. Endpoints still worth waiting for (a first deploy, READY
scaled to zero) still hold. A request already holding ends when its endpoint fails: a plain
reply with the 503, a stream with an error event in its entry's format, a queued async task
FAILURE. Against a fake replica; api and worker, no Docker."""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from appliance import bus
from appliance.db import open_engine, session_scope
from appliance.models import Endpoint, EndpointStatus, Replica, ReplicaState
from tests.api.test_admission import (
    ENTRIES,
    Bed,
    auth,
    chat_body,
    refused,
    running_bed,
    tokens_field,
)
from tests.forwarder.test_async_support import seed_endpoint
from tests.harness import ADMIN_KEY as ADMIN
from tests.harness import wait_until

HOLD_S = 90  # the cold-start hold: every answer here must come well before it
QUICK_S = 30
BROKEN, GOING, FIRST, IDLE, CRASHED = "broken", "going", "first", "idle", "x-hub"
NONE = "none"  # max_workers 0: READY, and no replica ever comes
SHARED = "shared"  # public: another team may call it
REASON = "pulling image 'registry.example/nope:1' failed: manifest unknown"
LOG_TAIL = "Traceback (most recent call last):\n  secret=hunter2"
CRASH = "replica crashed 3 times; last: container exited with code 1"
HUB_DOWN = "OSError: We couldn't connect to 'https://huggingface.co' to load the files"
CRASH_TAIL = (  # as vLLM ends: the cause, then a last exception that only points back at it
    f"INFO starting\nTraceback (most recent call last):\n  token=hunter2\n{HUB_DOWN}\n"
    "RuntimeError: Engine core initialization failed. See root cause above."
)


def seed_bare(
    data_dir: Path,
    name: str,
    status: EndpointStatus,
    reason: str | None,
    public: bool = False,
    max_replicas: int = 1,
) -> None:
    """An endpoint row of team t1 with no replica at all."""
    engine = open_engine(data_dir / "appliance.db")
    with session_scope(engine) as session:
        session.add(
            Endpoint(
                id=f"end_{name}",
                name=name,
                owner="t1",
                created_by="test",
                framework="vllm",
                model="org/model",
                endpoint_type="streaming",
                status=status,
                status_reason=reason,
                public_inference=public,
                min_replicas=min(max_replicas, 1),
                max_replicas=max_replicas,
            )
        )
    engine.dispose()


def set_status(data_dir: Path, name: str, status: EndpointStatus, reason: str) -> None:
    engine = open_engine(data_dir / "appliance.db")
    with session_scope(engine) as session:
        endpoint = session.get(Endpoint, f"end_{name}")
        assert endpoint is not None
        endpoint.status, endpoint.status_reason = status, reason
        session.add(endpoint)
    engine.dispose()


def _seed(data_dir: Path, address: str) -> None:
    seed_endpoint(data_dir, "mine", address, owner="t1")
    seed_bare(data_dir, BROKEN, EndpointStatus.UPDATE_FAILED, f"{REASON}\n{LOG_TAIL}")
    seed_bare(data_dir, GOING, EndpointStatus.DELETE_IN_PROGRESS, None)
    seed_bare(data_dir, FIRST, EndpointStatus.UPDATE_IN_PROGRESS, None)
    seed_bare(data_dir, IDLE, EndpointStatus.READY, None)  # scaled to zero
    seed_bare(data_dir, CRASHED, EndpointStatus.UPDATE_FAILED, f"{CRASH}\n{CRASH_TAIL}")
    seed_bare(data_dir, SHARED, EndpointStatus.UPDATE_FAILED, f"{REASON}\n{LOG_TAIL}", public=True)
    seed_bare(data_dir, NONE, EndpointStatus.READY, None, max_replicas=0)


@pytest.fixture(scope="module")
def bed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bed]:
    env = {
        "APPLIANCE_ROUTING_REFRESH_S": "0.5",
        "APPLIANCE_ACTIVATION_TIMEOUT_S": str(HOLD_S),
        "APPLIANCE_STREAM_KEEPALIVE_S": "0.5",
    }
    with running_bed(tmp_path_factory.mktemp("failed"), env, _seed) as made:
        yield made


def down(reply: httpx.Response, family: str, *words: str) -> str:
    """A refusal that tells the client not to retry; its message."""
    refused(reply, 503, family)
    assert reply.headers.get("x-should-retry") == "false", reply.headers
    assert "retry-after" not in reply.headers, reply.headers
    body = reply.json()
    message = str(body["error"]["message"] if family == "openai" else body["detail"])
    for word in words:
        assert word in message, message
    return message


@pytest.mark.parametrize("entry", list(ENTRIES))
def test_a_failed_endpoint_is_refused_at_once_saying_why(bed: Bed, entry: str) -> None:
    send, family, _ = ENTRIES[entry]
    began = time.monotonic()
    reply = send(bed, bed.key(), BROKEN, {tokens_field(entry): 1})
    assert time.monotonic() - began < QUICK_S  # well under the hold
    message = down(reply, family, f"endpoint {BROKEN!r} failed to start: {REASON}")
    assert f"/v1/model-endpoints/end_{BROKEN}/restart" in message and "PUT" in message
    assert "hunter2" not in reply.text  # the first line of the reason, not the log tail


@pytest.mark.parametrize("entry", list(ENTRIES))
def test_a_crash_loop_says_the_line_of_its_log_that_names_the_cause(bed: Bed, entry: str) -> None:
    """ "container exited with code 1" alone says nothing: the line that names the error comes
    with it, and no other line of the log tail."""
    send, family, _ = ENTRIES[entry]
    reply = send(bed, bed.key(), CRASHED, {tokens_field(entry): 1})
    message = down(reply, family, f"endpoint {CRASHED!r} failed to start: {CRASH} ({HUB_DOWN})")
    assert "hunter2" not in message and "root cause above" not in message, message


@pytest.mark.parametrize("entry", [e for e in ENTRIES if e != "batch lines"])  # t1's file
def test_another_team_is_told_only_that_a_public_endpoint_failed(bed: Bed, entry: str) -> None:
    """Its reasons (the builder's words, its log) and its id are for its owner, to whom the
    id is otherwise a 404 like any other team's."""
    send, family, _ = ENTRIES[entry]
    reply = send(bed, bed.key(team="t2"), SHARED, {tokens_field(entry): 1})
    message = down(reply, family, f"endpoint {SHARED!r} failed to start", "its owner")
    assert f"end_{SHARED}" not in reply.text and "registry.example" not in reply.text, message
    owner = send(bed, bed.key(), SHARED, {tokens_field(entry): 1})
    down(owner, family, REASON, f"/v1/model-endpoints/end_{SHARED}/restart")


@pytest.mark.parametrize("entry", list(ENTRIES))
def test_an_endpoint_being_deleted_is_refused_at_once(bed: Bed, entry: str) -> None:
    send, family, _ = ENTRIES[entry]
    down(send(bed, bed.key(), GOING, {tokens_field(entry): 1}), family, "is being deleted")


@pytest.mark.parametrize("entry", list(ENTRIES))
def test_an_endpoint_whose_max_workers_is_0_is_refused_at_once(bed: Bed, entry: str) -> None:
    """It runs no replica, so a request would hold for the whole cold-start wait and then be
    told to retry shortly: it is told at once what keeps it down and how to change it."""
    send, family, _ = ENTRIES[entry]
    began = time.monotonic()
    reply = send(bed, bed.key(), NONE, {tokens_field(entry): 1})
    assert time.monotonic() - began < QUICK_S  # well under the hold
    down(reply, family, "max_workers is 0", f"PUT /v1/model-endpoints/end_{NONE}")


def test_a_restart_of_an_endpoint_still_deploying_says_what_to_wait_for(bed: Bed) -> None:
    """As an update is: a 409 that says until when, not only the status it has."""
    reply = bed.admin.post(f"/v1/model-endpoints/end_{FIRST}/restart")
    assert reply.status_code == 409, reply.text
    assert "wait until it is READY or UPDATE_FAILED" in reply.json()["detail"], reply.text


def test_a_change_to_an_endpoint_being_deleted_says_so(bed: Bed) -> None:
    """A PUT or restart sent as (or after) the endpoint was deleted was told to wait until it
    is READY or UPDATE_FAILED, which an endpoint being deleted never becomes."""
    for reply in (
        bed.admin.post(f"/v1/model-endpoints/end_{GOING}/restart"),
        bed.admin.put(f"/v1/model-endpoints/end_{GOING}", json={"per_worker": 3}),
        bed.admin.put(f"/v1/llm/model-endpoints/{GOING}", json={"per_worker": 3}),
    ):
        assert reply.status_code == 409, reply.text
        said = reply.json()["detail"]
        assert f"endpoint {GOING!r} is being deleted" in said, said
        assert "wait until" not in said, said


def test_a_stream_to_a_failed_endpoint_gets_a_plain_503(bed: Bed) -> None:
    body = chat_body(BROKEN, {}, stream=True)
    reply = httpx.post(
        bed.appliance.url + "/v1/chat/completions", json=body, headers=auth(bed.key()), timeout=30
    )
    assert reply.headers["content-type"].startswith("application/json")
    down(reply, "openai", REASON)


def test_the_openai_sdk_does_not_retry_it(bed: Bed) -> None:
    openai = pytest.importorskip("openai")
    sent: list[httpx.Request] = []
    hooks = {"request": [sent.append]}
    client = openai.OpenAI(
        base_url=bed.appliance.url + "/v1",
        api_key=bed.key(),
        max_retries=2,
        http_client=httpx.Client(event_hooks=hooks, timeout=30),
    )
    with pytest.raises(openai.APIStatusError) as raised:
        client.chat.completions.create(model=BROKEN, messages=[{"role": "user", "content": "hi"}])
    assert raised.value.status_code == 503 and REASON in str(raised.value)
    assert len(sent) == 1  # a 503 with Retry-After would have been sent three times


@pytest.mark.parametrize("name", [FIRST, IDLE])
def test_an_endpoint_that_may_still_get_a_replica_is_waited_for(bed: Bed, name: str) -> None:
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            bed.appliance.url + "/v1/chat/completions",
            json=chat_body(name, {}),
            headers=auth(bed.key()),
            timeout=httpx.Timeout(30, read=2),
        )


def collect(into: dict[str, Any], label: str, method: str, url: str, **kw: Any) -> None:
    """Send one request; keep its status, headers, body and when it ended."""
    with httpx.stream(method, url, timeout=HOLD_S + 30, **kw) as reply:
        into[label] = (reply.status_code, reply.headers, reply.read(), time.monotonic())


def stream_chat(bed: Bed, name: str, key: str, got: dict[str, Any]) -> threading.Thread:
    """A streamed chat to `name`, sent from a thread started here; `got["stream"]` once done."""
    stream = threading.Thread(
        target=collect,
        args=(got, "stream", "POST", bed.appliance.url + "/v1/chat/completions"),
        kwargs={"json": chat_body(name, {}, stream=True), "headers": auth(key)},
    )
    stream.start()
    return stream


def test_requests_holding_for_a_replica_end_when_the_endpoint_fails(bed: Bed) -> None:
    name, key = "late", bed.key()
    seed_bare(bed.appliance.data_dir, name, EndpointStatus.UPDATE_IN_PROGRESS, None)
    url = bed.appliance.url
    task = httpx.post(
        url + "/v1/async-tasks",
        params={"model_endpoint_id": f"end_{name}"},
        json={"args": {"prompt": "hi"}},
        headers=auth(key),
        timeout=30,
    )
    assert task.status_code == 200, task.text  # it may still start: queued
    completion = {"prompt": "hi", "max_new_tokens": 2, "temperature": 0}
    sends = {
        "chat": ("/v1/chat/completions", None, chat_body(name, {})),
        "chat stream": ("/v1/chat/completions", None, chat_body(name, {}, stream=True)),
        "llm stream": ("/v1/llm/completions-stream", {"model_endpoint_name": name}, completion),
        "task stream": (
            "/v1/streaming-tasks",
            {"model_endpoint_id": f"end_{name}"},
            {"args": {"prompt": "hi"}},
        ),
    }
    got: dict[str, Any] = {}
    threads = [
        threading.Thread(
            target=collect,
            args=(got, label, "POST", url + path),
            kwargs={"params": params, "json": body, "headers": auth(key)},
        )
        for label, (path, params, body) in sends.items()
    ]
    for thread in threads:
        thread.start()
    time.sleep(3)  # they hold (a keep-alive each half second for the streams)
    assert not got, got
    failed_at = time.monotonic()
    set_status(bed.appliance.data_dir, name, EndpointStatus.UPDATE_FAILED, REASON)
    for thread in threads:
        thread.join(HOLD_S + 30)
    assert set(got) == set(sends)
    for label, (_, _, _, ended) in got.items():
        assert ended - failed_at < QUICK_S, label  # within a refresh, not at the hold's end
    status, headers, body, _ = got["chat"]
    assert status == 503 and headers.get("x-should-retry") == "false"
    assert REASON in json.loads(body)["error"]["message"]
    for label in ("chat stream", "llm stream", "task stream"):
        status, headers, body, _ = got[label]
        assert status == 200 and headers["content-type"].startswith("text/event-stream")
        text = body.decode()
        assert text.startswith(": keep-alive\n\n"), text[:200]
        events = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: ")]
        assert len(events) == 1, text
        last = events[0]
        if label == "chat stream":  # OpenAI's envelope
            assert last["error"]["code"] == 503 and REASON in last["error"]["message"]
        elif label == "llm stream":  # LLM Engine's CompletionStreamV1Response
            assert last["output"] is None and last["error"]["status_code"] == 503
            assert REASON in last["error"]["content"]["error"]
        else:  # LLM Engine's task events
            assert last["status"] == "FAILURE" and last["status_code"] == 503
            assert REASON in last["result"]["result"]["detail"]
    task_id = task.json()["task_id"]

    def task_over() -> bool:
        view = httpx.get(url + f"/v1/async-tasks/{task_id}", headers=auth(key), timeout=10)
        return bool(view.json()["status"] == "FAILURE")

    wait_until(task_over, QUICK_S, "the queued task to fail")
    view = httpx.get(url + f"/v1/async-tasks/{task_id}", headers=auth(key), timeout=10).json()
    assert REASON in str(view["traceback"]), view


def test_another_teams_queued_task_is_told_only_that_a_public_endpoint_failed(bed: Bed) -> None:
    """A task of another team, queued while a public endpoint still deployed, ends FAILURE
    with what that team's request is told (`check_coming`): not its owner's reasons, log
    tail or id; the owner's own queued task still says why."""
    name = "shared-late"
    seed_bare(bed.appliance.data_dir, name, EndpointStatus.UPDATE_IN_PROGRESS, None, public=True)
    url = bed.appliance.url
    tasks = {}
    for team in ("t2", "t1"):
        key = bed.key(team=team)
        queued = httpx.post(
            url + "/v1/async-tasks",
            params={"model_endpoint_id": f"end_{name}"},
            json={"args": {"prompt": "hi"}},
            headers=auth(key),
            timeout=30,
        )
        assert queued.status_code == 200, queued.text
        tasks[team] = (key, queued.json()["task_id"])
    time.sleep(1)  # a worker holds them for a replica
    set_status(bed.appliance.data_dir, name, EndpointStatus.UPDATE_FAILED, f"{REASON}\n{LOG_TAIL}")

    def view(team: str) -> dict[str, Any]:
        key, task_id = tasks[team]
        reply = httpx.get(url + f"/v1/async-tasks/{task_id}", headers=auth(key), timeout=10)
        return dict(reply.json())

    def both_over() -> bool:
        return all(view(team)["status"] == "FAILURE" for team in tasks)

    wait_until(both_over, QUICK_S, "the queued tasks to fail")
    other = str(view("t2")["traceback"])
    assert f"endpoint {name!r} failed to start" in other and "its owner" in other, other
    assert f"end_{name}" not in other and "registry.example" not in other, other
    assert REASON in str(view("t1")["traceback"])


def test_a_stream_cut_by_its_endpoints_deletion_says_so(bed: Bed) -> None:
    """Deleting an endpoint drains its replicas, then stops them: a stream still running then
    ends with the deletion as its reason, not as the replica's failure."""
    cut, sent = threading.Event(), threading.Event()
    server = socket.create_server(("127.0.0.1", 0))
    address = f"http://127.0.0.1:{server.getsockname()[1]}"

    def replica() -> None:  # one chunk, then the connection closes when the test says
        conn, _ = server.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                b"transfer-encoding: chunked\r\n\r\n"
            )
            event = b'data: {"choices": [{"index": 0, "delta": {"content": "hi"}}]}\n\n'
            conn.sendall(b"%x\r\n%b\r\n" % (len(event), event))
            sent.set()
            cut.wait(60)

    threading.Thread(target=replica, daemon=True).start()
    name = "leaving"
    seed_endpoint(bed.appliance.data_dir, name, address, owner="t1")
    key = bed.key()
    wait_until(  # the routing table has it
        lambda: httpx.get(bed.appliance.url + "/v1/models", headers=auth(key)).text.count(name),
        20,
        "the endpoint to be routed",
    )
    got: dict[str, Any] = {}
    stream = stream_chat(bed, name, key, got)
    assert sent.wait(30), "the request never reached the replica"
    set_status(bed.appliance.data_dir, name, EndpointStatus.DELETE_IN_PROGRESS, "deleting")
    time.sleep(2)  # a routing refresh or more (0.5 s here): the api knows it is being deleted
    cut.set()
    stream.join(60)
    server.close()
    status, _, body, _ = got["stream"]
    assert status == 200 and b'"content": "hi"' in body, body
    assert f"endpoint {name!r} was deleted while this request ran".encode() in body, body
    assert b"failed mid-reply" not in body


def test_a_stream_cut_by_its_replicas_drain_says_so(bed: Bed) -> None:
    """An edit that rolls an endpoint (a restart, a scale-down) drains the replicas it replaces,
    then stops them, whatever still runs: a stream still running then ended with "the replica
    failed mid-reply", which blamed a replica that never failed; its last event says the
    replica was stopped, and why."""
    cut, sent = threading.Event(), threading.Event()
    server = socket.create_server(("127.0.0.1", 0))
    address = f"http://127.0.0.1:{server.getsockname()[1]}"

    def replica() -> None:  # one chunk, then the connection closes when the test says
        conn, _ = server.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                b"transfer-encoding: chunked\r\n\r\n"
            )
            event = b'data: {"choices": [{"index": 0, "delta": {"content": "hi"}}]}\n\n'
            conn.sendall(b"%x\r\n%b\r\n" % (len(event), event))
            sent.set()
            cut.wait(60)

    threading.Thread(target=replica, daemon=True).start()
    name = "rolling"
    seed_endpoint(bed.appliance.data_dir, name, address, owner="t1")
    key = bed.key()
    wait_until(
        lambda: httpx.get(bed.appliance.url + "/v1/models", headers=auth(key)).text.count(name),
        20,
        "the endpoint to be routed",
    )
    got: dict[str, Any] = {}
    stream = stream_chat(bed, name, key, got)
    assert sent.wait(30), "the request never reached the replica"
    engine = open_engine(bed.appliance.data_dir / "appliance.db")
    with session_scope(engine) as session:  # the builder drains it: out of the routes
        draining = session.get(Replica, f"rep_{name}")
        assert draining is not None
        draining.state = ReplicaState.STOPPING
        session.add(draining)
    engine.dispose()
    set_status(
        bed.appliance.data_dir, name, EndpointStatus.UPDATE_IN_PROGRESS, "rolling to generation 2"
    )
    time.sleep(2)  # a routing refresh or more (0.5 s here): the api no longer routes to it
    cut.set()
    stream.join(60)
    server.close()
    status, _, body, _ = got["stream"]
    assert status == 200 and b'"content": "hi"' in body, body
    assert b"failed mid-reply" not in body, body
    assert b"was stopped" in body and b"drain" in body, body


@pytest.mark.parametrize("entry", ["/v1/chat/completions", "/v1/llm/completions-sync"])
def test_an_endpoint_being_deleted_takes_no_new_request_while_its_replicas_drain(
    bed: Bed, entry: str
) -> None:
    """Deleted, an endpoint refuses new requests at once, as the UI's delete says, while its
    replicas are still ready and draining (the builder stops them later), where they were
    served on for seconds."""
    send, family, _ = ENTRIES[entry]
    name = "draining-" + entry.rsplit("/", 1)[-1]
    seed_endpoint(bed.appliance.data_dir, name, bed.backend.address, owner="t1")
    key = bed.key()
    wait_until(
        lambda: send(bed, key, name, {tokens_field(entry): 1}).status_code == 200,
        20,
        "the endpoint to be served",
    )
    set_status(bed.appliance.data_dir, name, EndpointStatus.DELETE_IN_PROGRESS, "deleting")
    time.sleep(2)  # a routing refresh or more (0.5 s here)
    down(send(bed, key, name, {tokens_field(entry): 1}), family, "is being deleted")


def test_a_refusal_of_a_failed_endpoint_is_in_the_api_log(bed: Bed) -> None:
    """The README's "Failed requests": a request that ends in a 5xx, the appliance's own for an
    endpoint with no replica to give included, is a warning in the api's log naming the endpoint
    and why, where only a replica's failures were."""
    send, family, _ = ENTRIES["/v1/chat/completions"]
    down(send(bed, bed.key(), BROKEN, {"max_tokens": 1}), family, REASON)
    logged = re.compile(rf"WARNING .*endpoint {BROKEN}, replica -: 503, .*failed to start")
    wait_until(
        lambda: logged.search((bed.appliance.workdir / "api.log").read_text()),
        5,
        "the refusal in the api's log",
    )


def test_a_held_stream_that_ends_with_its_endpoints_failure_counts_as_an_error(bed: Bed) -> None:
    """A stream held for a replica, answered 200 at once, that ends with an error event when its
    endpoint fails is counted as the 503 it carries (metrics, and usage's errors), as a plain
    request is, where it was counted nowhere."""
    name, key = "late-stream", bed.key()
    seed_bare(bed.appliance.data_dir, name, EndpointStatus.UPDATE_IN_PROGRESS, None)
    got: dict[str, Any] = {}
    stream = stream_chat(bed, name, key, got)
    time.sleep(2)  # it holds
    set_status(bed.appliance.data_dir, name, EndpointStatus.UPDATE_FAILED, REASON)
    stream.join(QUICK_S)
    assert got["stream"][0] == 200 and REASON.encode() in got["stream"][2]
    counted = re.compile(rf'appliance_requests_total{{code="503",endpoint="{name}",.*}} 1\.0')

    wait_until(
        lambda: counted.search(bed.admin.get("/metrics").text), 5, "the stream in the metrics"
    )


@pytest.mark.parametrize("lane", ["true", "false"], ids=["lane", "no lane"])
def test_a_stream_still_running_when_the_api_stops_ends_with_an_error_event(
    tmp_path: Path, lane: str
) -> None:
    """The api stopping (SIGTERM: an upgrade, `docker compose down`) lets streams run for its
    graceful wait (10 s); one still running after it ends with an error event saying so, in
    its entry's format, rather than a connection cut mid-stream that clients read as a
    truncated answer. The replica is not blamed for it: the log had a warning line a request
    ("endpoint slow, replica rep_...: 503, 'the appliance is shutting down'") and, past three,
    "replica ... failed 3 times in a row; out of rotation", at every stop with requests in
    flight (the worker's too)."""

    def seed(data_dir: Path, address: str) -> None:
        seed_endpoint(data_dir, "slow", address, owner="t1")
        seed_bare(data_dir, "coming", EndpointStatus.UPDATE_IN_PROGRESS, None)

    with running_bed(tmp_path, {"APPLIANCE_FAST_LANE": lane}, seed) as bed:
        bed.backend.pace_s = 4.0  # a word every 4 s: the stream outlasts the graceful wait
        held: dict[str, Any] = {}  # a request holding for a replica that never comes
        holding = threading.Thread(
            target=collect,
            args=(held, "reply", "POST", bed.appliance.url + "/v1/chat/completions"),
            kwargs={"json": chat_body("coming", {}), "headers": auth(ADMIN)},
        )
        nudges = redis.Redis.from_url(bed.appliance.redis.url)
        holding.start()
        # held: a request waiting for a replica wakes the builder (the stop must come after)
        wait_until(lambda: nudges.llen(bus.BUILDER_NUDGE_KEY) > 0, 30, "the request held")
        nudges.close()
        body = chat_body("slow", {}, stream=True)
        with (
            httpx.Client(base_url=bed.appliance.url, timeout=60) as client,
            client.stream("POST", "/v1/chat/completions", json=body, headers=auth(ADMIN)) as reply,
        ):
            assert reply.status_code == 200
            lines = reply.iter_lines()
            assert next(lines).startswith("data: ")
            stopping = threading.Thread(target=bed.appliance.stop_role, args=("api",))
            stopping.start()
            rest = [line for line in lines if line.startswith("data: ")]
        stopping.join()
        holding.join()
        logged = bed.appliance.logs()
    assert "is shutting down" not in logged and "out of rotation" not in logged, logged
    status, _, raw, _ = held["reply"]
    assert status == 503 and "shutting down" in json.loads(raw)["error"]["message"], raw
    assert rest and rest[-1] != "data: [DONE]", rest
    error = json.loads(rest[-1].removeprefix("data: "))["error"]
    assert "shutting down" in error["message"] and error["code"] == 503, error
