"""The Docker Engine's socket unreachable under a running builder (dockerd restarting, say), or
already when the builder starts: the builder says so in one line a tick, not a traceback, the
endpoints it cannot act on say why in their status_reason, and once the socket answers again it
carries out what was asked meanwhile: an endpoint created is built, one deleted is removed."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path

from tests.e2e.lifecycle import ON_FAKE_GPUS, create, describe, standin_body, wait_status
from tests.harness import Appliance, wait_until

DOCKER_SOCKET = "/var/run/docker.sock"


class SocketRelay:
    """A unix socket that relays to the Docker Engine's until stopped: stopping it closes
    every connection and removes the socket, as a Docker Engine going away does."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.open: list[socket.socket] = []
        self.server: socket.socket | None = None

    def start(self) -> SocketRelay:
        self.server = socket.socket(socket.AF_UNIX)
        self.server.bind(str(self.path))
        self.server.listen(64)
        threading.Thread(target=self._accept, args=(self.server,), daemon=True).start()
        return self

    def _accept(self, server: socket.socket) -> None:
        while True:
            try:
                near, _ = server.accept()
            except OSError:
                return  # stopped
            far = socket.socket(socket.AF_UNIX)
            far.connect(DOCKER_SOCKET)
            self.open += [near, far]
            threading.Thread(target=self._pump, args=(near, far), daemon=True).start()
            threading.Thread(target=self._pump, args=(far, near), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while chunk := source.recv(65536):
                sink.sendall(chunk)
        for end in (source, sink):
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)

    def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None
        for end in self.open:
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)
            end.close()
        self.open = []
        if self.path.exists():
            os.unlink(self.path)


def test_docker_down_is_a_line_a_tick_and_what_was_asked_is_done_once_it_is_back(
    make_appliance: Callable[..., Appliance], tmp_path: Path
) -> None:
    relay = SocketRelay(tmp_path / "docker.sock").start()
    try:
        appliance = make_appliance(**ON_FAKE_GPUS, APPLIANCE_DOCKER_HOST=f"unix://{relay.path}")
        client = appliance.client()
        old = create(client, standin_body("old"))
        wait_status(client, old, "READY", timeout_s=90)
        relay.stop()

        new = create(client, standin_body("new"))
        assert client.delete(f"/v1/model-endpoints/{old}").status_code == 200
        log = appliance.workdir / "builder.log"
        wait_until(
            lambda: log.read_text().count("Docker Engine unavailable") >= 3,
            30,
            "three ticks to say the Docker Engine is unavailable",
        )
        said = log.read_text()
        assert "Traceback" not in said and "reconcile tick failed" not in said, said[-3000:]
        for waiting in (new, old):  # UPDATE_PENDING, DELETE_IN_PROGRESS: each says why
            reason = str(describe(client, waiting)["status_reason"])
            assert "waiting for the Docker Engine" in reason, reason

        relay.start()
        wait_status(client, new, "READY", timeout_s=90)
        wait_until(
            lambda: client.get(f"/v1/model-endpoints/{old}").status_code == 404,
            60,
            "the deleted endpoint to be removed",
        )
        assert len(appliance.containers()) == 1  # the new endpoint's replica alone
    finally:
        relay.stop()


def test_a_builder_started_without_docker_waits_for_it_and_says_so(
    make_appliance: Callable[..., Appliance], tmp_path: Path
) -> None:
    relay = SocketRelay(tmp_path / "docker.sock")  # not started: no Docker Engine there yet
    try:
        appliance = make_appliance(**ON_FAKE_GPUS, APPLIANCE_DOCKER_HOST=f"unix://{relay.path}")
        client = appliance.client()
        endpoint = create(client, standin_body("patient"))
        log = appliance.workdir / "builder.log"
        wait_until(
            lambda: log.exists() and log.read_text().count("Docker Engine unavailable") >= 2,
            30,
            "two ticks to say the Docker Engine is unavailable",
        )
        assert appliance.procs["builder"].poll() is None, log.read_text()[-3000:]
        assert "Traceback" not in log.read_text(), log.read_text()[-3000:]
        reply = client.get("/v1/llm/model-endpoints/patient")
        assert reply.status_code == 200, reply.text
        assert reply.json()["status"] == "UPDATE_PENDING"
        assert "waiting for the Docker Engine" in str(reply.json()["status_reason"])

        relay.start()
        ready = wait_status(client, endpoint, "READY", timeout_s=90)
        assert ready["status_reason"] is None
        assert len(appliance.containers()) == 1
    finally:
        relay.stop()
