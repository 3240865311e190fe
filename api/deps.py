"""What routes depend on: the app's state, a database session, and the authenticated caller."""

from __future__ import annotations

import base64
import binascii
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Annotated, Any

import redis
from fastapi import Depends, Request
from sqlalchemy.engine import Engine
from sqlmodel import Session
from starlette.concurrency import run_in_threadpool

from api.limits import Limiter, Release
from api.submit import TaskSubmitter
from appliance import keys
from appliance.db import session_scope
from appliance.errors import AuthError, ForbiddenError
from appliance.settings import Settings
from forwarder.proxy import Forwarder

KEY_CACHE_TTL_S = 1.0  # a revoked key is refused within this long


@dataclass
class AppState:
    """Long-lived objects of one api process, made in the lifespan."""

    settings: Settings
    engine: Engine
    redis: redis.Redis
    forwarder: Forwarder
    key_secret: bytes
    install_id: str
    limiter: Limiter
    submitter: TaskSubmitter  # async tasks: group commit, then queue
    _key_cache: dict[str, tuple[float, keys.Caller | None]] = field(default_factory=dict)

    def key_limits(self) -> keys.KeyLimits:
        s = self.settings
        return keys.KeyLimits(
            s.key_requests_per_minute,
            s.key_max_concurrent_requests,
            s.key_max_queued_tasks,
            s.key_max_tokens_per_request,
        )

    def verify_key(self, key: str) -> keys.Caller:
        now = time.monotonic()
        cached = self._key_cache.get(key)
        if cached is not None and now - cached[0] < KEY_CACHE_TTL_S:
            if cached[1] is None:
                raise AuthError("invalid API key")
            return cached[1]
        try:
            with session_scope(self.engine) as session:
                caller = keys.verify(
                    session=session, secret=self.key_secret, key=key, defaults=self.key_limits()
                )
        except AuthError:
            self._key_cache[key] = (now, None)
            raise
        if len(self._key_cache) > 10_000:
            self._key_cache.clear()
        self._key_cache[key] = (now, caller)
        return caller


async def get_state(request: Request) -> AppState:
    # async: FastAPI runs a plain-def dependency on the threadpool, a hop for one attribute read
    state: AppState = request.app.state.appliance
    return state


StateDep = Annotated[AppState, Depends(get_state)]


def get_session(state: StateDep) -> Iterator[Session]:
    with session_scope(state.engine) as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]


def key_from_headers(request: Request) -> str | None:
    """The key from `Authorization: Bearer`, HTTP Basic (key as user name) or `x-api-key`."""
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    if scheme.lower() == "basic" and value.strip():
        try:
            user = base64.b64decode(value.strip()).decode().partition(":")[0]
        except (binascii.Error, UnicodeDecodeError):
            return None
        return user or None
    return request.headers.get("x-api-key") or None


async def authenticate(request: Request, state: StateDep) -> keys.Caller:
    key = key_from_headers(request)
    if key is None:
        raise AuthError("an API key is required: send `Authorization: Bearer <key>`")
    cached = state._key_cache.get(key)
    fresh = cached is not None and time.monotonic() - cached[0] < KEY_CACHE_TTL_S
    if fresh and cached is not None and cached[1] is not None:
        return cached[1]
    return await run_in_threadpool(state.verify_key, key)


CallerDep = Annotated[keys.Caller, Depends(authenticate)]


def require(scope: str) -> Any:
    async def check(caller: CallerDep) -> keys.Caller:  # pure: no threadpool hop
        if not caller.can(scope):
            raise ForbiddenError(f"this key lacks the {scope!r} scope")
        return caller

    return Depends(check)


async def admitted(state: StateDep, caller: CallerDep) -> AsyncIterator[keys.Caller]:
    """Counts the request against its key's rate and concurrency limits while it runs."""
    release: Release = await state.limiter.admit(caller)
    try:
        yield caller
    finally:
        await release()


AdmittedDep = Annotated[keys.Caller, Depends(admitted)]
