"""The Files API of both clients on the same routes: upload, read, list, download, delete.

OpenAI's SDK and LLM Engine's client (`llmengine.File`) each get what they parse. A file
object carries OpenAI's fields and LLM Engine's `size`; a list both `data` and `files`; an
upload without `purpose` (LLM Engine's client sends none) is a `batch` file. The content is
the raw file for OpenAI's SDK and curl, and LLM Engine's `{id, content}` for a request that
asks for JSON (`Accept: application/json`) or sends its key as LLM Engine's client does
(`x-api-key`) without asking for bytes (`wants_json`).

Files live under `data_dir/files`; a row per file says whose it is. Batch output and error
files appear here too, made by the worker's sweeper.
"""

from __future__ import annotations

import codecs
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, BinaryIO, Literal

from fastapi import APIRouter, File, Form, Query, Request, UploadFile
from fastapi.responses import FileResponse, StreamingResponse
from sqlalchemy import tuple_
from sqlmodel import col, select

from api import team_limits
from api.deps import AddressDep, CallerDep, SessionDep, StateDep, require
from api.file_service import owned_file, upload_name
from appliance import audit, disk, queries
from appliance.db import session_scope
from appliance.errors import ApplianceError, InvalidSpecError
from appliance.ids import new_id
from appliance.models import File as FileRow

router = APIRouter(tags=["files"], dependencies=[require("inference")])
PURPOSES = ("batch",)
DEFAULT_PURPOSE = "batch"
MAX_LIST = 10_000  # OpenAI's most (and default) files per page
BYTES_TYPES = ("application/binary", "application/octet-stream", "application/jsonl")
MAX_FILE_BYTES = 512 * 1024 * 1024
COPY_CHUNK_BYTES = 1024 * 1024


def file_public(row: FileRow) -> dict[str, Any]:
    return {
        "id": row.id,
        "object": "file",
        "bytes": row.bytes,
        "size": row.bytes,  # LLM Engine's name
        "created_at": int(row.created_at),
        "filename": row.filename,
        "purpose": row.purpose,
        "status": "processed",
    }


def _store(upload: UploadFile, path: Path, reserve: int, fits: Callable[[int], None]) -> int:
    """The upload written to `path`; `fits(size)` refuses one past its team's quota."""
    size = 0
    partial = path.with_suffix(".part")
    with partial.open("wb") as out:
        while chunk := upload.file.read(COPY_CHUNK_BYTES):
            size += len(chunk)
            try:
                if size > MAX_FILE_BYTES:
                    raise InvalidSpecError(f"files are limited to {MAX_FILE_BYTES} bytes")
                fits(size)
                disk.check_room(path.parent, len(chunk), reserve, "storing the file")
            except ApplianceError:
                out.close()
                partial.unlink()
                raise
            out.write(chunk)
        out.flush()
        os.fsync(out.fileno())
    os.replace(partial, path)
    return size


