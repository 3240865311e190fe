"""Health routes, open without a key: liveness of the api and readiness of its dependencies."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import PlainTextResponse

from api.deps import StateDep

router = APIRouter(tags=["health"])


@router.get("/healthz", response_class=PlainTextResponse)
@router.get("/healthcheck", response_class=PlainTextResponse)
async def read_health() -> PlainTextResponse:  # no I/O: async saves a threadpool hop per probe
    return PlainTextResponse("")


@router.get(
    "/readyz",
    response_class=PlainTextResponse,
    responses={503: {"content": {"text/plain": {}}, "description": "Redis unavailable"}},
)
def read_ready(state: StateDep) -> PlainTextResponse:
    try:
        state.redis.ping()
    except Exception:
        return PlainTextResponse("redis unavailable", status_code=503)
    return PlainTextResponse("")
