"""Entry point of the worker role (`appliance worker`): runs async tasks and batch requests.

One process: the job runner (an asyncio loop with `worker_concurrency` jobs in flight, see
`forwarder.worker.runner`), the sweeper thread and the heartbeat. Add worker containers or processes
to scale out; the sweeper's Redis lock keeps one sweep at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import signal
import threading
import time

import uvloop

from appliance import bus, disk
from appliance.db import open_engine, open_reader
from appliance.install import callback_secret, key_secret
from appliance.settings import Settings
from forwarder.proxy import Forwarder, Limits
from forwarder.table import Target
from forwarder.upstream import UpstreamPool
from forwarder.worker import callbacks, jobs, taskstore
from forwarder.worker.runner import Failing, Runner
from forwarder.worker.sweeper import Sweeper

logger = logging.getLogger(__name__)

HEARTBEAT_EVERY_S = 10.0
NUDGE_EVERY_S = 2.0


def _heartbeat(settings: Settings, stop: threading.Event) -> None:
    client = bus.connect(str(settings.redis_url))
    failing = Failing("the heartbeat to Redis", logger)  # a line a minute while Redis is away
    while not stop.is_set():
        try:
            bus.beat(client, "worker")
        except Exception as exc:
            failing.failed(exc, time.monotonic())
        else:
            failing.worked()
        stop.wait(HEARTBEAT_EVERY_S)


def _demand_nudger(settings: Settings) -> object:
    client = bus.connect(str(settings.redis_url))
    last = [0.0]

    def nudge(route: Target) -> None:
        if time.monotonic() - last[0] >= NUDGE_EVERY_S:
            last[0] = time.monotonic()
            with contextlib.suppress(Exception):
                bus.nudge_builder(client)

    return nudge


async def _serve(settings: Settings, stop_threads: threading.Event) -> None:
    engine = open_engine(settings.database_path)
    committer = taskstore.GroupCommitter(engine)
    forwarder = Forwarder(
        limits=Limits.of(settings), pool=UpstreamPool(key_secret(settings.data_dir))
    )
    forwarder.on_demand = _demand_nudger(settings)  # type: ignore[assignment]
    runtime = jobs.Runtime(
        committer=committer,
        forwarder=forwarder,
        callbacks=callbacks.CallbackSender(
            secret=callback_secret(settings.data_dir),
            allowed_hosts=tuple(settings.callback_allowed_hosts),
            max_attempts=settings.callback_max_attempts,
            timeout_s=settings.callback_timeout_s,
        ),
        hold_s=settings.activation_timeout_s,
        keep_s=settings.task_result_ttl_s,
        max_attempts=settings.task_max_attempts,
        result_max_bytes=settings.task_result_max_bytes,
        room=functools.partial(
            disk.check_room,
            settings.database_path,
            reserve=settings.disk_reserve_bytes,
            what="storing the task's result",
        ),
    )
    reader = open_reader(settings.database_path)
    runner = Runner(
        engine,
        reader,
        bus.connect(str(settings.redis_url)),
        runtime,
        concurrency=settings.worker_concurrency,
        lease_s=settings.task_lease_s,
        routing_refresh_s=settings.routing_refresh_s,
    )
    sweeper = Sweeper(
        engine,
        bus.connect(str(settings.redis_url)),
        files_dir=settings.data_dir / "files",
        grace_s=settings.task_lease_s,
        interval_s=settings.sweep_interval_s,
        audit_retention_days=settings.audit_retention_days,
        audit_max_entries_per_team=settings.audit_max_entries_per_team,
    )
    threading.Thread(target=sweeper.loop, args=(stop_threads,), name="sweeper", daemon=True).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    logger.info("worker running %d tasks at a time", settings.worker_concurrency)
    try:
        await runner.run(stop)
    finally:
        committer.close()
        engine.dispose()
        reader.dispose()


def main(settings: Settings) -> None:
    stop = threading.Event()
    beat = threading.Thread(target=_heartbeat, args=(settings, stop), name="heartbeat", daemon=True)
    beat.start()
    try:
        uvloop.run(_serve(settings, stop))
    finally:
        stop.set()
