"""The api's outermost ASGI middleware, called by uvicorn for every request the fast lane does
not carry: a body over its route's limit is a 413 before anything reads it (a declared length
at once, a chunked body as soon as it passes the limit), before the key gate and before any
parsing; a body a route reads whole into memory (management routes, the UI's forms) takes its
bytes from the api's budget of bodies in flight (`api/bodies.py`) as the route reads it, by
key, or by client address on a route that asks none; and an error no handler answered is a
500 in the route's envelope that keeps the connection open, instead of uvicorn's plain 500 and
a dropped keep-alive connection."""

from __future__ import annotations

import logging

from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.bodies import BodyBudget, Reading
from api.deps import key_of_raw
from api.errors import PASSING, answer, envelope_of, unanswered
from api.gate import OPEN_EXACT, OPEN_PREFIXES
from appliance.errors import ApplianceError, BadRequestError, BodyTooLargeError

logger = logging.getLogger(__name__)

MANAGEMENT_BODY_BYTES = 2 * 1024 * 1024  # endpoint specs, keys, config documents, UI forms
FILE_BODY_BYTES = 513 * 1024 * 1024  # a 512 MiB batch file and its multipart framing
FILE_PATHS = ("/v1/files",)
# Model uploads: the API's and the UI's; their limit is `Settings.model_upload_max_bytes`.
MODEL_UPLOAD_PATHS = ("/v1/storage/model-files/", "/ui/models/files/")


class Shield:
    def __init__(
        self,
        app: ASGIApp,
        inference_paths: frozenset[str],
        inference_bytes: int,
        model_upload_bytes: int = MANAGEMENT_BODY_BYTES,
    ):
        self.app = app
        self.inference_paths = inference_paths
        self.inference_bytes = inference_bytes
        self.model_upload_bytes = model_upload_bytes

    def limit(self, path: str) -> tuple[int, str]:
        """The largest body `path` accepts, and what sets it: inference, file and model upload
        routes take large ones."""
        if path in self.inference_paths:
            return self.inference_bytes, "the setting APPLIANCE_MAX_BODY_BYTES"
        if path.startswith(FILE_PATHS):
            return FILE_BODY_BYTES, "a file's limit, 512 MiB, as OpenAI's"
        if path.startswith(MODEL_UPLOAD_PATHS):
            return self.model_upload_bytes, "the setting APPLIANCE_MODEL_UPLOAD_MAX_BYTES"
        return MANAGEMENT_BODY_BYTES, "the limit of management routes"

    def budget(self, scope: Scope, path: str) -> BodyBudget | None:
        """The budget of bodies in flight, for a route that reads its body whole into memory:
        not the inference routes (whose transports count their bodies themselves), nor the
        uploads, which stream to disk; none while the api starts."""
        if path in self.inference_paths or path.startswith((*FILE_PATHS, *MODEL_UPLOAD_PATHS)):
            return None
        core = getattr(getattr(scope.get("app"), "state", None), "inference", None)
        return core.bodies if core is not None else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        limit, source = self.limit(path)
        too_large = BodyTooLargeError(
            f"the request body is over this route's {limit} bytes ({source})"
        )
        length = dict(scope.get("headers", ())).get(b"content-length", b"0")
        if not length.isdigit() or int(length) > limit:
            await _error(send, path, too_large if length.isdigit() else _bad_length())
            return
        started = answered = False
        seen = 0
        budget = self.budget(scope, path)
        reading: Reading | None = None  # from when the route reads the body

        async def refuse(exc: ApplianceError) -> None:
            nonlocal answered
            if not answered:
                if not started:  # the route's own answer, whatever it makes of this, is dropped
                    answered = True
                    await _error(send, path, exc, close=True)
                raise exc

        async def counted() -> Message:
            nonlocal seen, reading
            if budget is not None and reading is None:  # the key gate let its key through
                reading = Reading(budget, bucket_of(scope, path))
                if refused := reading.upto(int(length)):
                    await refuse(refused)
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > limit:
                await refuse(too_large)
            if reading is not None:
                if refused := reading.upto(seen):  # a chunked body, counted as it comes
                    await refuse(refused)
                if not message.get("more_body", False):
                    reading.done()  # read whole, or the client gone
            return message

        async def watched(message: Message) -> None:
            nonlocal started
            if answered:
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, watched)
        except Exception as exc:
            if answered or isinstance(exc, ClientDisconnect):
                return  # a client gone half way through its body is no error, and hears nothing
            if started:
                raise  # half a reply is out: only closing the connection can end it
            answered_as = unanswered(exc)
            if answered_as in PASSING:  # load or Redis away, not a fault: a line, no traceback
                logger.warning("%s %s: %s (%s)", scope.get("method"), path, answered_as, exc)
            elif not isinstance(exc, ApplianceError):
                logger.exception("unanswered error on %s %s", scope.get("method"), path)
            await _error(send, path, answered_as)
        finally:
            if reading is not None:
                reading.done()


def bucket_of(scope: Scope, path: str) -> str:
    """Whose share of the budget a body counts in: its key's (valid: the key gate let it
    through), or on a route that asks no key (the UI's, by session), its client address's."""
    if path not in OPEN_EXACT and not path.startswith(OPEN_PREFIXES):
        try:
            key = key_of_raw(scope.get("headers", ()))
        except BadRequestError:
            key = None
        if key:
            return key
    client = scope.get("client")
    return f"address {client[0]}" if client else "address"


def _bad_length() -> ApplianceError:
    return BadRequestError("Content-Length must be a byte count")


async def _error(send: Send, path: str, exc: ApplianceError, close: bool = False) -> None:
    status, headers, body = answer(exc, envelope_of(path))
    if close or status == 413:  # its body is not read: end the connection rather than read it
        headers = [*headers, (b"connection", b"close")]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
