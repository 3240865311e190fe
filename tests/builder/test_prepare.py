"""The Preparer and the pull tally with plain values: jobs run when the test says, time is a
number, Docker's pull stream is a recorded list of messages."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from appliance.models import Endpoint, EndpointStatus
from builder.prepare import (
    MILESTONE_EVERY_S,
    STALL_S,
    Failed,
    Job,
    Note,
    PrepareError,
    Preparer,
    Progress,
    Report,
    Waiting,
)
from builder.pull import PullTally, explained
from tests.factories import make_endpoint

IMAGE = "registry.local/acme/server:1"
MB = 1_000_000


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class FakeFetch:
    """A job source whose jobs run only when `finish` or `step` is called."""

    def __init__(self, present: bool = False) -> None:
        self.present = present
        self.started: list[Callable[[], None]] = []
        self.reports: list[Report] = []
        self.outcome: Exception | None = None
        self.release = threading.Event()
        self.release.set()

    def source(self, endpoint: Endpoint) -> Job:
        def run(report: Report) -> None:
            self.reports.append(report)
            self.release.wait(10)
            if self.outcome is not None:
                raise self.outcome

        return Job(
            key=f"image:{IMAGE}",
            start=Progress(kind="image", ref=IMAGE),
            present=lambda: self.present,
            run=run,
        )

    def spawn(self, target: Callable[[], None]) -> None:
        self.started.append(target)


def preparer(fetch: FakeFetch, clock: Clock) -> Preparer:
    return Preparer([fetch.source], clock=clock, spawn=fetch.spawn)


def two_endpoints() -> list[Endpoint]:
    return [make_endpoint(), make_endpoint(id="end_b", name="b")]


def test_an_image_two_endpoints_need_is_fetched_once_and_both_wait_on_it() -> None:
    fetch, clock = FakeFetch(), Clock()
    prep = preparer(fetch, clock)
    waiting, notes = prep.poll(two_endpoints())
    assert len(fetch.started) == 1
    assert waiting == {
        "end_a": Waiting(Progress("image", IMAGE)),
        "end_b": Waiting(Progress("image", IMAGE)),
    }
    assert notes == [
        Note("end_a", "pulling", f"pulling image {IMAGE}"),
        Note("end_b", "pulling", f"pulling image {IMAGE}"),
    ]
    waiting, notes = prep.poll(two_endpoints())
    assert len(fetch.started) == 1 and notes == [] and set(waiting) == {"end_a", "end_b"}


def test_an_image_already_there_is_not_fetched() -> None:
    fetch, clock = FakeFetch(present=True), Clock()
    waiting, notes = preparer(fetch, clock).poll(two_endpoints())
    assert waiting == {} and notes == [] and fetch.started == []


def test_a_finished_pull_frees_its_endpoints_and_says_what_it_fetched() -> None:
    fetch, clock = FakeFetch(), Clock()
    prep = preparer(fetch, clock)
    prep.poll(two_endpoints())
    fetch.started[0]()
    fetch.reports[0](Progress("image", IMAGE, 50 * MB, 50 * MB, 3, 3))
    fetch.present = True
    clock.now += 42
    waiting, notes = prep.poll(two_endpoints())
    assert waiting == {}
    assert Note("end_a", "pulled", f"pulled image {IMAGE}: 50.0 MB in 42 s") in notes
    assert len(notes) == 2


def test_a_failed_pull_fails_its_generation_and_a_new_generation_tries_again() -> None:
    fetch, clock = FakeFetch(), Clock()
    fetch.outcome = PrepareError("cannot pull image x: manifest unknown")
    prep = preparer(fetch, clock)
    prep.poll([make_endpoint(generation=3)])
    fetch.started[0]()
    waiting, _ = prep.poll([make_endpoint(generation=3)])
    assert waiting == {"end_a": Failed("cannot pull image x: manifest unknown")}
    waiting, _ = prep.poll([make_endpoint(generation=3)])
    assert isinstance(waiting["end_a"], Failed) and len(fetch.started) == 1

    fetch.outcome = None
    waiting, _ = prep.poll([make_endpoint(generation=4)])  # an edit or a restart
    assert isinstance(waiting["end_a"], Waiting) and len(fetch.started) == 2


def test_a_crashing_job_still_fails_with_words() -> None:
    fetch, clock = FakeFetch(), Clock()
    fetch.outcome = RuntimeError("disk on fire")
    prep = preparer(fetch, clock)
    prep.poll([make_endpoint()])
    fetch.started[0]()
    waiting, _ = prep.poll([make_endpoint()])
    assert waiting == {"end_a": Failed(f"pulling image {IMAGE} failed: disk on fire")}


def test_failed_and_deleted_endpoints_start_no_job() -> None:
    fetch, clock = FakeFetch(), Clock()
    quiet = [
        make_endpoint(status=EndpointStatus.UPDATE_FAILED),
        make_endpoint(id="end_b", status=EndpointStatus.DELETE_IN_PROGRESS),
    ]
    assert preparer(fetch, clock).poll(quiet) == ({}, [])
    assert fetch.started == []


def test_progress_events_come_at_quarters_or_every_so_often_never_every_tick() -> None:
    fetch, clock = FakeFetch(), Clock()
    prep = preparer(fetch, clock)
    endpoints = [make_endpoint()]
    fetch.release.clear()  # the job runs in its thread until the test ends
    prep.poll(endpoints)
    running = threading.Thread(target=fetch.started[0])
    running.start()
    while not fetch.reports:
        time.sleep(0.01)
    report = fetch.reports[0]

    def notes_after(done: int, seconds: float = 1) -> list[str]:
        clock.now += seconds
        report(Progress("image", IMAGE, done * MB, 100 * MB, 0, 2))
        return [n.message for n in prep.poll(endpoints)[1]]

    assert notes_after(10) == []
    assert notes_after(20) == []
    assert notes_after(26) == [f"pulling image {IMAGE}: 26.0 of 100.0 MB, 0 of 2 layers"]
    assert notes_after(30) == []
    assert len(notes_after(31, MILESTONE_EVERY_S)) == 1  # slow: one now and then
    assert len(notes_after(80)) == 1  # past a half and three quarters at once: one event
    assert notes_after(81) == []
    fetch.release.set()
    running.join(10)


def test_progress_reads_as_a_person_would_say_it() -> None:
    waiting = Progress("image", IMAGE, 1_234_000_000, 9_800_000_000, 3, 7)
    assert waiting.describe() == f"pulling image {IMAGE}: 1.2 of 9.8 GB, 3 of 7 layers"
    unknown = Progress("weights", "o/m@main", 5 * MB, None, 1, 4)
    assert unknown.describe() == "downloading weights o/m@main: 5.0 MB so far, 1 of 4 files"
    assert unknown.to_json()["fraction"] is None
    assert waiting.to_json()["fraction"] == 1_234_000_000 / 9_800_000_000


def recorded(layer: str, status: str, current: int = 0, total: int = 0) -> dict[str, object]:
    detail = {"current": current, "total": total} if total else {}
    return {"status": status, "id": layer, "progressDetail": detail}


def test_the_tally_counts_bytes_and_layers_of_what_it_fetches() -> None:
    tally = PullTally(IMAGE)
    messages = [
        {"status": "Pulling from acme/server", "id": "1"},
        recorded("base", "Already exists"),
        recorded("big", "Pulling fs layer"),
        recorded("small", "Pulling fs layer"),
        recorded("big", "Downloading", 10 * MB, 40 * MB),
    ]
    progress = [tally.add(m) for m in messages][-1]
    assert (progress.done_bytes, progress.total_bytes) == (10 * MB, None)  # small: size unknown
    assert (progress.done_parts, progress.total_parts) == (1, 3)
    progress = tally.add(recorded("small", "Downloading", 1 * MB, 2 * MB))
    assert (progress.done_bytes, progress.total_bytes) == (11 * MB, 42 * MB)
    tally.add(recorded("small", "Download complete"))
    progress = tally.add(recorded("small", "Pull complete"))
    assert (progress.done_bytes, progress.done_parts) == (12 * MB, 2)
    progress = tally.add(recorded("big", "Retrying in 5 seconds"))
    assert progress.detail == "retrying in 5 seconds"
    tally.add(recorded("big", "Downloading", 40 * MB, 40 * MB))
    tally.add(recorded("big", "Extracting", 1 * MB, 40 * MB))
    progress = tally.add(recorded("big", "Pull complete"))
    tally.add({"status": "Digest: sha256:0"})
    assert tally.add({"status": "Status: Downloaded newer image"}) == progress
    assert progress == Progress("image", IMAGE, 42 * MB, 42 * MB, 3, 3)


def test_terse_pull_errors_keep_their_words_and_say_what_they_mean() -> None:
    assert explained("EOF") == "EOF (the registry closed the connection during the transfer)"
    full = explained("write /var/lib/docker/tmp/x: no space left on device")
    assert full.endswith("(the disk is full: free space or prune unused images)")
    manifest = "manifest for r/x:1 not found: manifest unknown: manifest unknown"
    assert explained(manifest) == manifest


def test_every_job_of_an_endpoint_starts_at_once_and_a_failure_comes_first() -> None:
    image, weights, clock = FakeFetch(), FakeFetch(), Clock()

    def weights_job(endpoint: Endpoint) -> Job:
        job = weights.source(endpoint)
        return Job("weights:o/m@main", Progress("weights", "o/m@main"), job.present, job.run)

    prep = Preparer([image.source, weights_job], clock=clock, spawn=image.spawn)
    waiting, _ = prep.poll([make_endpoint()])
    assert len(image.started) == 2  # both spawned through the same spawner
    assert waiting == {"end_a": Waiting(Progress("image", IMAGE))}
    image.started[0]()  # the image arrives
    image.present = True
    weights.outcome = PrepareError("401: a token is needed for o/m")
    image.started[1]()
    waiting, _ = prep.poll([make_endpoint()])
    assert waiting == {"end_a": Failed("401: a token is needed for o/m")}


def test_a_pull_that_stops_moving_fails_and_a_restart_tries_again() -> None:
    fetch, clock = FakeFetch(), Clock()
    prep = preparer(fetch, clock)
    prep.poll([make_endpoint()])  # its thread never runs: a connection gone silent
    clock.now += STALL_S - 1
    assert isinstance(prep.poll([make_endpoint()])[0]["end_a"], Waiting)
    clock.now += 1
    waiting, _ = prep.poll([make_endpoint()])
    assert waiting == {"end_a": Failed(f"pulling image {IMAGE}: no progress for 600 s")}
    waiting, _ = prep.poll([make_endpoint(generation=2)])
    assert isinstance(waiting["end_a"], Waiting) and len(fetch.started) == 2
