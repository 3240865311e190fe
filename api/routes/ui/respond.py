"""How the web UI's routes answer: pages rendered from `web`'s templates with the UI's security
headers, redirects, the not-found page, and the two request helpers every route uses (the
form's fields, the key's scope). Used by every module of `api.routes.ui`."""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from starlette.exceptions import HTTPException

from api import ui_session
from api.errors import answer
from api.ui_session import UiSession
from appliance.errors import ApplianceError, ForbiddenError, NotFoundError
from appliance.keys import Caller
from forwarder.paths import DETAIL
from web import render

NAV = (  # (key, label, page, the scope it needs: "" none, "admin" an administrator's key)
    ("endpoints", "Endpoints", "/ui/endpoints", "manage"),
    ("models", "Models", "/ui/models", "manage"),
    ("playground", "Playground", "/ui/playground", "inference"),
    ("gpus", "GPUs", "/ui/gpus", "manage"),
    ("tasks", "Tasks", "/ui/tasks", "inference"),  # prompts and replies: as the API's
    ("usage", "Usage", "/ui/usage", "manage"),
    ("keys", "API keys", "/ui/keys", "manage"),
    ("audit", "Audit", "/ui/audit", "admin"),
)
HEADERS = {
    "content-security-policy": "default-src 'self'; img-src 'self' data:; "
    "style-src 'self'; script-src 'self'; frame-ancestors 'none'; form-action 'self'",
    "x-frame-options": "DENY",
    "x-content-type-options": "nosniff",
    "referrer-policy": "same-origin",
    "cache-control": "no-store",
}

templates = Jinja2Templates(env=render.environment())


def page(
    request: Request,
    name: str,
    ui: UiSession | None,
    active: str = "",
    status: int = 200,
    **context: Any,
) -> Response:
    response = templates.TemplateResponse(
        request,
        name,
        {"ui": ui, "nav": nav_for(ui), "active": active, "now": time.time(), **context},
        status_code=status,
    )
    response.headers.update(HEADERS)
    return response


def nav_for(ui: UiSession | None) -> list[tuple[str, str, str]]:
    """The menu: the pages the signed-in key may open (its routes check the same with `need`)."""
    if ui is None:
        return []
    return [(key, label, href) for key, label, href, scope in NAV if _opens(ui.caller, scope)]


def _opens(caller: Caller, scope: str) -> bool:
    return caller.is_admin if scope == "admin" else not scope or caller.can(scope)


def home(caller: Caller) -> str:
    """The first page of the menu the key may open: where signing in (or /ui) lands. A key
    that may open none (the `admin` scope alone: a metrics scraper's) lands on a page that
    says which scope it lacks."""
    return next((href for _, _, href, scope in NAV if _opens(caller, scope)), "/ui/tasks")


def landing(caller: Caller, target: str) -> str:
    """`target` (a sign-in's `next`), or `home` when it is a menu page the key may not open."""
    for _, _, href, scope in NAV:
        if (target == href or target.startswith(href + "/")) and not _opens(caller, scope):
            return home(caller)
    return target


def redirect(url: str) -> Response:
    return RedirectResponse(url, status_code=303, headers=HEADERS)


def not_found(request: Request, ui: UiSession, exc: NotFoundError) -> Response:
    return page(request, "notfound.html", ui, status=404, message=exc.message)


HEADINGS = {403: "Not allowed", 404: "Not found", 409: "Conflict", 429: "Try again later"}


async def bad_request(request: Request, exc: Exception) -> Response:
    """A request the UI refuses, as a page of the UI with the key's menu, not raw JSON in the
    browser (mounted by `api.main` through `api.errors.install`): a query parameter or path
    part the page cannot read (422, naming it), a page that does not exist, or a domain error
    no route answered with a page of its own (its status and words)."""
    state = request.app.state.appliance
    ui = ui_session.load(state, request.cookies.get(ui_session.SESSION_COOKIE))
    if isinstance(exc, ApplianceError):
        status, headers, _ = answer(exc, DETAIL)
        heading = HEADINGS.get(status, "Refused")
        reply = page(
            request, "notfound.html", ui, status=status, heading=heading, message=exc.message
        )
        reply.headers.update({k.decode(): v.decode() for k, v in headers if k != b"content-type"})
        return reply
    if isinstance(exc, RequestValidationError):
        problems = "; ".join(_problem(p) for p in exc.errors())
        return page(request, "notfound.html", ui, status=422, heading="Bad link", message=problems)
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        message = f"There is no page at {request.url.path}."
        return page(request, "notfound.html", ui, status=404, message=message)
    detail = str(exc.detail)
    return page(request, "notfound.html", ui, status=exc.status_code, heading=detail, message="")


def _problem(problem: Any) -> str:
    where = problem.get("loc", ())
    return f"{where[-1] if where else 'the request'}: {problem.get('msg', 'not valid')}"


async def form_data(request: Request) -> dict[str, str]:
    return {k: str(v) for k, v in (await request.form()).items()}


FormDep = Annotated[dict[str, str], Depends(form_data)]


class PageRefusedError(ForbiddenError):
    """A UI route the key's scopes do not open: answered as a page of the UI (`refused`)."""


def need(caller: Caller, scope: str) -> None:
    if not caller.can(scope):
        raise PageRefusedError(f"this key lacks the {scope!r} scope")


async def refused(request: Request, exc: Exception) -> Response:
    """`need`'s refusal as the UI's "Not allowed" page, with the key's menu and a way on, not
    a bare JSON error in the browser (mounted by `api.main` as PageRefusedError's handler)."""
    assert isinstance(exc, PageRefusedError)
    state = request.app.state.appliance
    ui = ui_session.load(state, request.cookies.get(ui_session.SESSION_COOKIE))
    return page(
        request, "notfound.html", ui, status=403, heading="Not allowed", message=exc.message
    )
