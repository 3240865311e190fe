"""A replica that dies under a request before replying, through real api and worker processes,
real Redis and SQLite: the replica is a process killed with SIGKILL, its replacement a fake
OpenAI backend the routes name once its row is written (the builder's part; no Docker). A
stream waiting for the replacement is kept alive as at a cold start, on every streaming
entry; an async task waiting for it shows PENDING, then STARTED once the replacement takes it."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from appliance.db import open_engine, session_scope
from appliance.models import Replica, ReplicaState
from tests.forwarder.test_async_support import FakeBackend, seed_endpoint, start_api, stop_all
from tests.harness import ADMIN_KEY, Appliance, RedisServer, free_port, wait_until

AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}
READ_TIMEOUT_S = 3.0  # the client's: longer than a keep-alive's gap, shorter than the wait
GONE_S = 2 * READ_TIMEOUT_S  # from the replica's death to its replacement's routes

# A replica that takes requests and never answers them (it is killed before it would): it
# answers its health route, and leaves a file named after each request it took.
SILENT_REPLICA = """
import sys, time
from pathlib import Path
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("content-length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length") or 0))
        Path(sys.argv[2]).touch()
        time.sleep(3600)

    def log_message(self, *args):
        pass

ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
"""


class SilentReplica:
    """A replica process that takes a request and dies (`kill`) before any reply byte."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.taken = workdir / f"taken-{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", SILENT_REPLICA, str(self.port), str(self.taken)]
        )
        wait_until(self._up, 10, "the silent replica to answer its health route")

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _up(self) -> bool:
        try:
            return httpx.get(self.address + "/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def wait_taken(self) -> None:
        wait_until(self.taken.exists, 30, "the replica to take the request")

    def kill(self) -> None:
        """Once it took a request: SIGKILL, as `docker kill` ends a replica."""
        self.wait_taken()
        self.proc.kill()
        self.proc.wait(10)


def replace_replica(data_dir: Path, name: str, address: str | None) -> None:
    """The builder's part: the dead replica's row goes; with `address`, its replacement's comes
    (READY there)."""
    engine = open_engine(data_dir / "appliance.db")
    with session_scope(engine) as session:
        dead = session.get(Replica, f"rep_{name}")
        if dead is not None:
            session.delete(dead)
        if address is not None:
            session.add(
                Replica(
                    id=f"rep_{name}_2",
                    endpoint_id=f"end_{name}",
                    generation=1,
                    container_name=f"{name}-2",
                    address=address,
                    state=ReplicaState.READY,
                )
            )
    engine.dispose()


@pytest.fixture(scope="module")
def appl(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Appliance]:
    base = tmp_path_factory.mktemp("gone")
    redis = RedisServer(base / "redis").start()
    appliance = Appliance(
        base / "appliance",
        redis,
        env_extra={
            "APPLIANCE_ROUTING_REFRESH_S": "0.5",
            "APPLIANCE_ACTIVATION_TIMEOUT_S": "60",
            "APPLIANCE_STREAM_KEEPALIVE_S": "0.5",
        },
    )
    try:
        start_api(appliance)
        appliance.start_role("worker")
        yield appliance
    finally:
        print(appliance.logs())
        stop_all(appliance)
        redis.stop()


@pytest.fixture
def replacement() -> Iterator[FakeBackend]:
    server = FakeBackend(delay_s=0.0).start()
    yield server
    server.stop()


def chat(name: str) -> dict[str, Any]:
    messages = [{"role": "user", "content": "hi"}]
    return {"model": name, "stream": True, "max_tokens": 4, "messages": messages}


def ui_headers(appl: Appliance) -> dict[str, str]:
    """The headers of a signed-in UI session's script (its cookie and CSRF token)."""
    with httpx.Client(base_url=appl.url, timeout=30) as client:
        form = client.get("/ui/sign-in")
        token = re.search(r'name="csrf" value="([^"]+)"', form.text)
        assert token
        fields = {"csrf": token[1], "key": ADMIN_KEY, "next": "/ui/keys"}
        assert client.post("/ui/sign-in", data=fields).status_code == 303
        csrf = re.search(r'name="csrf" content="([^"]+)"', client.get("/ui/keys").text)
        assert csrf
        cookie = "; ".join(f"{k}={v}" for k, v in client.cookies.items())
        return {"x-csrf-token": csrf[1], "cookie": cookie}


STREAMS = {  # entry -> (path, query, body for the endpoint named)
    "v1 chat": lambda n: ("/v1/chat/completions", {}, chat(n)),
    "v2 chat": lambda n: ("/v2/chat/completions", {}, chat(n)),
    "llm completion": lambda n: (
        "/v1/llm/completions-stream",
        {"model_endpoint_name": n},
        {"prompt": "hi", "max_new_tokens": 4, "temperature": 0},
    ),
    "streaming task": lambda n: (
        "/v1/streaming-tasks",
        {"model_endpoint_id": f"end_{n}"},
        {"args": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}},
    ),
    "playground": lambda n: (
        "/ui/playground/chat",
        {},
        {"endpoint": n, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
    ),
}


@pytest.mark.parametrize("entry", list(STREAMS))
def test_a_stream_whose_replica_dies_before_replying_is_kept_alive_until_its_replacement(
    appl: Appliance, replacement: FakeBackend, tmp_path: Path, entry: str
) -> None:
    """The stream's replica is killed before the first byte of its answer; its replacement
    comes only after the client's read timeout. The stream begins at once with keep-alive
    comments (as at a cold start), so the client outlasts the wait, and the replacement
    answers it; it was silent, and the client timed out."""
    name = "gone" + entry.replace(" ", "")
    dead = SilentReplica(tmp_path)
    seed_endpoint(appl.data_dir, name, dead.address, endpoint_type="streaming")
    path, query, body = STREAMS[entry](name)
    headers = ui_headers(appl) if entry == "playground" else AUTH
    got: dict[str, Any] = {}

    def send() -> None:
        try:
            timeout = httpx.Timeout(120, read=READ_TIMEOUT_S)
            with httpx.stream(
                "POST", appl.url + path, params=query, json=body, headers=headers, timeout=timeout
            ) as reply:
                got["status"] = reply.status_code
                got["body"] = reply.read()
        except httpx.HTTPError as exc:
            got["error"] = repr(exc)

    client = threading.Thread(target=send)
    client.start()
    dead.kill()
    replace_replica(appl.data_dir, name, None)
    time.sleep(GONE_S)
    replace_replica(appl.data_dir, name, replacement.address)
    client.join(60)
    assert "error" not in got, got  # a ReadTimeout: nothing came while it waited
    assert got["status"] == 200, got
    text = got["body"].decode()
    assert text.startswith(": keep-alive\n\n"), text[:300]
    events = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]
    assert events and all(not e.get("error") and e.get("status") != "FAILURE" for e in events), text
    assert sum(replacement.seen.values()) == 1  # the replacement answered it


