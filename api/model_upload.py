"""A GGUF file uploaded into the models directory (`PUT /v1/storage/model-files/{name}` and the
UI's Models page), as the request body itself: streamed to a hidden temporary file while its
sha256 is computed, checked for GGUF's magic bytes, and moved to its name only when the whole
body arrived, so an upload that is refused, too large or cut off leaves no file behind.

The size limit is the Shield's (`api/shield.py`, `Settings.model_upload_max_bytes`): it refuses
a declared length at once and cuts a chunked body as it passes the limit, which ends the
stream read here. Only an administrator replaces an existing file (`overwrite`), and never
one an endpoint uses. A team's uploads count against its quota
(`APPLIANCE_MAX_MODEL_BYTES_PER_TEAM`, `api/team_limits.py`): before the body when its length
is declared, as it arrives, and once more, exactly, in the transaction that records whose it
is (`ModelFile`) and moves it into place.
"""

from __future__ import annotations

import errno
import hashlib
import os
import secrets
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from anyio import to_thread
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, delete, select
from starlette.requests import ClientDisconnect

from api import model_files, storage, team_limits
from appliance import audit, disk, queries
from appliance.db import session_scope
from appliance.errors import (
    BadRequestError,
    ConflictError,
    InsufficientStorageError,
    InvalidSpecError,
)
from appliance.keys import Caller
from appliance.models import ModelFile
from appliance.settings import Settings
from builder.specs import MODELS_MOUNT

GGUF_MAGIC = b"GGUF"
WRITE_BYTES = 4 * 1024 * 1024  # gathered before each write (one thread hop per write)


@dataclass
class Upload:
    """One upload as it is written: the temporary file, its size and running digest."""

    final: Path
    partial: Path
    out: IO[bytes]
    reserve: int = 0  # bytes the disk keeps free (`appliance.disk.check_room`)
    fits: Callable[[int], None] = lambda size: None  # refuses a size past the team's quota
    size: int = 0
    digest: Any = field(default_factory=hashlib.sha256)

    def write(self, data: bytes) -> None:
        self.fits(self.size + len(data))
        disk.check_room(self.partial, len(data), self.reserve, f"uploading {self.final.name}")
        try:
            self.out.write(data)
        except OSError as exc:
            self._refuse_if_full(exc)
            raise
        self.digest.update(data)
        self.size += len(data)

    def sync(self) -> None:
        """Flush the whole file to disk (before any lock is taken: it may take seconds)."""
        try:
            self.out.flush()
            os.fsync(self.out.fileno())
            self.out.close()
        except OSError as exc:
            self._refuse_if_full(exc)
            raise

    def _refuse_if_full(self, exc: OSError) -> None:
        """A disk that filled up under the file (its last bytes may wait in the buffer until
        `sync`) is the 507 saying so."""
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise InsufficientStorageError(
                f"the models directory's disk filled up after {self.size} bytes of "
                f"{self.final.name}; free some space (delete unused models) and retry"
            ) from exc

    def place(self, overwrite: bool) -> None:
        """Move into place (a link: refused if the name appeared meanwhile)."""
        if overwrite:
            os.replace(self.partial, self.final)
            return
        try:
            os.link(self.partial, self.final)
        except FileExistsError:
            raise _exists(self.final.name) from None
        self.partial.unlink()

    def discard(self) -> None:
        """Remove the partial file, whatever closing it says (on a full disk, closing flushes
        the buffer again and fails again: the file must go all the same)."""
        try:
            self.out.close()
        except OSError:
            pass
        finally:
            self.partial.unlink(missing_ok=True)


def _exists(name: str) -> ConflictError:
    return ConflictError(
        f"a model file named {name!r} already exists; delete it first, or send "
        "overwrite=true (administrators) to replace it",
        field="name",
    )


def check_gguf_name(name: str) -> str:
    model_files.check_name(name)
    if not name.lower().endswith(".gguf"):
        raise InvalidSpecError(f"{name!r} does not end in .gguf: only GGUF files are uploaded")
    return name


def admit(
    name: str,
    overwrite: bool,
    declared: int | None,
    caller: Caller,
    engine: Engine,
    settings: Settings,
) -> tuple[bool, int]:
    """Everything that refuses an upload before its body is read; whether it replaces a file,
    and the bytes the caller's team's uploads hold."""
    check_gguf_name(name)
    if overwrite:
        storage.require_admin(caller, "replace a model file (overwrite=true)")
    path = settings.models_dir / name
    exists = os.path.lexists(path)
    if exists:
        if not overwrite:
            raise _exists(name)
        if path.is_dir():
            raise ConflictError(f"{name!r} is a folder; delete it first", field="name")
        with session_scope(engine) as session:
            users = model_files.users_of(name, queries.all_endpoints(session=session))
        storage.refuse_in_use(f"model file {name!r}", users, "name")
    settings.models_dir.mkdir(parents=True, exist_ok=True)
    with session_scope(engine) as session:
        had = owned_bytes(caller.team, session, settings)
    if declared is not None:
        team_limits.check_model_bytes(caller, settings, have=had, adding=declared)
        disk.check_room(
            settings.models_dir,
            declared,
            settings.disk_reserve_bytes,
            f"{name} needs {declared} bytes",
        )
    return exists, had


