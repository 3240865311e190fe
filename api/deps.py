"""What routes depend on: the app's state, a database session, and the authenticated caller."""

from __future__ import annotations

import base64
import binascii
import logging
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Annotated, Any

import redis
import redis.asyncio as aioredis
from fastapi import Depends, Request
from sqlalchemy.engine import Engine
from sqlmodel import Session
from starlette.concurrency import run_in_threadpool

from api.callers import Keys
from api.limits import FollowSlots, Limiter, Release
from api.submit import TaskSubmitter
from appliance import keys
from appliance.db import session_scope
from appliance.errors import AuthError, BadRequestError, ForbiddenError
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
    aredis: aioredis.Redis  # the same Redis for async code (log streams): holds no thread
    forwarder: Forwarder
    key_secret: bytes
    install_id: str
    limiter: Limiter
    submitter: TaskSubmitter  # async tasks: group commit, then queue
    key_cache: Keys = field(init=False)  # the verified keys (api/callers.py)
    follows: FollowSlots = field(default_factory=FollowSlots)  # log streams followed, per key

    def __post_init__(self) -> None:
        self.key_cache = Keys(self._read_key)

    def key_limits(self) -> keys.KeyLimits:
        s = self.settings
        return keys.KeyLimits(
            s.key_requests_per_minute,
            s.key_max_concurrent_requests,
            s.key_max_queued_tasks,
            s.key_max_tokens_per_request,
        )

    def _read_key(self, key: str) -> keys.Caller:
        with session_scope(self.reader) as session:
            return keys.verify(
                session=session, secret=self.key_secret, key=key, defaults=self.key_limits()
            )


async def get_state(request: Request) -> AppState:
    # async: FastAPI runs a plain-def dependency on the threadpool, a hop for one attribute read
    state: AppState = request.app.state.appliance
    return state


StateDep = Annotated[AppState, Depends(get_state)]


READING_METHODS = frozenset({"GET", "HEAD"})  # HEAD is routed as GET (`api/gate.HeadAsGet`)


def get_session(request: Request, state: StateDep) -> Iterator[Session]:
    """The request's session. A GET reads through the read-only engine: it takes no write lock,
    so one team's reads (however many, however slow) never hold up another's writes or the
    builder's and the worker's, and none waits for them. A GET cannot write (the write fails
    at once, on every call), so no GET's transaction can need the lock halfway. Every other
    method begins IMMEDIATE (`appliance/db.py`): its read-modify-write never fails on upgrade."""
    reading = request.method in READING_METHODS
    with session_scope(state.reader if reading else state.engine) as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]


KEY_TWICE = BadRequestError(
    "send the API key once: this request has two Authorization or two X-Api-Key headers",
    field="authorization",
)


def key_from_headers(request: Request) -> str | None:
    """The key from `Authorization: Bearer`, HTTP Basic (key as user name) or `x-api-key`."""
    return key_of_raw(request.scope["headers"])


def key_of_raw(headers: Iterable[tuple[bytes, bytes]]) -> str | None:
    """The key of a request's ASGI header list (lower-case names), as `parse_key` reads it.
    A request naming its key twice (two Authorization or two X-Api-Key headers) is refused
    (KEY_TWICE): a proxy in front and the appliance could each read another of them, and
    the key gate and a route would too. The fast lane hands such a request to uvicorn."""
    authorization: bytes | None = None
    api_key: bytes | None = None
    for name, value in headers:
        if name == b"authorization":
            if authorization is not None:
                raise KEY_TWICE
            authorization = value
        elif name == b"x-api-key":
            if api_key is not None:
                raise KEY_TWICE
            api_key = value
    return parse_key(
        authorization.decode("latin-1") if authorization is not None else "",
        api_key.decode("latin-1") if api_key is not None else None,
    )


def parse_key(authorization: str, api_key: str | None) -> str | None:
    """The key of the two header values (`key_of_raw`; the fast lane has no Request)."""
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
    return await caller_of(state, key_from_headers(request))


async def caller_of(state: AppState, key: str | None) -> keys.Caller:
    """The caller a key is (AuthError for none or a bad one): the routes' dependency and the
    key gate (`api/gate.py`) both ask here."""
    if key is None:
        raise AuthError("an API key is required: send `Authorization: Bearer <key>`")
    caller = state.key_cache.cached(key)
    if caller is not None:
        return caller
    found: keys.Caller = await run_in_threadpool(state.key_cache.verify, key)
    return found


CallerDep = Annotated[keys.Caller, Depends(authenticate)]


def address_of(request: Request) -> str | None:
    """The address a request came from, as the audit log records it."""
    return request.client.host if request.client else None


async def client_address(request: Request) -> str | None:  # async: no threadpool hop
    return address_of(request)


AddressDep = Annotated[str | None, Depends(client_address)]


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
