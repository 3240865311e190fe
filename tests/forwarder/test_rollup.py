"""The api's usage record reaches the usage table exactly once (real Redis, real SQLite): the
rows carry their key's team; a sweep that died after storing does not store again; sweeps
racing store each count once; and a Redis wipe after the roll-up loses nothing stored."""

from __future__ import annotations

import threading
from pathlib import Path

import redis
from sqlalchemy.engine import Engine

from appliance import bus, keys, usage
from appliance.db import open_engine, session_scope
from forwarder import rollup
from tests.harness import RedisServer

H = usage.HOUR_S


def setup(tmp_path: Path) -> tuple[Engine, str]:
    engine = open_engine(tmp_path / "a.db")
    with session_scope(engine) as session:
        row, _ = keys.create_key(session=session, secret=b"s", name="ci", team="red", user="r")
    return engine, row.id


def totals(engine: Engine) -> dict[tuple[int, str, str], list[int]]:
    with session_scope(engine) as session:
        lines = usage.read(usage.driver(session), usage.Query(0, 100 * H))
    return {
        (x.period, x.team, x.key_id): [x.requests, x.prompt_tokens, x.completion_tokens, x.errors]
        for x in lines
    }


def publish(client: redis.Redis, hour: int, key_id: str, counts: list[int]) -> None:
    pipe = client.pipeline()
    rollup.publish(pipe, hour, {(key_id, "gemma"): counts})
    pipe.execute()


def test_each_batch_is_stored_once_even_when_a_sweep_dies(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    engine, key_id = setup(tmp_path)
    client = bus.connect(redis_server.url)
    publish(client, 2 * H, key_id, [3, 30, 12, 1])
    publish(client, 2 * H, key_id, [1, 5, 5, 0])  # a second api worker adds up
    publish(client, 3 * H, "key_unknown", [1, 0, 0, 1])
    assert rollup.roll_up(client, engine) == 2
    assert totals(engine) == {
        (2 * H, "red", key_id): [4, 35, 17, 1],
        (3 * H, rollup.UNKNOWN_TEAM, "key_unknown"): [1, 0, 0, 1],
    }
    assert not client.exists(bus.USAGE_PENDING_KEY, bus.USAGE_ROLLING_KEY)

    # A sweep stores a batch and dies before deleting it: the next one does not store it again.
    publish(client, 2 * H, key_id, [1, 1, 1, 0])
    flat = client.eval(
        rollup._TAKE, 2, bus.USAGE_PENDING_KEY, bus.USAGE_ROLLING_KEY, "b1", "#batch"
    )
    batch, found = rollup.parse(flat)
    assert batch == "b1" and rollup._store(engine, batch, found, 0.0)
    publish(client, 2 * H, key_id, [2, 0, 0, 0])  # meanwhile the api counts on
    rollup.roll_up(client, engine)
    assert totals(engine)[(2 * H, "red", key_id)] == [5, 36, 18, 1]
    rollup.roll_up(client, engine)
    assert totals(engine)[(2 * H, "red", key_id)] == [7, 36, 18, 1]

    client.flushall()  # Redis wiped: the hours stored are still there
    assert rollup.roll_up(client, engine) == 0
    assert totals(engine)[(2 * H, "red", key_id)] == [7, 36, 18, 1]


def test_racing_sweeps_count_each_request_once(tmp_path: Path, redis_server: RedisServer) -> None:
    engine, key_id = setup(tmp_path)
    client = bus.connect(redis_server.url)
    stop = threading.Event()

    def sweep() -> None:
        mine = bus.connect(redis_server.url)
        while not stop.is_set():
            rollup.roll_up(mine, engine)

    sweepers = [threading.Thread(target=sweep) for _ in range(3)]
    for thread in sweepers:
        thread.start()
    for _ in range(200):
        publish(client, 5 * H, key_id, [1, 2, 3, 0])
    stop.set()
    for thread in sweepers:
        thread.join()
    rollup.roll_up(client, engine)
    assert totals(engine) == {(5 * H, "red", key_id): [200, 400, 600, 0]}


def test_a_sweep_the_database_refuses_is_a_line_not_a_traceback(
    tmp_path: Path, redis_server: RedisServer, caplog, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    """A full disk made every sweep (every 5 s) log a 45-line traceback, growing the log of a
    disk already full: a sweep the database refuses is one warning line, as when Redis is down."""
    from sqlalchemy.exc import OperationalError

    from forwarder.worker.sweeper import Sweeper

    engine = open_engine(tmp_path / "appliance.db")
    sweeper = Sweeper(
        engine, redis.Redis(port=redis_server.port), files_dir=tmp_path, grace_s=1, interval_s=0.01
    )
    stop = threading.Event()

    def full(now: float | None = None) -> None:
        stop.set()
        raise OperationalError("INSERT", {}, Exception("database or disk is full"))

    monkeypatch.setattr(sweeper, "sweep", full)
    with caplog.at_level("WARNING", logger="forwarder.worker.sweeper"):
        sweeper.loop(stop)
    [record] = caplog.records
    assert record.exc_info is None and "database or disk is full" in record.getMessage()
