"""The same inference requests through every way the api can carry them must get the same
answers: the compiled build with the fast lane on, with it off (every request over uvicorn's
ASGI cycle), and the plain build (no compiled modules) with it on. Compared: the status, the
headers that matter, the body bytes (ids and timestamps aside), and then the usage and
request metrics each api counted. Against a fake replica, no Docker."""

from __future__ import annotations

import json
import re
import socket
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from appliance.models import EndpointStatus
from tests.api.test_failed_endpoint import seed_bare
from tests.api.test_fast_lane import chat, read_response
from tests.forwarder.test_async_support import FakeBackend, seed_endpoint, start_api, stop_all
from tests.harness import ADMIN_KEY, COMPILED, Appliance, RedisServer, wait_until

MODEL = "same"
HEADERS_COMPARED = (
    "content-type",
    "cache-control",
    "retry-after",
    "www-authenticate",
    "x-should-retry",
)
FAILED = "failed"  # an endpoint whose replica never started
CUT = "cut"  # an endpoint whose streams the client leaves half way
PACE_S = 0.1  # between the events of its replica's streams: a client leaving is seen between two
CUT_AFTER = 4  # events a client reads before it leaves
VOLATILE = re.compile(rb'"(created|request_id|timestamp|id)": ("[^"]*"|\d+)')
WAYS = {  # name -> (build, fast lane)
    "compiled, lane": ("compiled", "true"),
    "compiled, no lane": ("compiled", "false"),
    "plain, lane": ("plain", "true"),
}


@pytest.fixture(scope="module")
def apis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Appliance]]:
    if not COMPILED.exists():
        pytest.fail("the compiled build is missing: run scripts/compile")
    base = tmp_path_factory.mktemp("differential")
    backend = FakeBackend(delay_s=0.005, created=1_790_000_000).start()  # same bytes each second
    paced = FakeBackend(created=1_790_000_000, pace_s=PACE_S).start()
    made: dict[str, Appliance] = {}
    redis: list[RedisServer] = []
    try:
        for name, (build, lane) in WAYS.items():
            server = RedisServer(base / f"redis-{len(made)}").start()
            redis.append(server)
            appliance = Appliance(
                base / f"api-{len(made)}",
                server,
                env_extra={"APPLIANCE_FAST_LANE": lane, "APPLIANCE_MAX_BODY_BYTES": "4096"},
                build=build,
            )
            start_api(appliance)
            seed_endpoint(appliance.data_dir, MODEL, backend.address, endpoint_type="streaming")
            seed_bare(appliance.data_dir, FAILED, EndpointStatus.UPDATE_FAILED, "pull failed")
            seed_endpoint(appliance.data_dir, CUT, paced.address, endpoint_type="streaming")
            made[name] = appliance
        yield made
    finally:
        for appliance in made.values():
            print(appliance.logs())
            stop_all(appliance)
        for server in redis:
            server.stop()
        backend.stop()
        paced.stop()


