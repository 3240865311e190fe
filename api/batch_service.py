"""Batches on the async workers, for OpenAI's Batch API and LLM Engine's batch completions:
one low-priority task per input line or prompt, stored with its batch in one transaction and
then queued on each endpoint's low-priority queue; a batch the caller's team owns; cancel.
The worker's sweeper writes the output and error files once every request ended."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

import redis
from pydantic import Field
from sqlmodel import Session, col, select
from starlette.concurrency import run_in_threadpool

from api import storage
from api.body import Body
from api.deps import AppState
from api.inference import admission
from api.submit import (
    HELD_OF_TEAM,
    INSERT_TASK,
    WAITING,
    WAITING_OF_TEAM,
    NewTask,
    over_bytes,
    over_queued,
    task_row,
    team_limits_of,
)
from appliance import audit
from appliance.db import session_scope
from appliance.errors import ApplianceError, InvalidSpecError, NotFoundError
from appliance.ids import new_id
from appliance.keys import Caller
from appliance.models import Batch, Task, TaskStatus
from forwarder.paths import BY_MODEL, BY_PATH
from forwarder.table import Target
from forwarder.worker import batches, jobs

logger = logging.getLogger(__name__)

COMPLETION_WINDOW_S = 24 * 3600
UNFINISHED = (TaskStatus.PENDING, TaskStatus.STARTED)
ADMIT_BETWEEN_TURNS = 1000  # requests admitted (a few microseconds each) per event-loop turn


class CreateBatchRequest(Body):
    input_file_id: str
    endpoint: str
    completion_window: str = "24h"
    metadata: dict[str, str] | None = Field(None)


def batch_public(batch: Batch, session: Session | None) -> dict[str, Any]:
    """OpenAI's batch object; live counts while it runs (`session` None: the stored ones)."""
    counts = batch.request_counts
    if session is not None and batch.status in ("in_progress", "cancelling"):
        counts = batches.count_requests(session.connection(), batch.id)
    return {
        "id": batch.id,
        "object": "batch",
        "endpoint": batch.endpoint,
        "errors": batch.errors,
        "input_file_id": batch.input_file_id,
        "completion_window": batch.completion_window,
        "status": batch.status,
        "output_file_id": batch.output_file_id,
        "error_file_id": batch.error_file_id,
        "created_at": int(batch.created_at),
        "in_progress_at": _int(batch.in_progress_at),
        "expires_at": int(batch.created_at + COMPLETION_WINDOW_S),
        "finalizing_at": _int(batch.finalizing_at),
        "completed_at": _int(batch.completed_at),
        "failed_at": _int(batch.failed_at),
        "expired_at": None,
        "cancelling_at": _int(batch.cancelling_at),
        "cancelled_at": _int(batch.cancelled_at),
        "request_counts": counts,
        "metadata": batch.metadata_ or None,
    }


def _int(value: float | None) -> int | None:
    return None if value is None else int(value)


def owned_batch(
    batch_id: str, caller: Caller, *, session: Session, field: str = "batch_id"
) -> Batch:
    batch = session.get(Batch, batch_id)
    if batch is None or not caller.owns(batch.owner):
        raise NotFoundError(f"no batch with id {batch_id!r}", field=field)
    return batch


async def submit(
    body: CreateBatchRequest,
    requests: list[batches.BatchRequest],
    caller: Caller,
    state: AppState,
    address: str | None,
) -> Batch:
    """Admit every request as the request it will be, store the batch and its tasks, queue
    them at low priority. A request refused is named first in the error (its `where`), and
    nothing is stored. Shared with LLM Engine's batch completions
    (`api/routes/batch_completions.py`)."""
    targets: dict[str, Target] = {}
    for i, request in enumerate(requests, 1):
        try:
            await _admit(request, caller, state, targets)
        except ApplianceError as exc:
            raise exc.located(request.where) from exc
        if i % ADMIT_BETWEEN_TURNS == 0:
            await asyncio.sleep(0)  # other requests get the event loop in between
    return await run_in_threadpool(
        _store_and_queue, body, caller, body.input_file_id, requests, targets, state, address
    )


async def _admit(
    request: batches.BatchRequest, caller: Caller, state: AppState, targets: dict[str, Target]
) -> None:
    """One request's admission checks: its model, its tokens, its endpoint (each model once)."""
    model = request.body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidSpecError("every request body needs `model`, an endpoint name", field="model")
    admission.cap_tokens(caller, request.body, inject=BY_PATH[request.url].limit_field)
    if model not in targets:
        targets[model] = await admission.find_target(state, caller, BY_MODEL, model)
    admission.fit_framework(targets[model], BY_PATH[request.url].upstream, request.body, caller)


