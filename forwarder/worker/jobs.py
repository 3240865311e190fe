"""RQ queues of async tasks and the job function the workers run.

The api enqueues (after it committed the task row); `forwarder.worker.runner` dequeues and runs
`run_task`. A job carries only the task id (JSON serializer); everything else is read from
the row, so a job re-enqueued by the sweeper runs the same task, and the conditional UPDATE in
`taskstore.finish` stores its result once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import zlib
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import redis
from redis.typing import EncodableT, FieldT
from rq import Queue
from rq.job import Job, JobStatus
from rq.utils import now as rq_now
from rq.utils import utcformat

from appliance.errors import (
    BadRequestError,
    CapacityError,
    EndpointDownError,
    InsufficientStorageError,
    UpstreamError,
)
from appliance.models import TaskStatus
from forwarder.llm_engine import SERIALIZE_KEY, task_path, wrap_result
from forwarder.proxy import Forwarder, ReplyTooLargeError
from forwarder.table import Target
from forwarder.unserved import not_served, replica_words
from forwarder.usage import usage_from_json
from forwarder.worker import taskstore
from forwarder.worker.callbacks import CallbackSender

logger = logging.getLogger(__name__)

HIGH_QUEUE = "appliance:tasks:{endpoint_id}"  # single tasks
LOW_QUEUE = "appliance:batch:{endpoint_id}"  # batch requests: taken only when no single waits
# Each team's tasks on an endpoint wait in a queue of their own, `<endpoint's queue>:<team>`,
# and the set `<endpoint's queue's name>:teams` names the teams whose queue may hold some: the
# runner takes from them in turn, so one team's backlog never holds up another team's tasks.
TEAMS_SUFFIX = ":teams"
JOB_FUNC = "forwarder.worker.jobs.run_task"
RETRIED_STATUSES = frozenset({429, 502, 503, 504})
ASYNC_PATH = "/v1/async-tasks"
T = TypeVar("T")


def queue_name(endpoint_id: str, team: str, *, low: bool) -> str:
    """The RQ queue of one team's tasks on the endpoint (of its batch requests when `low`)."""
    return endpoint_queue_name(endpoint_id, low=low) + ":" + team


def queue_key(endpoint_id: str, team: str, *, low: bool) -> str:
    return Queue.redis_queue_namespace_prefix + queue_name(endpoint_id, team, low=low)


def endpoint_queue_name(endpoint_id: str, *, low: bool) -> str:
    return (LOW_QUEUE if low else HIGH_QUEUE).format(endpoint_id=endpoint_id)


def endpoint_queue_key(endpoint_id: str, *, low: bool) -> str:
    """The endpoint's one queue, where every team's tasks waited before each team had its own:
    the runner still takes what an upgraded install left there (`team_queue_keys`)."""
    return Queue.redis_queue_namespace_prefix + endpoint_queue_name(endpoint_id, low=low)


def endpoint_of_queue(name: str) -> str:
    """The endpoint whose queue (`queue_name`, `endpoint_queue_name`) a job came from: its
    id has no ':'."""
    for prefix in (HIGH_QUEUE, LOW_QUEUE):
        head = prefix.format(endpoint_id="")
        if name.startswith(head):
            return name[len(head) :].split(":", 1)[0]
    return ""


def teams_key(endpoint_id: str, *, low: bool) -> str:
    """The set of teams with a queue of tasks (`low`: batch requests) on the endpoint."""
    return endpoint_queue_name(endpoint_id, low=low) + TEAMS_SUFFIX


def team_queue_keys(client: redis.Redis, endpoint_ids: Iterable[str]) -> list[str]:
    """Every queue that may hold the endpoints' jobs: each team's, and the endpoint's own."""
    wanted = [(e, low) for e in endpoint_ids for low in (False, True)]
    with client.pipeline(transaction=False) as pipe:
        for endpoint_id, low in wanted:
            pipe.smembers(teams_key(endpoint_id, low=low))
        found = pipe.execute()
    keys = []
    for (endpoint_id, low), teams in zip(wanted, found, strict=True):
        keys.append(endpoint_queue_key(endpoint_id, low=low))
        keys += [queue_key(endpoint_id, t.decode(), low=low) for t in sorted(teams)]
    return keys


