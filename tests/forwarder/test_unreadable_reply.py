"""A replica's 200 reply the appliance has to reshape but cannot (a value nested deeper than
JSON is read or written here: orjson writes 254 levels and reads 1,024, the standard library
about 1,000) is answered: a 502 in the route's envelope, or an error event once its stream
began, that says the replica's reply could not be read; never a hang or a connection cut
without a reply, and the endpoint's next request is served. Through a real api process, real
Redis and SQLite, in front of a fake replica (no real server sends such JSON)."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

from tests.forwarder.test_async_support import seed_endpoint, start_api, stop_all
from tests.harness import ADMIN_KEY, Appliance, RedisServer, free_port

AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}
ANSWER_S = 15.0  # the client's read timeout: a hang fails the test, well before the api's own
DEEP = "__deep__"
UNREADABLE = "sent a reply that could not be read"


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def encoded(value: dict[str, Any], depth: int) -> bytes:
    """`value` as JSON, its `extra` field (if any) a list nested `depth` deep."""
    text = json.dumps(value)
    return text.replace(json.dumps(DEEP), nested(depth)).encode()


def depths(text: str) -> tuple[int, int]:
    """What the request asks the fake for: `deep N` (an event, or the whole reply, nested N
    deep) and `last N` (the stream's finishing chunk so): 0 when absent."""
    found = [re.search(rf"{word} (\d+)", text) for word in ("deep", "last")]
    first, last = (int(m.group(1)) if m else 0 for m in found)
    return first, last


def completion(text: str, finish: str | None, extra: bool, usage: bool = False) -> dict[str, Any]:
    chunk: dict[str, Any] = {
        "id": "chatcmpl-1",
        "object": "text_completion",
        "created": 1,
        "model": "m",
        "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}],
    }
    if usage:
        chunk["usage"] = {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}
    if extra:
        chunk["extra"] = DEEP
    return chunk


def response(extra: bool) -> dict[str, Any]:
    message = {
        "type": "message",
        "id": "msg_1",
        "status": "completed",
        "role": "assistant",
        "content": [{"type": "output_text", "text": "hi", "annotations": []}],
    }
    reply: dict[str, Any] = {
        "id": "resp_1",
        "object": "response",
        "created_at": 1,
        "status": "completed",
        "model": "m",
        "output": [message],
        "usage": {"input_tokens": 1, "output_tokens": 1, "total_tokens": 2},
    }
    if extra:
        reply["extra"] = DEEP
    return reply


def completion_events(deep: int, last: int) -> list[bytes]:
    events = [encoded(completion("a", None, False), 0)]
    events.append(encoded(completion("b", None, deep > 0), deep))
    events.append(encoded(completion("", "stop", last > 0, usage=True), last))
    return [b"data: " + e + b"\n\n" for e in events] + [b"data: [DONE]\n\n"]


def response_events(deep: int) -> list[bytes]:
    delta = {"type": "response.output_text.delta", "item_id": "msg_1", "delta": "hi"}
    if deep:
        delta["extra"] = DEEP
    events = [
        ("response.created", {"type": "response.created", "response": response(False)}),
        ("response.output_text.delta", delta),
        ("response.completed", {"type": "response.completed", "response": response(False)}),
    ]
    return [b"event: %b\ndata: %b\n\n" % (k.encode(), encoded(v, deep)) for k, v in events]


class Handler(BaseHTTPRequestHandler):
    """llama.cpp's (and vLLM's) completions and responses, whole or streamed (chunked, or
    with a Content-Length when the prompt says `framed`), with a value nested as deep as the
    request's prompt says (`depths`)."""

    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self._send(b"ok", "text/plain")

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers.get("content-length") or 0)))
        deep, last = depths(json.dumps(body.get("prompt", body.get("input"))))
        responses = self.path == "/v1/responses"
        if not body.get("stream"):
            whole = response(deep > 0) if responses else completion("hi", "stop", deep > 0, True)
            self._send(encoded(whole, deep), "application/json")
            return
        events = response_events(deep) if responses else completion_events(deep, last)
        if "framed" in json.dumps(body):  # a stream with a Content-Length, as a proxy may send
            self._send(b"".join(events), "text/event-stream")
            return
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        for event in events:
            self.wfile.write(b"%x\r\n%b\r\n" % (len(event), event))
            self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")

    def _send(self, body: bytes, kind: str) -> None:
        self.send_response(200)
        self.send_header("content-type", kind)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Appliance]:
    base = tmp_path_factory.mktemp("unreadable")
    replica = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
    threading.Thread(target=replica.serve_forever, daemon=True).start()
    address = f"http://127.0.0.1:{replica.server_address[1]}"
    redis = RedisServer(base / "redis").start()
    appliance = Appliance(
        base / "appliance", redis, env_extra={"APPLIANCE_ROUTING_REFRESH_S": "0.5"}
    )
    try:
        start_api(appliance)
        seed_endpoint(appliance.data_dir, "llama", address, framework="llamacpp")
        seed_endpoint(appliance.data_dir, "vllm", address)
        yield appliance
    finally:
        print(appliance.logs())
        stop_all(appliance)
        redis.stop()
        replica.shutdown()