def requests() -> list[tuple[str, str, bytes, dict[str, str]]]:
    """(name, target, body, extra headers) of each request every way gets."""
    key = {"authorization": f"Bearer {ADMIN_KEY}"}
    task = json.dumps({"args": {"prompt": "task", "max_tokens": 3}}).encode()
    completion = json.dumps({"prompt": "hi", "max_new_tokens": 4, "temperature": 0}).encode()
    completion_body = {"model": MODEL, "prompt": "p"}
    embedding = {"model": MODEL, "input": "x"}
    response = {"model": MODEL, "input": "r", "max_output_tokens": 4}
    return [
        ("response", "/v1/responses", json.dumps(response).encode(), key),
        ("response stream", "/v1/responses", json.dumps(response | {"stream": True}).encode(), key),
        ("response stored", "/v1/responses", json.dumps(response | {"store": True}).encode(), key),
        ("chat", "/v1/chat/completions", chat("one", model=MODEL), key),
        ("chat stream", "/v1/chat/completions", chat("a b", model=MODEL, stream=True), key),
        ("completion", "/v1/completions", json.dumps(completion_body).encode(), key),
        ("embedding", "/v1/embeddings", json.dumps(embedding).encode(), key),
        ("v2 chat", "/v2/chat/completions", chat("v2", model=MODEL), key),
        ("unknown model", "/v1/chat/completions", chat("x", model="nope"), key),
        ("no model", "/v1/completions", b'{"prompt": "x"}', key),
        ("bad json", "/v1/chat/completions", b"{not json", key),
        ("not an object", "/v1/chat/completions", b"[1, 2]", key),
        ("bad key", "/v1/chat/completions", chat("x", model=MODEL), {"x-api-key": "mea_nope"}),
        ("too large", "/v1/chat/completions", chat("x" * 5000, model=MODEL), key),
        ("llm sync", f"/v1/llm/completions-sync?model_endpoint_name={MODEL}", completion, key),
        ("llm stream", f"/v1/llm/completions-stream?model_endpoint_name={MODEL}", completion, key),
        ("llm no query", "/v1/llm/completions-sync", completion, key),
        ("llm invalid", f"/v1/llm/completions-sync?model_endpoint_name={MODEL}", b"{}", key),
        ("sync task", f"/v1/sync-tasks?model_endpoint_id=end_{MODEL}", task, key),
        ("stream task", f"/v1/streaming-tasks?model_endpoint_id=end_{MODEL}", task, key),
        ("task no args", f"/v1/sync-tasks?model_endpoint_id=end_{MODEL}", b"{}", key),
        ("failed", "/v1/chat/completions", chat("x", model=FAILED), key),
        ("failed stream", "/v1/chat/completions", chat("x", model=FAILED, stream=True), key),
        ("llm failed", f"/v1/llm/completions-stream?model_endpoint_name={FAILED}", completion, key),
        ("task failed", f"/v1/streaming-tasks?model_endpoint_id=end_{FAILED}", task, key),
    ]


def send(appliance: Appliance, target: str, body: bytes, headers: dict[str, str]) -> Any:
    """One request on a raw connection (so nothing in a client library changes the bytes)."""
    head = f"POST {target} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    head += f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    with socket.create_connection(("127.0.0.1", appliance.port), timeout=15) as sock:
        sock.sendall(head.encode() + body)
        status, found, data = read_response(sock.makefile("rb"))
    kept = {k: v for k, v in found.items() if k in HEADERS_COMPARED}
    return status, kept, VOLATILE.sub(rb'"\1": "-"', data), "x-appliance-overhead-ms" in found


def counters(appliance: Appliance) -> dict[str, float]:
    """The request and token counters the api exposes (fast-lane count aside)."""
    text = httpx.get(
        appliance.url + "/metrics", headers={"authorization": f"Bearer {ADMIN_KEY}"}, timeout=10
    ).text
    found: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(("appliance_requests_total{", "appliance_tokens_total{")):
            sample, value = line.rsplit(" ", 1)
            sample = re.sub(r'key="[^"]*"', 'key="admin"', sample)  # each install's own id
            found[sample] = found.get(sample, 0.0) + float(value)
    return found


def test_every_way_of_carrying_a_request_answers_the_same(apis: dict[str, Appliance]) -> None:
    answers: dict[str, dict[str, Any]] = {name: {} for name in apis}
    for label, target, body, headers in requests():
        for name, appliance in apis.items():
            answers[name][label] = send(appliance, target, body, headers)
    reference = answers["compiled, lane"]
    assert reference["chat"][0] == 200 and reference["chat stream"][0] == 200
    assert reference["llm stream"][0] == 200 and reference["sync task"][0] == 200
    assert reference["too large"][0] == 413 and reference["bad key"][0] == 401
    assert reference["unknown model"][0] == 404 and reference["llm invalid"][0] == 400
    assert reference["failed stream"][0] == 503 and reference["task failed"][0] == 503
    assert reference["response"][0] == 200 and reference["response stream"][0] == 200
    assert reference["response stored"][0] == 400
    assert b"event: response.completed" in reference["response stream"][2]
    for name, got in answers.items():
        for label in reference:
            assert got[label] == reference[label], (name, label)
    totals = {name: counters(appliance) for name, appliance in apis.items()}
    assert any("tokens" in sample for sample in totals["compiled, lane"])
    for name, found in totals.items():
        assert found == totals["compiled, lane"], name


