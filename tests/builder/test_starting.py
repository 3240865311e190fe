"""A starting replica's last line of output: how it is cleaned, whose is read, and how often."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import cast

import pytest

from appliance.models import EndpointStatus, Replica, ReplicaState
from builder import starting
from builder.runtime import ContainerRuntime
from builder.starting import StartingLogs, last_line, watched
from tests.factories import make_endpoint


def test_the_last_line_with_text_without_colours_controls_or_redrawn_bars() -> None:
    assert last_line("INFO one\nINFO two\n\n  \n") == "INFO two"
    assert last_line("\x1b[32mINFO\x1b[0m 05-01 \x1b]0;title\x07Loading\tweights\x00\n") == (
        "INFO 05-01 Loading weights"
    )
    bar = "Loading shards:   0% 0/2\rLoading shards:  50% 1/2\rLoading shards: 100% 2/2\n"
    assert last_line(bar) == "Loading shards: 100% 2/2"
    long = last_line("x" * 5000)
    assert len(long) == starting.STARTING_LINE_CHARS and long.endswith("…")
    assert last_line("") == last_line("\n\n") == ""


def rep(rid: str, endpoint_id: str, state: ReplicaState, generation: int = 1) -> Replica:
    return Replica(
        id=rid,
        endpoint_id=endpoint_id,
        generation=generation,
        container_id=f"c-{rid}",
        container_name=rid,
        state=state,
    )


def test_only_starting_replicas_of_a_deploy_with_none_ready_are_read() -> None:
    endpoints = [
        make_endpoint(id="new"),  # being deployed, nothing ready: read
        make_endpoint(id="half", name="half"),  # one ready already: not read
        make_endpoint(id="cold", name="cold", status=EndpointStatus.READY),  # scaling: not read
        make_endpoint(id="roll", name="roll", generation=2),  # old ready, new starting: read
    ]
    replicas = [
        rep("r1", "new", ReplicaState.STARTING),
        rep("r2", "half", ReplicaState.STARTING),
        rep("r3", "half", ReplicaState.READY),
        rep("r4", "cold", ReplicaState.STARTING),
        rep("r5", "roll", ReplicaState.READY),
        rep("r6", "roll", ReplicaState.STARTING, generation=2),
        rep("r7", "roll", ReplicaState.STARTING),  # an old generation's: not read
    ]
    assert watched(endpoints, replicas) == {"r1": "c-r1", "r6": "c-r6"}


class Tails:
    """Stands in for the runtime's `logs_tail` only; counts the reads."""

    def __init__(self) -> None:
        self.reads: list[str] = []
        self.output = "INFO Loading weights\n"

    def logs_tail(self, container_id: str, lines: int = 30) -> str:
        self.reads.append(container_id)
        if self.output == "gone":
            raise RuntimeError("No such container")
        return self.output


def test_a_replica_is_read_at_most_every_few_seconds_and_a_failed_read_keeps_its_line(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = [1000.0]
    monkeypatch.setattr(starting.time, "monotonic", lambda: clock[0])
    tails = Tails()
    endpoints = [make_endpoint(id="new")]
    replicas = [rep("r1", "new", ReplicaState.STARTING)]
    with ThreadPoolExecutor(2) as pool:
        logs = StartingLogs(cast(ContainerRuntime, tails), pool)
        assert logs.read(endpoints, replicas) == {"r1": "INFO Loading weights"}
        tails.output = "INFO Loaded\n"
        clock[0] += starting.STARTING_READ_EVERY_S - 1
        assert logs.read(endpoints, replicas) == {"r1": "INFO Loading weights"}
        assert tails.reads == ["c-r1"]
        clock[0] += 1
        assert logs.read(endpoints, replicas) == {"r1": "INFO Loaded"}
        tails.output = "gone"
        clock[0] += starting.STARTING_READ_EVERY_S
        assert logs.read(endpoints, replicas) == {"r1": "INFO Loaded"}
        replicas = [rep("r1", "new", ReplicaState.READY)]
        assert logs.read(endpoints, replicas) == {}
        assert len(tails.reads) == 3
