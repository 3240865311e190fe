"""Test harness: real redis-server and appliance processes on free ports, one install each.

Used by the fixtures in conftest.py; every appliance gets its own data dir (so its own install
id), its own Redis, and its containers are removed when it stops.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

CACHE = Path(os.environ.get("APPLIANCE_TEST_CACHE", Path.home() / ".cache/model-engine-appliance"))
ROOT = Path(__file__).resolve().parents[1]
COMPILED = ROOT / "build/compiled"  # scripts/compile installs the compiled wheel here
# Which build the appliance's processes run: "plain" (the source tree) or "compiled"
BUILD = os.environ.get("APPLIANCE_TEST_BUILD", "plain")
MODELS_DIR = CACHE / "models"
GEMMA_FILE = "gemma-3-270m-q4_k_m.gguf"
GEMMA_HF = "gemma-3-270m-hf"  # the same model as safetensors, for vLLM
LLAMACPP_IMAGE = "appliance-test/llama.cpp:server"
VLLM_IMAGE = "appliance-test/vllm-openai:standin"  # GPU replicas: GPUs are faked in tests
VLLM_CPU_IMAGE = "appliance-test/vllm-cpu:0.32"  # replicas without GPUs: the real vLLM
BASE_IMAGE = "appliance-test/base:bookworm"
ADMIN_KEY = "mea_000000000001_testadminkeytestadminkey0"
# A client that threads share never closes an idle connection: httpcore 1.0.9's pool may close
# one it has just handed to a waiting thread (encode/httpcore#1110) once it holds more than its
# keep-alive limit, and that thread's read then fails with EBADF, a client fault, not ours.
SHARED_POOL = httpx.Limits(max_connections=None, max_keepalive_connections=None)


# Ports free_port handed out, with when, shared by every test process on this machine
PORTS_HANDED = Path(tempfile.gettempdir()) / "appliance-test-ports.json"
PORT_HELD_S = 900.0  # longer than any test leaves a port it was handed unbound (a restart)


def kernel_port() -> int:
    """A port nothing is bound to now, as the kernel picks one (at random, in Linux)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def free_port() -> int:
    """A port nothing is bound to, and that no free_port of any process here handed out in
    the last PORT_HELD_S. The kernel's choice alone is free only now: two xdist workers (or a
    worker and another run) could each be handed the same port before either binds it; the
    second appliance's api then fails to bind while its test, answered by the first's api
    (/healthz, the admin key), talks to another install: a 404 for the endpoint it seeded."""
    with PORTS_HANDED.open("a+") as registry:
        fcntl.flock(registry, fcntl.LOCK_EX)  # released as the file closes
        registry.seek(0)
        try:
            handed: dict[str, float] = json.loads(registry.read() or "{}")
        except ValueError:  # a process killed mid-write: start the record again
            handed = {}
        now = time.time()
        handed = {port: at for port, at in handed.items() if now - at < PORT_HELD_S}
        port = kernel_port()
        for _ in range(100):  # a few thousand held of ~14k: nearly always the first try
            if str(port) not in handed:
                break
            port = kernel_port()
        handed[str(port)] = now
        registry.seek(0)
        registry.truncate()
        registry.write(json.dumps(handed))
    return port


