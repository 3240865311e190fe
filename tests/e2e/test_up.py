"""`appliance up` runs api, builder and worker together with a private redis-server when no
Redis URL is set, and stops them all when it gets SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.harness import ADMIN_KEY, free_port, wait_until


def ignore_sigint() -> None:
    """As a shell's background job (`appliance up &`) starts a program: SIGINT ignored."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def start_up(tmp_path: Path, port: int, *, background: bool = False) -> subprocess.Popen[bytes]:
    """`appliance up` on `port`, its data and log (up.log) in `tmp_path`, in a session of its
    own (so `pgrep -s` finds what it started); `background`: handed SIGINT ignored."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")}
    env.update(
        {
            "APPLIANCE_DATA_DIR": str(tmp_path / "data"),
            "APPLIANCE_PORT": str(port),
            "APPLIANCE_ADMIN_KEY": ADMIN_KEY,
            "APPLIANCE_MODELS_DIR": str(tmp_path),
        }
    )
    log = open(tmp_path / "up.log", "wb")  # noqa: SIM115 - the child writes to it
    return subprocess.Popen(
        [sys.executable, "-m", "appliance", "up"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=ignore_sigint if background else None,
    )


def test_up_runs_every_role_on_a_private_redis(tmp_path: Path, docker_ready: None) -> None:
    port = free_port()
    up = start_up(tmp_path, port)
    try:
        url = f"http://127.0.0.1:{port}"

        def answers() -> bool:
            try:
                reply = httpx.get(
                    url + "/v1/llm/model-endpoints",
                    headers={"Authorization": f"Bearer {ADMIN_KEY}"},
                    timeout=2,
                )
            except httpx.HTTPError:
                return False
            return reply.status_code == 200

        wait_until(answers, 60, "the api started by `appliance up`")
        roles = {"builder started for install", "GPU inventory"}
        wait_until(
            lambda: all(r in (tmp_path / "up.log").read_text() for r in roles),
            30,
            "the builder to start",
        )
        assert (tmp_path / "data" / "redis" / "appendonlydir").exists()  # the private Redis
        children = subprocess.run(
            ["pgrep", "-s", str(up.pid)], capture_output=True, text=True
        ).stdout.split()
        assert len(children) >= 5  # up, api, builder, worker, redis-server
    finally:
        up.send_signal(signal.SIGTERM)  # to `up` alone, as `docker stop` would
        up.wait(30)
        print((tmp_path / "up.log").read_text()[-3000:])
    assert subprocess.run(["pgrep", "-s", str(up.pid)], capture_output=True).stdout == b""


def test_up_on_a_port_already_taken_stops_saying_so(tmp_path: Path, docker_ready: None) -> None:
    """The api cannot listen: it ends, and `up` stops the other roles and exits non-zero, where
    the api hung in its shutdown and `up` ran on, serving nothing."""
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    up = start_up(tmp_path, taken.getsockname()[1])
    try:
        code = up.wait(45)
    except subprocess.TimeoutExpired:
        code = None
    finally:
        if up.poll() is None:
            os.killpg(up.pid, signal.SIGKILL)
            up.wait(10)
        taken.close()
    text = (tmp_path / "up.log").read_text()
    assert code is not None, f"`up` ran on 45 s after its api could not listen:\n{text[-3000:]}"
    assert code != 0
    assert "address already in use" in text
    assert subprocess.run(["pgrep", "-s", str(up.pid)], capture_output=True).stdout == b""


def test_up_says_which_role_died_and_exits_non_zero(tmp_path: Path, docker_ready: None) -> None:
    """A role killed under `up` (the OOM killer, an admin's kill -9) stops the others, and
    `up` says which and how, and exits non-zero, so a supervisor restarts it."""
    port = free_port()
    up = start_up(tmp_path, port)
    try:

        def api_pid() -> int | None:
            found = subprocess.run(
                ["pgrep", "-P", str(up.pid), "-f", "appliance api"], capture_output=True, text=True
            ).stdout.split()
            return int(found[0]) if found else None

        wait_until(lambda: api_pid() is not None, 30, "the api started by `appliance up`")
        os.kill(api_pid() or 0, signal.SIGKILL)
        assert up.wait(60) == 128 + signal.SIGKILL
    finally:
        if up.poll() is None:
            os.killpg(up.pid, signal.SIGKILL)
        print((tmp_path / "up.log").read_text()[-3000:])
    said = (tmp_path / "up.log").read_text()
    assert "the api was killed by signal 9 (SIGKILL); stopping the other roles" in said
    assert subprocess.run(["pgrep", "-s", str(up.pid)], capture_output=True).stdout == b""


def test_roles_stop_when_up_itself_is_killed(tmp_path: Path, docker_ready: None) -> None:
    """`up` killed with SIGKILL (the OOM killer, an admin's kill -9) left its api, builder and
    worker (and its private redis-server) running with no parent: the next `up` found the
    port taken, and two builders ran on one install. Each now ends when `up` does."""
    port = free_port()
    up = start_up(tmp_path, port)

    def roles() -> list[str]:
        found = subprocess.run(
            ["pgrep", "-s", str(up.pid), "-f", "appliance (api|builder|worker)"],
            capture_output=True,
            text=True,
        )
        return found.stdout.split()

    try:
        wait_until(lambda: len(roles()) == 3, 30, "the roles started by `appliance up`")
        up.kill()
        up.wait(10)
        left = ["pgrep", "-s", str(up.pid)]  # the roles and the private redis-server
        wait_until(
            lambda: subprocess.run(left, capture_output=True).stdout == b"",
            30,
            "the roles and the private Redis to stop with `up`",
        )
    finally:
        subprocess.run(["pkill", "-KILL", "-s", str(up.pid)], capture_output=True)
        print((tmp_path / "up.log").read_text()[-3000:])


def test_a_second_ctrl_c_stops_up_at_once_in_a_line(tmp_path: Path, docker_ready: None) -> None:
    """Ctrl+C pressed twice in the terminal `up` runs in (SIGINT to its whole process group):
    the second, while `up` waited for its roles to stop (here the api, whose graceful wait a
    request still arriving holds), ended `up` with a KeyboardInterrupt traceback and left the
    roles stopping on their own with no parent. It now ends them at once, saying so; and so
    when `up` was started as a shell's background job, with SIGINT ignored (the roles, with
    handlers of their own, stopped on the first while `up` took that for a role's failure
    and ignored the second)."""
    port = free_port()
    up = start_up(tmp_path, port, background=True)
    log = tmp_path / "up.log"
    try:
        started = ("builder started for install", "worker running", "Uvicorn running")
        wait_until(lambda: all(s in log.read_text() for s in started), 60, "every role")
        arriving = socket.create_connection(("127.0.0.1", port))
        arriving.sendall(
            b"POST /v1/api-keys HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer " + ADMIN_KEY.encode() + b"\r\nContent-Length: 100\r\n\r\n{"
        )
        time.sleep(0.5)
        os.killpg(up.pid, signal.SIGINT)
        wait_until(lambda: "Shutting down" in log.read_text(), 10, "the api to begin its stop")
        time.sleep(1)
        os.killpg(up.pid, signal.SIGINT)
        up.wait(5)
        arriving.close()
    finally:
        if up.poll() is None:
            os.killpg(up.pid, signal.SIGKILL)
        print(log.read_text()[-3000:])
    said = log.read_text()
    assert "Traceback" not in said and "KeyboardInterrupt" not in said, said
    assert "interrupted again: killing the roles still running" in said
    assert subprocess.run(["pgrep", "-s", str(up.pid)], capture_output=True).stdout == b""
