"""A pure ASGI gate in front of every route: a request that carries no key at all is answered
401 before anything reads its body, so no route can leak a 400 or 422 to an anonymous caller.
Which key, and whether it is valid, is still the routes' own dependency's to decide."""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from api.errors import answer, envelope_of
from appliance.errors import AuthError

OPEN_PREFIXES = ("/healthz", "/healthcheck", "/readyz", "/docs", "/redoc", "/openapi.json", "/ui")
OPEN_EXACT = ("/",)
CREDENTIAL_HEADERS = (b"authorization", b"x-api-key")
NO_KEY = AuthError("an API key is required: send `Authorization: Bearer <key>`")


class KeyGate:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if (
            scope["type"] != "http"
            or path in OPEN_EXACT
            or path.startswith(OPEN_PREFIXES)
            or any(name in CREDENTIAL_HEADERS for name, _ in scope.get("headers", ()))
        ):
            await self.app(scope, receive, send)
            return
        status, headers, body = answer(NO_KEY, envelope_of(path))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