def enqueue(client: redis.Redis, items: Iterable[tuple[str, str, str]], *, low: bool) -> int:
    """Queue (task id, endpoint id, team) triples as RQ jobs whose id is the task id, each on
    its team's queue of the endpoint; one round trip.

    Each job is what `Queue.enqueue_call(JOB_FUNC, args=(task_id,), job_id=task_id,
    result_ttl=0)` stores (its hash, then RPUSH on its queue) without building a Job and a
    Queue per task: a third of the CPU, which matters at hundreds of submits a second. The
    team joins the endpoint's set after its job is pushed: the runner drops a team from the
    set when it finds its queue empty, so a push between the two re-adds it, never loses it.
    """
    stamp = utcformat(rq_now())
    count = 0
    with client.pipeline(transaction=False) as pipe:
        for task_id, endpoint_id, team in items:
            name = queue_name(endpoint_id, team, low=low)
            pipe.hset(
                Job.redis_job_namespace_prefix + task_id, mapping=_job_hash(task_id, name, stamp)
            )
            pipe.rpush(Queue.redis_queue_namespace_prefix + name, task_id)
            pipe.sadd(teams_key(endpoint_id, low=low), team)
            count += 1
        pipe.execute()
    return count


def _job_hash(task_id: str, queue: str, stamp: str) -> dict[FieldT, EncodableT]:
    call = json.dumps([JOB_FUNC, None, [task_id], {}]).encode()  # rq's JSONSerializer
    return {
        "status": JobStatus.QUEUED.value,
        "data": zlib.compress(call),
        "origin": queue,
        "description": f"{JOB_FUNC}({task_id!r})",
        "created_at": stamp,
        "enqueued_at": stamp,
        "timeout": Queue.DEFAULT_TIMEOUT,
        "result_ttl": 0,
    }


def upstream_route(payload: dict[str, Any], target: Target) -> str:
    """Where a task's args go on the target's replicas: `forwarder/llm_engine.task_path`, the
    rule of every task entry (a BadRequestError when a vLLM or llama.cpp endpoint has no route
    for them; the api refuses those when they are submitted)."""
    route = payload.get("route")
    named = route if isinstance(route, str) else None
    return task_path(target.framework, target.predict_route, payload.get("args"), named)


@dataclass
class Runtime:
    """The worker process's long-lived clients, installed once before jobs run."""

    committer: taskstore.GroupCommitter
    forwarder: Forwarder
    callbacks: CallbackSender
    hold_s: float
    keep_s: float
    max_attempts: int
    result_max_bytes: int = 0  # longest reply a task keeps (APPLIANCE_TASK_RESULT_MAX_BYTES)
    # raises InsufficientStorageError when a result of n bytes would pass the disk's reserve
    room: Callable[[int], None] = lambda adding: None
    # the jobs waiting for a replica (`Forwarder.acquire`): cancelled when the worker stops
    waiting: set[asyncio.Task[Any]] = field(default_factory=set)
    # batch requests waiting for or sent to a replica, by job, with their task ids: the runner
    # cancels those whose task ended meanwhile (a cancelled batch), which aborts the request
    sending: dict[asyncio.Task[Any], str] = field(default_factory=dict)


# why a task whose workers all stopped while running it ends without running again
LOST_TOO_OFTEN = "lost too many times; not run again"

_runtime: Runtime | None = None


def install_runtime(runtime: Runtime | None) -> None:
    global _runtime
    _runtime = runtime


def _current() -> Runtime:
    if _runtime is None:
        raise RuntimeError(
            "run_task needs a worker runtime (forwarder.worker.jobs.install_runtime)"
        )
    return _runtime


