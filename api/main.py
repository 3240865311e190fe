"""The api's composition root: makes the app, wires state in the lifespan, mounts the routes."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import redis.asyncio as aioredis
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from api import errors, model_files
from api.deps import AppState
from api.gate import HeadAsGet, KeyGate
from api.inference.asgi import InferenceRoutes
from api.inference.call import Core
from api.limits import Limiter
from api.routes import (
    api_keys,
    audit,
    batch_completions,
    batches,
    config,
    docs,
    files,
    fine_tunes,
    gpus,
    health,
    hf_downloads,
    llm_endpoints,
    metrics,
    model_download,
    model_endpoints,
    openai,
    storage,
    tasks,
    ui,
    usage,
)
from api.shield import Shield
from api.storage import check_database_room
from api.submit import TaskSubmitter
from appliance import __version__, bus, keys
from appliance.db import open_engine, open_reader, session_scope
from appliance.install import install_id, key_secret
from appliance.settings import Settings
from forwarder.live import run_publisher
from forwarder.paths import PATHS
from forwarder.proxy import Forwarder, Limits
from forwarder.refresh import load_table
from forwarder.shared import SharedCounts
from forwarder.table import Target
from forwarder.upstream import UpstreamPool
from web.render import STATIC_DIR, STATIC_URL

logger = logging.getLogger(__name__)


GC_YOUNG_THRESHOLD = 20_000  # allocations between young collections; CPython's default: 700


def settle_collector() -> None:
    """Once started: everything start-up made lives as long as the process. Frozen, the
    collector no longer walks it (a full collection went from ~100 ms, every stream stalled
    at once, to ~15 ms under 256 streams here). A request's objects die with it, by reference
    counting, so a young collection finds mostly the objects of the requests in flight: at
    CPython's default of one every 700 allocations it walks each of those many times, about
    4,000 instructions a request on the lane (`bench/lane_cost.py`). At 20,000 it walks
    them a thirtieth as often."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, 10, 10)


def prepare(settings: Settings) -> None:
    """What happens once per start, before any api worker is forked: the schema migration,
    on the first start the admin key (printed once), and the removal of model uploads a
    stopped api left half written."""
    if model_files.remove_partial_uploads(settings.models_dir):
        logger.info("removed model uploads left unfinished by the last run")
    engine = open_engine(settings.database_path)
    try:
        with session_scope(engine) as session:
            made = keys.ensure_admin_key(
                session=session, secret=key_secret(settings.data_dir), text=settings.admin_key
            )
    finally:
        engine.dispose()
    if made and not settings.admin_key:
        path = settings.data_dir / "admin-key"
        path.touch(mode=0o600)
        path.write_text(made + "\n")
        print(f"Admin API key (shown once; also in {path}): {made}", flush=True)


async def _refresh_routes(state: AppState) -> None:
    """Keep the routing table fresh: on every announcement and every few seconds. While Redis
    is away (restarting, say) it is read every few seconds alone, and followed again once
    Redis is back: a Redis error must not end the refresher, or the api never sees a replica
    replaced afterwards."""
    interval_s = state.settings.routing_refresh_s
    while True:
        try:
            await _follow_routes(state)
        except aioredis.RedisError as exc:
            logger.warning(
                "routes: Redis unavailable (%s); reading them every %.1f s", exc, interval_s
            )
            read_at = time.monotonic()
            state.forwarder.update(await run_in_threadpool(load_table, state.engine), read_at)
            await asyncio.sleep(interval_s)


async def _follow_routes(state: AppState) -> None:
    client = aioredis.Redis.from_url(str(state.settings.redis_url))
    pubsub = client.pubsub()
    try:
        await pubsub.subscribe(bus.ROUTES_CHANNEL)
        while True:
            read_at = time.monotonic()
            table = await run_in_threadpool(load_table, state.engine)
            state.forwarder.update(table, read_at)
            await pubsub.get_message(
                ignore_subscribe_messages=True, timeout=state.settings.routing_refresh_s
            )
            while await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.01):
                pass  # a burst of announcements needs one reload
    finally:
        await pubsub.aclose()  # type: ignore[no-untyped-call]
        await client.aclose()


async def _stop(*tasks: asyncio.Task[None]) -> None:
    """Cancel the api's own background tasks and wait until they have ended. redis-py can lose
    a cancel that lands while it connects or reads (the task then runs on, and a shutdown
    waiting for it never ends), so one still running after a second is cancelled again."""
    pending = set(tasks)
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=1.0)
    for task in tasks:
        if not task.cancelled() and task.exception() is not None:
            logger.error("background task ended with an error", exc_info=task.exception())


def _demand(state: AppState) -> object:
    def record(route: Target) -> None:
        with contextlib.suppress(Exception):
            bus.nudge_builder(state.redis)

    return record


