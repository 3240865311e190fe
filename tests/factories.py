"""Factories for rows the pure-policy tests build by hand; every field can be overridden."""

from __future__ import annotations

from appliance.models import Endpoint, EndpointStatus


def make_endpoint(**overrides: object) -> Endpoint:
    """A vLLM endpoint row with plain defaults: one replica, READY-bound, created long ago."""
    fields: dict[str, object] = {
        "id": "end_a",
        "name": "a",
        "owner": "t",
        "created_by": "u",
        "framework": "vllm",
        "model": "o/m",
        "endpoint_type": "streaming",
        "gpus": 1,
        "min_replicas": 1,
        "max_replicas": 2,
        "desired_replicas": 1,
        "target_concurrency": 4,
        "status": EndpointStatus.UPDATE_IN_PROGRESS,
        "generation": 1,
        "created_at": 0.0,
        "updated_at": 0.0,
    }
    fields.update(overrides)
    return Endpoint(**fields)
