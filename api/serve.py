"""Entry point of the api role (`appliance api`): uvicorn with uvloop and httptools, its
connections opened by the fast lane's front protocol (`api/lane/front.py`), or with the lane
off by uvicorn's httptools protocol with a bound on request heads (`api/lane/glue.py`).

With `api_workers` > 1 this process binds the port, makes the shared in-flight counters
(`forwarder/shared.py`) and forks the workers, each accepting on its own SO_REUSEPORT socket
for the port. It stays as their supervisor: SIGTERM or SIGINT is passed on to every worker
(each shuts down gracefully), and if one worker dies the others are stopped too and it exits
non-zero, so the container or `appliance up` restarts the api whole (a dead worker's counts
would linger in the shared memory otherwise).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import signal
import socket
import sys
from collections.abc import Callable
from types import FrameType
from typing import cast

import uvicorn
from fastapi import FastAPI

from api.lane.front import front_protocol
from api.lane.glue import AddressGate, plain_protocol
from api.main import create_app, prepare
from appliance.settings import Settings
from forwarder.shared import SharedCounts

logger = logging.getLogger(__name__)

BACKLOG = 2048


def _config(settings: Settings, shared: SharedCounts | None, worker: int | None) -> uvicorn.Config:
    app = create_app(settings, shared=shared, worker=worker)
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        # uvicorn only calls what it is given, as it would a protocol class; either way a
        # request head over max_head_bytes is answered 431 (httptools alone has no bound)
        http=cast("type[asyncio.Protocol]", _protocol(app, settings)),
        ws="none",  # no websocket server: a request asking for one is declined (glue.py)
        log_level=settings.log_level.lower(),
        access_log=False,
        timeout_graceful_shutdown=10,
        limit_concurrency=settings.max_connections,  # uvicorn's own cap, without the lane
        proxy_headers=True,
        forwarded_allow_ips=settings.forwarded_allow_ips,
        backlog=BACKLOG,
    )


def _protocol(app: FastAPI, settings: Settings) -> Callable[..., asyncio.Protocol]:
    per_address = settings.max_connections_per_address
    if settings.fast_lane:
        return front_protocol(
            app,
            settings.header_timeout_s,
            settings.max_connections,
            settings.max_head_bytes,
            per_address,
        )
    return plain_protocol(
        settings.max_head_bytes, AddressGate(per_address), settings.header_timeout_s
    )


def main(settings: Settings) -> None:
    _open_files(settings.max_connections)
    prepare(settings)  # once, before any fork: several workers never race to migrate
    if settings.api_workers == 1:
        uvicorn.Server(_config(settings, None, None)).run()
        return
    sockets = [_listen(settings.host, settings.port) for _ in range(settings.api_workers)]
    shared = SharedCounts(settings.api_workers)
    workers: dict[int, int] = {}  # pid -> worker index
    for index, sock in enumerate(sockets):
        pid = os.fork()
        if pid == 0:  # the worker: no threads or loops were started before the fork
            for other in sockets:
                if other is not sock:
                    other.close()
            shared.bind(index)
            uvicorn.Server(_config(settings, shared, index)).run(sockets=[sock])
            os._exit(0)
        workers[pid] = index
    for sock in sockets:
        sock.close()
    sys.exit(_supervise(workers))


def _open_files(connections: int) -> None:
    """Room for the connection cap and the api's own files, within the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = connections + 1024
    if soft != resource.RLIM_INFINITY and soft < want:
        top = want if hard == resource.RLIM_INFINITY else min(want, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, top), hard))


def _listen(host: str, port: int) -> socket.socket:
    """One worker's listening socket. With SO_REUSEPORT the kernel spreads new connections
    over the workers' sockets; one socket shared by all would let one worker accept nearly
    every connection of a burst while the others idle."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(BACKLOG)
    return sock


def _supervise(workers: dict[int, int]) -> int:
    stopping = False

    def stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    logger.info("api: %d workers", len(workers))
    code = 0
    while workers:
        pid, status = os.wait()
        index = workers.pop(pid, None)
        if index is None:
            continue
        if not stopping:
            logger.error("api worker %d exited (status %d); stopping the others", index, status)
            code = 1
            stop(signal.SIGTERM, None)
    return code
