"""Redis keys and channels the roles use to nudge and inform each other, in one place."""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Mapping
from typing import Any

import redis

logger = logging.getLogger(__name__)

BUILDER_NUDGE_KEY = "appliance:builder:nudge"
ROUTES_CHANNEL = "appliance:routes"
INFLIGHT_KEY = "appliance:inflight"  # hash: replica id -> requests the api has in flight
# hash: replica id -> requests one worker process has in flight (async tasks, batch requests)
WORKER_INFLIGHT_KEY = "appliance:inflight:worker:{worker}"
INFLIGHT_TTL_S = 10  # a dead process's counts vanish instead of blocking drains forever
DEMAND_KEY = "appliance:demand"  # hash: endpoint id -> when a request last found no replica
LAST_REQUEST_KEY = "appliance:last-request"  # hash: endpoint id -> time of its last request
API_METRICS_KEY = "appliance:metrics:api:{worker}"  # one api worker's counters, as JSON
# hash "<hour> <key id> <endpoint> <count>" -> n: usage counted by the api, not yet in SQLite
USAGE_PENDING_KEY = "appliance:usage:pending"
USAGE_ROLLING_KEY = "appliance:usage:rolling"  # the pending hash while it is being stored
HEARTBEAT_KEY = "appliance:heartbeat:{role}"
LOGS_KEY = "appliance:logs:{replica}"  # a capped stream of one replica's output lines
LOGS_KEPT_LINES = 2000
GPUS_KEY = "appliance:gpus"  # the builder's last GPU inventory, as JSON
GPU_AGENT_KEY = "appliance:gpus:agent"  # the GPU agent's last look, with its time, as JSON
GPU_AGENT_TTL_S = 30
IMAGES_KEY = "appliance:images"  # the builder's last list of the appliance's images, as JSON
PRUNE_REQUESTS_KEY = "appliance:images:prune-requests"  # list of prune requests (JSON)
PRUNE_RESULT_KEY = "appliance:images:prune:{request}"  # a prune's outcome, as JSON
PRUNE_RESULT_TTL_S = 3600
HEARTBEAT_TTL_S = 30
BACKLOG_KEY = "appliance:backlog"  # endpoint id -> async tasks queued + running (scaler)
TASK_LEASE_KEY = "appliance:lease:{task_id}"  # held by the worker running the task
# hash "<repo>@<revision>" -> JSON {repository, revision, requested_at, requested_by, asked_by}:
# Hugging Face models the api asked the builder to download ahead of time, without an endpoint
# (`requested_by` the first team that asked, `asked_by` every team -> when it last asked)
HF_DOWNLOADS_KEY = "appliance:hf-downloads"
# hash "<repo>@<revision>" -> JSON {state, progress, message, requested_at, at}: how far the
# builder got with each of those
HF_DOWNLOAD_STATE_KEY = "appliance:hf-downloads:state"
PROGRESS_KEY = "appliance:progress"  # hash: endpoint id -> what it waits on (JSON), by builder


def connect(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, health_check_interval=30, socket_connect_timeout=5)


def nudge_builder(client: redis.Redis) -> None:
    """Wake the builder now instead of at its next tick. Only a shortcut: the builder's tick
    reads every row anyway, so with Redis unavailable a change already committed is carried
    out a tick later, and the nudge is dropped with a line in the log, never failing the
    request that made the change."""
    try:
        pipe = client.pipeline()
        pipe.rpush(BUILDER_NUDGE_KEY, 1)
        pipe.ltrim(BUILDER_NUDGE_KEY, -10, -1)
        pipe.execute()
    except redis.RedisError as exc:
        logger.warning("cannot nudge the builder, Redis unavailable (%s); it acts on its tick", exc)


def announce_routes(client: redis.Redis) -> None:
    """Tell every api process that replicas changed, so they re-read their routing table. A
    shortcut too: each api re-reads it every few seconds, so with Redis unavailable the
    announcement is dropped with a line in the log."""
    try:
        client.publish(ROUTES_CHANNEL, str(time.time()))
    except redis.RedisError as exc:
        logger.warning("cannot announce changed routes, Redis unavailable (%s)", exc)


def put_inflight(pipe: Any, key: str, counts: Mapping[str, int]) -> None:
    """Queue on `pipe` (a pipeline, sync or asyncio) the replace of one process's requests in
    flight per replica: the api's under INFLIGHT_KEY, each worker's under its
    WORKER_INFLIGHT_KEY, every second, so the builder sees the requests of both."""
    pipe.delete(key)
    if counts:
        pipe.hset(key, mapping=dict(counts))
        pipe.expire(key, INFLIGHT_TTL_S)


def inflight(client: redis.Redis) -> dict[str, int]:
    """Replica id -> requests in flight to it from the api and every worker process: what
    the builder drains, preempts and scales by."""
    workers = client.scan_iter(match=WORKER_INFLIGHT_KEY.format(worker="*"), count=1000)
    pipe = client.pipeline(transaction=False)
    for key in [INFLIGHT_KEY, *workers]:
        pipe.hgetall(key)
    total: Counter[str] = Counter()
    for counts in pipe.execute():
        for replica, n in counts.items():
            total[replica.decode() if isinstance(replica, bytes) else str(replica)] += int(n)
    return dict(total)


def beat(client: redis.Redis, role: str) -> None:
    client.set(HEARTBEAT_KEY.format(role=role), str(time.time()), ex=HEARTBEAT_TTL_S)


def alive(client: redis.Redis, role: str) -> bool:
    return bool(client.exists(HEARTBEAT_KEY.format(role=role)))


def publish_progress(client: redis.Redis, progress: dict[str, str]) -> None:
    """The builder's whole answer to "what does each endpoint wait on" (JSON per endpoint)."""
    pipe = client.pipeline()
    pipe.delete(PROGRESS_KEY)
    if progress:
        pipe.hset(PROGRESS_KEY, mapping=progress)  # type: ignore[arg-type]
    pipe.execute()


def read_progress(client: redis.Redis, endpoint_id: str) -> str | None:
    raw = client.hget(PROGRESS_KEY, endpoint_id)
    if raw is None:
        return None
    return raw.decode() if isinstance(raw, bytes) else str(raw)
