"""The scaler's policy: how many replicas an endpoint wants, from its load and `now`.

Pure: the builder's loop gathers the load (the api's in-flight counts, each replica's own
metrics, the async backlog) and calls `decide` for every endpoint on every tick. Up at once,
down only after the endpoint's stable window, to zero after its idle timeout when min is 0.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from appliance.models import Endpoint, EndpointType

DEMAND_WINDOW_S = 60.0  # a request that found no replica this recently keeps one wanted
_SERVER_GAUGES = {
    "vllm:num_requests_running": "running",
    "vllm:num_requests_waiting": "waiting",
    "llamacpp:requests_processing": "running",
    "llamacpp:requests_deferred": "waiting",
}
_SAMPLE = re.compile(r"^([a-zA-Z_:][\w:]*)(\{[^}]*\})?\s+([-+0-9.eEinfNa]+)")

History = tuple[tuple[float, int], ...]


@dataclass(frozen=True)
class Load:
    """What an endpoint is asked to do right now."""

    inflight: int = 0  # requests the api and the workers have in flight to its replicas
    server_running: int = 0  # what its servers report running...
    server_waiting: int = 0  # ...and queued inside them
    backlog: int = 0  # async tasks queued and running
    demand_at: float | None = None  # last time a request found no ready replica
    last_request_at: float | None = None
    evicted_at: float | None = None  # GPUs were taken for a higher priority: activity before
    # this no longer keeps the endpoint warm


@dataclass(frozen=True)
class Decision:
    desired: int
    reason: str | None  # None: keep what it has
    history: History


def parse_server_load(text: str) -> tuple[int, int]:
    """(running, waiting) from a vLLM or llama.cpp `/metrics` page."""
    totals = {"running": 0.0, "waiting": 0.0}
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match and match.group(1) in _SERVER_GAUGES:
            try:
                totals[_SERVER_GAUGES[match.group(1)]] += float(match.group(3))
            except ValueError:
                continue
    return int(totals["running"]), int(totals["waiting"])


def _busy(endpoint: Endpoint, load: Load) -> int:
    if endpoint.endpoint_type == EndpointType.ASYNC:
        return load.backlog
    return max(load.inflight, load.server_running + load.server_waiting) + load.backlog


def decide(endpoint: Endpoint, load: Load, history: History, now: float) -> Decision:
    """The replicas the endpoint wants now, and the history to pass to the next call."""
    target = max(endpoint.target_concurrency, 1)
    busy = _busy(endpoint, load)
    raw = math.ceil(busy / target)
    demanded = load.demand_at is not None and now - load.demand_at < DEMAND_WINDOW_S
    if raw == 0 and (demanded or load.backlog > 0):
        raw = 1
    activity = [
        t
        for t in (load.last_request_at, load.demand_at, endpoint.created_at, endpoint.rolled_at)
        if t is not None and t > (load.evicted_at or 0.0)
    ]
    quiet = not activity or now - max(activity) >= endpoint.idle_timeout_s
    idle = quiet and busy == 0 and not demanded
    floor = endpoint.min_replicas if idle else max(endpoint.min_replicas, 1)
    raw = max(endpoint.min_replicas, min(max(raw, floor), endpoint.max_replicas))
    if idle:  # the idle timeout is the window for going to the minimum
        kept: History = ((now, raw),)
        wanted = raw
    else:
        window = endpoint.scale_down_window_s
        kept = (*((t, n) for t, n in history if now - t < window), (now, raw))
        wanted = max(n for _, n in kept)
    current = endpoint.desired_replicas
    if wanted == current:
        return Decision(current, None, kept)
    if wanted > current:
        why = _why_up(endpoint, load, busy, target, demanded, wanted)
    elif idle:
        why = f"idle for {endpoint.idle_timeout_s} s"
    else:
        why = f"load {busy} for {endpoint.scale_down_window_s} s"
    return Decision(wanted, f"scaled from {current} to {wanted}: {why}", kept)


def _why_up(
    endpoint: Endpoint, load: Load, busy: int, target: int, demanded: bool, wanted: int
) -> str:
    """Why the endpoint wants more replicas, in its events: load, a request waiting, its
    minimum, or activity within its idle timeout (a create, a roll, a recent request)."""
    if busy:
        return f"load {busy} for a target of {target} per replica"
    if demanded:
        return "a request is waiting for a replica"
    if wanted <= endpoint.min_replicas:
        return f"its minimum is {endpoint.min_replicas}"
    latest = max(
        (t, what)
        for t, what in (
            (load.last_request_at, "a request"),
            (endpoint.created_at, "its creation"),
            (endpoint.rolled_at, "a new generation (an update or a restart)"),
        )
        if t is not None
    )
    return f"kept warm for its idle timeout ({endpoint.idle_timeout_s} s) after {latest[1]}"
