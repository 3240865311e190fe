"""The api's fast lane (`api/lane/front.py`) against a fake replica, no Docker:
one keep-alive connection mixing lane and uvicorn requests, pipelining, a stream passed
through unchanged, a client that leaves, a silent replica, and several api workers sharing
their in-flight counts and metrics."""

from __future__ import annotations

import http.client
import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import httpx
import pytest

from api.lane.front import parse_head
from tests.forwarder.test_async_support import (
    FakeBackend,
    seed_endpoint,
    start_api,
    stop_all,
    stream_events,
)
from tests.harness import ADMIN_KEY, BUILD, Appliance, RedisServer, wait_until

MODEL = "lane"
BUILDS = ["compiled", "plain"] if BUILD == "compiled" else ["plain"]
HEADERS = {"Authorization": f"Bearer {ADMIN_KEY}", "Content-Type": "application/json"}


@pytest.fixture
def backend() -> Iterator[FakeBackend]:
    server = FakeBackend(delay_s=0.01).start()
    yield server
    server.stop()


def run_api(
    tmp_path: Path, redis: RedisServer, backend: FakeBackend, build: str = BUILD, **env: str
) -> Appliance:
    appliance = Appliance(
        tmp_path / "appliance",
        redis,
        env_extra={"APPLIANCE_ROUTING_REFRESH_S": "0.5", **env},
        build=build,
    )
    try:
        start_api(appliance)
        seed_endpoint(appliance.data_dir, MODEL, backend.address, endpoint_type="sync")
        with appliance.client() as client:
            wait_until(
                lambda: (
                    client.post("/v1/chat/completions", content=chat("warm")).status_code == 200
                ),
                10,
                "the seeded endpoint to answer",
            )
    except BaseException:
        print(appliance.logs())
        stop_all(appliance)  # a failed start leaves no process behind
        raise
    return appliance


@pytest.fixture(params=BUILDS)
def api(
    tmp_path: Path, redis_server: RedisServer, backend: FakeBackend, request: pytest.FixtureRequest
) -> Iterator[Appliance]:
    """The api on each build the run has: the compiled one when the test run is of it (as CI's
    is), and always the plain one, which behaves the same."""
    appliance = run_api(
        tmp_path, redis_server, backend, request.param, APPLIANCE_UPSTREAM_TIMEOUT_S="1"
    )
    yield appliance
    print(appliance.logs())
    stop_all(appliance)


def chat(content: str, **extra: Any) -> bytes:
    body = {"model": MODEL, "messages": [{"role": "user", "content": content}], **extra}
    return json.dumps(body).encode()


def echo(content: str) -> str:
    """FakeBackend's answer text for a chat with one user message."""
    return "echo: " + json.dumps([{"role": "user", "content": content}])[:200]


def metric(appliance: Appliance, pattern: str) -> float:
    """The sum of the /metrics samples whose line matches `pattern` (0 when none)."""
    text = httpx.get(appliance.url + "/metrics", headers=HEADERS, timeout=10).text
    lines = [line for line in text.splitlines() if re.match(pattern, line)]
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines)


def fast_count(appliance: Appliance) -> float:
    return metric(appliance, r"appliance_fast_lane_requests_total ")


def raw_request(method: str, path: str, body: bytes = b"", extra: str = "") -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {ADMIN_KEY}\r\n"
    head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n{extra}\r\n"
    return head.encode() + body


