"""Image pulls as preparation jobs: which image an endpoint needs, and Docker's pull stream
turned into `Progress` (bytes and layers).

`image_job` is a job source for the `Preparer` (`builder/prepare.py`), wired by
`builder/serve.py`; `PullTally` is pure and unit-tested with recorded messages.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from appliance.models import Endpoint
from appliance.settings import Settings
from builder.docker_engine import PullError
from builder.prepare import Job, PrepareError, Progress, Report
from builder.runtime import ContainerRuntime
from builder.specs import default_image

NOT_LAYERS = ("Pulling from", "Digest:", "Status:")  # messages about the image, not a layer
LAYER_DONE = ("Pull complete", "Already exists")
# Terse words from the Docker Engine, said once more for a person: (text in the error, meaning)
HINTS = (
    ("no space left on device", "the disk is full: free space or prune unused images"),
    ("connection refused", "the registry is not answering"),
    ("eof", "the registry closed the connection during the transfer"),
    ("connection reset", "the registry closed the connection during the transfer"),
    ("unauthorized", "the registry wants credentials this box does not have"),
    ("access to the resource is denied", "the registry refused access to this image"),
    ("no such host", "the registry's name does not resolve"),
    ("i/o timeout", "the registry did not answer in time"),
)
DOWNLOADED = ("Download complete", "Verifying Checksum", "Extracting", *LAYER_DONE)


@dataclass
class _Layer:
    total: int | None = None
    current: int = 0
    downloaded: bool = False
    done: bool = False
    fetched: bool = True  # False when the Docker Engine already had it


@dataclass
class PullTally:
    """Folds Docker's per-layer pull messages into one `Progress` for the image."""

    image: str
    layers: dict[str, _Layer] = field(default_factory=dict)
    detail: str = ""

    def add(self, message: Mapping[str, Any]) -> Progress:
        status = str(message.get("status") or "")
        layer_id = message.get("id")
        if not layer_id or status.startswith(NOT_LAYERS):
            return self.progress()
        layer = self.layers.setdefault(str(layer_id), _Layer())
        detail = message.get("progressDetail") or {}
        if status == "Downloading":
            layer.current = int(detail.get("current") or layer.current)
            layer.total = int(detail.get("total") or 0) or layer.total
            self.detail = ""
        elif status.startswith(("Retrying", "Extracting")):
            self.detail = status.split(" (")[0].lower()  # "retrying in 5 seconds", "extracting"
        if status.startswith(DOWNLOADED):
            layer.downloaded = True
        if status.startswith(LAYER_DONE):
            layer.done = True
            self.detail = ""
            layer.fetched = status != "Already exists"
        return self.progress()

    def progress(self) -> Progress:
        fetched = [layer for layer in self.layers.values() if layer.fetched]
        done_bytes = sum(
            (layer.total or layer.current) if layer.downloaded else layer.current
            for layer in fetched
        )
        known = all(layer.total is not None or layer.downloaded for layer in fetched)
        total = sum(layer.total or layer.current for layer in fetched) if known else None
        return Progress(
            kind="image",
            ref=self.image,
            done_bytes=done_bytes,
            total_bytes=total if fetched else None,
            done_parts=sum(layer.done for layer in self.layers.values()),
            total_parts=len(self.layers) or None,
            detail=self.detail,
        )


def explained(words: str) -> str:
    """The registry's (or the Docker Engine's) words, with what they mean when they are terse."""
    lowered = words.lower()
    for needle, meaning in HINTS:
        if needle in lowered and meaning not in lowered:
            return f"{words} ({meaning})"
    return words


def pull_image(runtime: ContainerRuntime, image: str, report: Report) -> None:
    """Pulls `image`, reporting progress; raises `PrepareError` in the registry's words."""
    tally = PullTally(image)
    report(tally.progress())
    try:
        for message in runtime.pull(image):
            report(tally.add(message))
    except PullError as exc:
        raise PrepareError(f"cannot pull image {image}: {explained(str(exc))}") from exc
    if not runtime.has_image(image):
        raise PrepareError(f"cannot pull image {image}: the pull ended without the image")


def image_job(endpoint: Endpoint, settings: Settings, runtime: ContainerRuntime) -> Job:
    """The pull an endpoint's replicas wait on (present already in most ticks)."""
    image = default_image(endpoint, settings)
    return Job(
        key=f"image:{image}",
        start=Progress(kind="image", ref=image),
        present=lambda: runtime.has_image(image),
        run=lambda report: pull_image(runtime, image, report),
    )
