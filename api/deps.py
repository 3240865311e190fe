"""What routes depend on: the app's state, a database session, and the authenticated caller."""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Annotated, Any

import redis
from fastapi import Depends, Request
from sqlalchemy.engine import Engine
from sqlmodel import Session
from starlette.concurrency import run_in_threadpool

from api.callers import KEY_CACHE_TTL_S, cached_caller
from api.limits import Limiter, Release
from api.submit import TaskSubmitter
from appliance import keys
from appliance.db import session_scope
from appliance.errors import AuthError, ForbiddenError
from appliance.settings import Settings
from forwarder.proxy import Forwarder

logger = logging.getLogger(__name__)


@dataclass
class AppState:
    """Long-lived objects of one api process, made in the lifespan."""

    settings: Settings
    engine: Engine
    reader: Engine  # read-only, never waits for a writer: key lookups
    redis: redis.Redis
    forwarder: Forwarder
    key_secret: bytes
    install_id: str
    limiter: Limiter
    submitter: TaskSubmitter  # async tasks: group commit, then queue
    _key_cache: dict[str, tuple[float, keys.Caller | None]] = field(default_factory=dict)
    _reverifying: set[str] = field(default_factory=set)

    def key_limits(self) -> keys.KeyLimits:
        s = self.settings
        return keys.KeyLimits(
            s.key_requests_per_minute,
            s.key_max_concurrent_requests,
            s.key_max_queued_tasks,
            s.key_max_tokens_per_request,
        )

    def reverify_soon(self, key: str) -> None:
        """Verify `key` again in a worker thread, once at a time per key."""
        if key in self._reverifying:
            return
        self._reverifying.add(key)

        def reverify() -> None:
            try:
                self.verify_key(key, fresh=True)
            except AuthError:
                pass  # cached as invalid: the next request takes the path that answers 401
            except Exception:
                logger.exception("could not verify a key again; the next miss retries")
            finally:
                self._reverifying.discard(key)

        asyncio.get_running_loop().run_in_executor(None, reverify)

    def verify_key(self, key: str, *, fresh: bool = False) -> keys.Caller:
        now = time.monotonic()
        cached = self._key_cache.get(key)
        if not fresh and cached is not None and now - cached[0] < KEY_CACHE_TTL_S:
            if cached[1] is None:
                raise AuthError("invalid API key")
            return cached[1]
        try:
            with session_scope(self.reader) as session:
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
    return parse_key(request.headers.get("authorization", ""), request.headers.get("x-api-key"))


def parse_key(authorization: str, api_key: str | None) -> str | None:
    """`key_from_headers` on the two header values (the fast lane has no Request)."""
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    if scheme.lower() == "basic" and value.strip():
        try:
            user = base64.b64decode(value.strip()).decode().partition(":")[0]
        except (binascii.Error, UnicodeDecodeError):
            return None
        return user or None
    return api_key or None


async def authenticate(request: Request, state: StateDep) -> keys.Caller:
    key = key_from_headers(request)
    if key is None:
        raise AuthError("an API key is required: send `Authorization: Bearer <key>`")
    caller = cached_caller(state, key)
    if caller is not None:
        return caller
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
    release: Release | None = await state.limiter.admit(caller)
    try:
        yield caller
    finally:
        if release is not None:
            await release()


AdmittedDep = Annotated[keys.Caller, Depends(admitted)]
