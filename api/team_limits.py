"""How many endpoints and active keys a team may have (`APPLIANCE_MAX_ENDPOINTS_PER_TEAM`,
`APPLIANCE_MAX_KEYS_PER_TEAM`), decided here for every way of making them: the endpoint
service's create (REST, LLM Engine's routes, the UI's form, `/v1/config/apply`) and the key
service's (the key routes, the UI's keys page); and how many Hugging Face downloads ahead of
time it may have open (`APPLIANCE_MAX_DOWNLOADS_PER_TEAM`, `api/hf_downloads.py`); how many bytes
of files (`/v1/files`) it may keep (`APPLIANCE_MAX_FILE_BYTES_PER_TEAM`, `api/routes/files.py`)
and of model files it may upload (`APPLIANCE_MAX_MODEL_BYTES_PER_TEAM`, `api/model_upload.py`),
so one team's uploads cannot take the room above the disk's reserve that every team shares.

Everything a team has counts, whoever made it, but an administrator is never refused: an
administrator may need to make an endpoint or key for a team at its limit, and is trusted not
to fill the box. The count is taken inside the create's own transaction (BEGIN IMMEDIATE,
`appliance/db.py`), so creates sent at once cannot pass the limit together."""

from __future__ import annotations

import time

from sqlalchemy import func
from sqlalchemy.sql.functions import coalesce
from sqlmodel import Session, col, or_, select

from appliance.errors import TeamLimitError
from appliance.keys import Caller
from appliance.models import ApiKey, Endpoint, EndpointStatus, File, ModelFile
from appliance.settings import Settings


def endpoints_of(team: str, *, session: Session) -> int:
    """The team's endpoints, less those being deleted (their room is already given back)."""
    query = select(func.count()).where(
        col(Endpoint.owner) == team, col(Endpoint.status) != EndpointStatus.DELETE_IN_PROGRESS
    )
    return int(session.exec(query).one())


def active_keys_of(team: str, *, session: Session, now: float) -> int:
    """The team's keys that still work: neither revoked nor expired."""
    query = select(func.count()).where(
        col(ApiKey.owner) == team,
        col(ApiKey.revoked_at).is_(None),
        or_(col(ApiKey.expires_at).is_(None), col(ApiKey.expires_at) > now),
    )
    return int(session.exec(query).one())


# A file takes at least a block of the disk (and a row), however small: an empty one counts
# this much, so a team's quota bounds how many files it keeps as well as their bytes
FILE_BLOCK_BYTES = 4096


def counted_bytes(size: int) -> int:
    """What a file of `size` bytes counts against its team's quota."""
    return max(size, FILE_BLOCK_BYTES)


def file_bytes_of(team: str, *, session: Session) -> int:
    """The bytes the team's files count: its uploads and its batches' output and error files."""
    each = func.max(col(File.bytes), FILE_BLOCK_BYTES)
    query = select(coalesce(func.sum(each), 0)).where(col(File.owner) == team)
    return int(session.exec(query).one())


def check_endpoints(
    team: str, caller: Caller, settings: Settings, *, session: Session, adding: int = 1
) -> None:
    """Refuse (409; LLM Engine's routes 400) `adding` more endpoints for a team at its limit."""
    limit = settings.max_endpoints_per_team
    if caller.is_admin or not limit:
        return
    have = endpoints_of(team, session=session)
    if have + adding > limit:
        raise TeamLimitError(
            f"team {team!r} has {have} endpoints and may have at most {limit} "
            "(APPLIANCE_MAX_ENDPOINTS_PER_TEAM); delete endpoints it no longer needs "
            "(DELETE /v1/model-endpoints/{id}, or the Delete button on the endpoint's page) "
            "or ask an administrator",
            field="name",
        )


def check_keys(team: str, caller: Caller, settings: Settings, *, session: Session) -> None:
    """Refuse (409) one more active key for a team at its limit."""
    limit = settings.max_keys_per_team
    if caller.is_admin or not limit:
        return
    have = active_keys_of(team, session=session, now=time.time())
    if have >= limit:
        raise TeamLimitError(
            f"team {team!r} has {have} active API keys and may have at most {limit} "
            "(APPLIANCE_MAX_KEYS_PER_TEAM); revoke keys it no longer uses "
            "(DELETE /v1/api-keys/{id}, or Revoke on the UI's keys page) or ask an administrator",
            field="name",
        )


def check_downloads(team: str, caller: Caller, settings: Settings, *, have: int) -> None:
    """Refuse (409) one more open download ahead of time for a team that has `have` open."""
    limit = settings.max_downloads_per_team
    if caller.is_admin or not limit or have < limit:
        return
    raise TeamLimitError(
        f"team {team!r} has {have} Hugging Face downloads pending or under way and may have at "
        f"most {limit} at once (APPLIANCE_MAX_DOWNLOADS_PER_TEAM); ask again once one has "
        "ended (GET /v1/storage/hf-downloads says how far each got)",
        field="repository",
    )


def check_file_bytes(caller: Caller, settings: Settings, *, have: int, adding: int) -> None:
    """Refuse (409) a file of `adding` bytes (or more: an upload still arriving) for a team
    whose files count `have`, when they would pass its quota."""
    limit = settings.max_file_bytes_per_team
    if caller.is_admin or not limit or have + counted_bytes(adding) <= limit:
        return
    raise TeamLimitError(
        f"team {caller.team!r} keeps {have} bytes of files and may keep at most {limit} "
        "(APPLIANCE_MAX_FILE_BYTES_PER_TEAM), so this file does not fit; delete files it no "
        "longer needs (DELETE /v1/files/{id}: batch inputs, and batches' output and error "
        "files once read) or ask an administrator",
        field="file",
    )


def model_bytes_of(team: str, *, session: Session) -> int:
    """The bytes of the model files the team uploaded (`appliance.models.ModelFile`)."""
    each = col(ModelFile.bytes)
    query = select(coalesce(func.sum(each), 0)).where(col(ModelFile.owner) == team)
    return int(session.exec(query).one())


def check_model_bytes(caller: Caller, settings: Settings, *, have: int, adding: int) -> None:
    """Refuse (409) a model file of `adding` bytes (or more: an upload still arriving) for a
    team whose uploads hold `have`, when they would pass its quota."""
    limit = settings.max_model_bytes_per_team
    if caller.is_admin or not limit or have + adding <= limit:
        return
    raise TeamLimitError(
        f"team {caller.team!r} keeps {have} bytes of model files it uploaded and may keep at "
        f"most {limit} (APPLIANCE_MAX_MODEL_BYTES_PER_TEAM), so this upload of {adding} bytes "
        "or more does not fit; ask an administrator to delete the team's model files no "
        "endpoint uses (DELETE /v1/storage/model-files/{name}, or the UI's Models page)",
        field="file",
    )
