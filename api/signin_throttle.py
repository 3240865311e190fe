"""Refused sign-ins (`POST /ui/sign-in`, which anyone may call), bounded per client address:
the first `REFUSALS_PER_MINUTE` in a clock minute are audited one by one, as before; after that
the address is answered 429 with Retry-After until the minute ends, without its key being
tried (which also slows guessing), and those tries are counted in Redis, not written. The next
sign-in from that address that is not throttled writes one entry saying how many there were.
So the audit log keeps a true account ("37 more refused sign-ins from X") at a bounded cost:
before, each refusal wrote a row (480 a second from one client), kept for a year.

Called by `api/routes/ui/signin.py`. Counts follow `api/limits.py`'s habit: per clock minute,
keys that expire by themselves. Without Redis, every refusal is audited as before."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import redis

from api.deps import AppState
from appliance import audit

logger = logging.getLogger(__name__)

REFUSALS_PER_MINUTE = 10  # refused sign-ins audited one by one, per address and clock minute
REFUSED_KEY = "appliance:signin:refused:{address}:{minute}"
UNRECORDED_KEY = "appliance:signin:unrecorded:{address}"  # throttled tries not yet summarised
UNRECORDED_TTL_S = 7 * 86400


@dataclass(frozen=True)
class Throttled:
    retry_after_s: int


def _minute(now: float) -> int:
    return int(now // 60)


def check(state: AppState, address: str | None, now: float) -> Throttled | None:
    """Before the key is tried: Throttled when the address has used up this minute's refusals
    (the try is counted for the summary); None to go on."""
    where = address or "unknown"
    try:
        refused = state.redis.get(REFUSED_KEY.format(address=where, minute=_minute(now)))
        if refused is None or int(refused) < REFUSALS_PER_MINUTE:
            return None
        pending = UNRECORDED_KEY.format(address=where)
        with state.redis.pipeline() as pipe:
            pipe.incr(pending)
            pipe.expire(pending, UNRECORDED_TTL_S)
            pipe.execute()
    except redis.RedisError:
        logger.warning("Redis is unreachable: refused sign-ins are not throttled")
        return None
    return Throttled(retry_after_s=max(1, 60 - int(now % 60)))


def summarise(state: AppState, address: str | None) -> None:
    """Audit, in one entry, the throttled tries from the address not yet written."""
    where = address or "unknown"
    pending = UNRECORDED_KEY.format(address=where)
    try:
        with state.redis.pipeline() as pipe:  # MULTI: no try counted between the two
            pipe.get(pending)
            pipe.delete(pending)
            count = pipe.execute()[0]
    except redis.RedisError:
        return
    if count is not None and int(count) > 0:
        said = {
            "reason": f"{int(count)} more refused sign-ins from {where} "
            f"(over {REFUSALS_PER_MINUTE} a minute: answered 429, key not tried)",
            "count": int(count),
        }
        audit.record_now(state.engine, None, "session.sign_in_refused", "", said, address)


def refused(state: AppState, address: str | None, reason: str, now: float) -> None:
    """Audit one refused sign-in and count it against its address's minute."""
    where = address or "unknown"
    key = REFUSED_KEY.format(address=where, minute=_minute(now))
    count = 0
    try:
        with state.redis.pipeline() as pipe:
            pipe.incr(key)
            pipe.expire(key, 120)
            count = int(pipe.execute()[0])
    except redis.RedisError:
        pass
    said: dict[str, object] = {"reason": reason}
    if count == REFUSALS_PER_MINUTE:
        said["throttled"] = (
            f"{REFUSALS_PER_MINUTE} refused sign-ins from {where} this minute: further tries "
            "until it ends are answered 429 and counted in one later entry"
        )
    summarise(state, address)
    audit.record_now(state.engine, None, "session.sign_in_refused", "", said, address)
