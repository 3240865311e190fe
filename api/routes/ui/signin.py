"""The web UI's sign-in and sign-out routes: a key is exchanged for a session cookie
(`api.ui_session`). Included by `api.routes.ui`."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request
from fastapi.responses import Response

from api import signin_throttle, ui_session
from api.deps import StateDep, address_of
from api.routes.ui.respond import FormDep, landing, page, redirect
from api.ui_session import ChangeDep
from appliance import audit
from appliance.errors import AuthError

router = APIRouter(prefix="/ui", include_in_schema=False)


def _safe_next(target: str | None) -> str:
    if not target or not target.startswith("/ui/") or target.startswith("/ui/sign"):
        return "/ui/endpoints"
    return "/ui/endpoints" if "\\" in target or "//" in target else target


@router.get("/sign-in")
def read_sign_in(request: Request, state: StateDep, next: str | None = None) -> Response:
    if ui_session.load(state, request.cookies.get(ui_session.SESSION_COOKIE)):
        return redirect(_safe_next(next))
    token = ui_session.signin_token(request)
    response = page(request, "signin.html", None, next=_safe_next(next), error="", csrf=token)
    ui_session.set_signin_cookie(response, request, token)
    return response


@router.post("/sign-in")
def sign_in(request: Request, state: StateDep, form: FormDep) -> Response:
    ui_session.check_signin_csrf(request, form.get("csrf", ""))
    target = _safe_next(form.get("next"))
    address, csrf, now = address_of(request), form.get("csrf", ""), time.time()
    throttled = signin_throttle.check(state, address, now)
    if throttled is not None:  # the key is not tried: guessing is slowed too
        wait = throttled.retry_after_s
        error = f"Too many refused sign-ins from your address; try again in {wait} s."
        response = page(
            request, "signin.html", None, status=429, next=target, error=error, csrf=csrf
        )
        response.headers["retry-after"] = str(wait)
        return response
    try:
        token, caller = ui_session.start(state, form.get("key", "").strip())
    except AuthError as exc:
        signin_throttle.refused(state, address, exc.message, now)
        error = "That key was not accepted." if "invalid" in exc.message else exc.message
        return page(request, "signin.html", None, status=401, next=target, error=error, csrf=csrf)
    signin_throttle.summarise(state, address)
    audit.record_now(
        state.engine, caller, "session.sign_in", caller.key_id, {}, address_of(request)
    )
    response = redirect(landing(caller, target))
    ui_session.set_session_cookie(response, request, token)
    return response


@router.post("/sign-out")
def sign_out(request: Request, state: StateDep, ui: ChangeDep) -> Response:
    ui_session.end(state, request.cookies.get(ui_session.SESSION_COOKIE))
    key = ui.caller.key_id
    audit.record_now(state.engine, ui.caller, "session.sign_out", key, {}, address_of(request))
    response = redirect("/ui/sign-in")
    ui_session.clear_cookies(response)
    return response
