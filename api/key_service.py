"""API keys as the key routes, the UI's keys page and the declared configuration make and
change them: requests checked against the maker's rights (the `manage` scope, for every key
route), limits bounded, every change audited, a key's text returned once and never stored.

A key a non-admin makes shares its maker's limits and counts (`ApiKey.limits_from`): a key
with a limit cannot make keys that get round it, by sending beside it. Nor does it outlive its
maker (`ApiKey.made_by`): it expires no later, and revoking a key revokes the keys made with
it, and theirs, in the same transaction."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Annotated, Any

from pydantic import ConfigDict, Field, field_validator, model_validator
from sqlmodel import Session, col, select

from api import team_limits
from api.body import Body
from api.deps import AppState
from appliance import audit, keys
from appliance.errors import (
    AuthError,
    ConflictError,
    ForbiddenError,
    InvalidSpecError,
    NotFoundError,
)
from appliance.keys import Caller
from appliance.models import ApiKey

NAME = r"^[A-Za-z0-9][A-Za-z0-9 ._@-]{0,63}$"

MAX_LIFETIME_S = 10 * 366 * 86400  # a key lives ten years at most

MAX_LIMIT = 1_000_000_000

# A key's limit: unset (the install's default), 0 (none) or a bound up to a billion.
Limit = Annotated[int | None, Field(ge=0, le=MAX_LIMIT)]

AUDITED = ("name", "team", "user", "scopes", "admin", "expires_at", "limits", "limits_from")

LIMITS = (
    "requests_per_minute",
    "max_concurrent_requests",
    "max_queued_tasks",
    "max_tokens_per_request",
)


class CreateKeyRequest(Body):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=NAME)
    team: str | None = Field(None, pattern=NAME, description="Admins only: the key's team.")
    user: str | None = Field(None, pattern=NAME, description="Admins only: the key's user.")
    scopes: list[str] = Field(default_factory=lambda: ["inference", "manage"], max_length=16)
    admin: bool = False
    expires_in_seconds: int | None = Field(None, gt=0, le=MAX_LIFETIME_S)
    requests_per_minute: Limit = None
    max_concurrent_requests: Limit = None
    max_queued_tasks: Limit = None
    max_tokens_per_request: Limit = None

    @field_validator("name", mode="before")
    @classmethod
    def _named(cls, name: Any) -> Any:
        """An empty name is asked for, before the character rule (for a name with other
        characters) would answer it."""
        if isinstance(name, str) and not name.strip():
            raise ValueError("Give the key a name, so you can tell it from your other keys.")
        return name

    @field_validator("scopes")
    @classmethod
    def _each_once(cls, scopes: list[str]) -> list[str]:
        """A scope named twice is one scope (the key stored it twice)."""
        return list(dict.fromkeys(scopes))

    @model_validator(mode="before")
    @classmethod
    def _limits_as_listed(cls, data: Any) -> Any:
        """The limits also as a key is listed and exported (`limits: {...}`, `public`), so a
        listing's shape sent back makes the same key; each is checked as when sent flat."""
        if not isinstance(data, dict) or "limits" not in data:
            return data
        flat = {name: value for name, value in data.items() if name != "limits"}
        nested = {} if data["limits"] is None else data["limits"]
        if not isinstance(nested, dict):  # [], "", 0 and false too, which were no limit
            raise ValueError(f"limits must be an object of {', '.join(LIMITS)}")
        for name, value in nested.items():
            if name not in LIMITS:
                raise ValueError(
                    f"limits.{name} is not a limit; the limits are {', '.join(LIMITS)}"
                )
            if name in flat and flat[name] != value:
                raise ValueError(f"{name} is sent twice: {flat[name]} and limits.{name} {value}")
            flat[name] = value
        return flat


def public(row: ApiKey) -> dict[str, Any]:
    return {
        "id": row.id,
        "name": row.name,
        "prefix": f"{keys.KEY_PREFIX}_{row.prefix}",
        "team": row.owner,
        "user": row.user,
        "scopes": row.scopes,
        "admin": row.is_admin,
        "created_at": row.created_at,
        "expires_at": row.expires_at,
        "revoked_at": row.revoked_at,
        "limits": {
            "requests_per_minute": row.requests_per_minute,
            "max_concurrent_requests": row.max_concurrent_requests,
            "max_queued_tasks": row.max_queued_tasks,
            "max_tokens_per_request": row.max_tokens_per_request,
        },
        "limits_from": row.limits_from,
    }


