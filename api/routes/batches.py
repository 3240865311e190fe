"""OpenAI's Batch API on the async workers: one low-priority task per input line.

`POST /v1/batches` checks the input file, stores the batch and its tasks in one transaction,
then queues them on each endpoint's low-priority queue; the worker's sweeper writes the output
and error files once every request ended. A refusal of one line names it first
(`line 3 (custom_id 'a'): ...`) and stores nothing. The route is async (admission may await a
reload of the routing table); its SQLite, disk and Redis work runs on the threadpool.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Query
from pydantic import ConfigDict, Field
from sqlmodel import col, select
from starlette.concurrency import run_in_threadpool

from api.batch_service import (
    CreateBatchRequest,
    batch_public,
    cancel,
    cancellable,
    owned_batch,
    submit,
)
from api.deps import (
    AddressDep,
    AdmittedDep,
    AppState,
    CallerDep,
    SessionDep,
    StateDep,
    require,
)
from api.file_service import owned_file
from appliance import queries
from appliance.db import session_scope
from appliance.errors import ApplianceError, FinishedError, InvalidSpecError
from appliance.keys import Caller
from appliance.models import Batch
from forwarder.paths import BATCH_PATHS, BY_PATH
from forwarder.worker import batches

router = APIRouter(tags=["batches"], dependencies=[require("inference")])

MetadataKey = Annotated[str, Field(max_length=64)]
MetadataValue = Annotated[str, Field(max_length=512)]


class OpenAIBatchRequest(CreateBatchRequest):
    """OpenAI's create-batch body: its fields only (any other, `output_expires_after` among
    them, is a 400 naming it rather than dropped), and its bounds on `metadata`."""

    model_config = ConfigDict(extra="forbid")

    metadata: dict[MetadataKey, MetadataValue] | None = Field(None, max_length=16)


@router.post("/v1/batches")
async def create_batch(
    body: OpenAIBatchRequest, caller: AdmittedDep, state: StateDep, address: AddressDep
) -> dict[str, Any]:
    """Each line is admitted as the request it will be (api/inference/admission.py): the
    key's token cap on its body, the tenancy of its endpoint; the key, its scope and counted
    limits once, for the batch (the dependencies)."""
    entry = BY_PATH.get(body.endpoint)
    if entry is None or not entry.batchable:
        raise InvalidSpecError(
            f"endpoint must be one of {', '.join(BATCH_PATHS)}", field="endpoint"
        )
    if body.completion_window != "24h":
        raise InvalidSpecError("completion_window must be 24h", field="completion_window")
    requests = await run_in_threadpool(_read_input, body, caller, state)
    batch = await submit(body, requests, caller, state, address)
    return batch_public(batch, None)


def _read_input(
    body: CreateBatchRequest, caller: Caller, state: AppState
) -> list[batches.BatchRequest]:
    """The input file's requests; on a thread, as its SQLite session may wait for the write
    lock (every transaction begins IMMEDIATE) and the file may be large."""
    with session_scope(state.engine) as session:
        source = owned_file(body.input_file_id, caller, session=session, field="input_file_id")
    if source.purpose != "batch":
        raise InvalidSpecError("the input file's purpose must be batch", field="input_file_id")
    try:
        return batches.parse_requests(Path(source.path), body.endpoint)
    except ApplianceError as exc:  # a line of the input file: its message says which
        exc.field = exc.field or "input_file_id"
        raise


@router.get("/v1/batches")
def read_batches(
    caller: CallerDep,
    session: SessionDep,
    limit: int = Query(20, ge=1, le=100, description="Batches a page, 1 to 100 (OpenAI's)."),
    after: str | None = None,
) -> dict[str, Any]:
    # one more than the page: whether it exists is `has_more`
    query = select(Batch).order_by(col(Batch.id).desc()).limit(limit + 1)
    query = queries.of_team(query, col(Batch.owner), caller)
    if after:  # a batch of the caller's, as `/v1/files` takes its cursor (404 naming after)
        query = query.where(
            col(Batch.id) < owned_batch(after, caller, session=session, field="after").id
        )
    rows = session.exec(query).all()
    data = [batch_public(b, session) for b in rows[:limit]]
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": len(rows) > limit,
    }


@router.get("/v1/batches/{batch_id}")
def read_batch(batch_id: str, caller: CallerDep, session: SessionDep) -> dict[str, Any]:
    return batch_public(owned_batch(batch_id, caller, session=session), session)


@router.post("/v1/batches/{batch_id}/cancel")
def cancel_batch(
    batch_id: str, caller: CallerDep, session: SessionDep, state: StateDep, address: AddressDep
) -> dict[str, Any]:
    """Requests not yet answered end at once, those a worker has sent to a replica too (their
    requests are dropped, so the replica stops); the sweeper then writes the files and marks
    the batch cancelled."""
    batch = owned_batch(batch_id, caller, session=session)
    if not cancellable(batch):
        raise FinishedError(f"batch {batch_id!r} is {batch.status}; it cannot be cancelled")
    return cancel(batch, caller, session, state, address)
