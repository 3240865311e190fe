"""A pure ASGI gate in front of every route: a request without a valid key is answered 401
before anything reads its body, so no route can leak a 400 or 422 to an anonymous caller and a
made-up key cannot make the api read and parse a body. Which rights the key has is still the
routes' own dependency's to decide.

The gate also bounds the management requests each key has in flight (everything but the
inference routes, which have their own limits, and async tasks, which have theirs): the api's
threadpool and database connections are shared by every team, so one key's 400 requests at
once are a 429 past `APPLIANCE_KEY_MAX_MANAGEMENT_REQUESTS`, not everyone's wait. The web UI's
pages carry no key but a session cookie (`api/ui_session.py`): they count against the key the
session was signed in with, so a browser shares its key's bound with the key's API clients."""

from __future__ import annotations

from starlette.concurrency import run_in_threadpool
from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api import ui_session
from api.deps import AppState, caller_of, key_of_raw
from api.errors import answer, envelope_of
from appliance.errors import AuthError, BadRequestError, RateLimitedError
from forwarder.paths import BY_PATH
from web.render import STATIC_URL

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
UI = "/ui"  # the web UI: a session cookie, not a key
PLAYGROUND_CHAT = "/ui/playground/chat"  # inference, bounded by the key's inference limits
MANAGEMENT_RETRY_AFTER_S = 1


def is_management(scope: Scope) -> bool:
    """Whether a request counts against its key's management requests in flight: not the
    inference routes (the playground's chat among them), async tasks or the UI's static files
    (no thread, no database; a page loads several at once)."""
    path: str = scope["path"]
    inference = scope["method"] == "POST" and (path in BY_PATH or path == PLAYGROUND_CHAT)
    return not inference and not path.startswith((ASYNC_TASKS, STATIC_URL))


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
        if scope["type"] != "http" or path in OPEN_EXACT:
            await self.app(scope, receive, send)
            return
        state: AppState | None = getattr(scope["app"].state, "appliance", None)
        slot: str | None = None
        try:
            counter = await self._counter(state, scope, path)
            if counter is not None and state is not None:
                most = state.settings.key_max_management_requests
                if most and is_management(scope):
                    self.slots.take(counter, most)
                    slot = counter
        except (AuthError, BadRequestError, RateLimitedError) as exc:
            status, out, body = answer(exc, envelope_of(path))
            await send({"type": "http.response.start", "status": status, "headers": out})
            await send({"type": "http.response.body", "body": body})
            return
        if slot is None:
            await self.app(scope, receive, send)
            return
        held = [slot]  # given back once: as the reply's last bytes go out, or when it fails

        def give_back() -> None:
            if held:
                self.slots.give_back(held.pop())

        async def sending(message: Message) -> None:
            # before the last bytes, not after the route returns: a client that sends its next
            # request once it has the reply finds the slot free (a dependency's clean-up, run
            # after the reply is sent, held it a moment longer)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                give_back()
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            give_back()

    async def _counter(self, state: AppState | None, scope: Scope, path: str) -> str | None:
        """Whose management requests the request counts as: its key's, or for the UI's pages
        the key its session was signed in with; None for what needs no key (a page with no
        session: it redirects to the sign-in) and while the api starts (the route answers as
        it would). A request with no key at all where one is needed: NO_KEY."""
        if path.startswith(OPEN_PREFIXES):
            if not path.startswith(UI) or state is None or not is_management(scope):
                return None
            token = HTTPConnection(scope).cookies.get(ui_session.SESSION_COOKIE)
            if not token or not state.settings.key_max_management_requests:
                return None
            ui = await run_in_threadpool(ui_session.load, state, token)
            if ui is None:
                return None
            ui_session.keep(scope, ui)  # the page's `signed_in` reads it again from here
            return ui.caller.counter()
        key = key_of_raw(scope.get("headers", ()))
        if key is None:
            raise NO_KEY
        if state is None:
            return None
        return (await caller_of(state, key)).counter()


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
