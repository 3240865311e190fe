"""Per-key limits kept in Redis: requests per minute and concurrent requests (the tokens a request
may ask for are checked by `api/inference/admission.cap_tokens`).

A key with no limits costs nothing here; a limited one costs one pipelined round trip per
request. Over a limit is a 429 with Retry-After; other keys are unaffected.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

import redis.asyncio as aioredis

from appliance.errors import RateLimitedError
from appliance.keys import Caller

RPM_KEY = "appliance:limit:rpm:{key_id}:{minute}"
CONCURRENT_KEY = "appliance:limit:concurrent:{key_id}"
CONCURRENT_TTL_S = 3600  # a crashed api cannot leave a key blocked for longer than this

Release = Callable[[], Awaitable[None]]


class Limiter:
    """Admits a caller's request or raises RateLimitedError; returns how to release it."""

    def __init__(self, url: str) -> None:
        self._redis = aioredis.Redis.from_url(url)

    async def close(self) -> None:
        await self._redis.aclose()

    async def admit(self, caller: Caller, now: float | None = None) -> Release | None:
        """How to give the request's slot back when it ends; None when nothing is counted."""
        limits = caller.limits
        if not limits.counted():
            return None
        now = time.time() if now is None else now
        pipe = self._redis.pipeline()
        if limits.requests_per_minute:
            rpm = RPM_KEY.format(key_id=caller.key_id, minute=int(now // 60))
            pipe.incr(rpm)
            pipe.expire(rpm, 61)
        conc = CONCURRENT_KEY.format(key_id=caller.key_id)
        if limits.max_concurrent_requests:
            pipe.incr(conc)
            pipe.expire(conc, CONCURRENT_TTL_S)
        counts = await pipe.execute()
        if limits.requests_per_minute and counts[0] > limits.requests_per_minute:
            if limits.max_concurrent_requests:
                await self._redis.decr(conc)
            raise RateLimitedError(
                f"this key is over its limit of {limits.requests_per_minute} requests per minute",
                retry_after_s=max(1, 60 - int(now % 60)),
            )
        if not limits.max_concurrent_requests:
            return None
        if counts[-2] > limits.max_concurrent_requests:
            await self._redis.decr(conc)
            raise RateLimitedError(
                f"this key already has {limits.max_concurrent_requests} requests in flight",
                retry_after_s=1,
            )

        async def release() -> None:
            await self._redis.decr(conc)

        return release