async def _write(runtime: Runtime, fn: Any) -> Any:
    return await asyncio.wrap_future(runtime.committer.submit(fn))


async def run_task(task_id: str) -> None:
    """The RQ job: run one task against its endpoint and store the outcome once."""
    rt = _current()
    claimed: taskstore.Claim | None = await _write(rt, lambda conn: taskstore.claim(conn, task_id))
    if claimed is None:
        return  # it ended already (a duplicate delivery) or expired
    if claimed.attempts > rt.max_attempts:  # every worker that ran it stopped part way
        await _finish(rt, claimed, TaskStatus.FAILURE, None, None, LOST_TOO_OFTEN)
        return
    route = rt.forwarder.table.by_id.get(claimed.endpoint_id)
    if route is None:
        await _finish(rt, claimed, TaskStatus.FAILURE, None, None, "the endpoint was deleted")
        return
    try:
        path = upstream_route(claimed.payload, route)
    except BadRequestError as exc:  # submitted before the api refused such args
        await _finish(rt, claimed, TaskStatus.FAILURE, None, 400, exc.message)
        return
    body = json.dumps(claimed.payload.get("args")).encode()
    this = asyncio.current_task()
    assert this is not None
    rt.waiting.add(this)  # until a replica takes it: a stopping worker hands it back
    started = time.perf_counter()
    try:
        current, replica, waited = await _abortable(  # another team is told only "failed"
            rt, claimed, rt.forwarder.acquire(route, rt.hold_s, claimed.owner == route.owner)
        )
    except EndpointDownError as exc:  # no replica comes by waiting: no retry either
        await _finish(rt, claimed, TaskStatus.FAILURE, None, None, exc.message)
        return
    except (CapacityError, UpstreamError) as exc:
        await _retry_or_fail(rt, claimed, None, None, str(exc))
        return
    except asyncio.CancelledError:
        await _write(rt, lambda conn: taskstore.hand_back(conn, claimed.task_id, time.time()))
        raise
    finally:
        rt.waiting.discard(this)
    if not await _start(rt, claimed.task_id, replica.id):
        return
    try:
        status, data = await _abortable(
            rt,
            claimed,
            rt.forwarder.fetch(
                current,
                replica,
                path,
                body,
                started=started,
                waited=waited,
                max_bytes=rt.result_max_bytes,
                hold_s=rt.hold_s,
                owner=claimed.owner == route.owner,
                on_wait=_marker(rt, claimed.task_id),
            ),
        )
    except ReplyTooLargeError as exc:  # no retry makes it shorter
        await _finish(rt, claimed, TaskStatus.FAILURE, None, None, exc.message)
        return
    except (CapacityError, UpstreamError) as exc:
        await _retry_or_fail(rt, claimed, None, None, str(exc))
        return
    refused = not_served(status, data, current.name, _asked(claimed))
    if refused is not None:  # the endpoint's server has no such route: no retry can pass
        await _finish(rt, claimed, TaskStatus.FAILURE, None, 400, refused.message)
        return
    try:
        rt.room(len(data))  # the result is stored as it came, and wrapped: its length or more
    except InsufficientStorageError as exc:  # no retry finds more room
        await _finish(rt, claimed, TaskStatus.FAILURE, None, None, exc.message)
        return
    try:
        answer: Any = json.loads(data)
    except ValueError:
        answer = data.decode(errors="replace")
    tokens = usage_from_json(data)
    # as its submission chose (api/routes/tasks.py); a batch's requests carry no choice and
    # keep objects, which their output file holds
    result = wrap_result(answer, claimed.payload.get(SERIALIZE_KEY) is True)
    if 200 <= status < 300:
        await _finish(rt, claimed, TaskStatus.SUCCESS, result, status, None, tokens)
    elif status in RETRIED_STATUSES:
        await _retry_or_fail(rt, claimed, result, status, _refusal(status, data))
    else:
        message = _refusal(status, data)
        await _finish(rt, claimed, TaskStatus.FAILURE, result, status, message, tokens)


