"""Several api workers on a fresh data directory: the schema is migrated and the admin key made
once, before the workers are forked, so none of them can fail its start on a locked database."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from tests.harness import ADMIN_KEY, Appliance, RedisServer

STARTS = 20
AT_ONCE = 2  # two starts at a time: the same 20 fresh directories in 80 s instead of 115 (idle VM)
WORKERS = "2"


def test_several_workers_always_start_on_a_fresh_data_directory(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}

    def start(attempt: int) -> None:
        appliance = Appliance(
            tmp_path / f"start{attempt}", redis_server, env_extra={"APPLIANCE_API_WORKERS": WORKERS}
        )
        try:
            appliance.start(roles=("api",))
            for _ in range(6):  # each on a new connection, so every worker answers some
                reply = httpx.get(appliance.url + "/v1/models", headers=headers, timeout=10)
                assert reply.status_code == 200, (attempt, reply.text)
            assert appliance.procs["api"].poll() is None, f"start {attempt}: the api exited"
        except BaseException:
            print(appliance.logs())
            raise
        finally:
            appliance.stop()

    with ThreadPoolExecutor(AT_ONCE) as pool:
        for done in [pool.submit(start, attempt) for attempt in range(STARTS)]:
            done.result()
