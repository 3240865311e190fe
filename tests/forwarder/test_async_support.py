"""Shared pieces of the async tests without Docker: a fake OpenAI backend in a thread, endpoint
and READY replica rows written straight into the appliance's SQLite, and an appliance running
only api + worker (no builder, so nothing replaces the hand-made replica rows)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from appliance.db import open_engine, session_scope
from appliance.models import Endpoint, EndpointStatus, Replica, ReplicaState
from tests.harness import Appliance, RedisServer, free_port, wait_until

# What vLLM answers for a route it never registered (a generative model's /v1/embeddings, a
# pooling model's chat): Starlette's bare 404, byte for byte as vLLM 0.32 sends it
UNREGISTERED = b'{"detail":"Not Found"}'


@dataclass
class FakeBackend:
    """An OpenAI-shaped server: answers after `delay_s`; `fail_first` answers 503 that often;
    `created` fixes the replies' timestamp (else the time of each); a stream's events come
    `pace_s` apart; `slots` > 0 answers that many at a time, the rest waiting first-come (as
    llama.cpp's `--parallel` slots)."""

    delay_s: float = 0.0
    created: int | None = None
    pace_s: float = 0.01
    port: int = field(default_factory=free_port)
    fail_first: int = 0
    seen: Counter[str] = field(default_factory=Counter)
    bodies: list[dict[str, Any]] = field(default_factory=list)  # every request's, in order
    busy: int = 0  # requests being answered now
    most_busy: int = 0  # the most at once
    slots: int = 0
    answered: list[dict[str, Any]] = field(default_factory=list)  # in the order they finished
    _gate: asyncio.Semaphore | None = None
    _loop: asyncio.AbstractEventLoop | None = None
    _runner: web.AppRunner | None = None

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _answer(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.seen[request.path] += 1
        self.bodies.append(body)
        if isinstance(body.get("status"), int):  # a request the replica refuses, as vLLM does
            message = {"object": "error", "message": "refused", "code": body["status"]}
            if isinstance(body.get("refusal"), str):  # in llama.cpp's envelope, in its words
                message = {"error": {"code": body["status"], "message": body["refusal"]}}
                message["error"]["type"] = "exceed_context_size_error"
            return web.json_response(message, status=body["status"])
        if body.get("unregistered"):  # as vLLM serving an embedding model answers chat
            return web.Response(status=404, body=UNREGISTERED, content_type="application/json")
        if self.fail_first > 0:
            self.fail_first -= 1
            return web.json_response({"error": "busy"}, status=503)
        if self.slots and self._gate is None:
            self._gate = asyncio.Semaphore(self.slots)
        async with self._gate or contextlib.nullcontext():
            self.busy += 1
            self.most_busy = max(self.most_busy, self.busy)
            try:
                await asyncio.sleep(float(body.get("delay_s", self.delay_s)))
            finally:
                self.busy -= 1
        self.answered.append(body)
        text = "echo: " + json.dumps(body.get("messages") or body.get("prompt"))[:200]
        if request.path == "/v1/responses":
            return await self._response(request, body)
        if body.get("stream") is True:
            return await self._stream(request, text, body)
        if request.path.endswith("chat/completions"):
            choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text}}
            kind = "chat.completion"
        else:
            choice, kind = {"index": 0, "text": text}, "text_completion"
        choice["finish_reason"] = "length"
        if isinstance(body.get("pad_bytes"), int):  # a reply that long, as many logprobs make
            choice["pad"] = "x" * body["pad_bytes"]
        return web.json_response(
            {
                "id": "cmpl-1",
                "object": kind,
                "created": int(time.time()) if self.created is None else self.created,
                "model": body.get("model"),
                "choices": [choice],
                "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7},
            }
        )

    async def _stream(
        self, request: web.Request, text: str, body: dict[str, Any]
    ) -> web.StreamResponse:
        """The text one word per SSE event, a usage event when asked for, then `[DONE]`
        (chunked); with `drop_after`, the connection drops after that many events, as a
        replica that dies mid-stream."""
        reply = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await reply.prepare(request)
        options = body.get("stream_options")
        asked = isinstance(options, dict) and options.get("include_usage") is True
        for sent, data in enumerate(stream_events(text, usage=asked)):
            if sent == body.get("drop_after") and request.transport is not None:
                request.transport.abort()
                return reply
            await reply.write(data)
            await asyncio.sleep(self.pace_s)
        await reply.write_eof()
        return reply

    async def _response(self, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        """A Responses API reply (`responses_events` when it streams), its usage by that API's
        names, with the details vLLM puts between its counts."""
        text = "echo: " + json.dumps(body.get("input"))[:200]
        created = int(time.time()) if self.created is None else self.created
        if body.get("stream") is not True:
            return web.json_response(response_object(text, created, body.get("model")))
        reply = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await reply.prepare(request)
        for data in responses_events(text, created, body.get("model")):
            await reply.write(data)
            await asyncio.sleep(self.pace_s)
        await reply.write_eof()
        return reply

    async def _embed(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.seen[request.path] += 1
        self.bodies.append(body)
        if isinstance(body.get("status"), int):  # refused, as by a server without embeddings
            message = {"object": "error", "message": "refused", "code": body["status"]}
            return web.json_response(message, status=body["status"])
        if body.get("unregistered"):  # vLLM's bytes for a route its model does not serve
            return web.Response(status=404, body=UNREGISTERED, content_type="application/json")
        return web.json_response(
            {
                "object": "list",
                "data": [{"object": "embedding", "index": 0, "embedding": [0.5, -0.25]}],
                "model": body.get("model"),
                "usage": {"prompt_tokens": 2, "total_tokens": 2},
            }
        )

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")

    def start(self) -> FakeBackend:
        ready = threading.Event()

        async def serve() -> None:
            app = web.Application()
            app.router.add_post("/v1/chat/completions", self._answer)
            app.router.add_post("/v1/completions", self._answer)
            app.router.add_post("/v1/embeddings", self._embed)
            app.router.add_post("/v1/responses", self._answer)
            app.router.add_post("/predict", self._answer)
            app.router.add_get("/health", self._health)
            self._runner = web.AppRunner(app, access_log=None)
            await self._runner.setup()
            await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
            ready.set()

        self._loop = asyncio.new_event_loop()
        threading.Thread(target=self._loop.run_forever, daemon=True).start()
        asyncio.run_coroutine_threadsafe(serve(), self._loop)
        ready.wait(10)
        return self

    def stop(self) -> None:
        if self._loop is not None and self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)


def stream_events(text: str, *, usage: bool = True) -> list[bytes]:
    """What FakeBackend streams for `text`, event by event: the usage-only chunk last when
    the request asks for it (`stream_options.include_usage`), as vLLM does."""
    events = [{"choices": [{"index": 0, "delta": {"content": word}}]} for word in text.split()]
    if usage:
        events.append({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4}})
    return [b"data: " + json.dumps(e).encode() + b"\n\n" for e in events] + [b"data: [DONE]\n\n"]


