"""How the web UI's routes answer: pages rendered from `web`'s templates with the UI's security
headers, redirects, the not-found page, and the two request helpers every route uses (the
form's fields, the key's scope). Used by every module of `api.routes.ui`."""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.responses import RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from api.ui_session import UiSession
from appliance.errors import ForbiddenError, NotFoundError
from appliance.keys import Caller
from web import render

NAV = (
    ("endpoints", "Endpoints", "/ui/endpoints"),
    ("models", "Models", "/ui/models"),
    ("playground", "Playground", "/ui/playground"),
    ("gpus", "GPUs", "/ui/gpus"),
    ("tasks", "Tasks", "/ui/tasks"),
    ("usage", "Usage", "/ui/usage"),
    ("keys", "API keys", "/ui/keys"),
    ("audit", "Audit", "/ui/audit"),
)
ADMIN_NAV = frozenset({"audit"})  # shown to administrators only
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
    admin = ui is not None and ui.caller.is_admin
    return [item for item in NAV if admin or item[0] not in ADMIN_NAV]


def redirect(url: str) -> Response:
    return RedirectResponse(url, status_code=303, headers=HEADERS)


def not_found(request: Request, ui: UiSession, exc: NotFoundError) -> Response:
    return page(request, "notfound.html", ui, status=404, message=exc.message)


async def form_data(request: Request) -> dict[str, str]:
    return {k: str(v) for k, v in (await request.form()).items()}


FormDep = Annotated[dict[str, str], Depends(form_data)]


def need(caller: Caller, scope: str) -> None:
    if not caller.can(scope):
        raise ForbiddenError(f"this key lacks the {scope!r} scope")
