"""View models of the UI's pages and the formatting their templates use; pure functions over
the dicts the api's routes already return (and a few table rows), called by `api.routes.ui`."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

TONES = {
    "READY": "ok",
    "UPDATE_PENDING": "busy",
    "UPDATE_IN_PROGRESS": "busy",
    "UPDATE_FAILED": "bad",
    "DELETE_IN_PROGRESS": "idle",
    "ready": "ok",
    "starting": "busy",
    "unhealthy": "bad",
    "stopping": "idle",
    "failed": "bad",
    "PENDING": "idle",
    "STARTED": "busy",
    "SUCCESS": "ok",
    "FAILURE": "bad",
    "completed": "ok",
    "in_progress": "busy",
    "finalizing": "busy",
    "validating": "idle",
    "failed_batch": "bad",
    "cancelled": "idle",
    "cancelling": "idle",
    "expired": "bad",
}
BUSY = ("UPDATE_PENDING", "UPDATE_IN_PROGRESS", "DELETE_IN_PROGRESS")
RESULT_SHOWN_CHARS = 20_000  # a task's result is cut here on its page
STARTS = ("created", "updated", "restart")  # events that begin a deploy of a new spec


def tone(status: str | None) -> str:
    """The colour family of a status: ok, busy, bad or idle."""
    if status == "failed":
        return "bad"
    return TONES.get(status or "", "idle")


def endpoint_tone(status: str, max_replicas: int) -> str:
    """An endpoint's badge colour: a READY endpoint allowed no replica (max 0) serves nothing,
    so it is not shown in the serving colour."""
    return "idle" if max_replicas == 0 else tone(status)


def ago(stamp: float | None, now: float) -> str:
    if stamp is None:
        return "—"
    return ago_text(max(0, int(now - stamp)))


def ago_text(seconds: int) -> str:
    """`seconds` ago in words; app.js's `agoText` says the same as the page stays open."""
    if seconds < 60:
        return f"{seconds} s ago"
    if seconds < 3600:
        return f"{seconds // 60} min ago"
    if seconds < 86400:
        return f"{seconds // 3600} h ago"
    return f"{seconds // 86400} d ago"


def clock(stamp: float | None) -> str:
    """A UTC time of day, with the date when it is not today."""
    if stamp is None:
        return "—"
    when = dt.datetime.fromtimestamp(stamp, dt.UTC)
    today = dt.datetime.now(dt.UTC).date()
    return when.strftime("%H:%M:%S" if when.date() == today else "%Y-%m-%d %H:%M")


