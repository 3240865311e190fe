"""What an edit changed in an endpoint's spec: the spec columns before and after, as the audit
log records them and as the endpoint's events timeline says them in words. Used by the
endpoint routes (`api/routes/llm_endpoints.py`) and the declared configuration's apply
(`api/declared.py`), so an edit that changes nothing records nothing.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from api.endpoint_specs import CONTAINER_COLUMNS
from api.endpoint_views import memory_quantity
from appliance.models import Endpoint

# The columns the api writes (DESIGN.md §4): an endpoint's spec; the rest is the builder's.
SPEC_COLUMNS = (
    "owner",
    "framework",
    *CONTAINER_COLUMNS,  # those a replica's container is built from
    "min_replicas",
    "max_replicas",
    "target_concurrency",
    "endpoint_type",
    "idle_timeout_s",
    "scale_down_window_s",
    "startup_timeout_s",
    "priority",
    "public_inference",
    "labels",
    "extra",
)
LABELS = {
    "min_replicas": "min replicas",
    "max_replicas": "max replicas",
    "target_concurrency": "requests per replica",
    "memory_bytes": "memory",
    "idle_timeout_s": "idle timeout",
    "scale_down_window_s": "scale-down window",
    "startup_timeout_s": "startup timeout",
    "public_inference": "public",
    "health_route": "health route",
    "gpu_memory_fraction": "GPU memory fraction",
    "extra": "settings",
    "owner": "team",
}
SUMMARY_CHARS = 300
Change = dict[str, list[Any]]  # column -> [before, after]


def spec(endpoint: Endpoint) -> dict[str, Any]:
    """A copy of the endpoint's spec columns (JSON columns copied, not shared)."""
    return {name: copy.deepcopy(getattr(endpoint, name)) for name in SPEC_COLUMNS}


def changes(before: Mapping[str, Any], after: Mapping[str, Any]) -> Change:
    return {
        name: [before[name], after[name]] for name in SPEC_COLUMNS if before[name] != after[name]
    }


def summary(change: Change) -> str:
    """The change in words: scalars as `before -> after` (memory in Kubernetes' units, as
    sent), maps by the keys that changed and lists by name, never their values (env values
    may be secrets)."""
    parts = []
    for name, (before, after) in change.items():
        label = LABELS.get(name, name)
        if isinstance(before, dict) and isinstance(after, dict):
            keys = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
            parts.append(f"{label} changed ({', '.join(keys)})" if keys else f"{label} changed")
        elif isinstance(before, dict | list) or isinstance(after, dict | list):
            parts.append(f"{label} changed")
        else:
            parts.append(f"{label} {_shown(name, before)} → {_shown(name, after)}")
    text = ", ".join(parts)
    return text if len(text) <= SUMMARY_CHARS else text[: SUMMARY_CHARS - 1] + "…"


def _shown(name: str, value: Any) -> str:
    if name == "memory_bytes" and isinstance(value, int):  # as a create names it: 3Gi
        return str(memory_quantity(value))
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)