def test_an_async_task_whose_replica_dies_shows_pending_until_its_replacement_takes_it(
    appl: Appliance, tmp_path: Path
) -> None:
    """A task STARTED on a replica that is killed before it replies waits for the replacement
    (as at a cold start): it shows PENDING meanwhile, where it showed STARTED, then STARTED
    once the replacement takes it, then its result."""
    name = "gonetask"
    dead = SilentReplica(tmp_path)
    seed_endpoint(appl.data_dir, name, dead.address)
    client = appl.client()
    sent = client.post(
        "/v1/async-tasks",
        params={"model_endpoint_id": f"end_{name}"},
        json={"args": {"prompt": "hi", "max_tokens": 4}},
    )
    assert sent.status_code == 200, sent.text
    task_id = sent.json()["task_id"]

    def status() -> str:
        return str(client.get(f"/v1/async-tasks/{task_id}").json()["status"])

    dead.wait_taken()
    wait_until(lambda: status() == "STARTED", 10, "the task STARTED on its replica")
    dead.kill()
    replace_replica(appl.data_dir, name, None)
    wait_until(lambda: status() == "PENDING", 10, "the task PENDING while it waits")
    time.sleep(1)  # still waiting: nothing serves the endpoint
    assert status() == "PENDING"
    slow = FakeBackend(delay_s=3.0).start()  # answers after 3 s: STARTED meanwhile
    try:
        replace_replica(appl.data_dir, name, slow.address)
        wait_until(lambda: status() == "STARTED", 10, "the task STARTED on the replacement")
        wait_until(lambda: status() == "SUCCESS", 30, "the replacement's answer")
    finally:
        slow.stop()
    assert slow.seen["/v1/completions"] == 1
