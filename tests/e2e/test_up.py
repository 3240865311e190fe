"""`appliance up` runs api, builder and worker together with a private redis-server when no
Redis URL is set, and stops them all when it gets SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx

from tests.harness import ADMIN_KEY, free_port, wait_until


def test_up_runs_every_role_on_a_private_redis(tmp_path: Path, docker_ready: None) -> None:
    port = free_port()
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
    up = subprocess.Popen(
        [sys.executable, "-m", "appliance", "up"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
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
