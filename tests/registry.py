"""Test bed for image pulls: Debian's `docker-registry` on a loopback port, a throttling TCP
proxy in front of it (so a pull is slow enough to watch, and can be cut), and images with a
large incompressible layer of their own pushed into it.

Used by the pull tests (tests/e2e/test_pulls.py) through the fixtures in tests/e2e/conftest.py.
The Docker Engine trusts registries on 127.0.0.0/8 without TLS, so it pushes and pulls for real.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.harness import free_port, wait_until

CHUNK_BYTES = 16 * 1024
PAD_BYTES = 48 * 1024 * 1024  # the image's own layer: random, so compression cannot shrink it
REGISTRY_CONFIG = """\
version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: {root}
  delete:
    enabled: true
http:
  addr: 127.0.0.1:{port}
"""


def have_registry() -> str | None:
    """None when `docker-registry` can run here; else why not."""
    if shutil.which("docker-registry") is None:
        return "no docker-registry (scripts/setup-host installs Debian's package)"
    return None


@dataclass
class Registry:
    """`docker-registry serve` on a free loopback port; stop and start keep its storage."""

    workdir: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> Registry:
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "config.yml"
        config.write_text(REGISTRY_CONFIG.format(root=self.workdir / "storage", port=self.port))
        log = open(self.workdir / "registry.log", "ab")  # noqa: SIM115 - kept open for the child
        self.proc = subprocess.Popen(
            ["docker-registry", "serve", str(config)], stdout=log, stderr=subprocess.STDOUT
        )
        wait_until(self._answers, 20, "docker-registry to answer /v2/")
        return self

    def _answers(self) -> bool:
        try:
            return httpx.get(f"http://{self.address}/v2/", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()  # gone at once, as a crashed or unplugged registry is
            self.proc.wait(10)
        self.proc = None


class ThrottleProxy:
    """A TCP proxy on a loopback port, at most `rate_bps` bytes/s toward the client over all its
    connections; `rate_bps` may change while it runs, `cut()` drops every connection."""

    def __init__(self, upstream_port: int, rate_bps: int) -> None:
        self.upstream_port = upstream_port
        self.rate_bps = rate_bps
        self.port = free_port()
        self.sent_bytes = 0
        self._next_send = 0.0
        self._writers: set[asyncio.StreamWriter] = set()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> ThrottleProxy:
        self._thread.start()
        self._ready.wait(10)
        return self

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(
            asyncio.start_server(self._client, "127.0.0.1", self.port)
        )
        self._ready.set()
        self._loop.run_forever()
        server.close()
        pending = asyncio.all_tasks(self._loop)
        for task in pending:
            task.cancel()
        self._loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        self._loop.run_until_complete(server.wait_closed())
        self._loop.close()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            writer.close()
            return
        self._writers |= {writer, up_writer}
        try:
            await asyncio.gather(
                self._pipe(reader, up_writer, throttle=False),
                self._pipe(up_reader, writer, throttle=True),
            )
        finally:
            self._writers -= {writer, up_writer}
            for end in (writer, up_writer):
                end.close()

    async def _pipe(
        self, source: asyncio.StreamReader, sink: asyncio.StreamWriter, *, throttle: bool
    ) -> None:
        try:
            while chunk := await source.read(CHUNK_BYTES):
                if throttle:
                    await self._pace(len(chunk))
                sink.write(chunk)
                await sink.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            if not sink.is_closing():
                sink.close()

    async def _pace(self, size: int) -> None:
        """One budget shared by all connections: each chunk books its slot of time."""
        now = time.monotonic()
        start = max(now, self._next_send)
        self._next_send = start + size / max(self.rate_bps, 1)
        self.sent_bytes += size
        if start > now:
            await asyncio.sleep(start - now)

    def set_rate(self, rate_bps: int) -> None:
        def apply() -> None:
            self.rate_bps = rate_bps
            self._next_send = min(self._next_send, time.monotonic())

        self._loop.call_soon_threadsafe(apply)

    def cut(self) -> None:
        """Drop every connection now (the registry went away mid-transfer)."""

        def close_all() -> None:
            for writer in list(self._writers):
                writer.transport.abort()

        self._loop.call_soon_threadsafe(close_all)

    def stop(self) -> None:
        self.cut()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


def _docker(*args: str) -> str:
    done = subprocess.run(["docker", *args], check=True, capture_output=True, text=True)
    return done.stdout.strip()


def push_padded_image(registry: Registry, base: str, workdir: Path) -> str:
    """Pushes `base` plus one new layer of PAD_BYTES random bytes as `<registry>/...:<tag>` and
    removes it from the Docker Engine again, so a pull must fetch that layer. Returns the
    repository path and tag (`appliance-pulltest/x:tag`), to be named through any address."""
    name = f"appliance-pulltest/{base.split('/')[-1].split(':')[0]}:{uuid.uuid4().hex[:10]}"
    pushed = f"{registry.address}/{name}"
    pad = workdir / "pad.bin"
    workdir.mkdir(parents=True, exist_ok=True)
    pad.write_bytes(os.urandom(PAD_BYTES))
    container = _docker("create", base)
    try:
        _docker("cp", str(pad), f"{container}:/pad.bin")
        _docker("commit", container, pushed)
    finally:
        _docker("rm", "-f", container)
        pad.unlink()
    try:
        _docker("push", pushed)
    finally:
        _docker("rmi", pushed)
    return name


def remove_image(reference: str) -> None:
    """Removes an image this test pulled (nothing else), if it is there."""
    subprocess.run(["docker", "rmi", reference], capture_output=True)
