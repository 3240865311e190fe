"""A replica's output as the builder ships it to Redis (a stream per replica), for the logs
route and the UI's endpoint page: the crash output kept for failed replicas, the last lines,
then, with `follow`, new lines as they come.

Read with the process's async Redis client, so an open stream holds no thread: blocked in a
thread each, a few dozen idle follows would queue every other `to_thread` call behind them.
A key follows at most `api.limits.LOG_FOLLOWS_PER_KEY` streams at once (`FollowSlots`), and
only while it stays valid: a followed stream looks at its key again each `KEY_CACHE_TTL_S`
and ends once the key is revoked or expired, as its next request would be refused."""

from __future__ import annotations

from collections.abc import AsyncIterator
from time import monotonic
from typing import Any

import redis.asyncio as aioredis
from sqlalchemy.engine import Engine
from starlette.concurrency import run_in_threadpool

from api import endpoint_service
from api.callers import KEY_CACHE_TTL_S
from api.deps import AppState
from api.limits import FollowSlot
from appliance import bus, keys, queries
from appliance.db import session_scope
from appliance.errors import NoSuchEndpointError
from appliance.keys import Caller
from appliance.models import ReplicaState

LOG_POLL_S = 0.5
MEDIA_TYPE = "text/plain; charset=utf-8"


def _as_bytes(value: Any) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()


def _lapsed(reader: Engine, caller: Caller) -> str | None:
    with session_scope(reader) as session:
        return keys.lapsed(session, caller.key_id)


async def _log_lines(
    client: aioredis.Redis,
    streams_of: list[str],
    first: list[bytes],
    tail: int,
    slot: FollowSlot | None,
    reader: Engine,
    caller: Caller,
) -> AsyncIterator[bytes]:
    """The lines; with a `slot`, followed until the client goes (which gives the slot back) or
    the caller's key is no longer valid."""
    try:
        for line in first:
            yield line
        cursors: dict[str, str] = {}
        for key in streams_of:
            entries: Any = await client.xrevrange(key, count=tail)
            cursors[key] = _as_bytes(entries[0][0]).decode() if entries else "$"
            for _entry_id, fields in reversed(entries or []):
                yield _as_bytes(fields[b"line"])
        checked = monotonic()
        while slot is not None and streams_of:
            if monotonic() - checked >= KEY_CACHE_TTL_S:
                checked = monotonic()
                why = await run_in_threadpool(_lapsed, reader, caller)  # a read, off the loop
                if why is not None:
                    yield f"[log stream ended: {why}]\n".encode()
                    return
            streams: Any = dict(cursors)
            found: Any = await client.xread(streams, block=int(LOG_POLL_S * 1000))
            for key, entries in found or []:
                for entry_id, fields in entries:
                    cursors[_as_bytes(key).decode()] = _as_bytes(entry_id).decode()
                    yield _as_bytes(fields[b"line"])
    finally:
        if slot is not None:
            slot.release()


def lines(
    endpoint_id: str,
    caller: Caller,
    state: AppState,
    tail: int,
    follow: bool,
    replica_id: str | None,
) -> AsyncIterator[bytes]:
    """The endpoint's (or one replica's) log lines. Checks with its own short session: a
    request-scoped one would hold SQLite's write lock for as long as the stream runs. A follow
    takes one of the caller's follow slots first: over its limit, RateLimitedError (429)."""
    with session_scope(state.engine) as session:
        endpoint_service.owned(endpoint_id, caller, session=session)
        all_replicas = queries.replicas_of(endpoint_id, session=session)
    replicas = [r for r in all_replicas if replica_id in (None, r.id)]
    if replica_id and not replicas:
        raise NoSuchEndpointError(f"no replica {replica_id!r} in endpoint {endpoint_id!r}")
    first: list[bytes] = []
    for replica in replicas:
        if replica.log_tail and replica.state == ReplicaState.FAILED:
            first.append(f"[{replica.id} crashed] {replica.log_tail}\n".encode())
    streams_of = [bus.LOGS_KEY.format(replica=r.id) for r in replicas]
    slot = state.follows.take(caller) if follow else None
    return _log_lines(state.aredis, streams_of, first, tail, slot, state.reader, caller)
