"""OpenAI batches on the async workers: reading the input JSONL, writing output and error files.

The api parses the input (`parse_requests`) and makes one low-priority task per line; the
sweeper calls `finish_batches`, which writes the output and error files in OpenAI's batch
output format once every task of a batch has ended.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy import Connection, text
from sqlalchemy.engine import Engine

from appliance.errors import InvalidSpecError
from appliance.ids import new_id

logger = logging.getLogger(__name__)

CANCELLED = "batch cancelled before this request ran"
MAX_REQUESTS = 50_000


@dataclass(frozen=True)
class BatchRequest:
    custom_id: str
    url: str
    body: dict[str, Any]
    where: str  # where the input holds it, leading a refusal of it: "line 3 (custom_id 'a')"


def read_json(raw: bytes) -> Any:
    """The JSON of an input file (a line of it, or the whole): strict, as a request body sent
    to its route directly is read (`api/inference/call.parse_object`), and at most 1,024 deep;
    ValueError otherwise, where the standard library's reader ends in a RecursionError."""
    return orjson.loads(raw)


def parse_requests(path: Path, endpoint_url: str) -> list[BatchRequest]:
    """The requests of a batch input file; InvalidSpecError names the first bad line (and its
    custom_id, once it has one)."""
    requests: list[BatchRequest] = []
    seen: set[str] = set()
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            try:
                line = read_json(raw)
            except orjson.JSONDecodeError as exc:  # what is wrong, and where on the line
                raise InvalidSpecError(
                    f"line {number} of the input file is not valid JSON: {exc.msg} at column "
                    f"{exc.colno}"
                ) from None
            if not isinstance(line, dict) or not isinstance(line.get("body"), dict):
                raise InvalidSpecError(f"line {number}: expected custom_id, method, url, body")
            custom_id = line.get("custom_id")
            if not isinstance(custom_id, str) or not custom_id:
                raise InvalidSpecError(f"line {number}: custom_id must be a unique string")
            where = f"line {number} (custom_id {custom_id!r})"
            if custom_id in seen:
                raise InvalidSpecError(f"{where}: custom_id must be unique; an earlier line has it")
            if line.get("method", "POST") != "POST" or line.get("url") != endpoint_url:
                raise InvalidSpecError(f"{where}: must be POST {endpoint_url}")
            seen.add(custom_id)
            requests.append(BatchRequest(custom_id, endpoint_url, line["body"], where))
            if len(requests) > MAX_REQUESTS:
                raise InvalidSpecError(f"a batch holds at most {MAX_REQUESTS} requests")
    if not requests:
        raise InvalidSpecError("the input file holds no requests")
    return requests


def count_requests(conn: Connection, batch_id: str) -> dict[str, int]:
    rows = conn.execute(
        text(
            "SELECT status, (traceback IS NOT NULL AND traceback = :cancelled), COUNT(*) "
            "FROM task WHERE batch_id = :id GROUP BY 1, 2"
        ),
        {"id": batch_id, "cancelled": CANCELLED},
    ).all()
    counts = {"total": 0, "completed": 0, "failed": 0}
    for status, cancelled, n in rows:
        counts["total"] += n
        if status == "SUCCESS":
            counts["completed"] += n
        elif status == "FAILURE" and not cancelled:
            counts["failed"] += n
    return counts


def _output_line(row: Any) -> tuple[bool, dict[str, Any]]:
    """(is_success, line) for one task, in OpenAI's batch output format."""
    task_id, status, result, status_code, traceback, payload = row
    custom_id = json.loads(payload or "{}").get("custom_id")
    answer = json.loads(result) if result else None
    body = answer.get("result") if isinstance(answer, dict) else answer
    ok = status == "SUCCESS" and status_code is not None and 200 <= status_code < 300
    response = None
    if status_code is not None:
        response = {"status_code": status_code, "request_id": task_id, "body": body}
    error = None
    if not ok:
        error = {"code": "request_failed", "message": traceback or "the request failed"}
    line = {"id": f"batch_req_{task_id}", "custom_id": custom_id, "response": response}
    line["error"] = error
    return ok, line


