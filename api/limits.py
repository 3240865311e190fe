"""Per-key limits kept in Redis: requests per minute and concurrent requests (the tokens a request
may ask for are checked by `api/inference/admission.cap_tokens`).

A key with no limits costs nothing here; a limited one costs one round trip per request: one
script (`ADMIT`) decides both limits together and counts the request only when it passes both.
Over a limit is a 429 with Retry-After; other keys are unaffected.

Requests per minute are a sliding window: a log of the key's requests admitted in the last 60
seconds (a sorted set, one member a request, so at most the limit's worth, and no more than the
key sent), so at most the limit pass in any 60 seconds, a minute's boundary included. Its
Retry-After is when the request whose leaving makes room leaves the window. A request refused
(over either limit) is not counted.

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
RPM_KEY = "appliance:limit:rpm:{key_id}"
INFLIGHT_KEY = "appliance:limit:inflight:{key_id}"

# KEYS: the key's rpm log (its admitted requests, each scored with when), its in-flight set.
# ARGV: now, requests per minute (0: none), in-flight most (0: none), lease's end, the request's
# name, the set's expiry in ms. Returns {0} when admitted (counted in both), {1, retry_after_s}
# over the rate, {2} with no slot free; a refusal counts nothing.
ADMIT = """
local now = tonumber(ARGV[1])
local rate = tonumber(ARGV[2])
local most = tonumber(ARGV[3])
if rate > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - 60)
  local count = redis.call('ZCARD', KEYS[1])
  if count >= rate then
    local leaves = redis.call('ZRANGE', KEYS[1], count - rate, count - rate, 'WITHSCORES')
    return {1, math.max(1, math.ceil(tonumber(leaves[2]) + 60 - now))}
  end
end
if most > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
  if redis.call('ZCARD', KEYS[2]) >= most then return {2} end
  redis.call('ZADD', KEYS[2], ARGV[4], ARGV[5])
  redis.call('PEXPIRE', KEYS[2], ARGV[6])
end
if rate > 0 then
  redis.call('ZADD', KEYS[1], now, ARGV[5])
  redis.call('EXPIRE', KEYS[1], 61)
end
return {0}
"""

Release = Callable[[], Awaitable[None]]


class Limiter:
    """Admits a caller's request or raises RateLimitedError; returns how to release it."""

    def __init__(self, url: str, lease_s: float = 15.0) -> None:
        self.lease_s = lease_s
        self._redis = aioredis.Redis.from_url(url)
        self._admit = self._redis.register_script(ADMIT)
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
        """How to give the request's slot back when it ends; None when nothing is held."""
        limits = caller.limits
        if not limits.counted():
            return None
        now = time.time() if now is None else now
        rate, most = limits.requests_per_minute, limits.max_concurrent_requests
        key_id = caller.counter()
        slots = INFLIGHT_KEY.format(key_id=key_id)
        lease = f"{self._process}:{next(self._numbers)}"
        keep_ms = int(self.lease_s * 2000)
        answer = await self._admit(
            keys=[RPM_KEY.format(key_id=key_id), slots],
            args=[now, rate, most, now + self.lease_s, lease, keep_ms],
        )
        if answer[0] == 1:
            raise RateLimitedError(
                f"this key is over its limit of {rate} requests per minute",
                retry_after_s=int(answer[1]),
            )
        if answer[0] == 2:
            raise RateLimitedError(
                f"this key is at its limit of {most} requests in flight at once: send the "
                "next when one has ended",
                retry_after_s=1,
            )
        if not most:
            return None
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