def _manager(caller: Caller) -> None:
    """Keys are managed with the `manage` scope: an inference-only key may not list, make or
    revoke keys, its own included."""
    if not caller.can("manage"):
        raise ForbiddenError("this key lacks the 'manage' scope, which managing API keys needs")


def _check_request(body: CreateKeyRequest, caller: Caller) -> None:
    _manager(caller)
    unknown = set(body.scopes) - set(keys.SCOPES)
    if unknown:
        raise InvalidSpecError(
            f"unknown scopes {sorted(unknown)}; known: {list(keys.SCOPES)}", field="scopes"
        )
    if not body.scopes and not body.admin:
        raise InvalidSpecError(
            f"scopes is empty: a key with no scope can do nothing; give one or more of "
            f"{list(keys.SCOPES)}",
            field="scopes",
        )
    if caller.is_admin:
        return
    if body.team not in (None, caller.team) or body.user not in (None, caller.user):
        raise ForbiddenError("only an administrator may make keys for other users or teams")
    if body.admin or not set(body.scopes) <= caller.scopes:
        raise ForbiddenError("a key may not have scopes its maker lacks")
    if any(getattr(body, name) is not None for name in LIMITS):
        raise ForbiddenError("only an administrator may set a key's limits")


def make_key(
    body: CreateKeyRequest,
    caller: Caller,
    session: Session,
    state: AppState,
    *,
    expires_at: float | None,
    address: str | None,
) -> tuple[ApiKey, str]:
    """Check, store and audit a new key (the route, the UI, the declared configuration);
    returns its row and its text, which only the caller ever sees."""
    _check_request(body, caller)
    # the caller's key was verified up to a second ago (api.callers); read again under the
    # write lock a revocation takes, so a key revoked meanwhile makes none that would outlive it
    lapsed = keys.lapsed(session, caller.key_id)
    if lapsed is not None:
        raise AuthError(lapsed)
    team_limits.check_keys(body.team or caller.team, caller, state.settings, session=session)
    if not caller.is_admin:
        expires_at = _within_maker(expires_at, caller, session)
    row, text = keys.create_key(
        session=session,
        secret=state.key_secret,
        name=body.name,
        team=body.team or caller.team,
        user=body.user or caller.user,
        scopes=tuple(keys.SCOPES if body.admin else body.scopes),
        is_admin=body.admin,
        expires_at=expires_at,
    )
    for name in LIMITS:
        setattr(row, name, getattr(body, name))
    if not caller.is_admin:  # its maker's limits and counts, not the install's defaults
        row.limits_from = caller.counter()
        row.made_by = caller.key_id
    session.add(row)
    audit.record(session, caller, "key.create", row.id, recorded(row), address)
    session.commit()
    return row, text


def _within_maker(expires_at: float | None, caller: Caller, session: Session) -> float | None:
    """A key a non-admin makes expires no later than the key making it: asked for no expiry,
    it expires with its maker; asked to outlive it, it is refused (422), never clamped."""
    maker = session.get(ApiKey, caller.key_id)
    ends = maker.expires_at if maker is not None else None
    if ends is None:
        return expires_at
    if expires_at is None:
        return ends
    if expires_at > ends:
        left = max(0, int(ends - time.time()))
        raise InvalidSpecError(
            f"expires_in_seconds: a key may not outlive the key making it, which expires in "
            f"{left} s; ask for at most {left}, or leave it out to expire with it",
            field="expires_in_seconds",
        )
    return expires_at