def read_response(stream: BinaryIO) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response (Content-Length or chunked) from a buffered socket file."""
    status = int(stream.readline().split()[1])
    headers: dict[str, str] = {}
    while (line := stream.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode().partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding") == "chunked":
        body = b""
        while size := int(stream.readline().strip(), 16):
            body += stream.read(size)
            stream.readline()
        stream.readline()
        return status, headers, body
    return status, headers, stream.read(int(headers.get("content-length", "0")))


def test_the_lane_reads_only_heads_it_can_serve() -> None:
    good = raw_request("POST", "/v1/chat/completions", b"{}").replace(b"Bearer", b"bearer", 1)
    head = parse_head(good, good.find(b"\r\n\r\n"))
    assert head is not None and head.length == 2 and head.keep_alive
    assert head.authorization == f"bearer {ADMIN_KEY}"  # the key keeps its case
    queried = good.replace(
        b"/v1/chat/completions", b"/v1/llm/completions-sync?model_endpoint_name=x"
    )
    head = parse_head(queried, queried.find(b"\r\n\r\n"))
    assert head is not None and head.query == "model_endpoint_name=x"
    assert head.entry.path == "/v1/llm/completions-sync"
    refused = {
        "another route": good.replace(b"/v1/chat/completions", b"/v1/models"),
        "HTTP/1.0": good.replace(b"HTTP/1.1", b"HTTP/1.0"),
        "chunked": good.replace(b"Host: test", b"Transfer-Encoding: chunked"),
        "expect": good.replace(b"Host: test", b"Expect: 100-continue"),
        "two lengths": good.replace(b"Host: test", b"Content-Length: 9"),
        "a bad length": good.replace(b"Content-Length: 2", b"Content-Length: +2"),
        "a folded line": good.replace(b"Host: test", b"Host:\r\n test"),
        "space before colon": good.replace(b"Host: test", b"Content-Length : 2"),
        "a space in a name": good.replace(b"Host: test", b"X Y: z"),
        "a bare LF": good.replace(b"Host: test", b"Host: a\nContent-Length: 9"),
        "a bare CR": good.replace(b"Host: test", b"Host: a\rb"),
        "no colon": good.replace(b"Host: test", b"Host"),
        "a control byte in a value": good.replace(b"Host: test", b"Host: te\x1bst"),
        "DEL in a value": good.replace(b"Host: test", b"Host: te\x7fst"),
        "no headers": b"POST /v1/chat/completions HTTP/1.1\r\n\r\n{}",
        # a request line that is not one: httptools reads the first line's end as the URL's
        # and `X: HTTP/1.1` as a header, where a lane reading up to the first space took
        # `model_endpoint_name=x\r\nX:` for the query
        "a line end in the target": queried.replace(b" HTTP/1.1", b"\r\nX: HTTP/1.1", 1),
        "a control byte in the target": queried.replace(b"=x", b"=x\x01y"),
        "a tab in the target": queried.replace(b"=x", b"=x\ty"),
        "a bare CR in the target": queried.replace(b"=x", b"=x\ry"),
        "DEL in the target": queried.replace(b"=x", b"=x\x7fy"),
        "non-ASCII in the target": queried.replace(b"=x", b"=x\xffy"),
    }
    for why, head_bytes in refused.items():
        assert parse_head(head_bytes, head_bytes.find(b"\r\n\r\n")) is None, why
    for closing in (
        good.replace(b"Host: test", b"Connection: Close"),
        good.replace(b"Host: test", b"Connection: close\r\nConnection: keep-alive"),
    ):
        head = parse_head(closing, closing.find(b"\r\n\r\n"))
        assert head is not None and head.keep_alive is False, closing


def test_one_connection_carries_lane_and_general_requests(api: Appliance) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", api.port, timeout=10)
    before = fast_count(api)

    def send(method: str, path: str, body: bytes | None = None) -> tuple[int, Any]:
        conn.request(method, path, body=body, headers=HEADERS)
        reply = conn.getresponse()
        return reply.status, json.loads(reply.read())

    status, body = send("POST", "/v1/chat/completions", chat("one"))  # the lane
    assert status == 200 and body["choices"][0]["message"]["content"] == echo("one")
    status, body = send("POST", "/v1/chat/completions", chat("x", model="nope"))  # the lane
    assert status == 404 and body["error"]["param"] == "model"
    status, body = send("GET", "/v1/models")  # uvicorn
    assert status == 200 and [m["id"] for m in body["data"]] == [MODEL]
    status, body = send("POST", "/v1/chat/completions", b"{not json")  # the lane again
    assert status == 400 and body["error"]["type"] == "invalid_request_error"
    status, body = send("POST", "/v1/chat/completions", chat("two"))  # the lane
    assert status == 200 and body["choices"][0]["message"]["content"] == echo("two")
    conn.request(  # a chunked body is uvicorn's to read
        "POST", "/v1/chat/completions", body=iter([chat("three")]), headers=HEADERS
    )
    reply = conn.getresponse()
    assert reply.status == 200
    assert json.loads(reply.read())["choices"][0]["message"]["content"] == echo("three")
    conn.close()
    # every POST it could read, also after the connection came back from uvicorn
    assert fast_count(api) - before == 4


def test_a_key_sent_twice_is_refused_on_every_path(api: Appliance, backend: FakeBackend) -> None:
    """Two Authorization (or two X-Api-Key) headers are a 400 that says to send the key once,
    on the lane, on uvicorn's inference path (chunked, so not the lane's) and on a management
    route alike, whichever comes first: a proxy in front could check one and the appliance use
    the other, and the key gate and a route read different ones."""
    bogus = "Authorization: Bearer mea_000000000000_bogus\r\n"
    again = f"Authorization: Bearer {ADMIN_KEY}\r\n"
    keys = f"X-Api-Key: {ADMIN_KEY}\r\nX-Api-Key: mea_000000000000_bogus\r\n"
    before = fast_count(api)
    answers = []
    with socket.create_connection(("127.0.0.1", api.port), timeout=10) as sock:
        stream = sock.makefile("rb")
        for extra in (bogus, again, keys):
            for request in (
                raw_request("POST", "/v1/chat/completions", chat("twice"), extra),
                raw_request("GET", "/v1/llm/model-endpoints", b"", extra),
            ):
                sock.sendall(request)
                answers.append(read_response(stream))
        body = chat("chunked")
        chunked = raw_request("POST", "/v1/chat/completions", b"", bogus).replace(
            b"Content-Length: 0\r\n", b"Transfer-Encoding: chunked\r\n"
        )
        sock.sendall(chunked + b"%x\r\n%b\r\n0\r\n\r\n" % (len(body), body))
        answers.append(read_response(stream))
        sock.sendall(raw_request("POST", "/v1/chat/completions", chat("once")))
        status, _, reply = read_response(stream)
    assert status == 200 and json.loads(reply)["choices"][0]["message"]["content"] == echo("once")
    for status, _, reply in answers:
        assert status == 400, reply
        assert "send the API key once" in reply.decode(), reply
    assert fast_count(api) - before == 1  # only the request with one key
    assert not any("twice" in str(body) or "chunked" in str(body) for body in backend.bodies)


def test_the_lane_reads_keys_and_fields_as_uvicorn_does(api: Appliance) -> None:
    """A request is answered the same on the lane and on uvicorn's path (a chunked body, which
    the lane leaves to uvicorn): `Bearer ` followed by nothing but a byte Python counts as
    whitespace (a no-break space, NEL) names no key there, so X-Api-Key's counts (the lane
    read an empty key: 401); a control byte in any header value is uvicorn's 400 (the lane
    served the request)."""
    body = chat("same")
    key = b"X-Api-Key: " + ADMIN_KEY.encode() + b"\r\n"
    cases = {
        "no-break space": b"Authorization: Bearer \xa0\r\n" + key,
        "NEL": b"Authorization: Bearer \x85\r\n" + key,
        "a control byte": b"X-Note: a\x01b\r\n" + key,
        "DEL": b"X-Note: a\x7fb\r\n" + key,
    }
    for why, fields in cases.items():
        head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: test\r\n" + fields
        answers = []
        for framing in (
            b"Content-Length: %d\r\n\r\n%b" % (len(body), body),
            b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%b\r\n0\r\n\r\n" % (len(body), body),
        ):
            with socket.create_connection(("127.0.0.1", api.port), timeout=10) as sock:
                sock.sendall(head + framing)
                status, _, reply = read_response(sock.makefile("rb"))
                answers.append((status, reply.replace(b"chatcmpl", b"").split(b'"id"')[0]))
        assert answers[0][0] == answers[1][0], (why, answers)
        expected = 400 if why in ("a control byte", "DEL") else 200
        assert answers[0][0] == expected, (why, answers)


def test_pipelined_requests_are_answered_in_order(api: Appliance) -> None:
    with socket.create_connection(("127.0.0.1", api.port), timeout=10) as sock:
        sock.sendall(
            raw_request("POST", "/v1/chat/completions", chat("first"))
            + raw_request("GET", "/healthz")
            + raw_request("POST", "/v1/chat/completions", chat("second"))
            + raw_request("POST", "/v1/chat/completions", chat("last"), "Connection: close\r\n")
        )
        stream = sock.makefile("rb")
        answers = [read_response(stream) for _ in range(4)]
        assert stream.read() == b""  # closed after the request that asked for it
    assert [status for status, _, _ in answers] == [200, 200, 200, 200]
    texts = [json.loads(body)["choices"][0]["message"]["content"] for _, _, body in answers[::2]]
    assert texts == [echo("first"), echo("second")]
    assert json.loads(answers[3][2])["choices"][0]["message"]["content"] == echo("last")
    assert answers[3][1].get("connection") == "close"


def test_a_body_still_to_come_is_held_only_for_a_key_found_valid(api: Appliance) -> None:
    """Without a valid key no one makes the api hold a body: the 401 comes while most of a
    declared 8 MiB is still unsent. A key found valid before is carried on the lane as ever,
    also once its cached entry has expired."""
    declared = f"Content-Length: {8 * 2**20}".encode()
    made_up = raw_request("POST", "/v1/chat/completions").replace(ADMIN_KEY.encode(), b"sk-nope")
    with socket.create_connection(("127.0.0.1", api.port), timeout=10) as sock:
        sock.sendall(made_up.replace(b"Content-Length: 0", declared) + b'{"model": "')
        status, _, body = read_response(sock.makefile("rb"))
    assert status == 401, body
    assert json.loads(body)["error"]["type"] == "authentication_error"

    warm = httpx.post(api.url + "/v1/chat/completions", content=chat("warm"), headers=HEADERS)
    assert warm.status_code == 200, warm.text
    time.sleep(1.2)  # the key's cached entry has expired
    before = fast_count(api)
    whole = raw_request("POST", "/v1/chat/completions", chat("in two parts"))
    with socket.create_connection(("127.0.0.1", api.port), timeout=10) as sock:
        sock.sendall(whole[:-10])
        time.sleep(0.2)
        sock.sendall(whole[-10:])
        status, _, body = read_response(sock.makefile("rb"))
    assert status == 200 and json.loads(body)["choices"][0]["message"]["content"] == echo(
        "in two parts"
    )
    assert fast_count(api) - before == 1


def test_a_stream_passes_the_lane_unchanged_and_is_counted(api: Appliance) -> None:
    before_fast = fast_count(api)
    before_tokens = metric(api, r'appliance_tokens_total\{.*kind="completion"')
    with socket.create_connection(("127.0.0.1", api.port), timeout=10) as sock:
        sock.sendall(raw_request("POST", "/v1/chat/completions", chat("a b c", stream=True)))
        status, headers, body = read_response(sock.makefile("rb"))
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    # the appliance asked the replica for the usage (so the tokens are counted) and took the
    # usage chunk out: the client did not ask for it
    assert body == b"".join(stream_events(echo("a b c"), usage=False))
    assert "x-appliance-overhead-ms" in headers
    assert fast_count(api) - before_fast == 1
    tokens = metric(api, r'appliance_tokens_total\{.*kind="completion"')
    assert tokens - before_tokens == 4


def test_a_key_back_from_idle_stays_on_the_lane_until_it_is_revoked(api: Appliance) -> None:
    made = api.client().post("/v1/api-keys", json={"name": "idle", "team": "admin", "user": "ann"})
    assert made.status_code == 201, made.text
    headers = {**HEADERS, "Authorization": f"Bearer {made.json()['key']}"}
    with httpx.Client(base_url=api.url, headers=headers, timeout=10) as user:
        assert user.post("/v1/chat/completions", content=chat("first")).status_code == 200
        before = fast_count(api)
        time.sleep(1.2)  # the key's cached entry has expired: the next request verifies it
        burst = [user.post("/v1/chat/completions", content=chat(str(i))) for i in range(3)]
        assert [reply.status_code for reply in burst] == [200] * 3
        assert fast_count(api) - before == 3  # none of them left the lane to verify the key

        assert api.client().delete(f"/v1/api-keys/{made.json()['id']}").status_code == 200
        revoked_at = time.monotonic()
        wait_until(
            lambda: user.post("/v1/chat/completions", content=chat("x")).status_code == 401,
            1.5,
            "the revoked key to be refused on the inference path",
            every_s=0.05,
        )
        assert time.monotonic() - revoked_at <= 1.5
        time.sleep(1.2)  # and once its entry expires, it is not served from what was cached
        refused = user.post("/v1/chat/completions", content=chat("y"))
        assert refused.status_code == 401 and "revoked" in refused.text


@pytest.mark.parametrize("ended_by", ["revoked", "expired"])
def test_a_key_refused_says_why_on_every_request(api: Appliance, ended_by: str) -> None:
    """A revoked or expired key is told so on each request, on the lane and off it, not
    "invalid API key" whenever its refusal came from the cache."""
    body: dict[str, Any] = {"name": "ends", "team": "admin", "user": "ann"}
    if ended_by == "expired":
        body["expires_in_seconds"] = 1
    made = api.client().post("/v1/api-keys", json=body)
    assert made.status_code == 201, made.text
    headers = {**HEADERS, "Authorization": f"Bearer {made.json()['key']}"}
    why = "this API key was revoked" if ended_by == "revoked" else "this API key has expired"
    with httpx.Client(base_url=api.url, headers=headers, timeout=10) as user:
        assert user.post("/v1/chat/completions", content=chat("first")).status_code == 200
        if ended_by == "revoked":
            assert api.client().delete(f"/v1/api-keys/{made.json()['id']}").status_code == 200
        wait_until(
            lambda: user.post("/v1/chat/completions", content=chat("x")).status_code == 401,
            3,
            f"the {ended_by} key to be refused",
            every_s=0.05,
        )
        for _ in range(6):
            for reply in (
                user.post("/v1/chat/completions", content=chat("y")),
                user.get("/v1/files"),
            ):
                assert reply.status_code == 401, reply.text
                assert why in reply.text, reply.text
            time.sleep(0.3)


@pytest.mark.parametrize("method", ["GET /healthz", "POST /v1/chat/completions"])
def test_a_head_with_bare_line_feeds_is_answered_at_once(api: Appliance, method: str) -> None:
    """Lines ended by LF alone, not CRLF: uvicorn's parser refuses such a head with a 400; the
    lane, which never found the end of it, held it unanswered until the header timeout."""
    head = raw_request(*method.split(), chat("x")).replace(b"\r\n", b"\n")
    began = time.monotonic()
    with socket.create_connection(("127.0.0.1", api.port), timeout=15) as sock:
        sock.sendall(head)
        status, _, _ = read_response(sock.makefile("rb"))
    assert status == 400
    assert time.monotonic() - began < 3


def test_a_client_that_leaves_frees_its_replica(api: Appliance) -> None:
    before = metric(api, r'appliance_requests_total\{code="499"')
    with socket.create_connection(("127.0.0.1", api.port), timeout=10) as sock:
        sock.sendall(raw_request("POST", "/v1/chat/completions", chat("bye", delay_s=0.8)))
        time.sleep(0.3)
    wait_until(
        lambda: metric(api, r'appliance_requests_total\{code="499"') == before + 1,
        5,
        "the abandoned request to be counted as 499",
    )
    assert metric(api, r"appliance_inflight_requests\{") == 0


def test_a_silent_replica_ends_in_504(api: Appliance) -> None:
    before = fast_count(api)
    timed_out = metric(api, r'appliance_requests_total\{code="504"')
    with socket.create_connection(("127.0.0.1", api.port), timeout=10) as sock:
        sock.sendall(raw_request("POST", "/v1/chat/completions", chat("slow", delay_s=3)))
        status, _, body = read_response(sock.makefile("rb"))
    assert status == 504, body  # before the reply the replica sends after 3 s
    assert "did not answer in time" in json.loads(body)["error"]["message"]
    assert fast_count(api) - before == 1
    # counted once (metrics, and so usage), where the relay and the call each counted it
    wait_until(
        lambda: metric(api, r'appliance_requests_total\{code="504"') > timed_out,
        5,
        "the 504 in the metrics",
    )
    time.sleep(1.5)  # a second count would be there by now
    assert metric(api, r'appliance_requests_total\{code="504"') == timed_out + 1
    # the operator reads which endpoint and replica failed, and why, in the api's log
    logged = r"endpoint \S+, replica \S+: 504, .*did not answer in time"
    wait_until(lambda: re.search(logged, api.logs()), 5, "the failure in the api's log")


def test_an_idle_connection_is_closed_after_the_keep_alive_timeout(api: Appliance) -> None:
    with socket.create_connection(("127.0.0.1", api.port), timeout=20) as sock:
        stream = sock.makefile("rb")
        for content in ("one", "two"):  # a lane request, then one more on the same connection
            sock.sendall(raw_request("POST", "/v1/chat/completions", chat(content)))
            status, _, _ = read_response(stream)
            assert status == 200
        assert stream.read() == b""  # uvicorn's 5 s keep-alive timeout: the api hangs up


def test_several_workers_share_counts_and_metrics(
    tmp_path: Path, redis_server: RedisServer, backend: FakeBackend
) -> None:
    appliance = run_api(
        tmp_path,
        redis_server,
        backend,
        APPLIANCE_API_WORKERS="2",
        APPLIANCE_REPLICA_MAX_CONCURRENCY="3",
        APPLIANCE_QUEUE_WAIT_S="20",
    )
    try:
        time.sleep(1.5)  # every worker has published its warm-up requests
        base = metric(appliance, r'appliance_requests_total\{code="200"')
        statuses: list[int] = []

        def one(i: int) -> None:  # each on its own connection, so both workers take some
            with httpx.Client(base_url=appliance.url, headers=HEADERS, timeout=60) as client:
                reply = client.post("/v1/chat/completions", content=chat(f"{i}", delay_s=0.3))
                statuses.append(reply.status_code)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert statuses == [200] * 16
        assert backend.most_busy <= 3  # the replica's cap held across both workers
        wait_until(  # /metrics adds the other worker's counters, published every second
            lambda: metric(appliance, r'appliance_requests_total\{code="200"') == base + 16,
            5,
            "/metrics to count every worker's requests",
        )
    finally:
        print(appliance.logs())
        stop_all(appliance)