def _write_file(
    conn: Connection, files_dir: Path, owner: str, name: str, lines: list[dict[str, Any]]
) -> str:
    file_id = new_id("file")
    path = files_dir / f"{file_id}.jsonl"
    data = "".join(json.dumps(line) + "\n" for line in lines).encode()
    partial = path.with_suffix(".part")
    partial.write_bytes(data)
    os.replace(partial, path)
    conn.execute(
        text(
            "INSERT INTO file (id, owner, created_by, purpose, filename, bytes, path, created_at) "
            "VALUES (:id, :owner, 'batch', 'batch_output', :name, :bytes, :path, :now)"
        ),
        {
            "id": file_id,
            "owner": owner,
            "name": name,
            "bytes": len(data),
            "path": str(path),
            "now": os.path.getmtime(path),
        },
    )
    return file_id


def finish_batches(engine: Engine, files_dir: Path, now: float) -> int:
    """Write the files of every batch whose tasks all ended; returns how many it finished."""
    with engine.begin() as conn:
        open_batches = conn.execute(
            text("SELECT id, status FROM batch WHERE status IN ('in_progress', 'cancelling')")
        ).all()
    finished = 0
    for batch_id, status in open_batches:
        with engine.begin() as conn:
            if _finish_one(conn, files_dir, batch_id, status, now):
                finished += 1
    return finished


def _finish_one(conn: Connection, files_dir: Path, batch_id: str, status: str, now: float) -> bool:
    left = conn.execute(
        text("SELECT COUNT(*) FROM task WHERE batch_id = :id AND status IN ('PENDING', 'STARTED')"),
        {"id": batch_id},
    ).scalar_one()
    if left:
        return False
    owner, metadata = conn.execute(
        text("SELECT owner, metadata FROM batch WHERE id = :id"), {"id": batch_id}
    ).one()
    rows = conn.execute(
        text(
            "SELECT id, status, result, status_code, traceback, payload FROM task "
            "WHERE batch_id = :id AND (traceback IS NULL OR traceback != :cancelled) "
            "ORDER BY rowid"
        ),
        {"id": batch_id, "cancelled": CANCELLED},
    ).all()
    outputs: list[dict[str, Any]] = []
    errors: list[dict[str, Any]] = []
    for row in rows:
        ok, line = _output_line(row)
        (outputs if ok else errors).append(line)
    files_dir.mkdir(parents=True, exist_ok=True)
    # LLM Engine's batch completions name their output (`output_data_path`)
    meta = metadata if isinstance(metadata, dict) else json.loads(metadata or "{}")
    named = meta.get("output_data_path")
    output_name = os.path.basename(named or "") or f"{batch_id}_output.jsonl"
    # as OpenAI's: no output file when no request succeeded (a batch cancelled before any
    # answer, one whose every request failed); LLM Engine's named output is always written
    output_id = (
        _write_file(conn, files_dir, owner, output_name, outputs) if outputs or named else None
    )
    error_id = (
        _write_file(conn, files_dir, owner, f"{batch_id}_error.jsonl", errors) if errors else None
    )
    done = "cancelled" if status == "cancelling" else "completed"
    conn.execute(
        text(
            f"UPDATE batch SET status = :done, output_file_id = :out, error_file_id = :err, "  # noqa: S608
            f"finalizing_at = :now, {done}_at = :now, request_counts = :counts "
            "WHERE id = :id"
        ),
        {
            "id": batch_id,
            "done": done,
            "out": output_id,
            "err": error_id,
            "now": now,
            "counts": json.dumps(count_requests(conn, batch_id)),
        },
    )
    logger.info("batch %s %s: %d answers, %d errors", batch_id, done, len(outputs), len(errors))
    return True
