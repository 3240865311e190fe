"""Group commit of async task submissions; the api's lifespan makes one, `POST /v1/async-tasks`
awaits it.

A request hands over a `Draft`. One background task takes every draft waiting (up to
SUBMIT_GROUP_MAX) and, on its own thread:
1. reads the group's endpoints with no lock held and lets each draft check itself against its
   endpoint and build its row (404, 422 refuse that draft alone);
2. in ONE short write transaction (one fsync for the group) counts each limited key's and
   team's waiting tasks, refuses what is over a limit (429), and inserts the rest with one
   executemany;
3. queues all their jobs in one Redis pipeline: the outbox, rows before jobs.
A group whose rows would leave the data directory's disk less free than its reserve
(`APPLIANCE_DISK_RESERVE_BYTES`, `appliance.disk.check_room`) is refused with 507, as an upload
is: a task holds up to a 2 MiB body; what one team's tasks hold is bounded in step 2
(`APPLIANCE_MAX_TASK_BYTES_PER_TEAM`, the `bytes` of each row).
Only then does each request get its answer. A group forms while the previous one commits, so a
lone request waits for nothing; under load dozens of tasks share a commit.

The write lock is held only for step 2, with no Python per row in between: the worker's
claims and finishes wait on the same lock, with SQLite's sleeping busy handler.
If Redis fails after the commit the tasks stay accepted: the worker's sweeper queues them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sqlite3
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import redis
from sqlalchemy.engine import Engine

from appliance.errors import (
    ApplianceError,
    BadRequestError,
    InsufficientStorageError,
    RateLimitedError,
)
from appliance.keys import Caller
from appliance.models import TaskStatus
from appliance.settings import Settings
from forwarder.worker import jobs

logger = logging.getLogger(__name__)

SUBMIT_GROUP_MAX = 512  # tasks committed and queued together
QUEUED_RETRY_AFTER_S = 5
_ENDPOINTS = (
    "SELECT id, name, owner, public_inference, status, "
    "json_extract(extra, '$.default_callback_url'), json_extract(extra, '$.default_callback_auth') "
    "FROM endpoint WHERE id IN ({})"
)
WAITING = (
    "SELECT COUNT(*) FROM task WHERE owner = ? AND created_by = ? "
    "AND status IN ('PENDING', 'STARTED')"
)
WAITING_OF_TEAM = "SELECT COUNT(*) FROM task WHERE owner = ? AND status IN ('PENDING', 'STARTED')"
# every row until the sweeper deletes it (its result expired): a running total, which triggers
# keep in every write of a task row (`appliance/migrations._v9_team_task_bytes`)
HELD_OF_TEAM = "SELECT COALESCE((SELECT bytes FROM task_bytes WHERE owner = ?), 0)"
BYTES_SETTING = "APPLIANCE_MAX_TASK_BYTES_PER_TEAM"
BYTES_RETRY_AFTER_S = 60
TEAM_SETTING = "APPLIANCE_MAX_QUEUED_TASKS_PER_TEAM"
INSERT_TASK = (
    "INSERT INTO task (id, endpoint_id, owner, created_by, status, payload, callback_url, "
    "callback_auth, attempts, priority, batch_id, created_at, enqueued_at, key_id, bytes) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, 0, ?, ?, ?, ?, ?, ?)"
)


@dataclass(frozen=True)
class EndpointView:
    """The endpoint columns a submission is checked against."""

    id: str
    name: str
    owner: str
    public_inference: bool
    status: str
    default_callback_url: str | None = None  # where a task without its own callback reports
    default_callback_auth: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class NewTask:
    """A task's row as a submission or a batch builds it: PENDING, queued as it is stored, one
    `INSERT_TASK` of `task_row` each. (Constructing the ORM's `Task` costs several times as
    much, and nothing on these paths needs one.)"""

    id: str
    endpoint_id: str
    owner: str
    created_by: str
    payload: dict[str, Any]
    callback_url: str | None
    callback_auth: dict[str, Any] | None
    created_at: float
    key_id: str | None  # the key it was sent with, for usage
    priority: int = 0  # a batch's: -1, its endpoint's low-priority queue
    batch_id: str | None = None


@dataclass(frozen=True)
class Draft:
    """A task as a route hands it over.

    `build` gets the endpoint (None: no such row), raises an ApplianceError to refuse the task,
    or returns its row. `max_queued` is the key's limit on its user's waiting tasks,
    `team_max_queued` its team's on all of the team's, and `team_max_bytes` its team's on the
    bytes of their stored requests (`team_limits_of`; 0: none).
    """

    endpoint_id: str
    owner: str
    created_by: str
    max_queued: int
    build: Callable[[EndpointView | None], NewTask]
    team_max_queued: int = 0
    team_max_bytes: int = 0


Outcome = NewTask | BaseException


@dataclass(frozen=True)
class _Pending:
    draft: Draft
    future: asyncio.Future[NewTask]


class TaskSubmitter:
    """Stores and queues tasks in groups; `submit` returns once its task is committed."""

    def __init__(
        self,
        engine: Engine,
        client: redis.Redis,
        room: Callable[[int], None] = lambda adding: None,
    ) -> None:
        """`room(n)` raises InsufficientStorageError when `n` more bytes of rows do not fit."""
        self._engine = engine
        self._redis = client
        self._room = room
        self._waiting: asyncio.Queue[_Pending | None] = asyncio.Queue()
        # one thread: groups commit one after another, and never wait on the request threadpool
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="task-submit")
        self._runner: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._runner = asyncio.create_task(self._run())

    async def close(self) -> None:
        """Store what was handed over already, then stop."""
        if self._runner is not None:
            self._waiting.put_nowait(None)
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner
        self._thread.shutdown()

    async def submit(self, draft: Draft) -> NewTask:
        """The committed task (queued, or left to the sweeper); raises why it was refused."""
        if self._runner is None or self._runner.done():
            raise RuntimeError("the task submitter is not running")
        future: asyncio.Future[NewTask] = asyncio.get_running_loop().create_future()
        self._waiting.put_nowait(_Pending(draft, future))
        return await future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        stopping = False
        while not stopping:
            first = await self._waiting.get()
            if first is None:
                return
            group = [first]
            while len(group) < SUBMIT_GROUP_MAX and not self._waiting.empty():
                item = self._waiting.get_nowait()
                if item is None:
                    stopping = True
                    break
                group.append(item)
            try:
                outcomes = await loop.run_in_executor(
                    self._thread, self._store, [p.draft for p in group]
                )
            except Exception as exc:  # never leave a request waiting, never stop the loop
                logger.exception("a group of %d task submissions failed", len(group))
                outcomes = [exc] * len(group)
            for pending, outcome in zip(group, outcomes, strict=True):
                if pending.future.done():  # the request went away; its task stays accepted
                    continue
                if isinstance(outcome, NewTask):
                    pending.future.set_result(outcome)
                else:
                    pending.future.set_exception(outcome)

    def _store(self, drafts: list[Draft]) -> list[Outcome]:
        raw = self._engine.raw_connection()  # the process's engine, below the ORM: no lock yet
        try:
            conn: sqlite3.Connection = raw.driver_connection  # type: ignore[assignment]
            outcomes = _build(conn, drafts)
            _insert(conn, drafts, outcomes, self._room)
        finally:
            raw.close()
        stored = [(t.id, t.endpoint_id, t.owner) for t in outcomes if isinstance(t, NewTask)]
        if stored:
            try:
                jobs.enqueue(self._redis, stored, low=False)
            except redis.RedisError as exc:
                logger.warning(
                    "%d tasks stored, not queued (%s); the sweeper will queue them",
                    len(stored),
                    exc,
                )
        return outcomes


def _build(conn: sqlite3.Connection, drafts: list[Draft]) -> list[Outcome]:
    """Each draft's row, or why it is refused; reads in autocommit mode, so takes no lock."""
    ids = sorted({d.endpoint_id for d in drafts})
    found = conn.execute(_ENDPOINTS.format(",".join("?" * len(ids))), ids).fetchall()
    endpoints = {
        row[0]: EndpointView(
            row[0], row[1], row[2], bool(row[3]), row[4], row[5], json.loads(row[6] or "null")
        )
        for row in found
    }
    outcomes: list[Outcome] = []
    for draft in drafts:
        try:
            outcomes.append(draft.build(endpoints.get(draft.endpoint_id)))
        except ApplianceError as exc:  # refused: 404, 422
            outcomes.append(exc)
        except Exception as exc:  # a bug in one draft must not fail its neighbours
            logger.exception("building a task failed")
            outcomes.append(exc)
    return outcomes