def create_app(
    settings: Settings, shared: SharedCounts | None = None, worker: int | None = None
) -> FastAPI:
    """The api's app; `shared` and `worker` when it is one of several api worker processes."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = open_engine(settings.database_path)
        forwarder = Forwarder(
            limits=Limits.of(settings),
            shared=shared,
            worker=worker,
            pool=UpstreamPool(key_secret(settings.data_dir)),
        )
        client = bus.connect(str(settings.redis_url))
        state = AppState(
            settings=settings,
            engine=engine,
            reader=open_reader(settings.database_path),
            redis=client,
            # a request uses one connection at most (a followed log stream holds one): with as
            # many as the api holds connections, the pool never runs out before they do
            aredis=aioredis.Redis.from_url(
                str(settings.redis_url),
                socket_connect_timeout=5,
                max_connections=settings.max_connections,
            ),
            forwarder=forwarder,
            limiter=Limiter(str(settings.redis_url), settings.inflight_lease_s),
            key_secret=key_secret(settings.data_dir),
            install_id=install_id(settings.data_dir),
            submitter=TaskSubmitter(
                engine,
                client,
                functools.partial(check_database_room, settings, what="storing tasks"),
            ),
        )
        forwarder.on_demand = _demand(state)  # type: ignore[assignment]
        await forwarder.start()
        state.submitter.start()
        app.state.appliance = state
        app.state.inference = Core(state)  # api/lane/front.py finds it here; until then, hands on
        settle_collector()
        refresher = asyncio.create_task(_refresh_routes(state))
        publisher = asyncio.create_task(run_publisher(forwarder, str(settings.redis_url)))
        try:
            yield
        finally:
            await _stop(refresher, publisher)
            await app.state.inference.shut_down()  # calls still waiting are told the api stops
            await state.submitter.close()  # what it was handed is stored before Redis closes
            await forwarder.close()
            await state.limiter.close()
            await state.aredis.aclose()
            state.redis.close()
            state.reader.dispose()
            engine.dispose()

    app = FastAPI(
        title="Model Engine Appliance",
        version=__version__,
        lifespan=lifespan,
        docs_url=None,  # api/routes/docs.py serves them, at fixed releases
        redoc_url=None,
    )
    errors.install(app, pages=ui.bad_request)  # the web UI answers its refusals as pages
    app.add_middleware(InferenceRoutes)  # pure ASGI: the inference POST routes
    app.add_middleware(KeyGate)  # no key at all is a 401 before any body is read
    if settings.cors_origins:  # outermost, so preflights are answered before the gate
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_credentials=False,
            allow_methods=["*"],
            allow_headers=["authorization", "content-type", "x-api-key"],
        )
    inference = frozenset(p.path for p in PATHS)
    app.add_middleware(
        Shield,
        inference_paths=inference,
        inference_bytes=settings.max_body_bytes,
        model_upload_bytes=settings.model_upload_max_bytes,
    )
    app.add_middleware(HeadAsGet)  # outermost: every layer sees a HEAD as the GET it answers
    # FastAPI tries the routers in this order on every request: the often-called ones first
    app.include_router(health.router)
    app.include_router(docs.router)
    app.include_router(tasks.router, responses=errors.ERROR_RESPONSES)
    app.include_router(model_download.router, responses=errors.ERROR_RESPONSES)
    app.include_router(llm_endpoints.router, responses=errors.ERROR_RESPONSES)
    app.include_router(model_endpoints.router, responses=errors.ERROR_RESPONSES)
    app.include_router(gpus.router, responses=errors.ERROR_RESPONSES)
    app.include_router(hf_downloads.router, responses=errors.ERROR_RESPONSES)
    app.include_router(api_keys.router, responses=errors.ERROR_RESPONSES)
    app.include_router(openai.router, responses=errors.ERROR_RESPONSES)
    app.include_router(metrics.router, responses=errors.ERROR_RESPONSES)
    app.include_router(files.router, responses=errors.ERROR_RESPONSES)
    app.include_router(fine_tunes.router, responses=errors.ERROR_RESPONSES)
    app.include_router(batches.router, responses=errors.ERROR_RESPONSES)
    app.include_router(batch_completions.router, responses=errors.ERROR_RESPONSES)
    app.include_router(usage.router, responses=errors.ERROR_RESPONSES)
    app.include_router(audit.router, responses=errors.ERROR_RESPONSES)
    app.include_router(config.router, responses=errors.ERROR_RESPONSES)
    app.include_router(storage.router, responses=errors.ERROR_RESPONSES)
    app.include_router(
        ui.router, responses=errors.ERROR_RESPONSES
    )  # the web UI, and its static files below
    app.include_router(ui.root)
    app.add_exception_handler(ui.PageRefusedError, ui.refused)
    app.mount(STATIC_URL, StaticFiles(directory=STATIC_DIR), name="ui-static")
    return app
