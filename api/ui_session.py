"""The web UI's sign-in: a key is exchanged for a random session token in an HttpOnly,
SameSite=Strict cookie; Redis holds the session (key id and CSRF token, never the key's
text) under a hash of the token. Every request re-reads the key's row, so a revoked or expired
key ends its sessions at once. A key keeps its newest UI_SESSIONS_PER_KEY sessions: a sign-in
past them ends its oldest, so one key signing in again and again cannot fill Redis (each
session is kept 12 hours). Used by `api.routes.ui`, and by the key gate (`api/gate.py`),
which counts a page against its session's key.

CSRF: every form that changes something carries the session's CSRF token (a hidden field, or
the `x-csrf-token` header for script requests) and must come from our own origin. The sign-in
form, which has no session yet, uses a short-lived token in its own SameSite=Strict cookie.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass
from typing import Annotated
from urllib.parse import quote, urlsplit

from fastapi import Depends, HTTPException, Request, Response
from starlette.types import Scope

from api.deps import AppState, StateDep
from appliance import keys
from appliance.db import session_scope
from appliance.errors import AuthError, ForbiddenError
from appliance.models import ApiKey

SESSION_COOKIE = "mea_session"
SIGNIN_COOKIE = "mea_signin"
COOKIE_PATH = "/ui"
SESSION_TTL_S = 12 * 3600  # idle sessions end after this; each page view extends it
SIGNIN_TTL_S = 3600
SESSION_KEY = "appliance:ui:session:{digest}"
# A key's sessions by sign-in time (a sorted set of digests), its newest UI_SESSIONS_PER_KEY
SESSIONS_OF_KEY = "appliance:ui:sessions-of:{key_id}"
UI_SESSIONS_PER_KEY = 32  # browsers one key stays signed in on at once
CSRF_HEADER = "x-csrf-token"
LOADED = "ui_session"  # the request's state: the session the key gate loaded (`keep`)


@dataclass(frozen=True)
class UiSession:
    """A signed-in browser: who it is (from the key's row, read now) and its CSRF token."""

    digest: str
    caller: keys.Caller
    csrf: str
    key_name: str


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def caller_for_key(state: AppState, key_id: str) -> tuple[keys.Caller, str]:
    """The key's caller and name; AuthError when the key is gone, revoked or expired."""
    with session_scope(state.engine) as session:
        why = keys.lapsed(session, key_id)
        if why is not None:
            raise AuthError(why)
        row = session.get(ApiKey, key_id)  # found by `lapsed`: no second read
        assert row is not None
        return keys.caller_of(session, row, state.key_limits()), row.name


def start(state: AppState, key_text: str) -> tuple[str, keys.Caller]:
    """Check a key and open a session for it; returns the cookie's token. AuthError if bad."""
    caller = state.key_cache.verify(key_text)
    token = secrets.token_urlsafe(32)
    now, digest = time.time(), _digest(token)
    record = {"key_id": caller.key_id, "csrf": secrets.token_urlsafe(32), "at": now}
    held = SESSIONS_OF_KEY.format(key_id=caller.key_id)
    with state.redis.pipeline() as pipe:  # MULTI: sign-ins at once keep the newest together
        pipe.set(SESSION_KEY.format(digest=digest), json.dumps(record), ex=SESSION_TTL_S)
        pipe.zadd(held, {digest: now})
        pipe.zrange(held, 0, -UI_SESSIONS_PER_KEY - 1)
        pipe.zremrangebyrank(held, 0, -UI_SESSIONS_PER_KEY - 1)
        pipe.expire(held, SESSION_TTL_S)
        oldest = pipe.execute()[2]
    if oldest:
        state.redis.delete(*(SESSION_KEY.format(digest=d.decode()) for d in oldest))
    return token, caller


def end(state: AppState, token: str | None) -> None:
    if token:
        name = SESSION_KEY.format(digest=_digest(token))
        raw = state.redis.get(name)
        state.redis.delete(name)
        if raw:  # its room among its key's sessions is free again
            key_id = json.loads(raw)["key_id"]
            state.redis.zrem(SESSIONS_OF_KEY.format(key_id=key_id), _digest(token))


def load(state: AppState, token: str | None) -> UiSession | None:
    if not token:
        return None
    name = SESSION_KEY.format(digest=_digest(token))
    raw = state.redis.get(name)
    if not raw:
        return None
    record = json.loads(raw)
    try:
        caller, key_name = caller_for_key(state, str(record["key_id"]))
    except AuthError:
        state.redis.delete(name)
        return None
    state.redis.expire(name, SESSION_TTL_S)
    return UiSession(_digest(token), caller, str(record["csrf"]), key_name)


def _secure(request: Request) -> bool:
    return request.url.scheme == "https"


def set_session_cookie(response: Response, request: Request, token: str) -> None:
    response.set_cookie(
        SESSION_COOKIE,
        token,
        max_age=SESSION_TTL_S,
        path=COOKIE_PATH,
        httponly=True,
        samesite="strict",
        secure=_secure(request),
    )


def clear_cookies(response: Response) -> None:
    for name in (SESSION_COOKIE, SIGNIN_COOKIE):
        response.delete_cookie(name, path=COOKIE_PATH, httponly=True, samesite="strict")


def signin_token(request: Request) -> str:
    """The sign-in form's CSRF token (no session exists yet): the one in its cookie, or new."""
    return request.cookies.get(SIGNIN_COOKIE) or secrets.token_urlsafe(32)


def set_signin_cookie(response: Response, request: Request, token: str) -> None:
    response.set_cookie(
        SIGNIN_COOKIE,
        token,
        max_age=SIGNIN_TTL_S,
        path=COOKIE_PATH,
        httponly=True,
        samesite="strict",
        secure=_secure(request),
    )


def same_origin(request: Request) -> bool:
    """A browser's Origin (or Referer) must be this host; clients that send neither are not
    browsers driven by another site, and still need the CSRF token."""
    source = request.headers.get("origin") or request.headers.get("referer")
    if not source or source == "null":
        return source is None
    parts = urlsplit(source)
    return f"{parts.scheme}://{parts.netloc}" == f"{request.url.scheme}://{request.url.netloc}"


def _matches(expected: str, submitted: str) -> bool:
    """A token compared in constant time, as bytes: `hmac.compare_digest` raises on a str
    with a character outside ASCII, which a hand-made form field, header or cookie can hold."""
    return hmac.compare_digest(
        expected.encode("utf-8", "surrogatepass"), submitted.encode("utf-8", "surrogatepass")
    )


def check_signin_csrf(request: Request, submitted: str) -> None:
    expected = request.cookies.get(SIGNIN_COOKIE, "")
    if not (expected and _matches(expected, submitted) and same_origin(request)):
        raise ForbiddenError("the sign-in form expired; reload the page and try again")


def keep(scope: Scope, ui: UiSession) -> None:
    """The session the key gate loaded to count the request against its key
    (`api/gate.py`), kept for the page's `signed_in`: one read of the key's row a request."""
    scope.setdefault("state", {})[LOADED] = ui


def signed_in(request: Request, state: StateDep) -> UiSession:
    """Dependency of every page: the session, or a redirect to the sign-in page."""
    kept: UiSession | None = getattr(request.state, LOADED, None)
    ui = kept or load(state, request.cookies.get(SESSION_COOKIE))
    if ui is None:
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        raise HTTPException(
            status_code=303,
            detail="sign in first",
            headers={"Location": f"/ui/sign-in?next={quote(target, safe='')}"},
        )
    return ui


SignedInDep = Annotated[UiSession, Depends(signed_in)]


async def csrf_checked(request: Request, ui: SignedInDep) -> UiSession:
    """Dependency of every route that changes something: same origin and the CSRF token,
    from the `x-csrf-token` header or the form's `csrf` field."""
    submitted = request.headers.get(CSRF_HEADER)
    if submitted is None and request.headers.get("content-type", "").startswith(
        ("application/x-www-form-urlencoded", "multipart/form-data")
    ):
        submitted = str((await request.form()).get("csrf", ""))
    if not (submitted and _matches(ui.csrf, submitted) and same_origin(request)):
        raise ForbiddenError("the form's security token is missing or stale; reload the page")
    return ui


ChangeDep = Annotated[UiSession, Depends(csrf_checked)]