def test_the_fast_lane_carried_what_it_could_read(apis: dict[str, Appliance]) -> None:
    def lane(appliance: Appliance) -> float:
        text = httpx.get(
            appliance.url + "/metrics",
            headers={"authorization": f"Bearer {ADMIN_KEY}"},
            timeout=10,
        ).text
        return float(re.findall(r"^appliance_fast_lane_requests_total (\S+)", text, re.M)[0])

    assert lane(apis["compiled, no lane"]) == 0
    assert lane(apis["compiled, lane"]) > 0 and lane(apis["plain, lane"]) > 0


@pytest.mark.parametrize("stream", [True, False])
def test_a_replica_s_refusal_is_passed_on_framed_once(
    apis: dict[str, Appliance], stream: bool
) -> None:
    """The replica's status and error body, with one Content-Length: the framing is the
    api's, never a second copy of the replica's (a client such as Node's refuses two)."""
    body = chat("x", model=MODEL, stream=stream, status=400)
    for name, appliance in apis.items():
        head = "POST /v1/chat/completions HTTP/1.1\r\nHost: test\r\n"
        head += f"Authorization: Bearer {ADMIN_KEY}\r\n"
        head += f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        with socket.create_connection(("127.0.0.1", appliance.port), timeout=15) as sock:
            sock.sendall(head.encode() + body)
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        reply_head, _, reply_body = data.partition(b"\r\n\r\n")
        lines = reply_head.lower().split(b"\r\n")
        assert lines[0].startswith(b"http/1.1 400 "), (name, lines[0])
        framing = [line for line in lines if line.startswith(b"content-length:")]
        assert framing == [b"content-length: %d" % len(reply_body)], (name, lines)
        assert json.loads(reply_body)["message"] == "refused", name


@pytest.mark.parametrize("way", list(WAYS))
def test_each_way_runs_the_build_it_claims(apis: dict[str, Appliance], way: str) -> None:
    log = (apis[way].workdir / "api.log").read_text()
    assert f"api: {WAYS[way][0]} build" in log


def cut_streams() -> list[tuple[str, str, bytes, bytes]]:
    """(name, target, body, the mark of one token's event) of each stream a client leaves."""
    words = "w " * 80  # far more events than the client reads
    llm = json.dumps({"prompt": words, "max_new_tokens": 100, "temperature": 0}).encode()
    task = json.dumps({"args": {"prompt": words, "max_tokens": 100}}).encode()
    response = {"model": CUT, "input": words, "stream": True}
    return [
        ("chat", "/v1/chat/completions", chat(words, model=CUT, stream=True), b"\n\n"),
        ("completion", "/v1/completions", json.dumps(completion_of(words)).encode(), b"\n\n"),
        ("response", "/v1/responses", json.dumps(response).encode(), b"output_text.delta\n"),
        ("llm stream", f"/v1/llm/completions-stream?model_endpoint_name={CUT}", llm, b"\n\n"),
        ("stream task", f"/v1/streaming-tasks?model_endpoint_id=end_{CUT}", task, b"\n\n"),
    ]


def completion_of(prompt: str) -> dict[str, Any]:
    return {"model": CUT, "prompt": prompt, "stream": True}


