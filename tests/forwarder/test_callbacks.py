"""Callbacks: HMAC-signed delivery, retries after a 500, and SSRF refusals at submit and at
delivery. Receivers listen on loopback only; private and metadata addresses are checked for
refusal before any connection is tried, so no traffic leaves this machine."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis as redis_lib
from aiohttp import web
from sqlalchemy import create_engine, text

from forwarder.worker import callbacks
from forwarder.worker.callbacks import CallbackRefusedError, CallbackSender, check_url
from tests.forwarder import test_async_support as support
from tests.forwarder.test_async_support import FakeBackend, seed_endpoint, start_api, stop_all
from tests.harness import Appliance, RedisServer, free_port, make_key, wait_until

backend = support.backend  # fixture


@dataclass
class Receiver:
    """A callback receiver: records each delivery; answers `statuses` in turn, then 200."""

    host: str = "127.0.0.1"
    port: int = field(default_factory=free_port)
    statuses: list[int] = field(default_factory=list)
    redirect_to: str | None = None
    got: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    _loop: asyncio.AbstractEventLoop | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/hook"

    async def _hook(self, request: web.Request) -> web.Response:
        self.got.append((dict(request.headers), await request.read()))
        if self.redirect_to:
            raise web.HTTPFound(self.redirect_to)
        status = self.statuses.pop(0) if self.statuses else 200
        return web.Response(status=status, text="ok")

    def start(self) -> Receiver:
        ready = threading.Event()

        async def serve() -> None:
            app = web.Application()
            app.router.add_post("/hook", self._hook)
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            await web.TCPSite(runner, self.host, self.port).start()
            ready.set()

        self._loop = asyncio.new_event_loop()
        threading.Thread(target=self._loop.run_forever, daemon=True).start()
        asyncio.run_coroutine_threadsafe(serve(), self._loop)
        assert ready.wait(10)
        return self

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)


def has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.fixture
def receivers() -> Iterator[dict[str, Receiver]]:
    made = {"allowed": Receiver(), "loopback": Receiver()}
    if has_ipv6_loopback():
        made["v6"] = Receiver(host="::1")
    for receiver in made.values():
        receiver.start()
    yield made
    for receiver in made.values():
        receiver.stop()


SECRET = b"s" * 32
REFUSED = [
    "http://127.0.0.1:{port}/hook",
    "http://[::1]:{port}/hook",
    "http://localhost:{port}/hook",
    "http://169.254.169.254/latest/meta-data/",
    "http://10.1.2.3/hook",
    "http://[::ffff:127.0.0.1]:{port}/hook",
    "http://[2002:7f00:1::1]:{port}/hook",  # 6to4 wrapping 127.0.0.1
    "http://[2002:a01:203::]/hook",  # 6to4 wrapping 10.1.2.3
    "http://[2001:0:4136:e378:8000:63bf:f5fe:fdfc]/hook",  # Teredo wrapping 10.1.2.3
    "http://metadata.google.internal/computeMetadata/v1/",
    "ftp://example.com/hook",
    "http://[::1/hook",  # not a URL: an unclosed bracket
]


@pytest.mark.parametrize("template", REFUSED)
def test_refused_before_any_connection(template: str) -> None:
    """Refused naming the field, and an address refusal says how an operator allows it."""
    with pytest.raises(CallbackRefusedError) as refused:
        check_url(template.format(port=free_port()), allowed_hosts=())
    assert refused.value.message.startswith("callback_url"), refused.value.message
    if "resolves to" in refused.value.message:
        assert "APPLIANCE_CALLBACK_ALLOWED_HOSTS" in refused.value.message


def test_a_6to4_address_of_a_public_one_is_allowed() -> None:
    """A 6to4 address is judged by the IPv4 address it carries (here 8.8.8.8, public)."""
    assert check_url("http://[2002:808:808::1]/hook", allowed_hosts=()).addresses == (
        "2002:808:808::1",
    )


def test_allow_list_names_host_and_port() -> None:
    port = free_port()
    assert check_url(f"http://127.0.0.1:{port}/x", [f"127.0.0.1:{port}"]).addresses == (
        "127.0.0.1",
    )
    with pytest.raises(CallbackRefusedError):
        check_url(f"http://127.0.0.1:{port + 1}/x", [f"127.0.0.1:{port}"])


def deliver(sender: CallbackSender, url: str) -> bool:
    return asyncio.run(sender.deliver(url, {"task_id": "tsk_1", "status": "SUCCESS"}, None))


def test_loopback_receivers_get_nothing_at_delivery(receivers: dict[str, Receiver]) -> None:
    allowed = receivers["allowed"]
    sender = CallbackSender(SECRET, (f"127.0.0.1:{allowed.port}",), max_attempts=2)
    targets = [receivers["loopback"].url, f"http://localhost:{receivers['loopback'].port}/hook"]
    if "v6" in receivers:
        targets.append(receivers["v6"].url)
    for url in targets:
        assert deliver(sender, url) is False
    # a redirect from the allowed receiver to loopback is an answer, never followed
    allowed.redirect_to = receivers["loopback"].url
    sender = CallbackSender(SECRET, (f"127.0.0.1:{allowed.port}",), max_attempts=1)
    assert deliver(sender, allowed.url) is False
    assert len(allowed.got) == 1
    assert receivers["loopback"].got == []
    assert receivers.get("v6", Receiver()).got == []


def test_signed_delivery_retries_after_500(receivers: dict[str, Receiver]) -> None:
    allowed = receivers["allowed"]
    allowed.statuses = [500, 500]
    sender = CallbackSender(
        SECRET, (f"127.0.0.1:{allowed.port}",), max_attempts=4, first_backoff_s=0.05
    )
    assert deliver(sender, allowed.url) is True
    assert len(allowed.got) == 3
    headers, body = allowed.got[-1]
    stamp = headers[callbacks.TIMESTAMP_HEADER]
    expected = hmac.new(SECRET, stamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    assert headers[callbacks.SIGNATURE_HEADER] == f"sha256={expected}"
    assert json.loads(body)["task_id"] == "tsk_1"


def test_task_callbacks_through_the_appliance(
    tmp_path: Path,
    redis_server: RedisServer,
    backend: FakeBackend,
    receivers: dict[str, Receiver],
) -> None:
    allowed = receivers["allowed"]
    allowed.statuses = [500]  # the first delivery fails; the worker retries
    appliance = Appliance(
        tmp_path / "appliance",
        redis_server,
        env_extra={"APPLIANCE_CALLBACK_ALLOWED_HOSTS": json.dumps([f"127.0.0.1:{allowed.port}"])},
    )
    start_api(appliance)
    try:
        endpoint_id = seed_endpoint(appliance.data_dir, "fake", backend.address)
        appliance.start_role("worker")
        client = appliance.client()
        submit = f"/v1/async-tasks?model_endpoint_id={endpoint_id}"
        for template in REFUSED[:5]:
            url = template.format(port=receivers["loopback"].port)
            reply = client.post(submit, json={"args": {"prompt": "x"}, "callback_url": url})
            assert reply.status_code == 400, (url, reply.text)
        reply = client.post(
            submit,
            json={
                "args": {"prompt": "hello"},
                "callback_url": allowed.url,
                "callback_auth": {"kind": "basic", "username": "u", "password": "p"},
            },
        )
        assert reply.status_code == 200, reply.text
        task_id = reply.json()["task_id"]
        wait_until(lambda: len(allowed.got) >= 2, 30, "the retried callback")
        headers, body = allowed.got[-1]
        # a receiver checks the signature as the README says, with the secret the operator's
        # `appliance callback-secret` prints
        printed = subprocess.run(
            [sys.executable, "-m", "appliance", "callback-secret"],
            env={**os.environ, "APPLIANCE_DATA_DIR": str(appliance.data_dir)},
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        stamp = headers["X-Appliance-Timestamp"]
        mac = hmac.new(bytes.fromhex(printed), stamp.encode() + b"." + body, hashlib.sha256)
        assert headers["X-Appliance-Signature"] == "sha256=" + mac.hexdigest()
        assert headers["Authorization"].startswith("Basic ")
        delivered: dict[str, Any] = json.loads(body)
        assert delivered["task_id"] == task_id and delivered["status"] == "SUCCESS"
        assert "hello" in json.loads(delivered["result"]["result"])["choices"][0]["text"]

        # a task without a callback_url reports to the endpoint's default_callback_url
        default = {"kind": "basic", "username": "d", "password": "p"}
        loopback = client.put(
            f"/v1/model-endpoints/{endpoint_id}",
            json={"default_callback_url": receivers["loopback"].url},
        )
        assert loopback.status_code == 400 and "default_callback_url" in loopback.text
        reply = client.put(
            f"/v1/model-endpoints/{endpoint_id}",
            json={"default_callback_url": allowed.url, "default_callback_auth": default},
        )
        assert reply.status_code == 200, reply.text
        reply = client.post(submit, json={"args": {"prompt": "by default"}})
        assert reply.status_code == 200, reply.text
        wait_until(lambda: len(allowed.got) >= 3, 30, "the default callback")
        headers, body = allowed.got[-1]
        assert json.loads(body)["task_id"] == reply.json()["task_id"]
        assert headers["Authorization"] == "Basic ZDpw"  # d:p
        assert receivers["loopback"].got == []

        # another team's task on the now public endpoint does not report to its default
        opened = client.put(f"/v1/model-endpoints/{endpoint_id}", json={"public_inference": True})
        assert opened.status_code == 200, opened.text
        other = appliance.client(make_key(appliance, "other"))
        theirs = other.post(submit, json={"args": {"prompt": "not yours"}}).json()["task_id"]
        wait_until(
            lambda: other.get(f"/v1/async-tasks/{theirs}").json()["status"] == "SUCCESS",
            30,
            "the other team's task",
        )
        mine = client.post(submit, json={"args": {"prompt": "after"}}).json()["task_id"]
        wait_until(lambda: len(allowed.got) >= 4, 30, "the next default callback")
        time.sleep(1)
        assert [json.loads(body)["task_id"] for _, body in allowed.got[3:]] == [mine]
    finally:
        print(appliance.logs())
        stop_all(appliance)


def test_a_task_lost_too_many_times_fails_and_calls_back(
    tmp_path: Path,
    redis_server: RedisServer,
    backend: FakeBackend,
    receivers: dict[str, Receiver],
) -> None:
    """A task whose workers stopped while running it APPLIANCE_TASK_MAX_ATTEMPTS times ends
    FAILURE without running again, and its callback says so, as for any other end."""
    allowed = receivers["allowed"]
    appliance = Appliance(
        tmp_path / "appliance",
        redis_server,
        env_extra={
            "APPLIANCE_CALLBACK_ALLOWED_HOSTS": json.dumps([f"127.0.0.1:{allowed.port}"]),
            "APPLIANCE_TASK_MAX_ATTEMPTS": "2",
            "APPLIANCE_TASK_LEASE_S": "1",
            "APPLIANCE_SWEEP_INTERVAL_S": "0.5",
        },
    )
    start_api(appliance)
    try:
        endpoint_id = seed_endpoint(appliance.data_dir, "fake", backend.address)
        client = appliance.client()
        submit = f"/v1/async-tasks?model_endpoint_id={endpoint_id}"
        reply = client.post(submit, json={"args": {"prompt": "x"}, "callback_url": allowed.url})
        assert reply.status_code == 200, reply.text
        task_id = reply.json()["task_id"]
        # as if two workers had stopped while running it: its attempts spent, no lease, no job
        engine = create_engine(f"sqlite:///{appliance.data_dir / 'appliance.db'}")
        with engine.begin() as conn:
            conn.execute(
                text("UPDATE task SET status = 'STARTED', attempts = 2, enqueued_at = 0"),
            )
        engine.dispose()
        redis_lib.Redis.from_url(redis_server.url).flushall()
        appliance.start_role("worker")
        wait_until(lambda: allowed.got, 20, "the callback of the task given up")
        delivered = json.loads(allowed.got[-1][1])
        assert (delivered["task_id"], delivered["status"]) == (task_id, "FAILURE")
        assert delivered["traceback"] == "lost too many times; not run again"
        assert client.get(f"/v1/async-tasks/{task_id}").json()["status"] == "FAILURE"
        assert sum(backend.seen.values()) == 0
    finally:
        stop_all(appliance)