def owned_bytes(team: str, session: Session, settings: Settings) -> int:
    """What the team's uploads hold, less those no longer in the models directory (removed by
    hand): their rows go, so they count no more."""
    names = session.exec(select(ModelFile.name).where(col(ModelFile.owner) == team)).all()
    gone = [name for name in names if not os.path.lexists(settings.models_dir / name)]
    if gone:
        session.exec(delete(ModelFile).where(col(ModelFile.name).in_(gone)))
    return team_limits.model_bytes_of(team, session=session)


def _open(settings: Settings, name: str) -> Upload:
    partial = settings.models_dir / f"{model_files.PARTIAL_PREFIX}{secrets.token_hex(8)}-{name}"
    return Upload(
        settings.models_dir / name, partial, partial.open("xb"), settings.disk_reserve_bytes
    )


def _check_magic(head: bytes, name: str) -> None:
    if not head.startswith(GGUF_MAGIC):
        raise InvalidSpecError(
            f"{name} is not a GGUF file (it does not start with the bytes 'GGUF')", field="file"
        )


async def receive(
    name: str, body: AsyncIterator[bytes], settings: Settings, fits: Callable[[int], None]
) -> Upload:
    """Stream `body` into a hidden file of the models directory, synced to disk; `record`
    moves it into place as `name`."""
    upload = await to_thread.run_sync(_open, settings, name)
    upload.fits = fits
    pending = bytearray()
    checked = False
    try:
        async for chunk in body:
            pending += chunk
            if not checked and len(pending) >= len(GGUF_MAGIC):
                _check_magic(bytes(pending[: len(GGUF_MAGIC)]), name)
                checked = True
            if len(pending) >= WRITE_BYTES:
                await to_thread.run_sync(upload.write, bytes(pending))
                pending.clear()
        if not checked:
            _check_magic(bytes(pending), name)
        await to_thread.run_sync(upload.write, bytes(pending))
        await to_thread.run_sync(upload.sync)
    except ClientDisconnect:
        await to_thread.run_sync(upload.discard)
        raise BadRequestError(f"the upload of {name} ended before its body was complete") from None
    except Exception:
        await to_thread.run_sync(upload.discard)
        raise
    except BaseException:  # cancelled: nothing may be awaited any more
        upload.discard()
        raise
    return upload


def record(
    upload: Upload,
    replaced: bool,
    overwrite: bool,
    caller: Caller,
    engine: Engine,
    settings: Settings,
    address: str | None,
) -> dict[str, Any]:
    """In one transaction: the team's quota checked again (uploads ending together cannot pass
    it together), the row saying whose the file is, the audit entry, and the file moved into
    place; then the answer: name, size, sha256, and the model value to use."""
    sha256 = upload.digest.hexdigest()
    change = {"bytes": upload.size, "sha256": sha256, "replaced": replaced}
    name = upload.final.name
    try:
        with session_scope(engine) as session:
            have = owned_bytes(caller.team, session, settings)
            team_limits.check_model_bytes(caller, settings, have=have, adding=upload.size)
            session.merge(
                ModelFile(name=name, owner=caller.team, bytes=upload.size, shared=caller.is_admin)
            )
            audit.record(session, caller, "model.upload", name, change, address)
            upload.place(overwrite)
    except BaseException:
        upload.discard()
        raise
    return {
        "name": upload.final.name,
        "bytes": upload.size,
        "sha256": sha256,
        "replaced": replaced,
        "model": f"{MODELS_MOUNT}/{upload.final.name}",
    }


async def upload(
    name: str,
    body: AsyncIterator[bytes],
    declared: str | None,
    overwrite: bool,
    caller: Caller,
    engine: Engine,
    settings: Settings,
    address: str | None,
) -> dict[str, Any]:
    """One upload from its checks to its answer: what the API's and the UI's routes call.
    `declared` is the request's Content-Length header, if any."""
    length = int(declared) if declared and declared.isdigit() else None
    replaces, had = await to_thread.run_sync(
        admit, name, overwrite, length, caller, engine, settings
    )

    def fits(size: int) -> None:
        team_limits.check_model_bytes(caller, settings, have=had, adding=size)

    done = await receive(name, body, settings, fits)
    return await to_thread.run_sync(
        record, done, replaces, overwrite, caller, engine, settings, address
    )