def read_then_leave(appliance: Appliance, target: str, body: bytes, mark: bytes) -> None:
    """Send a stream's request, read its reply until CUT_AFTER events with `mark`, then close
    the connection."""
    head = f"POST {target} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
    head += f"Authorization: Bearer {ADMIN_KEY}\r\nContent-Length: {len(body)}\r\n\r\n"
    with socket.create_connection(("127.0.0.1", appliance.port), timeout=15) as sock:
        sock.sendall(head.encode() + body)
        data = b""
        while data.count(mark) < CUT_AFTER:
            chunk = sock.recv(65536)
            assert chunk, data
            data += chunk
        assert data.startswith(b"HTTP/1.1 200 "), data


def tokens_of(appliance: Appliance, endpoint: str) -> tuple[float, float, float]:
    """(requests its clients left, prompt tokens, completion tokens) of `endpoint`."""
    found = counters(appliance)
    left = found.get(f'appliance_requests_total{{code="499",endpoint="{endpoint}",key="admin"}}')
    kinds = [
        found.get(f'appliance_tokens_total{{endpoint="{endpoint}",key="admin",kind="{kind}"}}')
        for kind in ("prompt", "completion")
    ]
    return left or 0.0, kinds[0] or 0.0, kinds[1] or 0.0


def counted_after(appliance: Appliance, left: float, completion: float) -> tuple[float, ...]:
    """`tokens_of(appliance, CUT)` once `left` requests were left and completion tokens
    passed `completion`."""

    def counted() -> tuple[float, ...] | None:
        now = tokens_of(appliance, CUT)
        return now if now[0] == left and now[2] > completion else None

    return tuple(wait_until(counted, 10, f"{left:.0f} streams left, tokens counted"))


def test_a_stream_its_client_leaves_counts_the_tokens_it_was_sent(
    apis: dict[str, Appliance],
) -> None:
    """Each stream the client leaves after CUT_AFTER token events counts about that many
    completion tokens (one event a token: the one that was on its way as the client left may
    count too) and its prompt estimated from the request's size, the same every way; a
    stream read to its end then counts its usage chunk's figures alone."""
    prompts: dict[str, list[float]] = {name: [] for name in apis}
    for label, target, body, mark in cut_streams():
        for name, appliance in apis.items():
            left, prompt, completion = tokens_of(appliance, CUT)
            read_then_leave(appliance, target, body, mark)
            _, now_prompt, now_completion = counted_after(appliance, left + 1, completion)
            sent = now_completion - completion
            assert CUT_AFTER <= sent <= CUT_AFTER + 1, (name, label, sent)
            assert now_prompt - prompt >= len(body) // 4 - 20, (name, label, now_prompt)
            prompts[name].append(now_prompt - prompt)
    for name in apis:
        assert prompts[name] == prompts["compiled, lane"], name
    for name, appliance in apis.items():
        _, prompt, completion = tokens_of(appliance, CUT)
        body = chat("read to the end", model=CUT, stream=True)
        status, _, data, _ = send(appliance, "/v1/chat/completions", body, {
            "authorization": f"Bearer {ADMIN_KEY}"})  # fmt: skip
        assert status == 200 and data.endswith(b"data: [DONE]\n\n"), data
        left = tokens_of(appliance, CUT)[0]
        counted = counted_after(appliance, left, completion)[1:]
        assert counted == (prompt + 3, completion + 4), name


def test_a_stream_its_replica_drops_counts_the_tokens_it_sent(apis: dict[str, Appliance]) -> None:
    """A replica that dies mid-stream: the client is told in band, and the events it was sent
    count as completion tokens, the same every way."""
    body = chat("w " * 80, model=CUT, stream=True, drop_after=CUT_AFTER)
    for name, appliance in apis.items():
        _, prompt, completion = tokens_of(appliance, CUT)
        status, _, data, _ = send(appliance, "/v1/chat/completions", body, {
            "authorization": f"Bearer {ADMIN_KEY}"})  # fmt: skip
        assert status == 200 and b"the replica failed mid-reply" in data, (name, data)
        counted = tokens_of(appliance, CUT)
        assert counted[2] == completion + CUT_AFTER and counted[1] > prompt, (name, counted)
