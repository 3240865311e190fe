"""What a replica waits on before its container can start (an image, weights), fetched in
background threads so the builder's loop never waits on a download.

The builder's loop (`builder/loop.py`) calls `Preparer.poll` once a tick with the endpoints; it
answers, per endpoint, what the endpoint still waits on (`Waiting` with its `Progress`, or
`Failed` with a message a user understands; absent means ready) and the events to record. The
planner (`builder/reconcile.py`) starts no replica while an endpoint waits.

A job is keyed by what it fetches (`image:<ref>`, `weights:<repo>@<revision>`), so endpoints
that need the same thing share one job. Job sources (`builder/pull.image_job`, and any other
kind) say which jobs an endpoint needs. A failed job is tried again when an endpoint asks for it
with a generation that has not seen it fail (an edit or a restart).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from appliance.models import Endpoint, EndpointStatus

logger = logging.getLogger(__name__)

MILESTONE_EVERY_S = 15.0  # an event at most this often while a job runs...
MILESTONE_STEP = 0.25  # ...or each time it passes another quarter of its total
PRESENT_RECHECK_S = 30.0  # how long "already there" is trusted before it is checked again
STALL_S = 600.0  # a job whose progress has not moved for this long has failed

Kind = Literal["image", "weights"]
_WORDS: dict[str, tuple[str, str, str]] = {  # kind -> (doing, its parts, done)
    "image": ("pulling image", "layers", "pulled image"),
    "weights": ("downloading weights", "files", "downloaded weights"),
}


def _event_kind(progress: Progress) -> str:
    return _WORDS[progress.kind][0].split()[0]  # "pulling", "downloading"


class PrepareError(Exception):
    """A job could not fetch what it was asked for; the message is for the user."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def size_text(count: int, unit_of: int | None = None) -> str:
    """Bytes as a person reads them, in the unit that suits `unit_of` (default: `count`)."""
    scale = count if unit_of is None else unit_of
    for unit, factor in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if scale >= factor:
            return f"{count / factor:.1f} {unit}"
    return f"{count} B"


@dataclass(frozen=True)
class Progress:
    """How far one job has come; totals are None while they are unknown."""

    kind: Kind
    ref: str
    done_bytes: int = 0
    total_bytes: int | None = None
    done_parts: int = 0
    total_parts: int | None = None
    detail: str = ""

    @property
    def headline(self) -> str:
        return f"{_WORDS[self.kind][0]} {self.ref}"

    @property
    def fraction(self) -> float | None:
        if not self.total_bytes:
            return None
        return min(self.done_bytes / self.total_bytes, 1.0)

    def describe(self) -> str:
        """'pulling image X: 1.2 of 9.8 GB, 3 of 7 layers'."""
        parts = _WORDS[self.kind][1]
        if self.total_bytes:
            amount = f"{size_text(self.done_bytes, self.total_bytes).split()[0]} of "
            amount += size_text(self.total_bytes)
        else:
            amount = f"{size_text(self.done_bytes)} so far"
        if self.total_parts is not None:
            amount += f", {self.done_parts} of {self.total_parts} {parts}"
        return f"{self.headline}: {amount}" + (f" ({self.detail})" if self.detail else "")

    def to_json(self) -> dict[str, object]:
        return {
            "kind": self.kind,
            "ref": self.ref,
            "done_bytes": self.done_bytes,
            "total_bytes": self.total_bytes,
            "done_parts": self.done_parts,
            "total_parts": self.total_parts,
            "detail": self.detail,
            "fraction": self.fraction,
            "description": self.describe(),
        }


Report = Callable[[Progress], None]


@dataclass(frozen=True)
class Job:
    """One thing to fetch: `present()` is a cheap check that nothing needs fetching; `run`
    fetches it in a thread, calling `report` as it goes, and raises `PrepareError` on failure."""

    key: str
    start: Progress
    present: Callable[[], bool]
    run: Callable[[Report], None]


JobSource = Callable[[Endpoint], "Job | None"]


@dataclass(frozen=True)
class Waiting:
    progress: Progress


@dataclass(frozen=True)
class Failed:
    message: str


Readiness = Waiting | Failed


@dataclass(frozen=True)
class Note:
    """An event for the loop to record on an endpoint."""

    endpoint_id: str
    kind: str
    message: str


@dataclass
class _Run:
    """One job's attempt; `progress`, `error` and `finished` are written by its thread."""

    job: Job
    started: float
    waiters: dict[str, int]  # endpoint id -> the generation that asked
    progress: Progress
    error: str | None = None
    finished: bool = False
    noted_at: float = 0.0
    noted_step: int = 0
    moved_at: float = 0.0  # when its progress last changed


