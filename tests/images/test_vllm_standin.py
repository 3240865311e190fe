"""Tests images/vllm-standin/server.py, the vLLM stand-in, as a loopback subprocess (no Docker)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

SERVER = Path(__file__).resolve().parents[2] / "images" / "vllm-standin" / "server.py"
PROMPT = "Tell me a story about seven brave cats"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(log: Path, *args: str, delay: float = 0.2) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {"VLLM_STANDIN_STARTUP_DELAY_S": str(delay), "VLLM_STANDIN_TOKEN_DELAY_S": "0.01"}
    cmd = [sys.executable, str(SERVER), *args, "--host", "127.0.0.1", "--port", str(port)]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    return proc, f"http://127.0.0.1:{port}"


def wait_healthy(proc: subprocess.Popen[bytes], url: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "stand-in exited early"
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise AssertionError("stand-in never became healthy")


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("standin") / "server.log"
    proc, base = start(
        log,
        "org/model",
        "--served-model-name",
        "alpha",
        "beta",
        "--max-num-seqs",
        "1",
        "--enforce-eager",
        "--dtype",
        "half",
    )
    wait_healthy(proc, base)
    yield base
    stop(proc)


def metrics(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics").text
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def chat(url: str, **body: Any) -> httpx.Response:
    body = {"model": "alpha", "messages": [{"role": "user", "content": PROMPT}]} | body
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30)


def test_health_answers_only_after_startup_delay(tmp_path: Path) -> None:
    began = time.monotonic()
    proc, url = start(tmp_path / "log", "org/model", delay=1.5)
    try:
        time.sleep(0.3)
        with pytest.raises(httpx.ConnectError):  # like vLLM: not listening while loading
            httpx.get(f"{url}/health", timeout=1)
        wait_healthy(proc, url)
        assert time.monotonic() - began >= 1.5
        response = httpx.get(f"{url}/health")
        assert response.status_code == 200
        assert response.content == b""
    finally:
        stop(proc)


def test_models_lists_served_names(url: str) -> None:
    body = httpx.get(f"{url}/v1/models").json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == ["alpha", "beta"]
    assert {m["owned_by"] for m in body["data"]} == {"vllm"}


def test_model_flag_and_default_served_name(tmp_path: Path) -> None:
    proc, url = start(tmp_path / "log", "--model", "org/other")
    try:
        wait_healthy(proc, url)
        assert [m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]] == ["org/other"]
    finally:
        stop(proc)


def test_chat_completion_is_deterministic_with_usage(url: str) -> None:
    first, second = chat(url, max_tokens=5), chat(url, model="beta", max_tokens=5)
    assert first.status_code == 200
    body = first.json()
    assert body["object"] == "chat.completion"
    assert body["model"] == "alpha"
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant"
    words = choice["message"]["content"].split()
    assert len(words) == 5
    assert set(words) <= set(PROMPT.lower().split())
    assert choice["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 8, "completion_tokens": 5, "total_tokens": 13}
    assert second.json()["choices"][0]["message"]["content"] == choice["message"]["content"]


def test_chat_stream_matches_and_ends_with_done(url: str) -> None:
    expected = chat(url, max_tokens=4).json()["choices"][0]["message"]["content"]
    body = {
        "model": "alpha",
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": 4,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=30) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        data = [line[len("data: ") :] for line in r.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == expected
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["completion_tokens"] == 4


def test_completions_endpoint(url: str) -> None:
    r = httpx.post(
        f"{url}/v1/completions", json={"model": "beta", "prompt": "a b c", "max_tokens": 3}
    )
    assert r.status_code == 200
    assert r.json()["object"] == "text_completion"
    assert len(r.json()["choices"][0]["text"].split()) == 3
    assert r.json()["usage"]["total_tokens"] == 6


def test_a_prompt_or_a_token_count_vllm_refuses_is_a_400(url: str) -> None:
    """As vLLM's request model and its context check answer them: a 400, the server serving on
    (where the stand-in's handler failed and dropped the connection, or generated for hours)."""
    for prompt in (-1, True, 2**64, {}, ""):
        body = {"model": "beta", "prompt": prompt, "max_tokens": 1}
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=10)
        assert r.status_code == 400, (prompt, r.text)
    bad_part = [{"role": "user", "content": [{"type": "input_text", "text": None}]}]
    r = httpx.post(f"{url}/v1/responses", json={"model": "alpha", "input": bad_part}, timeout=10)
    assert r.status_code == 400, r.text
    r = chat(url, max_tokens=2**64)
    assert r.status_code == 400 and "maximum context length" in r.text, r.text
    body = {"model": "alpha", "input": "hi", "max_output_tokens": 10**9}
    assert httpx.post(f"{url}/v1/responses", json=body, timeout=10).status_code == 400
    assert chat(url, max_tokens=2).status_code == 200


