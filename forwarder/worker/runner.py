"""The worker's job runner: many RQ jobs in flight at once in one asyncio process.

An RQ `Worker` runs one job at a time (a forked work horse per job), but a replica batches
well only with dozens of requests in flight, so this runner takes jobs from the same RQ queues
and runs up to `worker_concurrency` of them concurrently on one event loop. A Lua script pops
jobs and takes each one's lease in one step, high-priority queues (single tasks) before
low-priority ones (batches), each endpoint in turn and, within one, each team's queue in turn,
and from each endpoint at most the room its replicas have (`Runner.rooms`): a job sent to a
replica with no free slot would wait there first-come, behind another team's, where in Redis
it keeps its team's turn. The runner renews its leases while the jobs run, so the sweeper can
tell a job whose worker died (lease expired) from one that is still running.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import redis
from rq.job import Job
from rq.serializers import JSONSerializer
from sqlalchemy.engine import Engine

from appliance import bus
from forwarder.proxy import woken
from forwarder.refresh import load_table
from forwarder.worker import jobs, taskstore

logger = logging.getLogger(__name__)

IDLE_POLL_S = 0.02  # the wait after a pop that found nothing, doubled while none does,
IDLE_POLL_MAX_S = 0.1  # up to this: an idle worker polls Redis 10 times a second, not 50
ABORT_CHECK_S = 0.5  # how often the batch requests in flight are checked for a cancel
INFLIGHT_EVERY_S = 1.0  # how often the requests in flight per replica go to the builder
FAILURE_LOG_EVERY_S = 60.0  # a periodic helper failing on every tick: a line this often
DRAIN_S = 30.0  # a stopping worker waits this long for replies (compose.yaml: its grace is 40 s)
REDIS_RETRY_S = 1.0
LEASE_PREFIX = bus.TASK_LEASE_KEY.format(task_id="")

# Pop up to ARGV[1] job ids and lease each for ARGV[2] ms (lease keys prefixed ARGV[3]). KEYS
# come in pairs, one per endpoint and priority: the set of teams with a queue there, and the
# endpoint's own queue (`jobs.teams_key`, `jobs.endpoint_queue_key`); a team's queue is the
# latter's key, ':', the team. First the single tasks' pairs (the first ARGV[4]), then the
# batch requests'. Endpoints take turns, one id each, starting at pair ARGV[5] (mod the count),
# and within an endpoint its teams take turns, starting at team ARGV[5] (mod theirs): every
# endpoint's tasks, and every team's on a shared endpoint, share the worker's slots whatever
# their place in KEYS and however many they have queued. A team whose queue is found empty
# leaves the set (`jobs.enqueue` adds it back after a push). ARGV[5 + k] is the room of the
# k-th endpoint (pairs k and ARGV[4] + k): at most that many of its ids, single tasks and
# batch requests together, so one endpoint's backlog never takes the pop's ids from another's.
_POP_AND_LEASE = """
local out = {}
local n = tonumber(ARGV[1])
local high = tonumber(ARGV[4])
local turn = tonumber(ARGV[5])
local room = {}
for k = 1, high do room[k] = tonumber(ARGV[5 + k]) end
local function ring(pair)
  local set, own = KEYS[2 * pair - 1], KEYS[2 * pair]
  local teams = redis.call('SMEMBERS', set)
  table.sort(teams)
  local queues = {}
  if redis.call('EXISTS', own) == 1 then queues[1] = {own, nil} end
  for _, team in ipairs(teams) do queues[#queues + 1] = {own .. ':' .. team, team} end
  return {set = set, queues = queues, at = turn % math.max(#queues, 1), k = (pair - 1) % high + 1}
end
local function pop_one(e)
  while #e.queues > 0 do
    local i = e.at % #e.queues + 1
    local queue = e.queues[i]
    local id = redis.call('LPOP', queue[1])
    if id then
      e.at = i
      return id
    end
    table.remove(e.queues, i)
    if queue[2] then redis.call('SREM', e.set, queue[2]) end
    e.at = i - 1
  end
  return nil
end
local function take(first, last)
  local count = last - first + 1
  if count <= 0 then return end
  local live = {}
  for i = 0, count - 1 do
    live[#live + 1] = ring(first + ((turn + i) % count))
  end
  while #out < n and #live > 0 do
    local still = {}
    for _, e in ipairs(live) do
      if #out >= n then break end
      local id = nil
      if room[e.k] > 0 then id = pop_one(e) end
      if id then
        redis.call('SET', ARGV[3] .. id, '1', 'PX', ARGV[2])
        table.insert(out, id)
        room[e.k] = room[e.k] - 1
        still[#still + 1] = e
      end
    end
    live = still
  end
end
take(1, high)
take(high + 1, #KEYS / 2)
return out
"""


class Runner:
    """Runs jobs from every endpoint's queues with at most `concurrency` in flight."""

    def __init__(
        self,
        engine: Engine,
        reader: Engine,
        client: redis.Redis,
        runtime: jobs.Runtime,
        *,
        concurrency: int,
        lease_s: float,
        routing_refresh_s: float,
    ) -> None:
        self.engine = engine
        self.reader = reader
        self.redis = client
        self.runtime = runtime
        self.concurrency = concurrency
        self.lease_ms = int(lease_s * 1000)
        self.routing_refresh_s = routing_refresh_s
        self.running: dict[str, asyncio.Task[None]] = {}
        self._pop = client.register_script(_POP_AND_LEASE)
        self._turn = 0  # the queue each pop starts at, moved on by one every pop
        self._slot_free = asyncio.Event()
        self._endpoint_of: dict[str, str] = {}  # running job id -> its endpoint id
        self._slots: dict[str, int] = {}  # llama.cpp endpoint id -> its per_worker
        self._done_keys: list[str] = []
        # deleted endpoints with tasks still waiting: their queues are emptied too, each task
        # ending FAILURE, so none waits for ever on a queue nobody takes from
        self._orphaned: set[str] = set()
        # this process's requests in flight, which the builder's drains wait for
        self.inflight_key = bus.WORKER_INFLIGHT_KEY.format(worker=uuid.uuid4().hex[:12])

    async def run(self, stop: asyncio.Event) -> None:
        jobs.install_runtime(self.runtime)
        await self.runtime.forwarder.start()
        helpers: list[asyncio.Task[None]] = []
        try:
            await self._refresh_routes()
            helpers = [
                asyncio.create_task(
                    self._every(self.routing_refresh_s, self._refresh_routes, stop)
                ),
                asyncio.create_task(self._every(self.lease_ms / 3000, self._renew_leases, stop)),
                asyncio.create_task(self._every(ABORT_CHECK_S, self._abort_ended, stop)),
                asyncio.create_task(self._every(INFLIGHT_EVERY_S, self._publish_inflight, stop)),
            ]
            await self._take_jobs(stop)
            # Stopping. A job no replica has taken yet goes back to PENDING untried (the
            # sweeper re-enqueues it); one a replica is answering may finish within DRAIN_S,
            # else the sweeper re-runs it once its lease lapses.
            for waiting in list(self.runtime.waiting):
                waiting.cancel()
            if self.running:
                logger.info(
                    "stopping: waiting up to %.0f s for %d running tasks' replies",
                    DRAIN_S,
                    len(self.running),
                )
                await asyncio.wait(set(self.running.values()), timeout=DRAIN_S)
            await self.runtime.callbacks.drain(10)
        finally:
            for helper in helpers:
                helper.cancel()
            with contextlib.suppress(redis.RedisError):
                self.redis.delete(self.inflight_key)
            for task in self.running.values():
                task.cancel()
            await self.runtime.forwarder.close()
            jobs.install_runtime(None)
            self._drop_done_keys()

    def _drop_done_keys(self) -> None:
        """The leases and job hashes of the jobs that ended since the last pop: a job handed
        back is then re-enqueued by the next sweep, not after its lease lapses."""
        done, self._done_keys = self._done_keys, []
        if done:
            try:
                self.redis.delete(*done)
            except redis.RedisError as exc:
                logger.warning("cannot drop finished jobs' leases: %s", exc)

    def endpoint_ids(self) -> list[str]:
        return sorted(self.runtime.forwarder.table.by_id.keys() | self._orphaned)

    @staticmethod
    def queue_keys(endpoint_ids: list[str]) -> list[str]:
        """The pairs `_POP_AND_LEASE` takes from: every endpoint's single tasks', then its
        batch requests'."""
        return [
            key
            for low in (False, True)
            for e in endpoint_ids
            for key in (jobs.teams_key(e, low=low), jobs.endpoint_queue_key(e, low=low))
        ]

    def rooms(self, endpoint_ids: list[str]) -> list[int]:
        """How many more jobs of each endpoint this worker may run now: what its ready
        replicas run at once, at least one replica's worth (a task still starts an endpoint
        at zero, and finds a failed one), less its jobs running here. A replica runs the
        per-replica cap the forwarder holds requests to (`forwarder/balance.py`), and a
        llama.cpp one no more than its per_worker (its `--parallel` slots: `builder/specs.py`).
        A deleted endpoint's jobs only end, so it has the worker's whole concurrency."""
        by_id = self.runtime.forwarder.table.by_id
        running = Counter(self._endpoint_of.values())
        cap = self.runtime.forwarder.limits.replica_max_concurrency
        rooms = []
        for endpoint_id in endpoint_ids:
            target = by_id.get(endpoint_id)
            if target is None:
                rooms.append(self.concurrency)
                continue
            slots = min(target.max_concurrency or cap, self._slots.get(endpoint_id, cap))
            capacity = slots * max(len(target.replicas), 1)
            rooms.append(max(capacity - running[endpoint_id], 0))
        return rooms

    async def _take_jobs(self, stop: asyncio.Event) -> None:
        idle_s = IDLE_POLL_S
        taking = Failing("taking jobs from Redis")
        while not stop.is_set():
            free = self.concurrency - len(self.running)
            if free <= 0:
                self._slot_free.clear()
                await woken(self._slot_free, 1.0)
                continue
            endpoint_ids = self.endpoint_ids()
            keys = self.queue_keys(endpoint_ids)
            rooms = self.rooms(endpoint_ids)
            self._slot_free.clear()  # a job ending from here on ends an empty pop's wait
            try:
                taken = await asyncio.to_thread(self._pop_jobs, keys, rooms, free) if keys else []
            except redis.RedisError as exc:
                taking.failed(exc, time.monotonic())
                await _sleep_or_stop(stop, REDIS_RETRY_S)
                continue
            taking.worked()
            for job in taken:
                self._start(job)
            if taken:
                idle_s = IDLE_POLL_S
                continue
            # nothing queued, or no room where there is: a job ending makes room at once
            await woken(self._slot_free, idle_s)
            idle_s = IDLE_POLL_S if self._slot_free.is_set() else min(idle_s * 2, IDLE_POLL_MAX_S)

    def _pop_jobs(self, keys: list[str], rooms: list[int], n: int) -> list[Job | None]:
        done, self._done_keys = self._done_keys, []
        if done:  # finished jobs' leases and hashes, one round trip for many
            self.redis.delete(*done)
        self._turn += 1
        high = len(keys) // 4  # queue_keys: every endpoint's single-task pair, then its batch one
        args: list[str | int] = [n, self.lease_ms, LEASE_PREFIX, high, self._turn, *rooms]
        ids = [i.decode() for i in self._pop(keys=keys, args=args)]
        if not ids:
            return []
        found = Job.fetch_many(ids, connection=self.redis, serializer=JSONSerializer)
        lost = [i for i, job in zip(ids, found, strict=True) if job is None]
        if lost:  # queued ids whose job hash is gone: leave them to the sweeper
            self.redis.delete(*(LEASE_PREFIX + i for i in lost))
        return [job for job in found if job is not None]

    def _start(self, job: Job | None) -> None:
        assert job is not None
        task = asyncio.create_task(self._perform(job))
        self.running[job.id] = task
        self._endpoint_of[job.id] = jobs.endpoint_of_queue(job.origin)

    async def _perform(self, job: Job) -> None:
        try:
            result: Any = job.func(*job.args, **job.kwargs)
            if asyncio.iscoroutine(result):
                await result
        except Exception:
            logger.exception("job %s (%s) failed", job.id, job.func_name)
        finally:
            self.running.pop(job.id, None)
            self._endpoint_of.pop(job.id, None)
            self._done_keys += [LEASE_PREFIX + job.id, job.key]  # deleted with the next pop
            self._slot_free.set()

    async def _renew_leases(self) -> None:
        """Re-set (not just extend) every lease, so leases come back after a Redis wipe."""
        ids = list(self.running)
        if not ids:
            return

        def renew() -> None:
            with self.redis.pipeline(transaction=False) as pipe:
                for task_id in ids:
                    pipe.set(LEASE_PREFIX + task_id, "1", px=self.lease_ms)
                pipe.execute()

        await asyncio.to_thread(renew)

    async def _publish_inflight(self) -> None:
        """The worker's requests in flight per replica, for the builder: a replica draining
        (its endpoint deleted, updated or scaled down) stops once they end, as for the api's
        (`appliance.bus.inflight`), not while a task's reply is on its way."""
        counts = self.runtime.forwarder.inflight_totals()

        def put() -> None:
            with self.redis.pipeline(transaction=False) as pipe:
                bus.put_inflight(pipe, self.inflight_key, counts)
                pipe.execute()

        await asyncio.to_thread(put)

    async def _abort_ended(self) -> None:
        """Cancel the batch requests waiting for or sent to a replica whose task has ended
        (their batch was cancelled): the replica's connection is dropped, so it stops
        generating, and the worker's slot takes the next job."""
        sending = dict(self.runtime.sending)
        if not sending:
            return
        ended = await asyncio.to_thread(taskstore.ended, self.reader, set(sending.values()))
        abandoned = [
            job
            for job, task_id in sending.items()
            if task_id in ended and self.runtime.sending.get(job) == task_id
        ]
        for job in abandoned:
            job.cancel()
        if abandoned:
            logger.info("abandoned %d requests of cancelled batches", len(abandoned))

    async def _refresh_routes(self) -> None:
        read_at = time.monotonic()
        table = await asyncio.to_thread(load_table, self.engine)
        self.runtime.forwarder.update(table, read_at)
        self._orphaned = await asyncio.to_thread(taskstore.orphaned, self.reader)
        self._slots = await asyncio.to_thread(taskstore.llamacpp_slots, self.reader)

    @staticmethod
    async def _every(
        interval_s: float, work: Callable[[], Awaitable[None]], stop: asyncio.Event
    ) -> None:
        """Run `work` every `interval_s` until `stop`, its failures logged as `Failing` says."""
        name = getattr(work, "__name__", str(work))
        failing = Failing(name)
        while not stop.is_set():
            await _sleep_or_stop(stop, interval_s)
            started = time.monotonic()
            try:
                await work()
            except Exception as exc:
                failing.failed(exc, started)
            else:
                failing.worked()
            if time.monotonic() - started > interval_s:
                logger.warning("%s took longer than its interval", name)


class Failing:
    """A step that fails again and again while Redis is away (every tick of every helper, each
    second): logged when it begins, then at most once every FAILURE_LOG_EVERY_S saying how
    many were not, and once when it works again."""

    def __init__(self, what: str, log: logging.Logger = logger) -> None:
        self.what, self.log = what, log
        self.logged_at: float | None = None  # when the failure going on was last logged
        self.unlogged = 0

    def failed(self, exc: Exception, now: float) -> None:
        if self.logged_at is not None and now - self.logged_at < FAILURE_LOG_EVERY_S:
            self.unlogged += 1
            return
        more = f" ({self.unlogged} more since the last such line)" if self.unlogged else ""
        self.log.warning("%s failed: %s%s", self.what, exc, more)
        self.logged_at, self.unlogged = now, 0

    def worked(self) -> None:
        if self.logged_at is not None:
            self.log.info("%s works again", self.what)
            self.logged_at, self.unlogged = None, 0


async def _sleep_or_stop(stop: asyncio.Event, seconds: float) -> None:
    await woken(stop, seconds)
