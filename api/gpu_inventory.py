"""Each GPU of the box as the builder last read it, and which replicas hold it: for
`GET /v1/gpus` and the UI's GPU page."""

from __future__ import annotations

import json
from typing import Any

from sqlmodel import Session

from api.deps import AppState
from appliance import bus, queries
from appliance.keys import Caller
from appliance.models import ReplicaState


def inventory(caller: Caller, session: Session, state: AppState) -> dict[str, Any]:
    """The GPUs as the builder last reported them, each with the replicas that hold it
    (named only to the team that owns them)."""
    raw = state.redis.get(bus.GPUS_KEY)
    inventory: dict[str, Any] = (
        json.loads(raw)
        if raw
        else {"gpus": [], "message": "the builder has not reported the GPUs yet"}
    )
    endpoints = {e.id: e for e in queries.all_endpoints(session=session)}
    holders: dict[int, list[dict[str, Any]]] = {}
    for replica in queries.all_replicas(session=session):
        if replica.state == ReplicaState.FAILED:
            continue
        endpoint = endpoints.get(replica.endpoint_id)
        mine = endpoint is not None and caller.owns(endpoint.owner)
        for index in replica.gpus:
            holders.setdefault(index, []).append(
                {
                    "replica_id": replica.id if mine else None,
                    "endpoint_name": endpoint.name if mine and endpoint else None,
                    "fraction": replica.gpu_fraction,
                    "state": replica.state,
                }
            )
    gpus = []
    for gpu in inventory.get("gpus", []):
        held = holders.get(int(gpu["index"]), [])
        gpus.append(
            {
                **gpu,
                "claimed_fraction": round(sum(h["fraction"] for h in held), 3),
                "replicas": held,
            }
        )
    return {
        "gpus": gpus,
        "message": inventory.get("message", ""),
        "driver_version": inventory.get("driver_version"),
    }
