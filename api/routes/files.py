"""OpenAI's Files API for batches: upload a JSONL (`purpose: batch`), read, download, delete.

Files live under `data_dir/files`; a row per file says whose it is. Batch output and error
files appear here too, made by the worker's sweeper.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, File, Form, UploadFile
from fastapi.responses import FileResponse
from sqlmodel import col, select

from api.deps import AddressDep, CallerDep, SessionDep, StateDep, require
from api.file_service import owned_file
from appliance import audit, queries
from appliance.errors import InvalidSpecError
from appliance.ids import new_id
from appliance.models import File as FileRow

router = APIRouter(tags=["files"], dependencies=[require("inference")])
PURPOSES = ("batch",)
MAX_FILE_BYTES = 512 * 1024 * 1024
COPY_CHUNK_BYTES = 1024 * 1024


def file_public(row: FileRow) -> dict[str, Any]:
    return {
        "id": row.id,
        "object": "file",
        "bytes": row.bytes,
        "created_at": int(row.created_at),
        "filename": row.filename,
        "purpose": row.purpose,
        "status": "processed",
    }


def _store(upload: UploadFile, path: Path) -> int:
    size = 0
    partial = path.with_suffix(".part")
    with partial.open("wb") as out:
        while chunk := upload.file.read(COPY_CHUNK_BYTES):
            size += len(chunk)
            if size > MAX_FILE_BYTES:
                out.close()
                partial.unlink()
                raise InvalidSpecError(f"files are limited to {MAX_FILE_BYTES} bytes")
            out.write(chunk)
        out.flush()
        os.fsync(out.fileno())
    os.replace(partial, path)
    return size


@router.post("/v1/files")
def create_file(
    file: Annotated[UploadFile, File()],
    purpose: Annotated[str, Form()],
    caller: CallerDep,
    session: SessionDep,
    state: StateDep,
    address: AddressDep,
) -> dict[str, Any]:
    if purpose not in PURPOSES:
        raise InvalidSpecError(f"purpose must be one of {', '.join(PURPOSES)}", field="purpose")
    files_dir = state.settings.data_dir / "files"
    files_dir.mkdir(parents=True, exist_ok=True)
    file_id = new_id("file")
    path = files_dir / f"{file_id}.jsonl"
    size = _store(file, path)
    row = FileRow(
        id=file_id,
        owner=caller.team,
        created_by=caller.user,
        purpose=purpose,
        filename=os.path.basename(file.filename or "input.jsonl"),
        bytes=size,
        path=str(path),
        created_at=time.time(),
    )
    session.add(row)
    change = {"filename": row.filename, "bytes": row.bytes, "purpose": purpose}
    audit.record(session, caller, "file.upload", row.id, change, address)
    session.commit()
    return file_public(row)


@router.get("/v1/files")
def read_files(caller: CallerDep, session: SessionDep) -> dict[str, Any]:
    query = select(FileRow).order_by(col(FileRow.created_at).desc())
    query = queries.of_team(query, col(FileRow.owner), caller)
    return {"object": "list", "data": [file_public(r) for r in session.exec(query).all()]}


@router.get("/v1/files/{file_id}")
def read_file(file_id: str, caller: CallerDep, session: SessionDep) -> dict[str, Any]:
    return file_public(owned_file(file_id, caller, session=session))


@router.get("/v1/files/{file_id}/content")
def read_file_content(file_id: str, caller: CallerDep, session: SessionDep) -> FileResponse:
    row = owned_file(file_id, caller, session=session)
    return FileResponse(row.path, media_type="application/jsonl", filename=row.filename)


@router.delete("/v1/files/{file_id}")
def delete_file(
    file_id: str, caller: CallerDep, session: SessionDep, address: AddressDep
) -> dict[str, Any]:
    row = owned_file(file_id, caller, session=session)
    session.delete(row)
    change = {"filename": row.filename, "team": row.owner}
    audit.record(session, caller, "file.delete", row.id, change, address)
    session.commit()
    Path(row.path).unlink(missing_ok=True)
    return {"id": file_id, "object": "file", "deleted": True}
