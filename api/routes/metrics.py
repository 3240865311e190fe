"""`GET /metrics`: the data plane's Prometheus metrics, for keys with the `admin` scope (only
health routes are open without a key)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from api.deps import StateDep, require

router = APIRouter(tags=["metrics"], dependencies=[require("admin")])


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text"}},
)
async def read_metrics(state: StateDep) -> Response:
    body = generate_latest(state.forwarder.metrics.registry)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