@dataclass
class Preparer:
    """Runs jobs in threads, one per key; answers each tick what every endpoint waits on."""

    sources: Sequence[JobSource]
    clock: Callable[[], float] = time.monotonic
    spawn: Callable[[Callable[[], None]], None] = field(
        default=lambda target: threading.Thread(target=target, daemon=True).start()
    )
    _runs: dict[str, _Run] = field(default_factory=dict)
    _present: dict[str, float] = field(default_factory=dict)  # key -> when it was seen there
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def poll(self, endpoints: Sequence[Endpoint]) -> tuple[dict[str, Readiness], list[Note]]:
        """What each endpoint still waits on (absent: nothing), and the events to record."""
        notes = self._sweep()
        waiting: dict[str, Readiness] = {}
        for endpoint in endpoints:
            if endpoint.status in (EndpointStatus.DELETE_IN_PROGRESS, EndpointStatus.UPDATE_FAILED):
                continue
            # every job starts at once (an image and weights download side by side); a failure
            # is the answer before a wait
            answers = [self._ask(job, endpoint, notes) for job in self._jobs(endpoint)]
            failed = [a for a in answers if isinstance(a, Failed)]
            found: list[Readiness] = [*failed, *(a for a in answers if isinstance(a, Waiting))]
            if found:
                waiting[endpoint.id] = found[0]
        self._milestones(notes)
        return waiting, notes

    def _jobs(self, endpoint: Endpoint) -> list[Job]:
        return [job for source in self.sources if (job := source(endpoint)) is not None]

    def _ask(self, job: Job, endpoint: Endpoint, notes: list[Note]) -> Readiness | None:
        run = self._runs.get(job.key)
        if run is None:
            seen = self._present.get(job.key)
            if seen is not None and self.clock() - seen < PRESENT_RECHECK_S:
                return None
            if job.present():
                self._present[job.key] = self.clock()
                return None
            self._present.pop(job.key, None)
            run = self._start(job)
        with self._lock:
            if run.finished and run.error is not None:
                if run.waiters.get(endpoint.id) == endpoint.generation:
                    return Failed(run.error)
                run = self._start(job)  # a new generation asks: try again
            if endpoint.id not in run.waiters:
                run.waiters[endpoint.id] = endpoint.generation
                notes.append(Note(endpoint.id, _event_kind(job.start), run.progress.headline))
            return Waiting(run.progress)

    def _start(self, job: Job) -> _Run:
        logger.info("starting %s", job.key)
        run = _Run(job, self.clock(), {}, job.start, moved_at=self.clock())
        self._runs[job.key] = run

        def report(progress: Progress) -> None:
            with self._lock:
                if progress != run.progress:
                    run.progress, run.moved_at = progress, self.clock()

        def target() -> None:
            error: str | None = None
            try:
                job.run(report)
            except PrepareError as exc:
                error = exc.message
            except Exception as exc:  # a bug, or a client's own error: still the user's answer
                logger.exception("job %s failed", job.key)
                error = f"{job.start.headline} failed: {exc}"
            if error is None:
                logger.info("finished %s", job.key)
            else:
                logger.warning("%s failed: %s", job.key, error)
            with self._lock:
                if not run.finished:  # a stalled run was failed already: its answer stands
                    run.error, run.finished = error, True

        self.spawn(target)
        return run

    def _sweep(self) -> list[Note]:
        """Finished jobs: successes become 'present' and tell their endpoints; a job that has
        not moved for STALL_S has failed (its thread may hang on a silent connection)."""
        notes: list[Note] = []
        with self._lock:
            for run in self._runs.values():
                if not run.finished and self.clock() - run.moved_at >= STALL_S:
                    run.finished = True
                    run.error = f"{run.progress.headline}: no progress for {STALL_S:.0f} s"
            done = [k for k, r in self._runs.items() if r.finished and r.error is None]
            for key in done:
                run = self._runs.pop(key)
                self._present[key] = self.clock()
                took = self.clock() - run.started
                size = run.progress.total_bytes or run.progress.done_bytes
                what = f"{_WORDS[run.progress.kind][2]} {run.progress.ref}"
                message = f"{what}: {size_text(size)} in {took:.0f} s"
                kind = _WORDS[run.progress.kind][2].split()[0]  # "pulled", "downloaded"
                notes += [Note(e, kind, message) for e in run.waiters]
        return notes

    def _milestones(self, notes: list[Note]) -> None:
        """An event per quarter of the total or per MILESTONE_EVERY_S, never one per tick."""
        now = self.clock()
        with self._lock:
            for run in self._runs.values():
                if run.finished:
                    continue
                fraction = run.progress.fraction
                step = int(fraction / MILESTONE_STEP) if fraction is not None else 0
                if step > run.noted_step or now - max(run.noted_at, run.started) >= (
                    MILESTONE_EVERY_S
                ):
                    run.noted_step, run.noted_at = max(step, run.noted_step), now
                    text = run.progress.describe()
                    notes += [Note(e, _event_kind(run.progress), text) for e in run.waiters]
