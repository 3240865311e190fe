"""`GET /metrics`: the data plane's Prometheus metrics, for keys with the `admin` scope (only
health routes are open without a key). With several api workers, one answers for all: its
own numbers plus the others' as they published them (at most a second old)."""

from __future__ import annotations

import json

from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.concurrency import run_in_threadpool

from api.deps import AppState, StateDep, require
from appliance import bus
from forwarder.metrics import Snapshot, exposition

router = APIRouter(tags=["metrics"], dependencies=[require("admin")])


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text"}},
)
async def read_metrics(state: StateDep) -> Response:
    others = await run_in_threadpool(_other_workers, state)
    body = exposition(state.forwarder.metrics.registry, others)
    return Response(body, media_type=CONTENT_TYPE_LATEST)


def _other_workers(state: AppState) -> list[list[Snapshot]]:
    """The other api workers' counters as they last published them (none with one worker)."""
    me, workers = state.forwarder.worker, state.settings.api_workers
    if me is None or workers < 2:
        return []
    names = [bus.API_METRICS_KEY.format(worker=i) for i in range(workers) if i != me]
    return [json.loads(raw) for raw in state.redis.mget(names) if raw]
