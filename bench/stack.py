"""Starts what a benchmark run compares, all on loopback: the fake backend, an appliance api
pointed at it, nginx and LiteLLM's proxy.

The appliance runs without a builder or Docker: its SQLite gets an endpoint row and a READY
replica row whose address is the fake backend (`add_fake_endpoint`), and the api's routing
table picks them up like any replica the builder started.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ADMIN_KEY = "mea_000000000001_benchadminkeybenchadminkey0"
LITELLM_PYTHON = Path(os.environ.get("LITELLM_PYTHON", "/tmp/venv-litellm/bin/python"))
MODEL = "bench"
LITELLM_KEY = "sk-bench-0123456789abcdef0123456789abcdef"


def checkout(revision: str, workdir: Path, *, compiled: bool = True) -> Path:
    """The tree of git `revision` under `workdir`, built by its own scripts/compile (a few
    minutes) unless `compiled` is False."""
    tree = workdir / f"tree-{revision}"
    tree.mkdir()
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", revision], check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "x", "-C", str(tree)], input=archive, check=True)
    if compiled:
        env = {**os.environ, "PYTHON": sys.executable}
        subprocess.run([str(tree / "scripts/compile")], cwd=tree, env=env, check=True)
    return tree


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_port(port: int, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on port {port} after {timeout_s} s")


def add_fake_endpoint(
    database: Path, name: str, address: str, replica_id: str, source: Path = ROOT
) -> str:
    """Insert an endpoint and one READY replica at `address` (no container) into SQLite, with
    the schema of `source`'s code: a baseline tree refuses a database newer than it knows."""
    made = subprocess.run(
        [
            sys.executable,
            "-c",
            _FAKE_ENDPOINT,
            str(source),
            str(database),
            name,
            address,
            replica_id,
        ],
        check=True,
        capture_output=True,
        text=True,
        cwd=source,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    )
    return made.stdout.strip()


_FAKE_ENDPOINT = """
import sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from appliance.db import open_engine, session_scope
from appliance.ids import new_id
from appliance.models import Endpoint, EndpointStatus, Replica, ReplicaState

database, name, address, replica_id = sys.argv[2:6]
engine = open_engine(Path(database))
endpoint_id = new_id("end")
with session_scope(engine) as session:
    session.add(Endpoint(
        id=endpoint_id, name=name, owner="admin", created_by="admin", framework="custom",
        model=name, status=EndpointStatus.READY, public_inference=True,
    ))
    session.add(Replica(
        id=replica_id, endpoint_id=endpoint_id, generation=1, container_name=replica_id,
        address=address, state=ReplicaState.READY, ready_at=time.time(),
    ))
engine.dispose()
print(endpoint_id)
"""