def wait_until(check: Callable[[], Any], timeout_s: float, what: str, every_s: float = 0.2) -> Any:
    """Poll `check` until it returns something truthy; fail the test with `what` on timeout."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(every_s)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}; last: {last!r}")


@dataclass
class RedisServer:
    workdir: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.workdir),
                "--appendonly",
                "yes",
                "--save",
                "",
            ],
            stdout=subprocess.DEVNULL,
        )
        wait_until(self._answers, 10, "redis-server")
        return self

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


@dataclass
class Appliance:
    """One appliance install: api and builder as real processes against real services."""

    workdir: Path
    redis: RedisServer
    env_extra: dict[str, str] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    build: str = BUILD

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def data_dir(self) -> Path:
        return self.workdir / "data"

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")}
        env.update(
            {
                "APPLIANCE_DATA_DIR": str(self.data_dir),
                "APPLIANCE_MODELS_DIR": str(MODELS_DIR),
                "APPLIANCE_REDIS_URL": self.redis.url,
                "APPLIANCE_PORT": str(self.port),
                "APPLIANCE_LLAMACPP_IMAGE": LLAMACPP_IMAGE,
                "APPLIANCE_VLLM_IMAGE": VLLM_IMAGE,
                "APPLIANCE_VLLM_CPU_IMAGE": VLLM_CPU_IMAGE,
                "APPLIANCE_ADMIN_KEY": ADMIN_KEY,
                "APPLIANCE_RECONCILE_INTERVAL_S": "1",
                # the stand-in's models are made-up hub ids: nothing to download, unless a test
                # serves a hub (tests/hub.py) and switches it on
                "APPLIANCE_HF_DOWNLOAD_WEIGHTS": "false",
                # several installs share this box's Docker Engine, each counting only its own
                # replicas, and the stand-ins' limits (the api's default: the whole box) are far
                # from the tens of MiB they use: no memory bound, unless a test sets its own
                "APPLIANCE_REPLICA_MEMORY_BYTES": str(2**50),
                "APPLIANCE_LOG_LEVEL": "INFO",
            }
        )
        if self.build == "compiled":  # the installed wheel first, as in the image
            env["PYTHONPATH"] = str(COMPILED)
        env.update(self.env_extra)
        return env

    def start_role(self, role: str) -> None:
        log = open(self.workdir / f"{role}.log", "ab")  # noqa: SIM115 - kept open for the child
        self.procs[role] = subprocess.Popen(
            [sys.executable, "-m", "appliance", role],
            env=self.env(),
            cwd=self.workdir,  # not the source tree, which `-m` would put first on the path
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def start(self, roles: tuple[str, ...] = ("api", "builder")) -> Appliance:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.start_role("api")
        wait_until(self._healthy, 30, "the api to answer /healthz")
        for role in roles:
            if role != "api":
                self.start_role(role)
        return self

    def _healthy(self) -> bool:
        try:
            return httpx.get(self.url + "/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def stop_role(self, role: str, sig: int = signal.SIGTERM) -> None:
        proc = self.procs.pop(role, None)
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, sig)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)

    def install_id(self) -> str:
        return (self.data_dir / "install-id").read_text().strip()

    def containers(self, *extra_filters: str) -> list[str]:
        """Ids of this install's containers, running or not, from the docker CLI."""
        cmd = ["docker", "ps", "-aq", "--filter", f"label=appliance.install={self.install_id()}"]
        for item in extra_filters:
            cmd += ["--filter", item]
        return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.split()

    def replica_key(self, container: str) -> str:
        """The key the replica in `container` demands: its own (`appliance/install.py`), made
        from this install's key secret and the replica id its label carries."""
        from appliance.install import key_secret, replica_key

        replica_id = subprocess.run(
            ["docker", "inspect", "-f", '{{index .Config.Labels "appliance.replica"}}', container],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        assert replica_id, f"{container} carries no replica label"
        return replica_key(key_secret(self.data_dir), replica_id)

    def stop(self) -> None:
        for role in list(self.procs):
            self.stop_role(role)
        if (self.data_dir / "install-id").exists():
            ids = self.containers()
            if ids:
                subprocess.run(["docker", "rm", "-f", *ids], capture_output=True)

    def client(self, key: str = ADMIN_KEY) -> httpx.Client:
        return httpx.Client(
            base_url=self.url,
            headers={"Authorization": f"Bearer {key}"},
            timeout=120,
            limits=SHARED_POOL,
        )

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-4000:]}"
            for p in sorted(self.workdir.glob("*.log"))
        )


def have_docker() -> str | None:
    """None when Docker and the test images are usable; else why not."""
    if shutil.which("docker") is None:
        return "no docker CLI"
    if subprocess.run(["docker", "info"], capture_output=True).returncode != 0:
        return "the Docker Engine is not running (scripts/test starts one)"
    for image in (LLAMACPP_IMAGE, VLLM_IMAGE, VLLM_CPU_IMAGE):
        probe = subprocess.run(["docker", "image", "inspect", image], capture_output=True)
        if probe.returncode != 0:
            return f"test image {image} is missing (scripts/build-test-images builds it)"
    for model in (GEMMA_FILE, GEMMA_HF):
        if not (MODELS_DIR / model).exists():
            return f"test model {MODELS_DIR / model} is missing (scripts/prepare-model)"
    return None


def make_key(
    appliance: Appliance,
    team: str,
    *,
    scopes: tuple[str, ...] = ("inference", "manage"),
    admin: bool = False,
) -> str:
    """A key for another team, written straight into the appliance's database."""
    from appliance import keys
    from appliance.db import open_engine, session_scope
    from appliance.install import key_secret

    engine = open_engine(appliance.data_dir / "appliance.db")
    with session_scope(engine) as session:
        _, text = keys.create_key(
            session=session,
            secret=key_secret(appliance.data_dir),
            name=f"{team}-key",
            team=team,
            user=f"{team}-user",
            scopes=scopes,
            is_admin=admin,
        )
    engine.dispose()
    return text


def within_one_minute(room_s: float = 10) -> None:
    """Refused sign-ins are counted per clock minute (a key's requests per minute are a sliding
    window): wait, if need be, until the next `room_s` seconds fall in one, so the attempts a test
    counts are counted together."""
    left = 60 - time.time() % 60
    if left < room_s:
        time.sleep(left + 0.1)