def when(stamp: float | None) -> str:
    """A UTC date and time to the minute, whatever the day: a time ahead, such as an expiry."""
    if stamp is None:
        return "—"
    return dt.datetime.fromtimestamp(stamp, dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


def size(n: float | None) -> str:
    """Bytes in binary units, one decimal: 4.0 GiB."""
    if n is None:
        return "—"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def short_model(model: str) -> str:
    """A model as a user named it: the models mount dropped from a local path."""
    return model.removeprefix("/models/")


@dataclass(frozen=True)
class EndpointRow:
    id: str
    name: str
    framework: str
    model: str
    status: str
    tone: str
    reason: str | None
    ready: int
    desired: int
    gpus: int
    requests_per_minute: float | None
    last_activity: float | None


def endpoint_row(
    public: Mapping[str, Any], requests_per_minute: float | None, last_request: float | None
) -> EndpointRow:
    """One row of the endpoints table from the by-id route's description."""
    deployment = public["deployment_state"]
    updated = dt.datetime.fromisoformat(public["last_updated_at"]).timestamp()
    return EndpointRow(
        id=public["id"],
        name=public["name"],
        framework=public["framework"],
        model=short_model(public["model"]),
        status=public["status"],
        tone=endpoint_tone(public["status"], int(deployment["max_workers"])),
        reason=public.get("status_reason"),
        ready=int(deployment["available_workers"]),
        desired=int(deployment["desired_workers"]),
        gpus=int(public["resource_state"]["gpus"]),
        requests_per_minute=requests_per_minute,
        last_activity=max(last_request or 0.0, updated),
    )


@dataclass(frozen=True)
class Step:
    label: str
    state: str  # done, current, todo or failed
    detail: str = ""


NO_REPLICAS_ALLOWED = "scaled to 0: no replicas allowed"


def deploy_steps(
    events: Sequence[Mapping[str, Any]], status: str, max_replicas: int = 1
) -> list[Step]:
    """The latest deploy, step by step, from the endpoint's events timeline.

    Image present or pulled -> placed (on GPUs or CPU) -> container started, loading the
    model -> health check passed -> READY. With `max_replicas` 0 no replica will run: the
    first step not done says so, and none is in progress or serving."""
    start = max((i for i, e in enumerate(events) if e["kind"] in STARTS), default=0)
    if status == "READY":
        # an edit that did not roll (replica counts) leaves the last rollout standing
        start = max((i for i, e in enumerate(events) if e["kind"] == "placed"), default=start)
    recent = events[start:]
    found: dict[str, str] = {}
    for event in recent:
        found.setdefault(event["kind"], event["message"])
    started = "started" in found
    ready_status = any(
        e["kind"] == "status" and str(e["message"]).startswith("READY") for e in recent
    )
    placed = found.get("placed", "")
    image_ready = started or "pulled" in found or "placed" in found  # placed after the pull
    plan = [
        (
            "Image ready",
            image_ready,
            "pulled" if "pulled" in found else ("present" if image_ready else ""),
        ),
        ("Placed", "placed" in found, placed[placed.find(" placed ") + 8 :] if placed else ""),
        ("Loading model", started, "container started" if started else ""),
        ("Health check", "ready" in found, "passed" if "ready" in found else ""),
        ("Ready", ready_status or status == "READY", "serving" if status == "READY" else ""),
    ]
    if max_replicas == 0:
        plan = [(label, done, detail) for label, done, detail in plan[:-1]]
        plan.append(("Ready", False, ""))
    failed = status == "UPDATE_FAILED" or "crashed" in found
    steps: list[Step] = []
    current_given = False
    for label, done, detail in plan:
        if done and not current_given:  # none done after one still to come (a READY endpoint
            # woken from zero is not yet "serving" while its replica's health check runs)
            steps.append(Step(label, "done", detail))
        elif not current_given:
            current_given = True
            if failed:
                steps.append(Step(label, "failed", found.get("crashed", "") or "failed"))
            elif max_replicas == 0:
                steps.append(Step(label, "todo", NO_REPLICAS_ALLOWED))
            else:
                steps.append(Step(label, "current", "in progress"))
        else:
            steps.append(Step(label, "todo"))
    return steps


@dataclass(frozen=True)
class GpuCard:
    index: int
    name: str
    total: int
    used: int
    free: int
    used_pct: float
    claimed_pct: float
    utilization: float | None
    holders: list[str]


def gpu_cards(gpus: Iterable[Mapping[str, Any]]) -> list[GpuCard]:
    """The GPUs route's answer as cards: memory used, claimed (by placement) and free."""
    cards = []
    for gpu in gpus:
        total = int(gpu.get("memory_total_bytes") or 0)
        used = int(gpu.get("memory_used_bytes") or 0)
        holders = [
            f"{h.get('endpoint_name') or 'another team'} · {h.get('state')}"
            + (f" · {h['fraction']:.0%}" if h.get("fraction", 1) < 1 else "")
            for h in gpu.get("replicas", [])
        ]
        cards.append(
            GpuCard(
                index=int(gpu["index"]),
                name=str(gpu.get("name", "GPU")),
                total=total,
                used=used,
                free=int(gpu.get("memory_free_bytes") or max(total - used, 0)),
                used_pct=round(100 * used / total, 1) if total else 0.0,
                claimed_pct=min(100.0, round(100 * float(gpu.get("claimed_fraction", 0)), 1)),
                utilization=gpu.get("utilization_percent"),
                holders=holders,
            )
        )
    return cards


def key_state(key: Mapping[str, Any], now: float) -> str:
    if key.get("revoked_at"):
        return "revoked"
    if key.get("expires_at") and key["expires_at"] <= now:
        return "expired"
    return "active"


# A key's limits as the keys page labels them (its form) and lists them (its table).
KEY_LIMITS = (
    ("requests_per_minute", "Requests a minute", "requests a minute", "rate limit"),
    ("max_concurrent_requests", "Requests at once", "at once", "concurrency limit"),
    ("max_queued_tasks", "Queued async tasks", "queued tasks", "queued-task limit"),
    ("max_tokens_per_request", "Tokens a request", "tokens a request", "token cap"),
)


def key_limits(key: Mapping[str, Any]) -> str:
    """A key's limits in words: the set ones (0 is none), else whose limits apply."""
    limits = key.get("limits") or {}
    said = [
        f"no {none}" if limits[name] == 0 else f"{limits[name]} {unit}"
        for name, _, unit, none in KEY_LIMITS
        if limits.get(name) is not None
    ]
    if key.get("limits_from"):
        said.append("shared with the key that made it")
    return " · ".join(said) or "the install's defaults"


def pretty_json(value: Any) -> str:
    """A task's result or payload for a <pre>, cut at RESULT_SHOWN_CHARS."""
    text = json.dumps(value, indent=2, ensure_ascii=False, default=str)
    if len(text) > RESULT_SHOWN_CHARS:
        return text[:RESULT_SHOWN_CHARS] + "\n… (cut; fetch the task through the API for all)"
    return text


def duration(start: float | None, end: float | None) -> str:
    if start is None or end is None:
        return "—"
    seconds = end - start
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.1f} s"


@dataclass(frozen=True)
class DiskCard:
    """One filesystem on the Models page: what it holds and how full it is."""

    key: str
    label: str
    path: str
    free: int
    total: int
    used_pct: float


def disk_cards(disk: Mapping[str, Any]) -> list[DiskCard]:
    """The models directory's filesystem, and the Hugging Face cache's when it is another."""

    def card(key: str, label: str, usage: Mapping[str, Any]) -> DiskCard:
        total = int(usage["total_bytes"])
        used_pct = round(100 * int(usage["used_bytes"]) / total, 1) if total else 0.0
        return DiskCard(key, label, str(usage["path"]), int(usage["free_bytes"]), total, used_pct)

    if disk["same_filesystem"]:
        return [card("models", "Models and Hugging Face cache", disk["models_dir"])]
    return [
        card("models", "Models directory", disk["models_dir"]),
        card("hf-cache", "Hugging Face cache", disk["hf_cache"]),
    ]