def test_a_response_whole_and_streamed_as_vllm_sends_it(url: str) -> None:
    """vLLM's Responses API: a response with its usage by that API's names; a stream of named,
    numbered events ending in `response.completed` with the same text and usage, no [DONE]."""
    body = {
        "model": "alpha",
        "input": [{"role": "user", "content": PROMPT}],
        "max_output_tokens": 3,
    }
    whole = httpx.post(f"{url}/v1/responses", json=body, timeout=30).json()
    assert whole["object"] == "response" and whole["status"] == "incomplete", whole
    text = whole["output"][0]["content"][0]["text"]
    assert len(text.split()) == 3 and whole["usage"]["output_tokens"] == 3
    with httpx.stream("POST", f"{url}/v1/responses", json=body | {"stream": True}) as r:
        raw = r.read()
    assert b"[DONE]" not in raw
    events = [block.split(b"\n") for block in raw.split(b"\n\n") if block]
    kinds = [lines[0].removeprefix(b"event: ").decode() for lines in events]
    data = [json.loads(lines[1].removeprefix(b"data: ")) for lines in events]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed", kinds
    assert [d["sequence_number"] for d in data] == list(range(len(data)))
    deltas = "".join(d["delta"] for d in data if d["type"] == "response.output_text.delta")
    assert deltas == data[-1]["response"]["output"][0]["content"][0]["text"] == text
    assert data[-1]["response"]["usage"] == whole["usage"]


def test_unknown_model_is_404_and_bad_json_is_400(url: str) -> None:
    r = chat(url, model="nope")
    assert r.status_code == 404
    assert r.json()["error"]["type"] == "NotFoundError"
    assert "nope" in r.json()["error"]["message"]
    r = httpx.post(f"{url}/v1/chat/completions", content=b"{not json")
    assert r.status_code == 400
    assert r.json()["error"]["code"] == 400


def test_embeddings_are_deterministic_and_only_a_pooling_model_serves_them(
    url: str, tmp_path: Path
) -> None:
    """vLLM registers /v1/embeddings for a pooling model only, and chat and completions for a
    generative one only: any other route is Starlette's bare 404, as the appliance expects
    (`forwarder/unserved.py`)."""
    unregistered = {"detail": "Not Found"}
    generative = httpx.post(f"{url}/v1/embeddings", json={"model": "alpha", "input": "one"})
    assert (generative.status_code, generative.json()) == (404, unregistered)

    model = tmp_path / "bge"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"architectures": ["BertModel"]}))
    proc, base = start(tmp_path / "server.log", str(model), "--served-model-name", "bge")
    try:
        wait_healthy(proc, base)
        body = {"model": "bge", "input": ["one", "two"]}
        first = httpx.post(f"{base}/v1/embeddings", json=body).json()
        second = httpx.post(f"{base}/v1/embeddings", json=body).json()
        assert [d["index"] for d in first["data"]] == [0, 1]
        assert first["data"] == second["data"]
        assert first["data"][0]["embedding"] != first["data"][1]["embedding"]
        messages = [{"role": "user", "content": "hi"}]
        chat = httpx.post(
            f"{base}/v1/chat/completions", json={"model": "bge", "messages": messages}
        )
        assert (chat.status_code, chat.json()) == (404, unregistered)
    finally:
        stop(proc)


def test_metrics_use_vllm_names_and_count_tokens(url: str) -> None:
    before = metrics(url)
    label = '{model_name="alpha"}'
    for name in (
        "num_requests_running",
        "num_requests_waiting",
        "gpu_cache_usage_perc",
        "kv_cache_usage_perc",
        "prompt_tokens_total",
        "generation_tokens_total",
    ):
        assert f"vllm:{name}{label}" in before
    chat(url, max_tokens=7)
    after = metrics(url)
    assert (
        after[f"vllm:generation_tokens_total{label}"]
        - before[f"vllm:generation_tokens_total{label}"]
        == 7
    )
    assert (
        after[f"vllm:prompt_tokens_total{label}"] - before[f"vllm:prompt_tokens_total{label}"] == 8
    )


