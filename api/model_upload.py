"""A GGUF file uploaded into the models directory (`PUT /v1/storage/model-files/{name}` and the
UI's Models page), as the request body itself: streamed to a hidden temporary file while its
sha256 is computed, checked for GGUF's magic bytes, and moved to its name only when the whole
body arrived, so an upload that is refused, too large or cut off leaves no file behind.

The size limit is the Shield's (`api/shield.py`, `Settings.model_upload_max_bytes`): it refuses
a declared length at once and cuts a chunked body as it passes the limit, which ends the
stream read here. Only an administrator replaces an existing file (`overwrite`), and never
one an endpoint uses.
"""

from __future__ import annotations

import errno
import hashlib
import os
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from anyio import to_thread
from sqlalchemy.engine import Engine
from starlette.requests import ClientDisconnect

from api import model_files, storage
from appliance import audit, disk, queries
from appliance.db import session_scope
from appliance.errors import (
    BadRequestError,
    ConflictError,
    InsufficientStorageError,
    InvalidSpecError,
)
from appliance.keys import Caller
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
    size: int = 0
    digest: Any = field(default_factory=hashlib.sha256)

    def write(self, data: bytes) -> None:
        disk.check_room(self.partial, len(data), self.reserve, f"uploading {self.final.name}")
        try:
            self.out.write(data)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise InsufficientStorageError(
                    f"the models directory's disk filled up after {self.size} bytes of "
                    f"{self.final.name}; free some space (delete unused models) and retry"
                ) from exc
            raise
        self.digest.update(data)
        self.size += len(data)

    def finish(self, overwrite: bool) -> None:
        """Flush to disk and move into place (a link: refused if the name appeared meanwhile)."""
        self.out.flush()
        os.fsync(self.out.fileno())
        self.out.close()
        if overwrite:
            os.replace(self.partial, self.final)
            return
        try:
            os.link(self.partial, self.final)
        except FileExistsError:
            raise _exists(self.final.name) from None
        self.partial.unlink()

    def discard(self) -> None:
        self.out.close()
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
) -> bool:
    """Everything that refuses an upload before its body is read; True when it replaces a
    file."""
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
    if declared is not None:
        disk.check_room(
            settings.models_dir,
            declared,
            settings.disk_reserve_bytes,
            f"{name} needs {declared} bytes",
        )
    return exists


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
    name: str, body: AsyncIterator[bytes], overwrite: bool, settings: Settings
) -> Upload:
    """Stream `body` into the models directory as `name`; the file appears only when all of it
    arrived and passed the checks."""
    upload = await to_thread.run_sync(_open, settings, name)
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
        await to_thread.run_sync(upload.finish, overwrite)
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
    upload: Upload, replaced: bool, caller: Caller, engine: Engine, address: str | None
) -> dict[str, Any]:
    """The audit entry, and the answer: name, size, sha256, and the model value to use."""
    sha256 = upload.digest.hexdigest()
    change = {"bytes": upload.size, "sha256": sha256, "replaced": replaced}
    with session_scope(engine) as session:
        audit.record(session, caller, "model.upload", upload.final.name, change, address)
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
    replaces = await to_thread.run_sync(admit, name, overwrite, length, caller, engine, settings)
    done = await receive(name, body, overwrite, settings)
    return await to_thread.run_sync(record, done, replaces, caller, engine, address)
