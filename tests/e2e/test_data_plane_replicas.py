"""The data plane over several replicas of the vLLM stand-in (real containers on faked GPUs: the
stand-in's knobs make slow, cold and dying replicas on demand): load
spread by outstanding requests, a replica killed mid-run, client disconnects reaching the
replica, the body limit, upstream timeouts and cold starts. One appliance for the module."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from tests.e2e.lifecycle import ON_FAKE_GPUS
from tests.harness import ADMIN_KEY, Appliance, wait_until

AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}
BODY_LIMIT = 64 * 1024
TIMEOUT_S = 3


def standin(name: str, workers: int = 1, **env: str) -> dict[str, Any]:
    return {
        "name": name,
        "model_name": "acme/standin-1b",
        "inference_framework": "vllm",
        "gpus": 1,
        "min_workers": workers,
        "max_workers": workers,
        "per_worker": 8,
        "labels": {},
        "metadata": {},
        "env": env,
    }


def create(client: httpx.Client, body: dict[str, Any]) -> str:
    reply = client.post("/v1/llm/model-endpoints", json=body)
    assert reply.status_code == 200, reply.text
    return str(reply.json()["endpoint_creation_task_id"])


def wait_ready(client: httpx.Client, name: str, timeout_s: float = 90) -> None:
    wait_until(
        lambda: client.get(f"/v1/llm/model-endpoints/{name}").json()["status"] == "READY",
        timeout_s,
        f"{name} to be READY",
    )


@pytest.fixture(scope="module")
def appl(make_module_appliance: Callable[..., Appliance]) -> Appliance:
    appliance = make_module_appliance(
        **ON_FAKE_GPUS,
        APPLIANCE_MAX_BODY_BYTES=str(BODY_LIMIT),
        APPLIANCE_UPSTREAM_TIMEOUT_S=str(TIMEOUT_S),
        APPLIANCE_STREAM_KEEPALIVE_S="0.5",
    )
    client = appliance.client()
    create(client, standin("pair", workers=2, VLLM_STANDIN_TOKEN_DELAY_S="0.02"))
    create(client, standin("slow", VLLM_STANDIN_TOKEN_DELAY_S="5"))
    wait_ready(client, "pair")
    wait_ready(client, "slow")
    return appliance


def containers_of(appliance: Appliance, name: str) -> list[str]:
    endpoint_id = appliance.client().get(f"/v1/llm/model-endpoints/{name}").json()["id"]
    return appliance.containers("status=running", f"label=appliance.endpoint={endpoint_id}")


def replica_url(container: str) -> str:
    out = subprocess.run(["docker", "port", container], capture_output=True, text=True).stdout
    port = re.search(r"127\.0\.0\.1:(\d+)", out)
    assert port, out
    return f"http://127.0.0.1:{port.group(1)}"


def running_on(url: str) -> float:
    """The replica's own count of running requests; -1 while it is not answering yet (a
    replica that replaced a killed one may still be starting)."""
    try:
        text = httpx.get(url + "/metrics", timeout=5).text
    except httpx.HTTPError:
        return -1
    found = re.search(r"^vllm:num_requests_running\{[^}]*\} ([\d.]+)$", text, re.M)
    assert found, text
    return float(found.group(1))


def chat(model: str, tokens: int, stream: bool = False) -> dict[str, Any]:
    return {
        "model": model,
        "max_tokens": tokens,
        "stream": stream,
        "messages": [{"role": "user", "content": "tell me a long story about cats"}],
    }


def inflight_by_replica(appliance: Appliance, endpoint: str) -> dict[str, float]:
    text = appliance.client().get("/metrics").text
    pattern = rf'^appliance_inflight_requests\{{endpoint="{endpoint}",replica="([^"]+)"\}} (\S+)$'
    return {rid: float(n) for rid, n in re.findall(pattern, text, re.M)}


def test_load_spreads_by_outstanding_requests(appl: Appliance) -> None:
    urls = [replica_url(c) for c in containers_of(appl, "pair")]  # before the load: docker is slow

    def one(_: int) -> int:
        with httpx.stream(
            "POST",
            appl.url + "/v1/chat/completions",
            headers=AUTH,
            json=chat("pair", 400, stream=True),  # 8 s a stream: still running when counted
            timeout=60,
        ) as reply:
            for _ in reply.iter_bytes():
                pass
            return reply.status_code

    with ThreadPoolExecutor(8) as pool:
        results = pool.map(one, range(8))
        seen = wait_until(
            lambda: (c := inflight_by_replica(appl, "pair")) and sum(c.values()) == 8 and c,
            10,
            "8 streams in flight",
        )
        assert sorted(seen.values()) == [4.0, 4.0], seen
        # and the replicas' own counts (the api counts a request once it is sent; a busy box
        # may take a moment to deliver it)
        wait_until(
            lambda: sorted(running_on(u) for u in urls) == [4.0, 4.0], 5, "4 running on each"
        )
        assert list(results) == [200] * 8


def test_a_replica_killed_mid_run_loses_no_request(appl: Appliance) -> None:
    client = appl.client()
    victim = containers_of(appl, "pair")[0]
    statuses: list[int] = []

    def one(i: int) -> int:
        reply = httpx.post(
            appl.url + "/v1/chat/completions", headers=AUTH, json=chat("pair", 10), timeout=60
        )
        return reply.status_code

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(one, i) for i in range(40)]
        time.sleep(0.5)
        subprocess.run(["docker", "kill", victim], check=True, capture_output=True)
        statuses = [f.result() for f in futures]
    assert statuses == [200] * 40, statuses
    retries = client.get("/metrics").text
    assert 'appliance_upstream_retries_total{endpoint="pair"}' in retries
    # the builder replaces the replica; later tests want two again
    wait_until(lambda: len(containers_of(appl, "pair")) == 2, 60, "a replacement replica")
    wait_ready(client, "pair")
    wait_until(lambda: len(inflight_by_replica(appl, "pair")) == 0, 10, "no requests in flight")


def test_requests_on_an_endpoints_last_replica_wait_for_the_next_when_it_dies(
    appl: Appliance,
) -> None:
    """The requests a replica had not begun to answer when it went away (killed; or stopped by
    a roll, a restart or a scale-down before the api's routes said so) were 503 "no replica is
    ready" within 50 ms when it was the endpoint's last: they are held for its replacement, as
    at a cold start, and answered."""
    client = appl.client()
    create(client, standin("lone", VLLM_STANDIN_TOKEN_DELAY_S="0.02"))
    wait_ready(client, "lone")
    victim = containers_of(appl, "lone")[0]

    def one(i: int) -> tuple[int, str]:
        reply = httpx.post(
            appl.url + "/v1/chat/completions", headers=AUTH, json=chat("lone", 50), timeout=90
        )
        return reply.status_code, reply.text[:200]

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(one, i) for i in range(12)]
        time.sleep(0.5)  # 4 in flight, 1 s each
        subprocess.run(["docker", "kill", victim], check=True, capture_output=True)
        replies = [f.result() for f in futures]
    assert [status for status, _ in replies] == [200] * 12, replies
    client.delete("/v1/llm/model-endpoints/lone")


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "whole"])
def test_client_disconnect_cancels_the_replica_request(appl: Appliance, stream: bool) -> None:
    """A client that leaves, mid-stream or waiting for a whole answer, has the replica stop
    generating for it (the replica aborts a request whose connection closed, as vLLM does)."""
    wait_until(lambda: len(containers_of(appl, "pair")) == 2, 60, "two replicas")
    urls = [replica_url(c) for c in containers_of(appl, "pair")]
    wait_until(lambda: all(running_on(u) == 0 for u in urls), 60, "idle, answering replicas")
    stop = threading.Event()

    def abandon() -> None:
        if not stream:  # waits for the whole answer until told to leave, then hangs up
            body = json.dumps(chat("pair", 2000)).encode()
            head = (
                f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                f"Authorization: {AUTH['Authorization']}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n"
            )
            address = httpx.URL(appl.url)
            with socket.create_connection((address.host, address.port), timeout=30) as sock:
                sock.sendall(head.encode() + body)
                stop.wait(30)
            return
        with httpx.stream(
            "POST",
            appl.url + "/v1/chat/completions",
            headers=AUTH,
            json=chat("pair", 2000, stream=True),
            timeout=60,
        ) as reply:
            for _ in reply.iter_bytes():
                if stop.is_set():
                    return  # closes the connection mid-stream

    thread = threading.Thread(target=abandon)
    thread.start()
    wait_until(lambda: sum(running_on(u) for u in urls) == 1, 10, "the request to run")
    stop.set()
    thread.join(10)
    wait_until(lambda: sum(running_on(u) for u in urls) == 0, 10, "the replica to stop it")


def tokens_of(appliance: Appliance, endpoint: str) -> tuple[float, float]:
    """The (prompt, completion) tokens /metrics counts for `endpoint`, every key's."""
    text = appliance.client().get("/metrics").text
    pattern = rf'^appliance_tokens_total\{{endpoint="{endpoint}",key="[^"]*",kind="(\w+)"\}} (\S+)$'
    found = {"prompt": 0.0, "completion": 0.0}
    for kind, value in re.findall(pattern, text, re.M):
        found[kind] += float(value)
    return found["prompt"], found["completion"]


def tokens_past(appliance: Appliance, endpoint: str, completion: float) -> tuple[float, float]:
    """`tokens_of` once the completion tokens passed `completion`."""

    def past() -> tuple[float, float] | None:
        now = tokens_of(appliance, endpoint)
        return now if now[1] > completion else None

    found: tuple[float, float] = wait_until(past, 10, "the tokens counted")
    return found


def test_a_stream_its_client_leaves_counts_the_tokens_it_was_sent(appl: Appliance) -> None:
    """The stand-in sends one token an event, its usage only at the end: a client that reads
    a few events of a long stream and leaves is counted about those as completion tokens and
    its prompt estimated (the counts usage is made of); a stream read to its end counts its
    usage chunk's figures alone."""
    read = 6
    prompt, completion = tokens_of(appl, "pair")
    body = json.dumps(chat("pair", 2000, stream=True)).encode()
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
        f"Authorization: {AUTH['Authorization']}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    address = httpx.URL(appl.url)
    with socket.create_connection((address.host, address.port), timeout=30) as sock:
        sock.sendall(head.encode() + body)
        data = b""
        while data.count(b"\n\n") < read:
            chunk = sock.recv(65536)
            assert chunk, data
            data += chunk
    left = tokens_past(appl, "pair", completion)
    assert read <= left[1] - completion <= read + 10, left  # the client left a 2000-token stream
    assert left[0] - prompt >= len(body) // 4, left  # estimated from the request's size

    with httpx.stream(
        "POST", appl.url + "/v1/chat/completions", headers=AUTH, json=chat("pair", 5, stream=True)
    ) as reply:
        assert reply.status_code == 200
        assert "".join(reply.iter_text()).endswith("data: [DONE]\n\n")
    whole = tokens_past(appl, "pair", left[1])
    assert whole == (left[0] + 7, left[1] + 5)  # 7 words of prompt, 5 tokens asked for


def test_body_over_the_limit_is_413(appl: Appliance) -> None:
    big = chat("pair", 4) | {"padding": "x" * (BODY_LIMIT + 1)}
    reply = httpx.post(appl.url + "/v1/chat/completions", headers=AUTH, json=big, timeout=30)
    assert reply.status_code == 413
    assert reply.json()["error"]["code"] == 413
    sync = httpx.post(
        appl.url + "/v1/llm/completions-sync?model_endpoint_name=pair",
        headers=AUTH,
        json={"prompt": "x" * (BODY_LIMIT + 1), "max_new_tokens": 2, "temperature": 0},
        timeout=30,
    )
    assert sync.status_code == 413 and "detail" in sync.json()


def test_a_silent_replica_times_out_with_504(appl: Appliance) -> None:
    started = time.monotonic()
    reply = httpx.post(
        appl.url + "/v1/chat/completions", headers=AUTH, json=chat("slow", 4), timeout=60
    )
    assert reply.status_code == 504, reply.text
    assert reply.json()["error"]["type"] == "server_error"
    assert TIMEOUT_S <= time.monotonic() - started < TIMEOUT_S + 5


def test_cold_endpoint_answers_once_its_replica_is_up(appl: Appliance) -> None:
    client = appl.client()
    create(client, standin("cold", VLLM_STANDIN_STARTUP_DELAY_S="3"))
    started = time.monotonic()
    reply = httpx.post(
        appl.url + "/v1/chat/completions", headers=AUTH, json=chat("cold", 4), timeout=120
    )
    assert reply.status_code == 200, reply.text
    assert float(reply.headers["x-appliance-wait-ms"]) > 1000
    assert time.monotonic() - started < 120

    create(client, standin("cold-stream", VLLM_STANDIN_STARTUP_DELAY_S="3"))

    with httpx.stream(
        "POST",
        appl.url + "/v1/chat/completions",
        headers=AUTH,
        json=chat("cold-stream", 4, stream=True),
        timeout=120,
    ) as stream:
        assert stream.status_code == 200
        body = b"".join(stream.iter_bytes())
    assert body.startswith(b": keep-alive\n\n")
    events = [e for e in body.split(b"\n\n") if e.startswith(b"data: ")]
    assert events[-1] == b"data: [DONE]"
    assert all("error" not in json.loads(e[6:]) for e in events[:-1])


def test_llm_engine_task_routes_wrap_results(appl: Appliance) -> None:
    endpoint_id = appl.client().get("/v1/llm/model-endpoints/pair").json()["id"]
    sync = httpx.post(
        appl.url + f"/v1/sync-tasks?model_endpoint_id={endpoint_id}",
        headers=AUTH,
        json={"args": {"prompt": "hello there", "max_tokens": 3}},
        timeout=60,
    )
    assert sync.status_code == 200, sync.text
    got = sync.json()
    assert got["status"] == "SUCCESS" and got["status_code"] == 200
    assert json.loads(got["result"]["result"])["usage"]["completion_tokens"] == 3

    with httpx.stream(
        "POST",
        appl.url + f"/v1/streaming-tasks?model_endpoint_id={endpoint_id}",
        headers=AUTH,
        json={"args": {"prompt": "hello there", "max_tokens": 3}},
        timeout=60,
    ) as stream:
        lines = [x for x in stream.iter_lines() if x.startswith("data:")]
    events = [json.loads(x[5:]) for x in lines]
    assert events and all(e["status"] == "SUCCESS" for e in events)
    assert all(isinstance(e["result"]["result"], dict) for e in events)  # no [DONE] passed on