def _store_and_queue(
    body: CreateBatchRequest,
    caller: Caller,
    source_id: str,
    requests: list[batches.BatchRequest],
    targets: dict[str, Target],
    state: AppState,
    address: str | None,
) -> Batch:
    """On a thread: the transaction may wait for SQLite's write lock, and Redis is a socket.
    Every request becomes a row holding its body: refused (507) where they would not leave the
    disk its reserve, as the file they came from would have been."""
    adding = sum(len(json.dumps(request.body)) for request in requests)
    storage.check_database_room(state.settings, adding, f"storing {len(requests)} requests")
    batch, queued = _store(body, caller, source_id, requests, targets, state, address)
    try:
        jobs.enqueue(state.redis, queued, low=True)
    except redis.RedisError as exc:
        logger.warning("batch %s stored but not queued (%s); the sweeper will", batch.id, exc)
    return batch


def _store(
    body: CreateBatchRequest,
    caller: Caller,
    source_id: str,
    requests: list[batches.BatchRequest],
    targets: dict[str, Target],
    state: AppState,
    address: str | None,
) -> tuple[Batch, list[tuple[str, str, str]]]:
    """The batch and its tasks in one transaction: the outbox, every row before any job."""
    now = time.time()
    batch = Batch(
        id=new_id("batch"),
        owner=caller.team,
        created_by=caller.user,
        endpoint=body.endpoint,
        input_file_id=source_id,
        status="in_progress",
        request_counts={"total": len(requests), "completed": 0, "failed": 0},
        metadata_=body.metadata or {},
        created_at=now,
        in_progress_at=now,
        key_id=caller.key_id,
    )
    tasks = [
        NewTask(
            id=new_id("tsk"),
            endpoint_id=targets[request.body["model"]].endpoint_id,
            owner=caller.team,
            created_by=caller.user,
            payload={
                "args": {**request.body, "stream": False},
                "route": request.url,
                "custom_id": request.custom_id,
            },
            callback_url=None,
            callback_auth=None,
            created_at=now,
            key_id=caller.key_id,
            priority=-1,
            batch_id=batch.id,
        )
        for request in requests
    ]
    rows = [task_row(task) for task in tasks]  # made before the write lock is taken
    with session_scope(state.engine) as session:
        count = session.connection().exec_driver_sql
        if caller.limits.max_queued_tasks:  # every line is a task the limits count
            waiting = count(WAITING, (caller.team, caller.user)).scalar_one()
            refused = over_queued(waiting, len(requests), caller.limits.max_queued_tasks)
            if refused is not None:
                raise refused
        most, most_bytes = team_limits_of(caller, state.settings)
        if most:
            waiting = count(WAITING_OF_TEAM, (caller.team,)).scalar_one()
            refused = over_queued(waiting, len(requests), most, caller.team)
            if refused is not None:
                raise refused
        if most_bytes:
            held = count(HELD_OF_TEAM, (caller.team,)).scalar_one()
            adding = sum(row[-1] for row in rows)
            refused = over_bytes(held, adding, most_bytes, caller.team, batch=True)
            if refused is not None:
                raise refused
        session.add(batch)
        # one executemany of rows made beforehand, as async submits store theirs: 50,000
        # tasks hold SQLite's write lock a fraction of a second (an ORM object each: seconds)
        session.connection().exec_driver_sql(INSERT_TASK, rows)
        change = {"input_file_id": source_id, "endpoint": body.endpoint, "requests": len(requests)}
        audit.record(session, caller, "batch.create", batch.id, change, address)
    return batch, [(task.id, task.endpoint_id, task.owner) for task in tasks]


CANCELLABLE = ("in_progress", "cancelling")  # a batch whose requests may still be ended


def cancellable(batch: Batch) -> bool:
    """Whether a cancel can still end any of the batch's requests (both APIs' and the UI's
    cancels ask; what each says of one that cannot is its own)."""
    return batch.status in CANCELLABLE


def cancel(
    batch: Batch,
    caller: Caller,
    session: Session,
    state: AppState,
    address: str | None,
) -> dict[str, Any]:
    """End the batch's unfinished tasks at once, as cancelled (neither completed nor failed).
    A worker holding one abandons it within a second (`forwarder.worker.runner`), dropping its
    request to the replica, so the replica stops generating; an answer that still comes is
    not stored (the first outcome stays). The sweeper then writes the files (the finished
    answers) and marks the batch cancelled."""
    now = time.time()
    batch.status, batch.cancelling_at = "cancelling", now
    session.add(batch)
    pending = session.exec(
        select(Task).where(Task.batch_id == batch.id, col(Task.status).in_(UNFINISHED))
    ).all()
    for task in pending:
        task.status, task.traceback = TaskStatus.FAILURE, batches.CANCELLED
        task.finished_at, task.expires_at = now, now + state.settings.task_result_ttl_s
        session.add(task)
    audit.record(session, caller, "batch.cancel", batch.id, {"ended": len(pending)}, address)
    session.flush()
    public = batch_public(batch, session)
    session.commit()
    return public
