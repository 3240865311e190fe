"""How the usage the api counts per request reaches the usage table, exactly once.

The api's live publisher (`forwarder/live.py`) adds each second's changes, per hour, key and
endpoint, into one Redis hash (`appliance:usage:pending`) with HINCRBY: several api workers
add up. The worker's sweeper calls `roll_up` every sweep:
1. a Lua script renames the pending hash to `appliance:usage:rolling` and stamps it with a
   batch id (or finds the rolling hash a crashed sweep left, with its id);
2. one SQLite transaction adds its rows to the usage table and records the batch id, unless
   that id is recorded already (the sweep that stored it died before step 3);
3. the rolling hash is deleted, only if it still holds that batch id.
So a crash anywhere stores a batch once, and a Redis wipe loses at most one sweep interval.
The team of each row is its key's team, read from the key's row (keys never change team).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

import redis
from sqlalchemy.engine import Engine

from appliance import bus, usage
from appliance.ids import new_id
from forwarder.usage import USAGE_COUNTS, Totals

logger = logging.getLogger(__name__)

BATCH_FIELD = "#batch"
BATCHES_KEPT_S = 7 * 86400  # stored batch ids are remembered this long
UNKNOWN_TEAM = "unknown"

_TAKE = """
if redis.call('EXISTS', KEYS[2]) == 0 then
  if redis.call('EXISTS', KEYS[1]) == 0 then return {} end
  redis.call('RENAME', KEYS[1], KEYS[2])
  redis.call('HSET', KEYS[2], ARGV[2], ARGV[1])
end
return redis.call('HGETALL', KEYS[2])
"""
_DONE = """
if redis.call('HGET', KEYS[1], ARGV[2]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def publish(pipe: Any, hour: int, changes: Totals) -> None:
    """Queue on `pipe` (a Redis pipeline) the HINCRBYs that add `changes` to the pending hash."""
    for (key_id, endpoint), counts in changes.items():
        for name, value in zip(USAGE_COUNTS, counts, strict=True):
            if value:
                pipe.hincrby(bus.USAGE_PENDING_KEY, f"{hour} {key_id} {endpoint} {name}", value)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def parse(flat: list[Any]) -> tuple[str, dict[tuple[int, str, str], list[int]]]:
    """(batch id, (hour, key id, endpoint) -> counts) from HGETALL's flat reply."""
    batch = ""
    found: dict[tuple[int, str, str], list[int]] = {}
    for name, value in zip(flat[::2], flat[1::2], strict=True):
        field, number = _text(name), _text(value)
        if field == BATCH_FIELD:
            batch = number
            continue
        parts = field.split(" ")
        if len(parts) != 4 or parts[3] not in USAGE_COUNTS:
            logger.warning("usage record field %r is not understood; skipped", field)
            continue
        try:
            hour, count = int(parts[0]), int(number)
        except ValueError:
            continue
        counts = found.setdefault((hour, parts[1], parts[2]), [0] * len(USAGE_COUNTS))
        counts[USAGE_COUNTS.index(parts[3])] += count
    return batch, found


def _rows(
    found: Mapping[tuple[int, str, str], list[int]], teams: Mapping[str, str], models: Any
) -> list[usage.Counts]:
    return [
        usage.Counts(
            hour,
            teams.get(key_id, UNKNOWN_TEAM),
            key_id,
            endpoint,
            models.get(endpoint, ""),
            *counts,
        )
        for (hour, key_id, endpoint), counts in found.items()
    ]


def _store(engine: Engine, batch: str, found: Mapping[Any, list[int]], now: float) -> bool:
    """Add the batch's rows unless it was stored before; True when this call stored it."""
    with engine.begin() as conn:
        raw = conn.connection.driver_connection
        assert raw is not None
        if raw.execute("SELECT 1 FROM usage_batch WHERE id = ?", (batch,)).fetchone():
            return False
        key_ids = sorted({key_id for _, key_id, _ in found})
        marks = ",".join("?" * len(key_ids))
        teams = dict(raw.execute(f"SELECT id, owner FROM api_key WHERE id IN ({marks})", key_ids))  # noqa: S608
        usage.add(raw, _rows(found, teams, usage.models_by_name(raw)))
        raw.execute("INSERT INTO usage_batch (id, at) VALUES (?, ?)", (batch, now))
        raw.execute("DELETE FROM usage_batch WHERE at < ?", (now - BATCHES_KEPT_S,))
    return True


def roll_up(client: redis.Redis, engine: Engine, now: float | None = None) -> int:
    """Move what the api counted into the usage table; returns the rows stored."""
    now = time.time() if now is None else now
    keys = [bus.USAGE_PENDING_KEY, bus.USAGE_ROLLING_KEY]
    flat: list[Any] = client.eval(_TAKE, 2, *keys, new_id("use"), BATCH_FIELD)
    if not flat:
        return 0
    batch, found = parse(flat)
    stored = _store(engine, batch, found, now) if found and batch else False
    if batch:
        client.eval(_DONE, 1, bus.USAGE_ROLLING_KEY, batch, BATCH_FIELD)
    else:  # not made by _TAKE: nothing to keep it for
        client.delete(bus.USAGE_ROLLING_KEY)
    return len(found) if stored else 0
