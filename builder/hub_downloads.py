"""Hugging Face models downloaded ahead of time, without an endpoint (asked for through
`/v1/storage/hf-downloads`): each tick the builder's loop hands the open requests to a
Preparer of their own, running the same weights jobs an endpoint would wait on, and publishes
each one's state for the api. Called by `builder/loop.py`.

Two downloads of one snapshot (one ahead of time, one for an endpoint) fetch each file once:
huggingface_hub locks each blob of the cache, and the second finds it there.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import redis

from appliance import bus
from appliance.models import Endpoint, EndpointStatus, Framework
from appliance.settings import Settings
from builder.prepare import Failed, Job, Preparer, Readiness, Waiting
from builder.weights import HubModel, hub_job

FINISHED = ("done", "failed")


@dataclass
class HubDownloads:
    """The open requests, and the jobs that answer them."""

    settings: Settings
    redis: redis.Redis
    preparer: Preparer = field(init=False)
    _last: dict[str, dict[str, Any]] = field(default_factory=dict)  # ref -> last progress

    def __post_init__(self) -> None:
        self.preparer = Preparer([self._job])

    def _job(self, endpoint: Endpoint) -> Job:
        """The download asked for. APPLIANCE_HF_DOWNLOAD_WEIGHTS=false leaves an endpoint's
        weights to its replicas; a download asked for by name runs all the same."""
        return hub_job(HubModel(endpoint.model, str(endpoint.args["revision"])), self.settings)

    def tick(self) -> None:
        """Starts what was asked for, publishes how far each request got."""
        requests = _hash(self.redis, bus.HF_DOWNLOADS_KEY)
        states = _hash(self.redis, bus.HF_DOWNLOAD_STATE_KEY)
        open_ = {
            ref: request
            for ref, request in requests.items()
            if not _answered(states.get(ref), request)
        }
        if not open_:
            return
        asked = {ref: as_endpoint(ref, request) for ref, request in open_.items()}
        readiness, _ = self.preparer.poll(list(asked.values()))
        published = {
            ref: json.dumps(self._state(ref, request, readiness.get(asked[ref].id)))
            for ref, request in open_.items()
        }
        self.redis.hset(bus.HF_DOWNLOAD_STATE_KEY, mapping=published)  # type: ignore[arg-type]

    def _state(self, ref: str, request: dict[str, Any], now: Readiness | None) -> dict[str, Any]:
        state: dict[str, Any] = {"requested_at": request["requested_at"], "at": time.time()}
        if isinstance(now, Waiting):
            self._last[ref] = now.progress.to_json()
            return {**state, "state": "downloading", "progress": self._last[ref]}
        if isinstance(now, Failed):
            return {**state, "state": "failed", "message": now.message}
        last = self._last.pop(ref, None)
        if last is not None:  # finished between two ticks: it ended whole
            last = {**last, "done_bytes": last["total_bytes"], "done_parts": last["total_parts"]}
            last["fraction"] = 1.0
        return {**state, "state": "done", "progress": last}


def as_endpoint(ref: str, request: dict[str, Any]) -> Endpoint:
    """A request in the shape the Preparer asks about: a vLLM endpoint of that model that no
    table holds. A new request (a retry) is a new generation, so a failed job runs again."""
    asked_at = float(request["requested_at"])
    return Endpoint(
        id=f"download:{ref}",
        name="download",
        owner=str(request.get("requested_by") or ""),
        created_by="",
        framework=Framework.VLLM,
        model=request["repository"],
        args={"revision": request["revision"]},
        endpoint_type="streaming",
        gpus=0,
        status=EndpointStatus.UPDATE_IN_PROGRESS,
        generation=int(asked_at * 1000) % 2**31,
        created_at=asked_at,
        updated_at=asked_at,
    )


def _answered(state: dict[str, Any] | None, request: dict[str, Any]) -> bool:
    return (
        state is not None
        and state.get("requested_at") == request["requested_at"]
        and state.get("state") in FINISHED
    )


def _hash(client: redis.Redis, key: str) -> dict[str, dict[str, Any]]:
    raw = client.hgetall(key)
    return {(k.decode() if isinstance(k, bytes) else str(k)): json.loads(v) for k, v in raw.items()}