def _insert(
    conn: sqlite3.Connection,
    drafts: list[Draft],
    outcomes: list[Outcome],
    room: Callable[[int], None],
) -> None:
    """Check the queued-task limits and the disk's room, and insert the group's rows in one
    transaction.

    A refused draft gets its error in `outcomes`; if the transaction fails, or the rows do not
    fit on the disk, every draft that was to be stored gets that failure instead (no row of
    the group was stored)."""
    try:
        conn.execute("BEGIN IMMEDIATE")
        try:
            rows = _admit(conn, drafts, outcomes)
            room(sum(len(row[5]) for row in rows))  # the payloads: all else is a few bytes
            conn.executemany(INSERT_TASK, rows)
            conn.execute("COMMIT")
        finally:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
    except (sqlite3.Error, InsufficientStorageError) as exc:
        logger.error("storing %d tasks failed: %s", len(drafts), exc)
        for i, outcome in enumerate(outcomes):
            if isinstance(outcome, NewTask):
                outcomes[i] = exc


def waiting_tasks(conn: sqlite3.Connection, owner: str, user: str) -> int:
    """The tasks of a team's user waiting or running: what the queued-task limit counts."""
    return int(conn.execute(WAITING, (owner, user)).fetchone()[0])


def team_waiting_tasks(conn: sqlite3.Connection, owner: str) -> int:
    """The tasks of a team waiting or running, whoever sent them: what its limit counts."""
    return int(conn.execute(WAITING_OF_TEAM, (owner,)).fetchone()[0])


