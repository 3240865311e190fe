"""The one place domain errors become HTTP answers: a class-to-status table looked up by MRO,
and the envelope each family of routes answers in (`envelope_of`).

- OpenAI's routes (`/v1/chat/completions`, `/v1/models`, `/v1/batches`...) and unknown paths
  under /v1 and /v2: OpenAI's envelope, an invalid request 400.
- LLM Engine's routes (`/v1/llm/...`, `/v1/model-endpoints`, tasks): `{"detail": ...}` with LLM
  Engine's statuses, the ones its client maps to exceptions: an invalid request (a typed body's
  too) or a name that exists is 400 (`BadRequestError`), a change already in progress 409.
- `/v1/files`, which both clients call: OpenAI's envelope with LLM Engine's `detail` beside it.
- The appliance's own routes (keys, storage, config, the web UI): `{"detail": ...}`, an invalid
  request 422 and a conflict 409. A request of the web UI a browser shows (it accepts
  text/html) is refused with a page (`install`'s `pages`), never raw JSON; the UI's scripts
  get the JSON.
"""

from __future__ import annotations

import json
import math
import sqlite3
from collections.abc import Awaitable, Callable
from typing import Any, Final

import redis
import sqlalchemy.exc
from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException

from appliance import errors
from forwarder.paths import (
    BOTH,
    DETAIL,
    LLM_ENGINE,
    LLM_ENGINE_PATHS,
    OPENAI,
    OPENAI_PATHS,
    SHARED_PATHS,
)

STATUS: dict[type[errors.ApplianceError], int] = {
    errors.BadRequestError: 400,
    errors.InvalidSpecError: 422,
    errors.BodyTooLargeError: 413,
    errors.InsufficientStorageError: 507,
    errors.NotFoundError: 404,
    errors.ConflictError: 409,
    errors.AuthError: 401,
    errors.ForbiddenError: 403,
    errors.RateLimitedError: 429,
    errors.CapacityError: 503,
    errors.EndpointDownError: 503,
    errors.UpstreamError: 502,
}
# Where a family of routes answers differently from STATUS (see the module's docstring)
_OPENAI_STATUS: dict[type[errors.ApplianceError], int] = {errors.InvalidSpecError: 400}
STATUS_BY_ENVELOPE: Final = {
    DETAIL: STATUS,
    OPENAI: STATUS | _OPENAI_STATUS,
    BOTH: STATUS | _OPENAI_STATUS,
    LLM_ENGINE: STATUS
    | {
        errors.InvalidSpecError: 400,
        errors.ConflictError: 400,  # LLM Engine's "already exists"
        errors.OperationInProgressError: 409,
    },
}
OPENAI_PREFIXES = ("/v1/", "/v2/")  # an unknown path here answers in OpenAI's envelope
CHAT_INSTEAD = "; use chat completions (POST /v1/chat/completions, client.chat.completions)"
# OpenAI's APIs one box does not serve, by path: what their 404 says after "Invalid URL", so an
# SDK user learns what to call instead
OPENAI_UNSERVED: Final = {
    "/v1/responses": "this appliance keeps no responses: it answers POST /v1/responses alone "
    "(no retrieve, cancel, delete or input items); send the earlier turns in `input`",
    "/v1/chat/completions": "this appliance keeps no chat completions: it answers POST "
    "/v1/chat/completions alone (no retrieve, list, update, delete or messages); keep the reply "
    "yourself",
    "/v1/assistants": "the Assistants API is not available on this appliance" + CHAT_INSTEAD,
    "/v1/threads": "the Assistants API is not available on this appliance" + CHAT_INSTEAD,
    "/v1/vector_stores": "vector stores are not available on this appliance; embed with POST "
    "/v1/embeddings and store the vectors yourself",
    "/v1/fine_tuning": "fine-tuning is not available on this appliance: it serves models and "
    "does not train them",
    "/v1/images": "image generation is not available on this appliance: it serves language "
    "and embedding models",
    "/v1/audio": "audio is not available on this appliance: it serves language and embedding "
    "models",
    "/v1/moderations": "moderation is not available on this appliance" + CHAT_INSTEAD,
    "/v1/realtime": "the Realtime API is not available on this appliance" + CHAT_INSTEAD,
}
# Methods of OpenAI's served paths the appliance does not take (a 405), and what to do instead.
OPENAI_METHOD_UNSERVED: Final = {
    "/v1/chat/completions": OPENAI_UNSERVED["/v1/chat/completions"],
    "/v1/models": "a model here is an endpoint: delete one with DELETE "
    "/v1/llm/model-endpoints/{name} (or on the web UI's endpoint page)",
}
OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
}


class OpenAIErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int | str | None = None


class ErrorBody(BaseModel):
    """Every error answer: `detail` (FastAPI, LLM Engine) or `error` (OpenAI's envelope)."""

    detail: str | list[dict[str, Any]] | None = None
    error: OpenAIErrorBody | None = None


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": text}
    for status, text in [
        (400, "Bad request"),
        (401, "No valid API key"),
        (403, "The key lacks a scope"),
        (404, "No such object for this key"),
        (409, "A change is in progress"),
        (413, "Body too large"),
        (422, "Invalid request"),
        (429, "Over a per-key limit"),
        (502, "The replica failed"),
        (503, "No capacity: retry after Retry-After (x-should-retry: false: none will come)"),
        (504, "The replica timed out"),
        (507, "No room on the disk"),
    ]
}


def invalid_field(
    exc: ValidationError, prefix: str = "", names: dict[str, str] | None = None
) -> errors.InvalidSpecError:
    """Pydantic's first complaint as a 422 that names the field: `prefix` and its dotted path
    (a path in `names` is said as named there)."""
    first = exc.errors()[0]
    path = ".".join(str(part) for part in first["loc"])
    field = prefix + (names or {}).get(path, path)
    return errors.InvalidSpecError(f"{field}: {errors.validation_message(first)}", field=field)


def status_of(exc: errors.ApplianceError, envelope: str = DETAIL) -> int:
    """The status an error answers with on a route of `envelope`'s family."""
    if isinstance(exc, errors.UpstreamError):
        return exc.status_code
    table = STATUS_BY_ENVELOPE[envelope]
    for cls in type(exc).__mro__:
        if cls in table:
            return table[cls]
    return 500


DATABASE_BUSY = errors.CapacityError(
    "the appliance's database is busy with other changes; retry shortly", retry_after_s=2
)
REDIS_UNAVAILABLE = errors.CapacityError(
    "the appliance's Redis is unavailable (restarting?); nothing was changed, retry shortly",
    retry_after_s=5,
)
# Errors that are load or a dependency away, not a fault of the api: a line in the log
PASSING: Final = (DATABASE_BUSY, REDIS_UNAVAILABLE)


def unanswered(exc: Exception) -> errors.ApplianceError:
    """What an error no handler answered becomes: SQLite still locked by another writer after
    its busy timeout, or no connection of the pool free in time (every one held by requests
    waiting for that lock), is a 503 to retry (the request changed nothing), and its disk
    full a 507; Redis unreachable a 503 to retry too (a change already committed is never
    failed by what only follows it, a nudge: `appliance/bus.py`); anything else a 500."""
    if isinstance(exc, errors.ApplianceError):
        return exc
    if isinstance(exc, redis.RedisError):
        return REDIS_UNAVAILABLE
    if isinstance(exc, sqlalchemy.exc.TimeoutError):  # the pool's wait, not a query's
        return DATABASE_BUSY
    if isinstance(exc, sqlite3.OperationalError | sqlalchemy.exc.OperationalError):
        if "database is locked" in str(exc):
            return DATABASE_BUSY
        if "database or disk is full" in str(exc):  # SQLITE_FULL
            return errors.InsufficientStorageError(
                "the disk holding the appliance's database is full; free some space (delete "
                "unused files and models) and retry"
            )
    return errors.ApplianceError("internal error; the api logged it")


