"""The charts' sampler: every few seconds, adds what the data plane counted since last time into
Redis, where the endpoint page reads its charts. Run by the UI router's lifespan (`sampling`,
wired in `api.routes.ui`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import redis.asyncio as aioredis
from fastapi import FastAPI
from redis.exceptions import RedisError

from api.deps import AppState
from web import rates

logger = logging.getLogger(__name__)

SAMPLE_EVERY_S = 5.0


async def sample_metrics(state: AppState) -> None:
    """Every SAMPLE_EVERY_S, add what the data plane counted since last time into Redis."""
    client = aioredis.Redis.from_url(str(state.settings.redis_url), socket_connect_timeout=5)
    registry = state.forwarder.metrics.registry
    before = rates.totals(registry.collect())
    try:
        while True:
            await asyncio.sleep(SAMPLE_EVERY_S)
            after = rates.totals(registry.collect())
            try:
                await _store_rates(client, rates.deltas(before, after), time.time())
            except RedisError as exc:
                logger.warning("cannot store request rates in Redis: %s", exc)
                continue
            before = after
    finally:
        await client.aclose()


async def _store_rates(client: aioredis.Redis, changes: rates.Counters, now: float) -> None:
    if not changes:
        return
    bucket = str(rates.bucket_of(now))
    pipe = client.pipeline(transaction=False)
    names = []
    for endpoint, fields in changes.items():
        for field, value in fields.items():
            name = rates.RATES_KEY.format(endpoint=endpoint, field=field)
            names.append(name)
            pipe.hincrbyfloat(name, bucket, value)
            pipe.expire(name, rates.KEPT_S)
            pipe.hkeys(name)
    replies = await pipe.execute()
    prune = client.pipeline(transaction=False)
    for name, fields in zip(names, replies[2::3], strict=True):
        stale = rates.stale_buckets(dict.fromkeys(fields, 0), now)
        if stale:
            prune.hdel(name, *[str(b) for b in stale])
    await prune.execute()


@asynccontextmanager
async def sampling(app: FastAPI) -> AsyncIterator[None]:
    task = asyncio.create_task(sample_metrics(app.state.appliance))
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