def _refusal(status: int, body: bytes) -> str:
    """Why a task failed with its replica's error reply: the status and the replica's words
    (what its error envelope's `message` says, as OpenAI's routes answer it), which a
    batch's error file carries as its line's `error.message`."""
    words = replica_words(body).strip()
    return f"replica answered {status}: {words}" if words else f"replica answered {status}"


def _asked(claimed: taskstore.Claim) -> str:
    """The path the caller asked for: a batch line's `url`, a task's `route`, else the route
    that took the task."""
    route = claimed.payload.get("route")
    return route if isinstance(route, str) else ASYNC_PATH


async def _abortable(rt: Runtime, claimed: taskstore.Claim, step: Awaitable[T]) -> T:
    """Await a step that waits on a replica; a batch request's job is cancelled there when its
    batch is (`Runner._abort_ended`): `Forwarder.fetch` then drops the replica's connection,
    so the replica stops generating, and nothing is stored (the cancel stored the outcome)."""
    this = asyncio.current_task()
    if claimed.batch_id is None or this is None:
        return await step
    rt.sending[this] = claimed.task_id
    try:
        return await step
    finally:
        rt.sending.pop(this, None)


async def _start(rt: Runtime, task_id: str, replica_id: str) -> bool:
    """Mark the task STARTED now that a replica takes it (PENDING until then: a cold start
    is no work on it); False when it ended while it waited (its batch cancelled: a cancel
    ends the requests a worker holds), and then the replica's slot is given back unused."""
    now = time.time()
    try:
        started: bool = await _write(rt, lambda conn: taskstore.start(conn, task_id, now))
    except BaseException:
        rt.forwarder.balancer.release(replica_id)
        raise
    if not started:
        rt.forwarder.balancer.release(replica_id)
    return started


def _marker(rt: Runtime, task_id: str) -> Callable[[bool], None]:
    """What the relay tells when the task's replica failed it before replying and it waits for
    another (True), and when one takes it (False): the task shows PENDING meanwhile and
    STARTED again after, as before its first replica (`_start`). The writes queue behind
    each other and before the outcome's; a failed one is logged by the committer."""

    def mark(waiting: bool) -> None:
        now = time.time()
        if waiting:
            rt.committer.submit(lambda conn: taskstore.wait(conn, task_id))
        else:
            rt.committer.submit(lambda conn: taskstore.start(conn, task_id, now))

    return mark


async def _retry_or_fail(
    rt: Runtime, claimed: taskstore.Claim, result: Any, code: int | None, why: str
) -> None:
    if claimed.attempts >= rt.max_attempts:
        why = f"{why} (gave up after {claimed.attempts} attempts)"
        await _finish(rt, claimed, TaskStatus.FAILURE, result, code, why)
        return
    logger.info("task %s: %s; the sweeper will run it again", claimed.task_id, why)
    now = time.time()
    await _write(rt, lambda conn: taskstore.release(conn, claimed.task_id, now))


async def _finish(
    rt: Runtime,
    claimed: taskstore.Claim,
    status: TaskStatus,
    result: Any,
    code: int | None,
    traceback: str | None,
    tokens: tuple[int, int] | None = None,
) -> None:
    now = time.time()
    stored: bool = await _write(
        rt,
        lambda conn: taskstore.finish(
            conn,
            claimed.task_id,
            status=status.value,
            result=result,
            status_code=code,
            traceback=traceback,
            now=now,
            keep_s=rt.keep_s,
            tokens=tokens,
        ),
    )
    if stored and claimed.callback_url:
        rt.callbacks.send(
            claimed.callback_url,
            {
                "task_id": claimed.task_id,
                "status": status.value,
                "result": result,
                "status_code": code,
                "traceback": traceback,
            },
            claimed.callback_auth,
        )
