"""Publishes the data plane's live numbers to Redis about once a second, off the hot path:
requests in flight per replica (the builder drains and scales by them), demand for endpoints
with no ready replica (nudges the builder), the last request per endpoint, usage per hour, key
and endpoint (the worker's sweeper rolls it into SQLite, `forwarder/rollup.py`) and,
when the api runs several workers, each worker's counters for the others' `/metrics`.

Run by the api's lifespan as one background task per process.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Mapping
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from appliance import bus
from appliance.usage import hour_of
from forwarder import rollup
from forwarder.metrics import snapshot
from forwarder.proxy import Forwarder

logger = logging.getLogger(__name__)

PUBLISH_EVERY_S = 1.0
METRICS_TTL_S = 10  # likewise a dead worker's counters


def _fields(values: Mapping[str, float]) -> dict[Any, Any]:
    return dict(values)  # redis-py's mapping type is invariant in its keys


async def publish_once(
    forwarder: Forwarder, client: aioredis.Redis, sent_demand: dict[str, float]
) -> None:
    """One flush; usage not stored (Redis refused it) goes with the next one."""
    usage, totals = forwarder.ledger.unsent(forwarder.metrics.stats.rows)
    fresh_demand = {eid: at for eid, at in forwarder.demand.items() if sent_demand.get(eid) != at}
    pipe = client.pipeline(transaction=True)
    # every api worker's: each one writes the same sums
    bus.put_inflight(pipe, bus.INFLIGHT_KEY, forwarder.inflight_totals())
    if forwarder.last_request:
        pipe.hset(bus.LAST_REQUEST_KEY, mapping=_fields(forwarder.last_request))
    if fresh_demand:
        pipe.hset(bus.DEMAND_KEY, mapping=_fields(fresh_demand))
        pipe.rpush(bus.BUILDER_NUDGE_KEY, 1)
        pipe.ltrim(bus.BUILDER_NUDGE_KEY, -10, -1)
    if forwarder.worker is not None:  # one of several api workers: share the counters
        pipe.set(
            bus.API_METRICS_KEY.format(worker=forwarder.worker),
            json.dumps(snapshot(forwarder.metrics.registry)),
            ex=METRICS_TTL_S,
        )
    rollup.publish(pipe, hour_of(time.time()), usage)  # the sweeper stores it in SQLite
    await pipe.execute()
    forwarder.ledger.sent(totals)
    sent_demand.update(fresh_demand)


async def run_publisher(forwarder: Forwarder, redis_url: str) -> None:
    """Flush every PUBLISH_EVERY_S until cancelled; Redis outages are logged, not fatal."""
    client = aioredis.Redis.from_url(redis_url, socket_connect_timeout=5)
    sent_demand: dict[str, float] = {}
    try:
        while True:
            await asyncio.sleep(PUBLISH_EVERY_S)
            try:
                await publish_once(forwarder, client, sent_demand)
            except RedisError as exc:
                logger.warning("cannot publish live numbers to Redis: %s", exc)
    finally:
        await client.aclose()
