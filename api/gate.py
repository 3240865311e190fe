"""A pure ASGI gate in front of every route: a request without a valid key is answered 401
before anything reads its body, so no route can leak a 400 or 422 to an anonymous caller and a
made-up key cannot make the api read and parse a body. Which rights the key has is still the
routes' own dependency's to decide.

The gate also bounds the management requests each key has in flight (everything but the
inference routes, which have their own limits, and async tasks, which have theirs): the api's
threadpool and database connections are shared by every team, so one key's 400 requests at
once are a 429 past `APPLIANCE_KEY_MAX_MANAGEMENT_REQUESTS`, not everyone's wait."""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from api.deps import AppState, caller_of, key_of_raw
from api.errors import answer, envelope_of
from appliance.errors import AuthError, BadRequestError, RateLimitedError
from forwarder.paths import BY_PATH

OPEN_PREFIXES = (
    "/healthz",
    "/healthcheck",
    "/readyz",
    "/docs",
    "/redoc",
    "/openapi.json",
    "/ui",
    "/favicon.ico",
)
OPEN_EXACT = ("/",)
NO_KEY = AuthError("an API key is required: send `Authorization: Bearer <key>`")
ASYNC_TASKS = "/v1/async-tasks"  # bounded by the key's queued tasks instead
MANAGEMENT_RETRY_AFTER_S = 1


def is_management(scope: Scope) -> bool:
    """Whether a request counts against its key's management requests in flight."""
    path: str = scope["path"]
    inference = scope["method"] == "POST" and path in BY_PATH
    return not inference and not path.startswith(ASYNC_TASKS)


class ManagementSlots:
    """The management requests each key has in flight in this process (the event loop's
    alone: no lock)."""

    def __init__(self) -> None:
        self._held: dict[str, int] = {}

    def take(self, key: str, most: int) -> None:
        held = self._held.get(key, 0)
        if held >= most:
            raise RateLimitedError(
                f"this key is at its limit of {held} management requests in flight at once "
                "(APPLIANCE_KEY_MAX_MANAGEMENT_REQUESTS): send the next when one has ended",
                retry_after_s=MANAGEMENT_RETRY_AFTER_S,
            )
        self._held[key] = held + 1

    def give_back(self, key: str) -> None:
        held = self._held.pop(key) - 1
        if held:
            self._held[key] = held


class KeyGate:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.slots = ManagementSlots()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or path in OPEN_EXACT or path.startswith(OPEN_PREFIXES):
            await self.app(scope, receive, send)
            return
        state: AppState | None = getattr(scope["app"].state, "appliance", None)
        slot: str | None = None
        try:
            key = key_of_raw(scope.get("headers", ()))
            if key is None:
                raise NO_KEY
            if state is not None:  # else still starting: the route answers as it would
                caller = await caller_of(state, key)
                most = state.settings.key_max_management_requests
                if most and is_management(scope):
                    self.slots.take(caller.counter(), most)
                    slot = caller.counter()
        except (AuthError, BadRequestError, RateLimitedError) as exc:
            status, out, body = answer(exc, envelope_of(path))
            await send({"type": "http.response.start", "status": status, "headers": out})
            await send({"type": "http.response.body", "body": body})
            return
        try:
            await self.app(scope, receive, send)
        finally:
            if slot is not None:
                self.slots.give_back(slot)


class HeadAsGet:
    """HEAD is answered as GET is, on every route that answers GET (HTTP requires it of every
    server; uptime monitors and load balancers check with it): routed as a GET, and uvicorn,
    which still reads the request as HEAD, sends the GET's head without its body."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "HEAD":
            scope = {**scope, "method": "GET"}
        await self.app(scope, receive, send)
