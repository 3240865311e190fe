"""A pure ASGI gate in front of every route: a request without a valid key is answered 401
before anything reads its body, so no route can leak a 400 or 422 to an anonymous caller and a
made-up key cannot make the api read and parse a body. Which rights the key has is still the
routes' own dependency's to decide."""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from api.deps import AppState, caller_of, key_of_raw
from api.errors import answer, envelope_of
from appliance.errors import AuthError, BadRequestError

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


class KeyGate:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or path in OPEN_EXACT or path.startswith(OPEN_PREFIXES):
            await self.app(scope, receive, send)
            return
        state: AppState | None = getattr(scope["app"].state, "appliance", None)
        try:
            key = key_of_raw(scope.get("headers", ()))
            if key is None:
                raise NO_KEY
            if state is not None:  # else still starting: the route answers as it would
                await caller_of(state, key)
        except (AuthError, BadRequestError) as exc:
            status, out, body = answer(exc, envelope_of(path))
            await send({"type": "http.response.start", "status": status, "headers": out})
            await send({"type": "http.response.body", "body": body})
            return
        await self.app(scope, receive, send)


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
