"""Replica time in the usage table: running time and GPU-seconds per hour, accounted once,
charged to the endpoint's team; failed replicas no longer count."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy.engine import Engine

from appliance import usage
from appliance.db import open_engine, session_scope
from appliance.models import Replica, ReplicaState
from builder import metering
from tests.factories import make_endpoint

H = usage.HOUR_S


def read_all(engine: Engine) -> dict[tuple[int, str], tuple[float, float]]:
    with session_scope(engine) as session:
        lines = usage.read(usage.driver(session), usage.Query(0, 10 * H))
    return {(x.period, x.endpoint): (x.replica_seconds, x.gpu_seconds) for x in lines}


def test_running_time_is_accounted_once_per_hour(tmp_path: Path) -> None:
    engine = open_engine(tmp_path / "a.db")
    with session_scope(engine) as session:
        session.add(make_endpoint(id="end_a", name="a", owner="red", extra={"model_name": "m"}))
        for rid, gpus, fraction, state in (
            ("rep_1", [0, 1], 1.0, ReplicaState.READY),
            ("rep_2", [2], 0.5, ReplicaState.STARTING),
            ("rep_3", [3], 1.0, ReplicaState.FAILED),
        ):
            session.add(
                Replica(
                    id=rid,
                    endpoint_id="end_a",
                    generation=1,
                    container_name=rid,
                    gpus=gpus,
                    gpu_fraction=fraction,
                    state=state,
                    created_at=H - 100,
                )
            )
    with session_scope(engine) as session:
        replicas = [session.get(Replica, r) for r in ("rep_1", "rep_2", "rep_3")]
        metering.settle(session, [r for r in replicas if r is not None], H + 50)
    assert read_all(engine) == {
        (0, "a"): (200.0, pytest.approx(100 * 2 + 100 * 0.5)),
        (H, "a"): (100.0, pytest.approx(50 * 2 + 50 * 0.5)),
    }
    with session_scope(engine) as session:  # again, later: only the time since
        first = session.get(Replica, "rep_1")
        assert first is not None
        metering.settle(session, [first], H + 80)
    assert read_all(engine)[(H, "a")] == (130.0, pytest.approx(125.0 + 30 * 2))
    with session_scope(engine) as session:
        line = usage.read(usage.driver(session), usage.Query(0, 10 * H))[0]
    assert (line.team, line.key_id, line.model) == ("red", "", "m")
