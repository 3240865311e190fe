"""Uploaded files as the files and batches routes find them: one the caller's team owns, or
a 404 that does not say whether another team's exists."""

from __future__ import annotations

from sqlmodel import Session

from appliance.errors import NotFoundError
from appliance.keys import Caller
from appliance.models import File


def owned_file(file_id: str, caller: Caller, *, session: Session, field: str = "file_id") -> File:
    """The caller's team's file; a 404 naming `field` (the request's name for the id)."""
    row = session.get(File, file_id)
    if row is None or not caller.owns(row.owner):
        raise NotFoundError(f"no file with id {file_id!r}", field=field)
    return row
