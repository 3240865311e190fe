"""Task rows as the async workers change them, and the group committer that writes them.

The worker and sweeper call these (the api only `view`, its status read); every write is a
conditional UPDATE, so a task run twice (at-least-once delivery) stores its result once: the
first finisher wins, the rest see 0 rows.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import queue
import sqlite3
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy import Connection
from sqlalchemy.engine import Engine

from appliance import usage
from appliance.models import TaskStatus

logger = logging.getLogger(__name__)

T = TypeVar("T")
FINAL = (TaskStatus.SUCCESS.value, TaskStatus.FAILURE.value)
GROUP_MAX = 256  # writes committed together; one fsync instead of hundreds
# Plain SQL run on the driver's connection (qmark), inside the group's transaction: a fifteenth
# of the cost of text() per statement. These run while the group holds SQLite's write lock,
# which the api's submits and the next group of claims and finishes wait on.
# A claimed task stays PENDING (waiting for a cold start, a slot) until `start` marks it
# STARTED, as its request goes to a replica: LLM Engine's STARTED means a replica works on it.
_CLAIM = (
    "UPDATE task SET status = 'PENDING', attempts = attempts + 1 "
    "WHERE id = ? AND status IN ('PENDING', 'STARTED') "
    "RETURNING endpoint_id, payload, attempts, callback_url, callback_auth, batch_id, owner"
)
_START = (
    "UPDATE task SET status = 'STARTED', started_at = ? "
    "WHERE id = ? AND status IN ('PENDING', 'STARTED') RETURNING 1"
)
_WAIT = "UPDATE task SET status = 'PENDING' WHERE id = ? AND status = 'STARTED'"
_FINISH = (
    "UPDATE task SET status = ?, result = ?, status_code = ?, traceback = ?, finished_at = ?, "
    "expires_at = ? WHERE id = ? AND status NOT IN ('SUCCESS', 'FAILURE') "
    "RETURNING owner, key_id, endpoint_id"
)
_ENDPOINT = f"SELECT name, {usage.MODEL_OF_ENDPOINT} FROM endpoint WHERE id = ?"  # noqa: S608
_RELEASE = (
    "UPDATE task SET status = 'PENDING', enqueued_at = ? "
    "WHERE id = ? AND status NOT IN ('SUCCESS', 'FAILURE')"
)
_ORPHANED = (
    "SELECT DISTINCT endpoint_id FROM task WHERE status IN ('PENDING', 'STARTED') "
    "AND endpoint_id NOT IN (SELECT id FROM endpoint)"
)
_LLAMACPP_SLOTS = "SELECT id, target_concurrency FROM endpoint WHERE framework = 'llamacpp'"
_VIEW = "SELECT owner, status, result, traceback, status_code FROM task WHERE id = ?"
_HAND_BACK = (
    "UPDATE task SET status = 'PENDING', attempts = MAX(attempts - 1, 0), enqueued_at = ? "
    "WHERE id = ? AND status = 'PENDING'"
)


def _driver(conn: Connection) -> sqlite3.Connection:
    raw: sqlite3.Connection = conn.connection.driver_connection  # type: ignore[assignment]
    return raw


@dataclass(frozen=True)
class Claim:
    """What a worker needs to run a task, read as it takes the task."""

    task_id: str
    endpoint_id: str
    payload: dict[str, Any]
    attempts: int
    callback_url: str | None
    callback_auth: dict[str, Any] | None
    batch_id: str | None
    owner: str  # the task's team: told an endpoint's reasons only when it owns the endpoint


def claim(conn: Connection, task_id: str) -> Claim | None:
    """Count the attempt (the task stays PENDING until `start`); None when it already ended
    or is gone."""
    row = _driver(conn).execute(_CLAIM, (task_id,)).fetchone()
    if row is None:
        return None
    auth = json.loads(row[4]) if row[4] else None
    return Claim(task_id, row[0], json.loads(row[1] or "{}"), row[2], row[3], auth, row[5], row[6])


def finish(
    conn: Connection,
    task_id: str,
    *,
    status: str,
    result: Any,
    status_code: int | None,
    traceback: str | None,
    now: float,
    keep_s: float,
    tokens: tuple[int, int] | None = None,
) -> bool:
    """Store the outcome unless one is stored already; True only for the call that stored it.
    That call also adds the request (and its prompt and completion `tokens`, an error when it
    failed) to the usage table, in the same transaction: counted once, with the outcome."""
    raw = _driver(conn)
    done = raw.execute(
        _FINISH,
        (status, json.dumps(result), status_code, traceback, now, now + keep_s, task_id),
    ).fetchone()
    if done is None:
        return False
    owner, key_id, endpoint_id = done
    endpoint = raw.execute(_ENDPOINT, (endpoint_id,)).fetchone()
    if endpoint is not None:  # else it was deleted: nothing to charge the request to
        prompt, completion = tokens or (0, 0)
        failed = int(status == TaskStatus.FAILURE.value)
        name, model = endpoint
        hour = usage.hour_of(now)
        row = usage.Counts(hour, owner, key_id or "", name, model, 1, prompt, completion, failed)
        usage.add(raw, [row])
    return True


def release(conn: Connection, task_id: str, now: float) -> None:
    """Put a task that could not run now back to PENDING; the sweeper re-enqueues it later."""
    _driver(conn).execute(_RELEASE, (now, task_id))


def start(conn: Connection, task_id: str, now: float) -> bool:
    """Mark the task STARTED as a replica takes its request; False when it has an outcome
    already (or is gone): a batch cancelled, or a duplicate delivery that finished it."""
    return _driver(conn).execute(_START, (now, task_id)).fetchone() is not None


def wait(conn: Connection, task_id: str) -> None:
    """Show the task PENDING again: its replica failed it before replying, and it waits for
    another (a replacement, as at a cold start); `start` marks it STARTED once one takes it."""
    _driver(conn).execute(_WAIT, (task_id,))


def ended(reader: Engine, task_ids: set[str]) -> set[str]:
    """Which of the tasks have an outcome (or are gone), read on the read-only engine: it never
    waits for a writer, so the worker can ask often about the batch requests it has in flight."""
    ids = sorted(task_ids)
    marks = ", ".join("?" * len(ids))
    raw = reader.raw_connection()
    try:
        conn: sqlite3.Connection = raw.driver_connection  # type: ignore[assignment]
        found = dict(conn.execute(f"SELECT id, status FROM task WHERE id IN ({marks})", ids))  # noqa: S608
    finally:
        raw.close()
    return {i for i in ids if found.get(i, "SUCCESS") in FINAL}


def llamacpp_slots(reader: Engine) -> dict[str, int]:
    """Each llama.cpp endpoint's per_worker: the requests one of its replicas runs at once (its
    `--parallel` slots, `builder/specs.server_command`); the runner takes no more of its jobs."""
    raw = reader.raw_connection()
    try:
        conn: sqlite3.Connection = raw.driver_connection  # type: ignore[assignment]
        rows = conn.execute(_LLAMACPP_SLOTS).fetchall()
    finally:
        raw.close()
    return {row[0]: max(int(row[1]), 1) for row in rows}


def orphaned(reader: Engine) -> set[str]:
    """The endpoints whose row is gone (deleted) while tasks of theirs wait or run: the
    worker still takes those tasks from their queues, and ends each saying so (`jobs.run_task`)."""
    raw = reader.raw_connection()
    try:
        conn: sqlite3.Connection = raw.driver_connection  # type: ignore[assignment]
        rows = conn.execute(_ORPHANED).fetchall()
    finally:
        raw.close()
    return {row[0] for row in rows}


def hand_back(conn: Connection, task_id: str, now: float) -> None:
    """Put a claimed task that never reached a replica back to PENDING, its attempt uncounted
    (its worker is stopping); the sweeper re-enqueues it."""
    _driver(conn).execute(_HAND_BACK, (now, task_id))


@dataclass(frozen=True)
class TaskView:
    """A task as its owner polls it."""

    owner: str
    status: str
    result: Any
    traceback: str | None
    status_code: int | None


def view(reader: Engine, task_id: str) -> TaskView | None:
    """The task as `GET /v1/async-tasks/{id}` shows it, None when there is none. One
    primary-key read on the api's read-only engine (it never waits for a writer), short enough
    to make on the event loop: a client polling its tasks costs no threadpool hop and no ORM."""
    raw = reader.raw_connection()
    try:
        conn: sqlite3.Connection = raw.driver_connection  # type: ignore[assignment]
        row = conn.execute(_VIEW, (task_id,)).fetchone()
    finally:
        raw.close()
    if row is None:
        return None
    result = None if row[2] is None else json.loads(row[2])
    return TaskView(row[0], row[1], result, row[3], row[4])


@dataclass
class _Write:
    fn: Callable[[Connection], Any]
    future: concurrent.futures.Future[Any]


class GroupCommitter:
    """One thread that runs queued writes in shared transactions (group commit).

    With `synchronous=FULL` each commit costs an fsync; hundreds of tasks a second would
    spend the disk on fsyncs one by one, so writes that arrive together commit together.
    """

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._queue: queue.Queue[_Write | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="group-commit", daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[[Connection], T]) -> concurrent.futures.Future[T]:
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._queue.put(_Write(fn, future))
        return future

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(10)

    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            group = [first]
            while len(group) < GROUP_MAX:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    self._queue.put(None)
                    break
                group.append(item)
            self._commit(group)

    def _commit(self, group: list[_Write]) -> None:
        try:
            with self._engine.begin() as conn:
                results = [w.fn(conn) for w in group]
        except Exception:
            if len(group) == 1:
                logger.exception("a task write failed")
                group[0].future.set_exception(RuntimeError("task write failed"))
                return
            for write in group:  # one bad write must not fail its neighbours
                self._commit([write])
            return
        for write, result in zip(group, results, strict=True):
            write.future.set_result(result)
