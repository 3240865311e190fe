"""Gathers each endpoint's load for the scaler: the api's numbers from Redis and each ready
replica's own metrics page. Called by the builder's loop once a tick."""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import redis

from appliance import bus
from appliance.install import replica_key
from appliance.models import Replica, ReplicaState
from builder.scale import Load, parse_server_load

METRICS_TIMEOUT_S = 1.0


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _hash(client: redis.Redis, key: str) -> dict[str, float]:
    try:
        raw: Mapping[Any, Any] = client.hgetall(key)
    except redis.RedisError:
        return {}
    return {_text(k): float(v) for k, v in raw.items()}


def scrape(address: str, key: str = "") -> tuple[int, int]:
    """(running, waiting) from a replica's `/metrics`; (0, 0) when it has none. llama.cpp
    demands the replica's key there too."""
    request = urllib.request.Request(address + "/metrics")  # noqa: S310
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=METRICS_TIMEOUT_S) as reply:  # noqa: S310
            return parse_server_load(reply.read().decode("utf-8", "replace"))
    except (urllib.error.URLError, OSError, ValueError):
        return (0, 0)


def gather(
    client: redis.Redis,
    replicas: Sequence[Replica],
    inflight: Mapping[str, int],
    pool: ThreadPoolExecutor,
    key_secret: bytes = b"",
) -> dict[str, Load]:
    """Load per endpoint id; each replica's metrics are asked for with its own key."""
    ready = [r for r in replicas if r.state == ReplicaState.READY and r.address]
    served = dict(
        zip(
            (r.id for r in ready),
            pool.map(lambda r: scrape(str(r.address), replica_key(key_secret, r.id)), ready),
            strict=True,
        )
    )
    demand = _hash(client, bus.DEMAND_KEY)
    last = _hash(client, bus.LAST_REQUEST_KEY)
    backlog = _hash(client, bus.BACKLOG_KEY)
    endpoint_ids = {r.endpoint_id for r in replicas} | set(demand) | set(last) | set(backlog)
    loads = {}
    for endpoint_id in endpoint_ids:
        mine = [r for r in replicas if r.endpoint_id == endpoint_id]
        loads[endpoint_id] = Load(
            inflight=sum(inflight.get(r.id, 0) for r in mine),
            server_running=sum(served.get(r.id, (0, 0))[0] for r in mine),
            server_waiting=sum(served.get(r.id, (0, 0))[1] for r in mine),
            backlog=int(backlog.get(endpoint_id, 0)),
            demand_at=demand.get(endpoint_id),
            last_request_at=last.get(endpoint_id),
        )
    return loads