def test_requests_wait_beyond_max_num_seqs_and_disconnect_stops(url: str) -> None:
    running = 'vllm:num_requests_running{model_name="alpha"}'
    waiting = 'vllm:num_requests_waiting{model_name="alpha"}'
    body = {"model": "alpha", "prompt": PROMPT, "max_tokens": 100_000, "stream": True}
    queued: list[httpx.Response] = []
    with (
        httpx.Client(timeout=30) as client,
        client.stream("POST", f"{url}/v1/completions", json=body) as r,
    ):
        lines = r.iter_lines()  # keep a reference: a dropped iterator closes the connection
        next(lines)  # generating now, and holding the only slot (--max-num-seqs 1)
        t = threading.Thread(target=lambda: queued.append(chat(url, max_tokens=2)))
        t.start()
        deadline = time.monotonic() + 10
        while metrics(url)[waiting] != 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert metrics(url)[running] == 1
        assert metrics(url)[waiting] == 1
    t.join(timeout=10)  # the client went away: its slot is freed and the queued request runs
    assert queued and queued[0].status_code == 200
    deadline = time.monotonic() + 5
    while metrics(url)[running] != 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    generated = metrics(url)['vllm:generation_tokens_total{model_name="alpha"}']
    time.sleep(0.3)
    assert metrics(url)['vllm:generation_tokens_total{model_name="alpha"}'] == generated
    assert metrics(url)[waiting] == 0


def test_a_non_streaming_request_whose_client_left_is_aborted(url: str) -> None:
    """As vLLM: the client of a request still generating hangs up, and the request stops, its
    slot freed for the next, though its answer was never to be streamed."""
    running = 'vllm:num_requests_running{model_name="alpha"}'
    tokens = 'vllm:generation_tokens_total{model_name="alpha"}'
    with pytest.raises(httpx.ReadTimeout):  # leaves, closing its connection, after 0.3 s
        httpx.post(
            f"{url}/v1/chat/completions",
            json={"model": "alpha", "messages": [{"role": "user", "content": PROMPT}],
                  "max_tokens": 100_000},
            timeout=httpx.Timeout(5, read=0.3),
        )  # fmt: skip
    deadline = time.monotonic() + 5
    while metrics(url)[running] != 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert metrics(url)[running] == 0
    generated = metrics(url)[tokens]
    time.sleep(0.3)
    assert metrics(url)[tokens] == generated
    assert chat(url, max_tokens=2).status_code == 200  # the only slot is free


def test_unknown_flag_exits_2_like_vllm() -> None:
    r = subprocess.run(
        [sys.executable, str(SERVER), "m", "--no-such-flag", "1"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 2
    assert "usage: vllm serve" in r.stderr
    assert "unrecognized arguments: --no-such-flag" in r.stderr


def test_missing_model_path_exits_1(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    r = subprocess.run(
        [sys.executable, str(SERVER), "--model", str(missing)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 1
    assert str(missing) in r.stderr


@pytest.mark.parametrize("flags", [("--runner", "pooling"), ("--convert", "embed")])
def test_a_generative_model_run_for_pooling_serves_embeddings_only(
    tmp_path: Path, flags: tuple[str, str]
) -> None:
    """vLLM's --runner pooling, or --convert embed, makes a generative model an embedding one,
    as Qwen3-Embedding and the like are served."""
    model = tmp_path / "causal"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"architectures": ["Gemma3ForCausalLM"]}))
    proc, base = start(tmp_path / "server.log", str(model), "--served-model-name", "e", *flags)
    try:
        wait_healthy(proc, base)
        embedded = httpx.post(f"{base}/v1/embeddings", json={"model": "e", "input": "one"})
        assert embedded.status_code == 200 and embedded.json()["data"][0]["embedding"]
        messages = [{"role": "user", "content": "hi"}]
        chat = httpx.post(f"{base}/v1/chat/completions", json={"model": "e", "messages": messages})
        assert chat.status_code == 404
    finally:
        stop(proc)
