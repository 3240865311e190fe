"""API keys: made, shown once, stored as an HMAC-SHA256 digest and found by a public prefix."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time

from sqlmodel import Session, select

from appliance.caller import Caller as Caller  # re-exported: where callers are made
from appliance.caller import KeyLimits as KeyLimits
from appliance.errors import AuthError
from appliance.ids import new_id
from appliance.models import ApiKey

KEY_PREFIX = "mea"
SCOPES = ("inference", "manage", "admin")
# annotated: mypyc (setup.py) checks appliance.settings, which quotes it, in the same pass as
# this module and, left to infer it, stops with "Cannot determine type of SHAPE"
SHAPE: str = f"{KEY_PREFIX}_<12 hex digits>_<secret>"  # what `split` accepts, in words


def digest(secret: bytes, key: str) -> str:
    return hmac.new(secret, key.encode(), hashlib.sha256).hexdigest()


def split(key: str) -> tuple[str, str] | None:
    """`mea_<prefix>_<secret>` -> (prefix, whole key); None when it is not shaped like a key."""
    parts = key.split("_")
    if len(parts) != 3 or parts[0] != KEY_PREFIX or len(parts[1]) != 12:
        return None
    return parts[1], key


def new_key_text() -> str:
    return f"{KEY_PREFIX}_{secrets.token_hex(6)}_{secrets.token_urlsafe(24).replace('_', 'x')}"


def create_key(
    *,
    session: Session,
    secret: bytes,
    name: str,
    team: str,
    user: str,
    scopes: tuple[str, ...] = SCOPES[:2],
    is_admin: bool = False,
    expires_at: float | None = None,
    text: str | None = None,
) -> tuple[ApiKey, str]:
    """Store a new key; returns the row and the key's text, which is never stored."""
    text = text or new_key_text()
    parsed = split(text)
    if parsed is None:
        raise ValueError(f"an API key looks like {SHAPE}")
    row = ApiKey(
        id=new_id("key"),
        prefix=parsed[0],
        digest=digest(secret, text),
        name=name,
        owner=team,
        user=user,
        scopes=list(scopes),
        is_admin=is_admin,
        expires_at=expires_at,
    )
    session.add(row)
    return row, text


def verify(
    *,
    session: Session,
    secret: bytes,
    key: str,
    now: float | None = None,
    defaults: KeyLimits = KeyLimits(),
) -> Caller:
    """The caller a key stands for; AuthError for an unknown, revoked or expired key."""
    parsed = split(key)
    row = session.exec(select(ApiKey).where(ApiKey.prefix == parsed[0])).first() if parsed else None
    if row is None or not hmac.compare_digest(row.digest, digest(secret, key)):
        raise AuthError("invalid API key")
    refused = refusal(row, time.time() if now is None else now)
    if refused is not None:
        raise AuthError(refused)
    return caller_of(session, row, defaults)


def refusal(row: ApiKey, now: float) -> str | None:
    """Why a key found by its text may no longer be used (revoked, expired), or None."""
    if row.revoked_at is not None:
        return "this API key was revoked"
    if row.expires_at is not None and row.expires_at <= now:
        return "this API key has expired"
    return None


def lapsed(session: Session, key_id: str, now: float | None = None) -> str | None:
    """Why the key `key_id`, verified earlier, may no longer be used (revoked, expired or gone
    since), or None while it may: for what goes on after its key was verified (a followed log
    stream)."""
    row = session.get(ApiKey, key_id)
    if row is None:
        return "this API key no longer exists"
    return refusal(row, time.time() if now is None else now)


def caller_of(session: Session, row: ApiKey, defaults: KeyLimits) -> Caller:
    """The caller of a valid key's row: its limits are those of the key it shares them with
    (`limits_from`: a key a non-admin made counts against its maker's), else its own."""
    shared = session.get(ApiKey, row.limits_from) if row.limits_from else None
    limits = defaults.resolve(shared or row)
    counted_as = shared.id if shared is not None else ""
    return Caller(
        row.id, row.user, row.owner, frozenset(row.scopes), row.is_admin, limits, counted_as
    )


def ensure_admin_key(*, session: Session, secret: bytes, text: str | None) -> str | None:
    """On first start, create the admin key; returns its text only when it was just made."""
    if session.exec(select(ApiKey).where(ApiKey.is_admin == True)).first():  # noqa: E712
        return None
    _, made = create_key(
        session=session,
        secret=secret,
        name="admin",
        team="admin",
        user="admin",
        scopes=SCOPES,
        is_admin=True,
        text=text,
    )
    return made