@dataclass
class Stack:
    workdir: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    proxies: dict[int, list[subprocess.Popen[bytes]]] = field(default_factory=dict)  # by port
    backends: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def spawn(
        self,
        name: str,
        cmd: list[str],
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> subprocess.Popen[bytes]:
        log = open(self.workdir / f"{name}.log", "wb")  # noqa: SIM115 - the child keeps it
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True
        )
        self.procs.append(proc)
        return proc

    @contextmanager
    def alone(self, port: int) -> Iterator[None]:
        """Every proxy but the one on `port` (none for the backend's) stopped (SIGSTOP) for
        the duration: idle targets still wake for their own timers, and on 2 cores that
        noise would land in whichever target is being measured."""
        others = [p for at, procs in self.proxies.items() if at != port for p in procs]
        for proc in others:
            os.killpg(proc.pid, signal.SIGSTOP)
        try:
            yield
        finally:
            for proc in others:
                os.killpg(proc.pid, signal.SIGCONT)

    def backend(self, chunks: int, interval_ms: float) -> int:
        port = free_port()
        self.backends.append(
            self.spawn(
                "backend",
                [
                    sys.executable,
                    str(ROOT / "bench/fake_backend.py"),
                    "--port",
                    str(port),
                    "--chunks",
                    str(chunks),
                    "--interval-ms",
                    str(interval_ms),
                ],
            )
        )
        wait_port(port)
        return port

    def appliance(
        self,
        backend_port: int,
        workers: int = 1,
        fast_lane: bool = True,
        plain: bool = False,
        tree: Path | None = None,
    ) -> int:
        """An api in front of the backend: the compiled build of the working tree
        (build/compiled, `scripts/compile`); `plain`: its source as plain Python, to compare
        the two builds; `tree`: the build of another tree instead (`checkout`)."""
        redis_port, port = free_port(), free_port()
        redis = self.spawn(
            f"redis-{port}",
            ["redis-server", "--port", str(redis_port), "--save", "", "--appendonly", "no"],
        )
        data = self.workdir / f"appliance-data-{port}"
        data.mkdir(exist_ok=True)
        add_fake_endpoint(
            data / "appliance.db",
            MODEL,
            f"http://127.0.0.1:{backend_port}",
            "rep_bench0000000001",
            tree or ROOT,
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")}
        env.update(
            APPLIANCE_DATA_DIR=str(data),
            APPLIANCE_PORT=str(port),
            APPLIANCE_REDIS_URL=f"redis://127.0.0.1:{redis_port}/0",
            APPLIANCE_ADMIN_KEY=ADMIN_KEY,
            APPLIANCE_LOG_LEVEL="WARNING",
            APPLIANCE_REPLICA_MAX_CONCURRENCY="4096",
            APPLIANCE_API_WORKERS=str(workers),
            APPLIANCE_FAST_LANE=str(fast_lane).lower(),
        )
        wait_port(redis_port)
        cwd = self.workdir  # not a source tree, which `-m` would put first on the path
        if tree is not None and not (tree / "build/compiled").exists():
            cwd = tree  # a revision from before the build moved out of the tree
        elif not plain:
            env["PYTHONPATH"] = str((tree or ROOT) / "build/compiled")
        api = self.spawn(
            f"appliance-{port}", [sys.executable, "-m", "appliance", "api"], env=env, cwd=cwd
        )
        self.proxies[port] = [api, redis]
        wait_port(port)
        time.sleep(2.5)  # one routing refresh
        return port

    def nginx(self, backend_port: int, workers: int = 1) -> int:
        port = free_port()
        conf = self.workdir / f"nginx-{port}.conf"
        conf.write_text(f"""
worker_processes {workers};
daemon off;
pid {self.workdir}/nginx-{port}.pid;
error_log {self.workdir}/nginx-{port}-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    upstream backend {{ server 127.0.0.1:{backend_port}; keepalive 512; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_request_buffering off;
        }}
    }}
}}
""")
        proxy = self.spawn(f"nginx-{port}", ["nginx", "-c", str(conf), "-p", str(self.workdir)])
        self.proxies[port] = [proxy]
        wait_port(port)
        return port

    def floor(self, backend_port: int) -> int:
        """The floor of a Python proxy (`bench/floor_proxy.py`): uvloop passing bytes, no rules."""
        port = free_port()
        proxy = self.spawn(
            f"floor-{port}",
            [
                sys.executable,
                str(ROOT / "bench/floor_proxy.py"),
                "--port",
                str(port),
                "--backend-port",
                str(backend_port),
            ],
        )
        self.proxies[port] = [proxy]
        wait_port(port)
        return port

    def litellm(self, backend_port: int) -> int | None:
        if not LITELLM_PYTHON.exists():
            return None
        port = free_port()
        conf = self.workdir / "litellm.yaml"
        conf.write_text(f"""
model_list:
  - model_name: {MODEL}
    litellm_params:
      model: openai/{MODEL}
      api_base: http://127.0.0.1:{backend_port}/v1
      api_key: unused
litellm_settings:
  telemetry: false
general_settings:
  master_key: {LITELLM_KEY}
""")
        env = dict(os.environ, LITELLM_LOG="ERROR", LITELLM_TELEMETRY="False")
        proxy = self.spawn(
            "litellm",
            [
                str(LITELLM_PYTHON),
                "-m",
                "litellm.proxy.proxy_cli",
                "--config",
                str(conf),
                "--port",
                str(port),
                "--host",
                "127.0.0.1",
                "--num_workers",
                "1",
            ],
            env=env,
        )
        self.proxies[port] = [proxy]
        wait_port(port, timeout_s=120)
        return port

    def cpu_seconds(self, port: int) -> tuple[float, float]:
        """CPU time used so far by the proxy on `port`, user and system apart: every process
        of its group (nginx's and the api's workers included; not the api's redis-server)."""
        tick = os.sysconf("SC_CLK_TCK")
        user = system = 0
        for _, fields in _group_stats(self.proxies[port][0].pid):  # its own session and group
            user += int(fields[11])  # utime
            system += int(fields[12])  # stime
        return user / tick, system / tick

    @contextmanager
    def pinned(self, port: int) -> Iterator[None]:
        """For the duration, the proxy on `port` (every thread of its process group) alone on
        the last CPU, and the load (this process, which runs the stream client) and the
        backend on the others; for the backend's own port (direct) only the load is pinned.
        So the load's bursts do not delay the proxy under test, and direct pays the same
        client and backend sharing a CPU as the proxies do, which the added gap cancels."""
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < 2:
            yield
            return
        everything, proxy_cpu, load_cpus = set(cpus), {cpus[-1]}, set(cpus[:-1])
        proxy = self.proxies.get(port, [])[:1]  # the proxy's group, not its redis-server
        placed = [(t, proxy_cpu) for p in proxy for t in _group_threads(p.pid)]
        placed += [(t, load_cpus) for p in self.backends for t in _group_threads(p.pid)]
        placed += [(t, load_cpus) for t in _group_threads(os.getpgrp(), os.getpid())]
        for tid, cpu_set in placed:
            with suppress(OSError):  # a thread that ended meanwhile
                os.sched_setaffinity(tid, cpu_set)
        try:
            yield
        finally:
            for tid, _ in placed:
                with suppress(OSError):
                    os.sched_setaffinity(tid, everything)

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGCONT)
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


def _group_stats(group: int) -> Iterator[tuple[int, list[str]]]:
    """The pid and /proc stat fields (those after the command) of every process in process
    group `group`."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # ended meanwhile
        if int(fields[2]) == group:  # pgrp
            yield int(entry), fields


def _group_threads(group: int, only: int | None = None) -> list[int]:
    """Every thread id of process group `group` (of process `only` alone, when given)."""
    pids = [only] if only is not None else [pid for pid, _ in _group_stats(group)]
    tids: list[int] = []
    for pid in pids:
        with suppress(OSError):
            tids.extend(int(t) for t in os.listdir(f"/proc/{pid}/task"))
    return tids


def have(tool: str) -> bool:
    return shutil.which(tool) is not None
