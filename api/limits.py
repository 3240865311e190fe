"""Per-key limits kept in Redis: requests per minute and concurrent requests (the tokens a request
may ask for are checked by `api/inference/admission.cap_tokens`).

A key with no limits costs nothing here; a limited one costs one round trip per request. Over a
limit is a 429 with Retry-After; other keys are unaffected.

Requests in flight are leases, not a counter: each is a member of the key's sorted set, scored
with the time its lease runs out. The api process that took a slot renews the leases of its
requests still running every third of the lease (`APPLIANCE_INFLIGHT_LEASE_S`); a slot whose
process died (killed mid-stream) runs out within the lease and is dropped by the next
admission, so no key is locked out for good. A refused request writes nothing, so retrying
never extends anyone's slot.

The log streams a key follows (`GET .../logs?follow=1`, `api/endpoint_logs.py`) are counted in
the api process that carries them (`FollowSlots`), since that is where they cost: each holds a
Redis connection for as long as its client stays. One more than `LOG_FOLLOWS_PER_KEY` is a 429.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
import time
import uuid
import weakref
from collections.abc import Awaitable, Callable

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from appliance.errors import RateLimitedError
from appliance.keys import Caller

logger = logging.getLogger(__name__)

LOG_FOLLOWS_PER_KEY = 4  # log streams one key follows at once, in each api process
FOLLOW_RETRY_AFTER_S = 5
RPM_KEY = "appliance:limit:rpm:{key_id}:{minute}"
INFLIGHT_KEY = "appliance:limit:inflight:{key_id}"

# Drop run-out leases, then take a slot if one is free: 1 when taken, 0 when full.
TAKE = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
return 1
"""

Release = Callable[[], Awaitable[None]]


class Limiter:
    """Admits a caller's request or raises RateLimitedError; returns how to release it."""

    def __init__(self, url: str, lease_s: float = 15.0) -> None:
        self.lease_s = lease_s
        self._redis = aioredis.Redis.from_url(url)
        self._take = self._redis.register_script(TAKE)
        self._process = uuid.uuid4().hex[:12]  # this api process: the owner of its leases
        self._numbers = itertools.count()
        self._held: dict[str, str] = {}  # lease -> its key's set
        self._renewer: asyncio.Task[None] | None = None

    async def close(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewer
        await self._redis.aclose()

    async def admit(self, caller: Caller, now: float | None = None) -> Release | None:
        """How to give the request's slot back when it ends; None when nothing is counted."""
        limits = caller.limits
        if not limits.counted():
            return None
        now = time.time() if now is None else now
        if limits.requests_per_minute:
            rpm = RPM_KEY.format(key_id=caller.counter(), minute=int(now // 60))
            pipe = self._redis.pipeline()
            pipe.incr(rpm)
            pipe.expire(rpm, 61)
            count, _ = await pipe.execute()
            if count > limits.requests_per_minute:
                raise RateLimitedError(
                    f"this key is over its limit of {limits.requests_per_minute} requests per "
                    "minute",
                    retry_after_s=max(1, 60 - int(now % 60)),
                )
        if not limits.max_concurrent_requests:
            return None
        return await self._lease(caller, limits.max_concurrent_requests, now)

    async def _lease(self, caller: Caller, most: int, now: float) -> Release:
        slots = INFLIGHT_KEY.format(key_id=caller.counter())
        lease = f"{self._process}:{next(self._numbers)}"
        keep_ms = int(self.lease_s * 2000)
        taken = await self._take(keys=[slots], args=[now, now + self.lease_s, most, lease, keep_ms])
        if not taken:
            raise RateLimitedError(
                f"this key already has {most} requests in flight", retry_after_s=1
            )
        self._held[lease] = slots
        if self._renewer is None or self._renewer.done():
            self._renewer = asyncio.get_running_loop().create_task(self._renew())

        async def release() -> None:
            self._held.pop(lease, None)
            await self._redis.zrem(slots, lease)

        return release

    async def _renew(self) -> None:
        """Push the leases of this process's running requests on while it lives."""
        while True:
            await asyncio.sleep(self.lease_s / 3)
            if not self._held:
                continue
            until = time.time() + self.lease_s
            pipe = self._redis.pipeline(transaction=False)
            for lease, slots in list(self._held.items()):
                pipe.zadd(slots, {lease: until}, xx=True)
                pipe.pexpire(slots, int(self.lease_s * 2000))
            try:
                await pipe.execute()
            except RedisError:
                logger.warning("renewing in-flight leases failed; retrying", exc_info=True)


class FollowSlot:
    """One followed log stream's slot: given back by `release`, or when no one holds it any
    more (a stream dropped before it started runs no code that could give it back)."""

    def __init__(self, slots: FollowSlots, key: str) -> None:
        self._slots = slots
        self._key = key

    def release(self) -> None:
        self._slots.give_back(self._key, self)


class FollowSlots:
    """The log streams each key follows in this process: at most `most` at once. Route
    functions take slots in the thread pool, streams give them back on the event loop: locked."""

    def __init__(self, most: int = LOG_FOLLOWS_PER_KEY) -> None:
        self.most = most
        self._held: dict[str, weakref.WeakSet[FollowSlot]] = {}
        self._lock = threading.Lock()

    def take(self, caller: Caller) -> FollowSlot:
        key = caller.counter()
        with self._lock:
            held = self._held.setdefault(key, weakref.WeakSet())
            if len(held) >= self.most:
                raise RateLimitedError(
                    f"this key already follows {len(held)} log streams, its limit of "
                    f"{self.most} at once; close one to follow another",
                    retry_after_s=FOLLOW_RETRY_AFTER_S,
                )
            slot = FollowSlot(self, key)
            held.add(slot)
            return slot

    def give_back(self, key: str, slot: FollowSlot) -> None:
        with self._lock:
            held = self._held.get(key)
            if held is not None:
                held.discard(slot)
                if not held:
                    del self._held[key]