RESPONSE_USAGE = {
    "input_tokens": 3,
    "input_tokens_details": {"cached_tokens": 0},
    "output_tokens": 4,
    "output_tokens_details": {"reasoning_tokens": 0},
    "total_tokens": 7,
}


def response_object(text: str | None, created: int, model: Any) -> dict[str, Any]:
    """A Responses API response: in progress (`text` None), or done with its text and usage."""
    part = {"type": "output_text", "text": text, "annotations": []}
    message = {"type": "message", "id": "msg_1", "role": "assistant", "status": "completed"}
    return {
        "id": "resp_1",
        "object": "response",
        "created_at": created,
        "model": model,
        "status": "in_progress" if text is None else "completed",
        "output": [] if text is None else [message | {"content": [part]}],
        "usage": None if text is None else RESPONSE_USAGE,
    }


def responses_events(text: str, created: int, model: Any) -> list[bytes]:
    """A Responses API stream: named, numbered events, the usage in the last
    (`response.completed`), and no `[DONE]`."""
    events: list[dict[str, Any]] = [
        {"type": "response.created", "response": response_object(None, created, model)}
    ]
    for word in text.split():
        events.append({"type": "response.output_text.delta", "item_id": "msg_1", "delta": word})
    events.append({"type": "response.completed", "response": response_object(text, created, model)})
    return [
        f"event: {e['type']}\ndata: {json.dumps(e | {'sequence_number': i})}\n\n".encode()
        for i, e in enumerate(events)
    ]


def seed_endpoint(
    data_dir: Path,
    name: str,
    address: str,
    *,
    owner: str = "admin",
    endpoint_type: str = "async",
    extra: dict[str, Any] | None = None,
    framework: str = "vllm",
    public: bool = False,
    per_worker: int = 4,
) -> str:
    """An endpoint row and one READY replica row at `address`; returns the endpoint id."""
    engine = open_engine(data_dir / "appliance.db")
    endpoint_id = f"end_{name}"
    with session_scope(engine) as session:
        session.add(
            Endpoint(
                id=endpoint_id,
                name=name,
                owner=owner,
                created_by="test",
                framework=framework,
                model="org/model",
                endpoint_type=endpoint_type,
                status=EndpointStatus.READY,
                extra=extra or {},
                public_inference=public,
                target_concurrency=per_worker,
            )
        )
        session.add(
            Replica(
                id=f"rep_{name}",
                endpoint_id=endpoint_id,
                generation=1,
                container_name=name,
                address=address,
                state=ReplicaState.READY,
            )
        )
    engine.dispose()
    return endpoint_id


def start_api(appliance: Appliance) -> None:
    appliance.workdir.mkdir(parents=True, exist_ok=True)
    appliance.start_role("api")
    wait_until(appliance._healthy, 30, "the api to answer /healthz")


def stop_all(appliance: Appliance) -> None:
    for role in list(appliance.procs):
        appliance.stop_role(role)


@pytest.fixture
def backend() -> Iterator[FakeBackend]:
    server = FakeBackend(delay_s=0.05).start()
    yield server
    server.stop()


@pytest.fixture
def bare_appliance(tmp_path: Path, redis_server: RedisServer) -> Iterator[Appliance]:
    """api + worker (started by the test) on a real Redis and SQLite; no builder, no Docker."""
    appliance = Appliance(
        tmp_path / "appliance",
        redis_server,
        env_extra={
            "APPLIANCE_SWEEP_INTERVAL_S": "0.5",
            "APPLIANCE_TASK_LEASE_S": "3",
            "APPLIANCE_ROUTING_REFRESH_S": "0.5",
            "APPLIANCE_ACTIVATION_TIMEOUT_S": "5",
        },
    )
    start_api(appliance)
    yield appliance
    print(appliance.logs())
    stop_all(appliance)


def wait_tasks(client: Any, ids: list[str], timeout_s: float) -> dict[str, dict[str, Any]]:
    """Poll until every task ended; returns each one's GET body. A round stops at the first
    task still queued or running: tasks mostly end in the order they were sent, and asking
    about every pending one each round would load the api more than the tasks do."""
    done: dict[str, dict[str, Any]] = {}

    def check() -> bool:
        for task_id in ids:
            if task_id not in done:
                body = client.get(f"/v1/async-tasks/{task_id}").json()
                if body["status"] not in ("SUCCESS", "FAILURE"):
                    return False
                done[task_id] = body
        return True

    wait_until(check, timeout_s, f"{len(ids)} tasks to end", every_s=0.5)
    return done
