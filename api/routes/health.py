"""Health routes, open without a key: liveness of the api and readiness of its dependencies."""

from __future__ import annotations

from fastapi import APIRouter, Response

from api.deps import StateDep

router = APIRouter(tags=["health"])


@router.get("/healthz")
@router.get("/healthcheck")
def read_health() -> Response:
    return Response(status_code=200)


@router.get("/readyz")
def read_ready(state: StateDep) -> Response:
    try:
        state.redis.ping()
    except Exception:
        return Response("redis unavailable", status_code=503)
    return Response(status_code=200)