def send(api: Appliance, path: str, model: str, prompt: str, stream: bool) -> httpx.Response:
    if path.startswith("/v1/llm/"):
        params = {"model_endpoint_name": model}
        body: dict[str, Any] = {"prompt": prompt, "max_new_tokens": 4, "temperature": 0}
        path += "-stream" if stream else "-sync"
    else:
        params = {}
        field = "input" if path == "/v1/responses" else "prompt"
        body = {"model": model, field: prompt, "max_tokens": 4, "stream": stream}
        if path == "/v1/responses":
            body["max_output_tokens"] = body.pop("max_tokens")
    return httpx.post(api.url + path, params=params, json=body, headers=AUTH, timeout=ANSWER_S)


def error_message(reply: httpx.Response, path: str) -> str:
    """The message of the error the client got: a 502's, or a stream's last event's."""
    if reply.headers["content-type"].startswith("text/event-stream"):
        assert reply.status_code == 200, reply.text
        events = re.findall(r"^data: (.*)$", reply.text, re.MULTILINE)
        assert events, reply.text  # what came before the unreadable event (if any), then it
        last = json.loads(events[-1])
        if path.startswith("/v1/llm/"):
            assert last["output"] is None and last["error"]["status_code"] == 502, last
            return str(last["error"]["content"]["error"])
        return str(last["error"]["message"])
    assert reply.status_code == 502, reply.text
    body = reply.json()
    return str(body["detail"] if path.startswith("/v1/llm/") else body["error"]["message"])


CASES = [
    # path, endpoint, stream, prompt
    ("/v1/completions", "llama", False, "deep 300"),
    ("/v1/completions", "llama", True, "deep 300"),
    ("/v1/completions", "llama", True, "last 300"),  # the finishing chunk, held to the end
    ("/v1/responses", "llama", False, "deep 300"),
    ("/v1/responses", "llama", True, "deep 300"),
    ("/v1/llm/completions", "llama", False, "deep 300"),
    ("/v1/llm/completions", "llama", True, "deep 300"),
    ("/v1/llm/completions", "llama", False, "deep 1100"),
    ("/v1/llm/completions", "vllm", False, "deep 1100"),
    ("/v1/llm/completions", "vllm", True, "deep 1100"),
    ("/v1/llm/completions", "vllm", True, "deep 1100 framed"),
    ("/v1/completions", "llama", True, "deep 300 framed"),
]


@pytest.mark.parametrize(("path", "model", "stream", "prompt"), CASES)
def test_a_reply_that_cannot_be_reshaped_is_answered_as_the_replicas_fault(
    api: Appliance, path: str, model: str, stream: bool, prompt: str
) -> None:
    reply = send(api, path, model, prompt, stream)
    message = error_message(reply, path)
    assert UNREADABLE in message and repr(model) in message, message
    again = send(api, path, model, "hi", stream)
    assert again.status_code == 200, again.text
    assert "error" not in again.text, again.text


def test_a_reply_nested_deeper_than_llamacpps_reshaping_reads_passes_as_it_came(
    api: Appliance,
) -> None:
    """A whole llama.cpp reply the reshaping cannot parse (1,100 deep: orjson reads 1,024) is
    no completion it knows: passed on untouched, as any such body is."""
    reply = send(api, "/v1/completions", "llama", "deep 1100", False)
    assert reply.status_code == 200, reply.text
    assert nested(1100) in reply.text
