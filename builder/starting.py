"""What a deploy's starting replicas are doing: their last line of output, read by the builder's
loop (`builder/loop.py`) every few seconds, and the `status_reason` the planner
(`builder/reconcile.py`) words from it while none of them is ready yet.

A vLLM replica on CPU loads its model for minutes; without this its endpoint said
UPDATE_IN_PROGRESS and nothing else the whole time. Only the starting replicas of an endpoint
whose current generation is being deployed and has no ready replica are read, each at most
every STARTING_READ_EVERY_S, so a box with many endpoints pays nothing for the ones that serve.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from appliance.models import Endpoint, EndpointStatus, Replica, ReplicaState
from builder.runtime import ContainerRuntime

logger = logging.getLogger(__name__)

STARTING_READ_EVERY_S = 5.0  # a starting replica's output is read at most this often
STARTING_STEP_S = 5  # the elapsed time is shown in steps of this: the text (a write) changes less
STARTING_TAIL_LINES = 10  # lines read back to find the last one with text
STARTING_LINE_CHARS = 200
DEPLOYING = (EndpointStatus.UPDATE_PENDING, EndpointStatus.UPDATE_IN_PROGRESS)

_ESCAPES = re.compile(r"\x1b(\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(\x07|\x1b\\)?|.)")  # colours
_CONTROLS = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_STARTING = re.compile(r"starting \d+ replicas? \(\d+ s\)")


def last_line(output: str) -> str:
    """The last line with text in a container's output, without colours or control characters
    and cut to STARTING_LINE_CHARS. A progress bar redrawn with carriage returns counts its
    last drawing only (`splitlines` splits at them)."""
    for raw in reversed(output.splitlines()):
        line = _CONTROLS.sub("", _ESCAPES.sub("", raw).replace("\t", " ")).strip()
        if len(line) > STARTING_LINE_CHARS:
            line = line[: STARTING_LINE_CHARS - 1] + "…"
        if line:
            return line
    return ""


def describe(starting: Sequence[Replica], lines: Mapping[str, str], now: float) -> str:
    """`starting 2 replicas (95 s): Loading weights...`: the time since the first of them was
    started and the last line the first of them with output printed."""
    first = sorted(starting, key=lambda r: r.created_at)
    elapsed = int(max(now - first[0].created_at, 0.0) // STARTING_STEP_S) * STARTING_STEP_S
    count = f"{len(first)} replica" + ("s" if len(first) != 1 else "")
    line = next((lines[r.id] for r in first if lines.get(r.id)), "")
    return f"starting {count} ({elapsed} s)" + (f": {line}" if line else "")


def is_starting(reason: str | None) -> bool:
    """True for a reason `describe` wrote."""
    return reason is not None and _STARTING.match(reason) is not None


def watched(endpoints: Sequence[Endpoint], replicas: Sequence[Replica]) -> dict[str, str]:
    """Replica id -> container id of the starting replicas whose output is worth reading: those
    of the current generation of an endpoint being deployed that has no ready replica of it."""
    deploying = {e.id: e.generation for e in endpoints if e.status in DEPLOYING}
    ready = {(r.endpoint_id, r.generation) for r in replicas if r.state == ReplicaState.READY}
    return {
        r.id: r.container_id
        for r in replicas
        if r.state == ReplicaState.STARTING
        and r.container_id
        and deploying.get(r.endpoint_id) == r.generation
        and (r.endpoint_id, r.generation) not in ready
    }


@dataclass
class StartingLogs:
    """Keeps each watched replica's last line; reads a replica again only once it is due."""

    docker: ContainerRuntime
    pool: ThreadPoolExecutor
    _read: dict[str, tuple[float, str]] = field(default_factory=dict)  # id -> (monotonic, line)

    def read(self, endpoints: Sequence[Endpoint], replicas: Sequence[Replica]) -> dict[str, str]:
        """Replica id -> last line, for the watched replicas that printed one."""
        now = time.monotonic()
        wanted = watched(endpoints, replicas)
        self._read = {rid: seen for rid, seen in self._read.items() if rid in wanted}
        due = [
            (rid, cid)
            for rid, cid in wanted.items()
            if rid not in self._read or now - self._read[rid][0] >= STARTING_READ_EVERY_S
        ]
        for (rid, _), line in zip(due, self.pool.map(self._tail, due), strict=True):
            before = self._read.get(rid, (0.0, ""))[1]
            self._read[rid] = (now, before if line is None else line)
        return {rid: line for rid, (_, line) in self._read.items() if line}

    def _tail(self, item: tuple[str, str]) -> str | None:
        """The container's last line; None when it could not be read (the old one stays)."""
        replica_id, container_id = item
        try:
            return last_line(self.docker.logs_tail(container_id, STARTING_TAIL_LINES))
        except Exception as exc:  # gone, or Docker hiccuped: the planner sees to the replica
            logger.debug("cannot read the output of starting replica %s: %s", replica_id, exc)
            return None
