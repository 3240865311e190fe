"""The web UI's API keys page: the caller's keys, a form that makes one (its text shown once)
and revoke buttons, through the REST routes' own functions. Included by `api.routes.ui`."""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Mapping
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import ValidationError
from redis.exceptions import RedisError

from api import key_service
from api.deps import AppState, SessionDep, StateDep, address_of
from api.routes.ui.respond import FormDep, need, not_found, page, redirect
from api.ui_session import ChangeDep, SignedInDep, UiSession
from appliance.db import session_scope
from appliance.errors import (
    ConflictError,
    ForbiddenError,
    InvalidSpecError,
    NotFoundError,
    validation_message,
)
from appliance.models import ApiKey
from web import views

router = APIRouter(prefix="/ui", include_in_schema=False)


def _keys_page(
    request: Request,
    ui: UiSession,
    state: AppState,
    *,
    made: Mapping[str, Any] | None = None,
    errors: Mapping[str, str] | None = None,
    values: Mapping[str, str] | None = None,
) -> Response:
    with session_scope(state.engine) as session:  # the route's session may have committed
        listed = key_service.listed(ui.caller, session)
    now = time.time()
    for key in listed:
        key["state"] = views.key_state(key, now)
        key["limits_text"] = views.key_limits(key)
    return page(
        request,
        "keys.html",
        ui,
        "keys",
        status=422 if errors else 200,
        keys=listed,
        made=made,
        errors=errors or {},
        values=values or {"scope_inference": "on", "scope_manage": "on"},
        once=secrets.token_urlsafe(16),
        key_limits=[(name, label) for name, label, *_ in views.KEY_LIMITS],
    )


def _first_sending(state: AppState, once: str) -> bool:
    """Whether the form carrying `once` is sent for the first time: a page reloaded after
    making a key sends its form again, which must make no second key (its text is shown once,
    on that page). A form without `once` (a script's POST) and a Redis outage are let through."""
    if not once:
        return True
    try:
        return bool(state.redis.set(FORM_ONCE_KEY.format(once=once), 1, nx=True, ex=FORM_ONCE_S))
    except RedisError:
        return True


@router.get("/keys")
def read_keys_page(request: Request, ui: SignedInDep, state: StateDep) -> Response:
    need(ui.caller, "manage")
    return _keys_page(request, ui, state)


DAYS = re.compile(r"[0-9]{1,12}(\.[0-9]{1,6})?|\.[0-9]{1,6}", re.ASCII)
WHOLE = re.compile(r"[0-9]{1,12}", re.ASCII)


def _key_request(form: Mapping[str, str]) -> dict[str, Any]:
    body: dict[str, Any] = {
        "name": form.get("name", "").strip(),
        "scopes": [s for s in ("inference", "manage") if form.get(f"scope_{s}") == "on"],
    }
    days = form.get("expires_days", "").strip()
    if days:
        # ASCII digits with at most one point: float() alone also takes other scripts' digits,
        # underscores (1_0 is 10), exponents and "inf"
        if DAYS.fullmatch(days.removeprefix("-")) and (days[0] == "-" or not float(days)):
            raise InvalidSpecError(
                "Enter more than 0 days, or leave it empty for a key that never expires.",
                field="expires",
            )
        if not DAYS.fullmatch(days):
            raise InvalidSpecError("Enter a number of days.", field="expires")
        body["expires_in_seconds"] = int(float(days) * 86400)
        if body["expires_in_seconds"] > key_service.MAX_LIFETIME_S:  # the API says it in seconds
            most = key_service.MAX_LIFETIME_S // 86400
            raise InvalidSpecError(
                f"Enter at most {most} days (ten years), or leave it empty for a key that "
                "never expires.",
                field="expires",
            )
    # an administrator's fields (the form shows them to administrators only; sent by anyone
    # else, the key rules refuse them as the API does)
    for name in ("team", "user"):
        if form.get(name, "").strip():
            body[name] = form[name].strip()
    if form.get("admin") == "on":
        body["admin"] = True
    for name in key_service.LIMITS:
        value = form.get(name, "").strip()
        if not value:
            continue
        body[name] = _limit(name, value)
    if not body["scopes"] and not body.get("admin"):
        raise InvalidSpecError("Pick at least one scope.", field="scopes")
    return body


def _limit(name: str, value: str) -> int:
    """A limit field: a whole number no larger than the largest limit the API takes."""
    largest = key_service.MAX_LIMIT
    if (
        value.isascii()
        and value.isdigit()
        and (len(value) > len(str(largest)) or int(value) > largest)
    ):
        raise InvalidSpecError(
            f"Enter at most {largest}: 0 for no limit, or leave it empty for the install's "
            "default.",
            field=name,
        )
    if not WHOLE.fullmatch(value):
        raise InvalidSpecError(
            "Enter a whole number: 0 for no limit, or leave it empty for the install's default.",
            field=name,
        )
    return int(value)


FORM_ONCE_KEY = "ui:keys-form:{once}"  # a new-key form already sent
FORM_ONCE_S = 86400
ALREADY_SENT = (
    "This form was already sent, and its key made and shown then (a page reload sends it "
    "again); no other key was made. To make another, fill in the form."
)
KEY_FIELDS = {
    "name": "name",
    "scopes": "scopes",
    "expires": "expires",
    "expires_in_seconds": "expires",
    "team": "team",
    "user": "user",
    "admin": "admin",
    **{name: name for name in key_service.LIMITS},
}


@router.post("/keys")
def create_key_from_form(
    request: Request, ui: ChangeDep, form: FormDep, session: SessionDep, state: StateDep
) -> Response:
    if not _first_sending(state, form.get("once", "")):
        errors = {"": ALREADY_SENT}
        return _keys_page(request, ui, state, errors=errors, values=form)
    try:
        body = key_service.CreateKeyRequest.model_validate(_key_request(form))
        made = key_service.create(body, ui.caller, session, state, address_of(request))
    except ValidationError as exc:
        errors = {
            KEY_FIELDS.get(str((e.get("loc") or ("",))[0]), ""): (
                "Use letters, digits, spaces and . _ @ - (at most 64)."
                if e.get("type") == "string_pattern_mismatch"
                else validation_message(e)
            )
            for e in reversed(exc.errors())
        }
        return _keys_page(request, ui, state, errors=errors, values=form)
    except (InvalidSpecError, ForbiddenError, ConflictError) as exc:
        session.rollback()
        errors = {KEY_FIELDS.get(exc.field or "", ""): exc.message}
        return _keys_page(request, ui, state, errors=errors, values=form)
    return _keys_page(request, ui, state, made=made)


@router.post("/keys/{key_id}/revoke")
def revoke_key_from_form(
    request: Request, key_id: str, ui: ChangeDep, session: SessionDep, state: StateDep
) -> Response:
    try:
        row = key_service.visible(session.get(ApiKey, key_id), ui.caller)
        key_service.revoke(row, ui.caller, session, address=address_of(request))
    except NotFoundError as exc:
        return not_found(request, ui, exc)
    except ConflictError as exc:  # the last administrator key: the page says why it stays
        session.rollback()
        return _keys_page(request, ui, state, errors={"": exc.message})
    return redirect("/ui/keys")
