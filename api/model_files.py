"""The models directory (`Settings.models_dir`) as the storage routes and the UI's Models page
see it: its top-level entries (a GGUF file, a checkpoint folder) with sizes and the endpoints
that use each, and their deletion, refused while an endpoint uses one. Uploads are in
`api/model_upload.py`.

A file a team uploaded is that team's: to another team (not an administrator) it does not
exist (`hidden_from`: its listing, the endpoint form, and `builder.policy.resolve_model_path`
for endpoints and downloads). What an administrator uploaded or the operator put there is the
box's, every team's.

An endpoint uses an entry when its `model` is `/models/<entry>` or a path inside it. Names are
one path component, never hidden (a leading dot: uploads in progress are hidden files), and
what they resolve to stays inside the directory.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sqlmodel import Session, col, select

from api import storage, team_limits
from appliance import audit, queries
from appliance.errors import InvalidSpecError, NotFoundError
from appliance.keys import Caller
from appliance.models import Endpoint, ModelFile
from appliance.settings import Settings
from builder.specs import MODELS_MOUNT, is_local_model

ENTRY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,254}$")
PARTIAL_PREFIX = ".upload-"  # an upload being written; renamed into place only when complete
MAX_FILES_COUNTED = 100_000  # files summed per folder; a larger folder shows a lower bound


def check_name(name: str, field: str = "name") -> str:
    """A top-level name in the models directory: one component, not hidden, no path tricks."""
    if not ENTRY_NAME.fullmatch(name) or name in {".", ".."} or ".." in name:
        raise InvalidSpecError(
            f"{name!r} is not a model file name: use letters, digits, '.', '_', '-' and '+', "
            "starting with a letter or digit, with no '/' and no '..'",
            field=field,
        )
    return name


def entry_path(settings: Settings, name: str) -> Path:
    """The entry's path; 404 when there is none."""
    path = settings.models_dir / check_name(name)
    if not os.path.lexists(path):
        raise NotFoundError(f"no model file {name!r} in the models directory", field="name")
    return path


def hidden_from(caller: Caller, *, session: Session) -> frozenset[str]:
    """The entries that do not exist for the caller: the uploads of other teams (none, for an
    administrator). Every place that shows or resolves a model file asks this."""
    if caller.is_admin:
        return frozenset()
    rows = session.exec(
        select(ModelFile.name).where(
            col(ModelFile.owner) != caller.team,
            col(ModelFile.shared) == False,  # noqa: E712
        )
    )
    return frozenset(rows.all())


def users_of(name: str, endpoints: Sequence[Endpoint]) -> list[Endpoint]:
    """The endpoints whose model is the entry `name` or a path inside it."""
    prefix = f"{MODELS_MOUNT}/{name}"
    return [
        e
        for e in endpoints
        if is_local_model(e.model) and (e.model == prefix or e.model.startswith(prefix + "/"))
    ]


def _size(path: Path) -> tuple[int, int]:
    """Bytes and files of a file or folder (links inside are not followed)."""
    if not path.is_dir():
        return path.stat().st_size, 1
    total = files = 0
    for folder, _, names in os.walk(path):
        for file_name in names:
            try:
                total += os.lstat(os.path.join(folder, file_name)).st_size
            except OSError:
                continue
            files += 1
            if files >= MAX_FILES_COUNTED:
                return total, files
    return total, files


def _entry(path: Path, root: Path) -> dict[str, Any] | None:
    try:
        real = Path(os.path.realpath(path))
        if real != root and root not in real.parents:
            return None  # a link out of the directory: not a model the appliance can serve
        size, files = _size(real)
        modified = path.stat().st_mtime
    except OSError:
        return None
    kind = "link" if path.is_symlink() else "folder" if real.is_dir() else "file"
    return {
        "name": path.name,
        "kind": kind,
        "size_bytes": size,
        "files": files,
        "modified_at": modified,
        "gguf": real.is_file() and path.name.lower().endswith(".gguf"),
        "model": f"{MODELS_MOUNT}/{path.name}",
    }


def list_entries(settings: Settings) -> list[dict[str, Any]]:
    """Every visible top-level entry, by name, without "used by"."""
    root = Path(os.path.realpath(settings.models_dir))
    try:
        paths = sorted(p for p in settings.models_dir.iterdir() if not p.name.startswith("."))
    except OSError:
        return []
    return [entry for entry in (_entry(p, root) for p in paths) if entry is not None]


def read_model_files(caller: Caller, session: Session, settings: Settings) -> dict[str, Any]:
    """`GET /v1/storage/model-files`: the entries with "used by", the disk they are on, and
    what the caller's team's uploads hold (`team_bytes`) against its quota (null: none). The
    directory is walked before the session reads: no transaction is open while it is."""
    entries = list_entries(settings)
    disk = storage.disk(settings)["models_dir"]
    endpoints = queries.all_endpoints(session=session)
    hidden = hidden_from(caller, session=session)
    data = [
        {**entry, **storage.used_by(users_of(entry["name"], endpoints), caller)}
        for entry in entries
        if entry["name"] not in hidden
    ]
    return {
        "data": data,
        "disk": disk,
        "team_bytes": team_limits.model_bytes_of(caller.team, session=session),
        "team_max_bytes": settings.max_model_bytes_per_team or None,
    }


def delete_entry(
    name: str, caller: Caller, session: Session, settings: Settings, address: str | None
) -> dict[str, Any]:
    """Delete an entry no endpoint uses (409 naming those that do); a link goes, not its
    target."""
    storage.require_admin(caller, "delete a model file")
    path = entry_path(settings, name)
    storage.refuse_in_use(
        f"model file {name!r}", users_of(name, queries.all_endpoints(session=session)), "name"
    )
    found = _entry(path, Path(os.path.realpath(settings.models_dir)))
    size = found["size_bytes"] if found else 0
    audit.record(session, caller, "model.delete", name, {"bytes": size}, address)
    owned = session.get(ModelFile, name)
    if owned is not None:  # its bytes no longer count against its team's quota
        session.delete(owned)
    # Removed while the transaction holds the write lock: no endpoint can be created on it
    # between the check above and the removal.
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
    session.commit()
    return {"name": name, "deleted": True, "freed_bytes": size}


def remove_partial_uploads(models_dir: Path) -> int:
    """Remove what uploads cut short by a stopped api left behind (at start, before any
    upload can run); returns how many."""
    removed = 0
    try:
        found = [p for p in models_dir.iterdir() if p.name.startswith(PARTIAL_PREFIX)]
    except OSError:
        return 0
    for path in found:
        path.unlink(missing_ok=True)
        removed += 1
    return removed


def model_choices(settings: Settings, hidden: frozenset[str]) -> list[dict[str, Any]]:
    """What the endpoint form offers for its model field: the entries the caller may use
    (`hidden_from`), GGUF files first."""
    entries = [e for e in list_entries(settings) if e["name"] not in hidden]
    return sorted(entries, key=lambda e: (not e["gguf"], e["name"]))