@router.post("/v1/files")
def create_file(
    file: Annotated[UploadFile, File()],
    caller: CallerDep,
    session: SessionDep,
    state: StateDep,
    address: AddressDep,
    purpose: Annotated[str, Form()] = DEFAULT_PURPOSE,
    expires_anchor: Annotated[str | None, Form(alias="expires_after[anchor]")] = None,
    expires_seconds: Annotated[str | None, Form(alias="expires_after[seconds]")] = None,
) -> dict[str, Any]:
    if expires_anchor is not None or expires_seconds is not None:  # OpenAI's `expires_after`
        raise InvalidSpecError(
            "expires_after is refused: files here are kept until they are deleted "
            "(DELETE /v1/files/{id}); leave it out",
            field="expires_after",
        )
    if purpose not in PURPOSES:
        why = "; this appliance does not fine-tune" if purpose == "fine-tune" else ""
        raise InvalidSpecError(
            f"purpose {purpose!r} is refused: files here are batch inputs (purpose 'batch', for "
            f"/v1/batches and batch completions){why}",
            field="purpose",
        )
    filename = upload_name(file.filename)
    files_dir = state.settings.data_dir / "files"
    files_dir.mkdir(parents=True, exist_ok=True)
    file_id = new_id("file")
    path = files_dir / f"{file_id}.jsonl"
    with session_scope(state.reader) as reading:  # no write lock while the body arrives
        had = team_limits.file_bytes_of(caller.team, session=reading)

    def fits(size: int) -> None:
        team_limits.check_file_bytes(caller, state.settings, have=had, adding=size)

    size = _store(file, path, state.settings.disk_reserve_bytes, fits)
    try:  # again in the write transaction: uploads ending together cannot pass it together
        have = team_limits.file_bytes_of(caller.team, session=session)
        team_limits.check_file_bytes(caller, state.settings, have=have, adding=size)
    except ApplianceError:
        path.unlink()
        raise
    row = FileRow(
        id=file_id,
        owner=caller.team,
        created_by=caller.user,
        purpose=purpose,
        filename=filename,
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
def read_files(
    caller: CallerDep,
    session: SessionDep,
    state: StateDep,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIST)] = MAX_LIST,
    order: Literal["asc", "desc"] = "desc",
    purpose: str | None = None,
) -> dict[str, Any]:
    """OpenAI's cursor page (`after`, `limit`, `order`, `has_more`), newest first by default;
    `files` is the same list for LLM Engine's client; `team_bytes` what the caller's team's
    files count against `team_max_bytes` (null: no quota)."""
    newest = order == "desc"
    keys = (col(FileRow.created_at), col(FileRow.id))
    query = select(FileRow).order_by(*(k.desc() if newest else k for k in keys))
    query = queries.of_team(query, col(FileRow.owner), caller)
    if purpose:
        query = query.where(FileRow.purpose == purpose)
    if after:
        mark = owned_file(after, caller, session=session, field="after")
        later = tuple_(*keys) < (mark.created_at, mark.id)
        query = query.where(later if newest else tuple_(*keys) > (mark.created_at, mark.id))
    rows = session.exec(query.limit(limit + 1)).all()
    data = [file_public(r) for r in rows[:limit]]
    return {
        "object": "list",
        "data": data,
        "files": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": len(rows) > limit,
        "team_bytes": team_limits.file_bytes_of(caller.team, session=session),
        "team_max_bytes": state.settings.max_file_bytes_per_team or None,
    }


@router.get("/v1/files/{file_id}")
def read_file(file_id: str, caller: CallerDep, session: SessionDep) -> dict[str, Any]:
    return file_public(owned_file(file_id, caller, session=session))


@router.get("/v1/files/{file_id}/content", response_model=None)
def read_file_content(
    file_id: str, request: Request, caller: CallerDep, session: SessionDep
) -> FileResponse | StreamingResponse:
    row = owned_file(file_id, caller, session=session)
    if wants_json(request.headers.get("accept", ""), "x-api-key" in request.headers):
        return StreamingResponse(
            as_json(row.id, Path(row.path).open("rb")), media_type="application/json"
        )
    return FileResponse(row.path, media_type="application/jsonl", filename=row.filename)


def as_json(file_id: str, source: BinaryIO) -> Iterator[bytes]:
    """`{"id", "content"}` (as JSONResponse writes it) with the file's text as content,
    written as the file is read: a whole file (up to MAX_FILE_BYTES) decoded and written at
    once held several times its size for each read of it."""

    def text(part: str) -> bytes:
        return json.dumps(part, ensure_ascii=False)[1:-1].encode()

    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    with source:
        yield b'{"id":%b,"content":"' % json.dumps(file_id).encode()
        while block := source.read(COPY_CHUNK_BYTES):
            yield text(decoder.decode(block))
        yield text(decoder.decode(b"", final=True)) + b'"}'


def wants_json(accept: str, llm_engine_key: bool) -> bool:
    """Whether a download asks for LLM Engine's `{id, content}` rather than the bytes."""
    if "application/json" in accept:
        return True
    return llm_engine_key and not any(kind in accept for kind in BYTES_TYPES)


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