def team_limits_of(caller: Caller, settings: Settings) -> tuple[int, int]:
    """The most tasks the caller's team may have waiting or running, and the most bytes of
    requests its tasks may hold until their results expire (0: none): every key and user of a
    team counts together, so no team fills Redis and the workers' queues, or the database's
    disk, that every team shares. An administrator is never refused, as for a team's other
    limits (`api/team_limits.py`)."""
    if caller.is_admin:
        return 0, 0
    return settings.max_queued_tasks_per_team, settings.max_task_bytes_per_team


def over_bytes(
    held: int, adding: int, most: int, team: str, batch: bool = False
) -> RateLimitedError | BadRequestError | None:
    """The team's bytes of stored requests: the 429 to answer when `adding` more would pass
    `most` (0: no limit), or a 400 for a task or batch that alone holds more (no wait admits
    it)."""
    if not most or held + adding <= most:
        return None
    limit = f"limit {most}, {BYTES_SETTING}"
    if adding > most:
        what, instead = (
            ("this batch's requests hold", "split it into smaller batches")
            if batch
            else ("this task's request holds", "send a smaller one")
        )
        return BadRequestError(
            f"{what} {adding} bytes, more than team {team!r} may hold in its tasks at once "
            f"({limit}): {instead}",
            field="input_file_id" if batch else "args",
        )
    return RateLimitedError(
        f"team {team!r} holds {held} bytes of requests in its async tasks and batches, kept "
        f"until their results expire (APPLIANCE_TASK_RESULT_TTL_S), and this adds {adding} "
        f"({limit}); send more once older ones have expired",
        retry_after_s=BYTES_RETRY_AFTER_S,
    )


def over_queued(
    waiting: int, adding: int, most: int, team: str | None = None
) -> RateLimitedError | BadRequestError | None:
    """The queued-task limits, for tasks and batches alike: a key's user (or, given `team`, a
    team) may have at most `most` tasks waiting or running (0: no limit); the 429 to answer
    when `adding` more would pass it. A batch of more than `most` requests can never pass: a
    400 saying to split it, not a 429 that clients would send again and again."""
    if not most or waiting + adding <= most:
        return None
    holder, limit = (
        ("this key", f"limit {most}")
        if team is None
        else (f"team {team!r}", f"limit {most}, {TEAM_SETTING}")
    )
    if adding > most:
        return BadRequestError(
            f"this batch has {adding} requests, more than {holder} may have queued at once "
            f"({limit}): split it into batches of at most {most}",
            field="input_file_id",
        )
    also = f"; this batch adds {adding}" if adding > 1 else ""
    return RateLimitedError(
        f"{holder} already has {waiting} tasks queued ({limit}){also}; send more once some "
        "have finished",
        retry_after_s=QUEUED_RETRY_AFTER_S,
    )


def _admit(
    conn: sqlite3.Connection, drafts: list[Draft], outcomes: list[Outcome]
) -> list[tuple[Any, ...]]:
    """The rows to insert; a draft over its key's or its team's queued-task limit gets a 429
    instead.

    Counted inside the write transaction, so a burst of one key's (or team's) tasks cannot
    overshoot."""
    live = [(d, o) for d, o in zip(drafts, outcomes, strict=True) if isinstance(o, NewTask)]
    users = {(d.owner, d.created_by) for d, _ in live if d.max_queued}
    teams = {d.owner for d, _ in live if d.team_max_queued}
    holders = {d.owner for d, _ in live if d.team_max_bytes}
    waiting = Counter({who: waiting_tasks(conn, *who) for who in users})
    of_team = Counter({team: team_waiting_tasks(conn, team) for team in teams})
    held = Counter(
        {team: int(conn.execute(HELD_OF_TEAM, (team,)).fetchone()[0]) for team in holders}
    )
    rows = []
    for i, (draft, task) in enumerate(zip(drafts, outcomes, strict=True)):
        if not isinstance(task, NewTask):
            continue
        who, row = (draft.owner, draft.created_by), task_row(task)
        refused = (
            over_queued(waiting[who], 1, draft.max_queued)
            or over_queued(of_team[draft.owner], 1, draft.team_max_queued, draft.owner)
            or over_bytes(held[draft.owner], row[-1], draft.team_max_bytes, draft.owner)
        )
        if refused is not None:
            outcomes[i] = refused
            continue
        waiting[who] += 1
        of_team[draft.owner] += 1
        held[draft.owner] += row[-1]
        rows.append(row)
    return rows


def task_row(task: NewTask) -> tuple[Any, ...]:
    """The values of `INSERT_TASK` for the task."""
    auth = None if task.callback_auth is None else json.dumps(task.callback_auth)
    payload = json.dumps(task.payload)  # ASCII: its length is its bytes
    return (
        task.id,
        task.endpoint_id,
        task.owner,
        task.created_by,
        TaskStatus.PENDING.value,
        payload,
        task.callback_url,
        auth,
        task.priority,
        task.batch_id,
        task.created_at,
        task.created_at,  # enqueued_at: its job is queued in the same step
        task.key_id,
        len(payload),  # last: `_admit` reads it there
    )
