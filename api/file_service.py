"""Uploaded files as the files and batches routes find them: one the caller's team owns, or
a 404 that does not say whether another team's exists; and the name an upload is kept under."""

from __future__ import annotations

import os
import unicodedata

from sqlmodel import Session

from appliance.errors import InvalidSpecError, NotFoundError
from appliance.keys import Caller
from appliance.models import File

DEFAULT_NAME = "input.jsonl"
# Unicode's explicit direction marks, embeddings, overrides and isolates: a name holding one is
# shown other than it reads ('\u202egnp.jsonl' shows as 'lnosj.png')
BIDI_CONTROLS = frozenset(
    "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
)


def upload_name(sent: str | None) -> str:
    """The name an upload is kept under: the last part of what the client sent (no folders),
    `input.jsonl` when it sent none. It comes back in listings, the audit log and
    Content-Disposition, so one holding a control character (a NUL, a terminal's escape) or a
    direction control is a 400 naming the file; any other name, in any script, is kept."""
    name = os.path.basename(sent or DEFAULT_NAME)
    for char in name:
        if unicodedata.category(char) == "Cc" or char in BIDI_CONTROLS:
            raise InvalidSpecError(
                f"the file's name {name!r} holds the character U+{ord(char):04X}; name the file "
                "with printable characters",
                field="file",
            )
    return name


def owned_file(file_id: str, caller: Caller, *, session: Session, field: str = "file_id") -> File:
    """The caller's team's file; a 404 naming `field` (the request's name for the id)."""
    row = session.get(File, file_id)
    if row is None or not caller.owns(row.owner):
        raise NotFoundError(f"no file with id {file_id!r}", field=field)
    return row
