"""The one place domain errors become HTTP answers: a class-to-status table looked up by MRO.

OpenAI routes (`/v1/chat/completions`...) answer in OpenAI's error envelope; every other
route answers `{"detail": ...}` as FastAPI and the LLM Engine client expect.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from appliance import errors

STATUS: dict[type[errors.ApplianceError], int] = {
    errors.InvalidSpecError: 422,
    errors.BadRequestError: 400,
    errors.NotFoundError: 404,
    errors.ConflictError: 409,
    errors.AuthError: 401,
    errors.ForbiddenError: 403,
    errors.RateLimitedError: 429,
    errors.CapacityError: 503,
    errors.UpstreamError: 502,
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
OPENAI_PATHS = (
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/models",
    "/v2/chat/completions",
    "/v2/completions",
)


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
        (503, "No capacity; retry after Retry-After"),
        (504, "The replica timed out"),
    ]
}


def status_of(exc: errors.ApplianceError) -> int:
    if isinstance(exc, errors.UpstreamError):
        return exc.status_code
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return 500


def openai_error(status: int, message: str, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error envelope, for routes that answer outside FastAPI's handlers too."""
    kind = OPENAI_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


def error_headers(exc: errors.ApplianceError, status: int) -> dict[str, str]:
    """Retry-After for capacity and rate limits, WWW-Authenticate for a missing key."""
    headers: dict[str, str] = {}
    if isinstance(exc, errors.CapacityError | errors.RateLimitedError):
        headers["Retry-After"] = str(exc.retry_after_s)
    if status == 401:
        headers["WWW-Authenticate"] = 'Basic realm="appliance", Bearer'
    return headers


def error_response(
    request: Request,
    status: int,
    message: str,
    *,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    if request.url.path.startswith(OPENAI_PATHS):
        kind = OPENAI_TYPES.get(
            status, "server_error" if status >= 500 else "invalid_request_error"
        )
        body: dict[str, Any] = {
            "error": {"message": message, "type": kind, "param": param, "code": status}
        }
    else:
        body = {"detail": message}
    return JSONResponse(body, status_code=status, headers=headers)


async def _domain(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, errors.ApplianceError)
    status = status_of(exc)
    headers: dict[str, str] = {}
    if isinstance(exc, errors.CapacityError | errors.RateLimitedError):
        headers["Retry-After"] = str(exc.retry_after_s)
    if status == 401:
        headers["WWW-Authenticate"] = 'Basic realm="appliance", Bearer'
    return error_response(request, status, exc.message, param=exc.field, headers=headers)


async def _validation(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    problems = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        problems.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
    if not request.url.path.startswith(OPENAI_PATHS):
        return JSONResponse({"detail": jsonable(exc.errors())}, status_code=422)
    return error_response(request, 400, "; ".join(problems))


def jsonable(items: Any) -> Any:
    return jsonable_encoder(items, custom_encoder={Exception: str})


def install(app: FastAPI) -> None:
    app.add_exception_handler(errors.ApplianceError, _domain)
    app.add_exception_handler(RequestValidationError, _validation)