def openai_error(status: int, message: str, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error envelope, for routes that answer outside FastAPI's handlers too."""
    kind = OPENAI_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


def answer(
    exc: errors.ApplianceError, envelope: str
) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """Status, headers and body of an error answered in `envelope` (`forwarder/paths.py`), by
    routes that answer outside FastAPI's handlers (the inference core)."""
    status = status_of(exc, envelope)
    if envelope in (OPENAI, BOTH):
        reply = openai_error(status, exc.message, exc.field)
        body = json.dumps(reply | {"detail": exc.message} if envelope == BOTH else reply).encode()
    else:
        body = json.dumps({"detail": exc.message}).encode()
    headers = [(b"content-type", b"application/json")]
    headers += [(k.lower().encode(), v.encode()) for k, v in error_headers(exc, status).items()]
    return status, headers, body


def invalid(problems: list[Any], envelope: str) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """A request that fails its model's validation (pydantic's errors): FastAPI's 422
    `{"detail": [...]}` on the appliance's own routes; elsewhere a 400 whose message says
    where and what in words (`max_new_tokens: Input should be greater than 0`), as LLM Engine's
    client and OpenAI's SDK show it: in `detail` on LLM Engine's routes, OpenAI's envelope on
    OpenAI's."""
    if envelope == DETAIL:
        problems = [{**p, "msg": errors.validation_message(p)} for p in problems]
        body = json.dumps({"detail": jsonable(problems)}).encode()
        return 422, [(b"content-type", b"application/json")], body
    message = "; ".join(_problem(p) for p in problems)
    if envelope == LLM_ENGINE:
        return 400, [(b"content-type", b"application/json")], _detail(message)
    reply = openai_error(400, message, _field(problems[0]) if problems else None)
    if envelope == BOTH:
        reply["detail"] = message
    return 400, [(b"content-type", b"application/json")], json.dumps(reply).encode()


LOCATIONS = ("body", "query", "path", "header")


def _field(err: Any) -> str | None:
    """The field a problem names, as OpenAI's `param` gives it (`limit`, `metadata.team`):
    its place in the request without the part of the request it is in."""
    loc = [str(p) for p in err.get("loc", ())]
    return ".".join(loc[1:] if loc and loc[0] in LOCATIONS else loc) or None


def _detail(message: str) -> bytes:
    return json.dumps({"detail": message}).encode()


def _problem(err: Any) -> str:
    where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
    said = errors.validation_message(err)
    return f"{where}: {said}" if where else said


NO_RETRY: Final = (  # what no wait lifts (`error_headers`)
    errors.EndpointDownError,
    errors.TeamLimitError,
    errors.FinishedError,
    errors.InsufficientStorageError,
)


def error_headers(exc: errors.ApplianceError, status: int) -> dict[str, str]:
    """Retry-After for capacity and rate limits; `x-should-retry: false` (which OpenAI's SDKs
    obey) for an endpoint that will get no replica by itself, a team at one of its limits, an
    object that has ended (409s the SDKs would send again, which no wait lifts) and a disk
    without room (a 507, which they would send again, an upload's whole body each time);
    WWW-Authenticate for a missing key. That offers Bearer only: HTTP Basic is accepted (LLM
    Engine's client sends it unasked) but never offered, since a browser offered it asks for
    the key, keeps it and sends it with every later request to this origin, another site's
    forms included."""
    headers: dict[str, str] = {}
    if isinstance(exc, errors.CapacityError | errors.RateLimitedError):
        headers["Retry-After"] = str(exc.retry_after_s)
    if isinstance(exc, NO_RETRY):
        headers["x-should-retry"] = "false"
    if status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="appliance"'
    return headers


def envelope_of(path: str) -> str:
    """The envelope (and statuses) of the family of routes `path` belongs to."""
    if path.startswith(SHARED_PATHS):
        return BOTH
    if path.startswith(OPENAI_PATHS):
        return OPENAI
    if path.startswith(LLM_ENGINE_PATHS):
        return LLM_ENGINE
    return DETAIL


async def _domain(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, errors.ApplianceError)
    status, headers, body = answer(exc, envelope_of(request.url.path))
    return Response(body, status, {k.decode(): v.decode() for k, v in headers})


async def _validation(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    problems = list(exc.errors())
    if "json" not in request.headers.get("content-type", ""):
        problems = [_not_json(problem) for problem in problems]
    status, headers, body = invalid(problems, envelope_of(request.url.path))
    return Response(body, status, {k.decode(): v.decode() for k, v in headers})


NOT_JSON = "; send the body as JSON with the header Content-Type: application/json"


def _not_json(problem: Any) -> Any:
    """A body that is not an object because it was not sent as JSON (`curl -d` without a
    content type sends a form) says so, rather than only that an object was expected."""
    if tuple(problem.get("loc", ())) != ("body",):
        return problem
    return {**problem, "msg": f"{problem.get('msg', 'the body is not valid')}{NOT_JSON}"}


async def _http(request: Request, exc: Exception) -> Response:
    """FastAPI's own answers (no such route, a method the route lacks): in OpenAI's envelope
    for every unknown path under /v1 and /v2 (OpenAI's SDK is pointed at either), for
    OpenAI's routes, as its SDK expects, and for OpenAI's routes without their /v1 (an SDK
    whose base_url lacks it), saying so."""
    assert isinstance(exc, HTTPException)
    path = request.url.path
    envelope = envelope_of(path)
    unknown = exc.status_code == 404 and path.startswith(OPENAI_PREFIXES)
    unprefixed = exc.status_code == 404 and envelope_of("/v1" + path) in (OPENAI, BOTH)
    if envelope not in (OPENAI, BOTH) and not unknown and not unprefixed:
        return await http_exception_handler(request, exc)
    message = f"Invalid URL ({request.method} {path})" if unknown else str(exc.detail)
    unserved = next((why for p, why in OPENAI_UNSERVED.items() if _under(path, p)), None)
    if unknown and unserved:
        message = f"{message}: {unserved}"
    elif exc.status_code == 405:
        message = f"{message} ({request.method} {path})"
        instead = next((w for p, w in OPENAI_METHOD_UNSERVED.items() if _under(path, p)), None)
        if instead:
            message = f"{message}: {instead}"
    if unprefixed:  # an SDK whose base_url lacks /v1: say where the routes are
        v1 = str(request.base_url).rstrip("/") + "/v1"
        message = (
            f"Invalid URL ({request.method} {path}): OpenAI's routes are under /v1; "
            f"set the client's base_url to {v1}"
        )
    reply = openai_error(exc.status_code, message)
    body = json.dumps(reply | {"detail": message} if envelope == BOTH else reply).encode()
    headers = {**(exc.headers or {}), "content-type": "application/json"}
    return Response(body, exc.status_code, headers)


def _under(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix + "/")


def jsonable(items: Any) -> Any:
    """Validation problems as JSON can carry them: the input echoed back may hold bytes,
    exceptions or NaN (which strict JSON has no word for)."""
    return jsonable_encoder(
        items,
        custom_encoder={
            Exception: str,
            bytes: lambda b: b.decode("utf-8", "replace"),
            float: lambda f: f if math.isfinite(f) else str(f),
        },
    )


Handler = Callable[[Request, Exception], Awaitable[Response]]
UI_PATH = "/ui"


def install(app: FastAPI, pages: Handler | None = None) -> None:
    """`pages`: how the web UI answers, as a page, a request its routes refuse: a query
    parameter or path it cannot read, a page that does not exist, a domain error no route
    turned into a page of its own (a stale form, an id that is not one)."""
    app.add_exception_handler(errors.ApplianceError, _or_page(_domain, pages))
    app.add_exception_handler(RequestValidationError, _or_page(_validation, pages))
    app.add_exception_handler(HTTPException, _or_page(_http, pages))


def _or_page(handler: Handler, pages: Handler | None) -> Handler:
    async def either(request: Request, exc: Exception) -> Response:
        if pages is not None and _a_page(request, exc):
            return await pages(request, exc)
        return await handler(request, exc)

    return either


def _a_page(request: Request, exc: Exception) -> bool:
    """A refusal under /ui of a request a browser shows (a link followed, a form sent: they
    accept text/html), not a redirect; the UI's scripts (the playground's chat, an upload's
    progress) accept anything and read the JSON."""
    if isinstance(exc, HTTPException) and exc.status_code < 400:
        return False
    shown = "text/html" in request.headers.get("accept", "")
    return shown and _under(request.url.path, UI_PATH)