def update_key(
    row: ApiKey,
    wanted: CreateKeyRequest,
    caller: Caller,
    session: Session,
    *,
    expires_at: float | None,
    address: str | None,
) -> dict[str, list[Any]]:
    """Give a key the scopes, expiry and limits of `wanted` (admins: the declared
    configuration); returns what changed, audited, or {} when nothing did."""
    if not caller.is_admin:
        raise ForbiddenError("only an administrator may change a key")
    _check_request(wanted, caller)
    if row.is_admin and not wanted.admin and row.revoked_at is None:
        keep_an_administrator(row, session)
    before = recorded(row)
    row.scopes = list(keys.SCOPES if wanted.admin else wanted.scopes)
    row.is_admin, row.expires_at = wanted.admin, expires_at
    for name in LIMITS:
        setattr(row, name, getattr(wanted, name))
    if any(getattr(wanted, name) is not None for name in LIMITS):
        row.limits_from = None  # an administrator gave it limits of its own
    after = recorded(row)
    change = {name: [before[name], after[name]] for name in AUDITED if before[name] != after[name]}
    if change:
        session.add(row)
        audit.record(session, caller, "key.update", row.id, {"name": row.name, **change}, address)
        session.commit()
    return change


def recorded(row: ApiKey) -> dict[str, Any]:
    """What the audit log keeps of a key: never its text, digest or prefix."""
    shown = public(row)
    return {name: shown[name] for name in AUDITED}


def visible(row: ApiKey | None, caller: Caller) -> ApiKey:
    _manager(caller)
    mine = row is not None and row.user == caller.user and row.owner == caller.team
    if row is None or not (caller.is_admin or mine):
        raise NotFoundError("no such API key")
    return row


def keep_an_administrator(row: ApiKey, session: Session) -> None:
    """ConflictError when `row` is the last active administrator key: without one nobody
    manages other teams' keys or reads the audit log, and none is made at start while an
    administrator key exists, even revoked."""
    now = time.time()
    others = session.exec(
        select(ApiKey).where(
            col(ApiKey.is_admin) == True,  # noqa: E712
            col(ApiKey.revoked_at).is_(None),
            col(ApiKey.id) != row.id,
        )
    ).all()
    if not any(k.expires_at is None or k.expires_at > now for k in others):
        raise ConflictError(
            f"key {row.name!r} is the last active administrator key: without one nobody could "
            "manage keys or read the audit log again; make another administrator key first "
            '(POST /v1/api-keys with "admin": true)',
            field="admin",
        )


def revoke(row: ApiKey, caller: Caller, session: Session, *, address: str | None) -> None:
    """Revoke the key and every key made with it (and with those, on down), each audited, in
    one transaction: none keeps working once its maker is revoked. The last active
    administrator key is not revoked."""
    if row.is_admin and row.revoked_at is None:
        keep_an_administrator(row, session)
    now = time.time()
    for key in [row, *_made_with(row, session)]:
        if key.revoked_at is not None:
            continue
        key.revoked_at = now
        session.add(key)
        change = {"name": key.name, "team": key.owner, "user": key.user}
        if key is not row:
            change["revoked_with"] = row.id  # the key whose revocation took this one
        audit.record(session, caller, "key.revoke", key.id, change, address)
    session.commit()


def _made_with(row: ApiKey, session: Session) -> Iterator[ApiKey]:
    """The keys made with `row`, then those made with them, and so on."""
    pending, seen = [row.id], {row.id}
    while pending:
        maker = pending.pop()
        for made in session.exec(select(ApiKey).where(col(ApiKey.made_by) == maker)).all():
            if made.id not in seen:
                seen.add(made.id)
                pending.append(made.id)
                yield made


def create(
    body: CreateKeyRequest, caller: Caller, session: Session, state: AppState, address: str | None
) -> dict[str, Any]:
    """A new key as `POST /v1/api-keys` answers it: its text included, this once."""
    expires = time.time() + body.expires_in_seconds if body.expires_in_seconds else None
    row, text = make_key(body, caller, session, state, expires_at=expires, address=address)
    return {**public(row), "key": text}


def listed(caller: Caller, session: Session) -> list[dict[str, Any]]:
    """The keys a caller may see: every key for an admin, else the caller's own."""
    _manager(caller)
    query = select(ApiKey).order_by(col(ApiKey.created_at))
    if not caller.is_admin:
        query = query.where(col(ApiKey.user) == caller.user, col(ApiKey.owner) == caller.team)
    return [public(row) for row in session.exec(query).all()]
