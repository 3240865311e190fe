"""What the data plane knows of endpoints and their ready replicas: the routing table every
request looks its endpoint up in (`forwarder/refresh.load_table` reads it from SQLite), and the
rule of which endpoints get no replica by waiting (`check_coming`), which the admission
(`api/inference/admission.py`, `api/inference/call.py`) and the wait for a replica
(`forwarder/proxy.Forwarder.acquire`) both apply.

Compiled with the fast lane (`setup.py`): these are native classes there, whose fields the
lane reads on every request as plain struct reads rather than instance dictionary lookups.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from appliance.errors import EndpointDownError
from appliance.models import EndpointStatus

DEFAULT_HEALTH_ROUTE = "/health"
DEFAULT_PREDICT_ROUTE = "/predict"
FAILED: Final = EndpointStatus.UPDATE_FAILED.value  # the builder gave up: no replica comes
DELETING: Final = EndpointStatus.DELETE_IN_PROGRESS.value  # its replicas are being drained
REASON_MAX_CHARS: Final = 300  # of the status reason's first line, in an error message
CAUSE_LINES: Final = 2  # of a crashed replica's log tail that name its error, in that message
CAUSE_LINE_MAX_CHARS: Final = 200
# A log line that names an error: Python's `OSError: ...` (dotted names too); else `error:
# ...` or `ERROR ...` (llama.cpp, vLLM's logger), `llama_model_load: error loading model: ...`
_RAISED: Final = re.compile(r"^[A-Za-z_][\w.]*(?:Error|Exception)(?::|$)")
_ERROR: Final = re.compile(r"^(?:error|ERROR)\b|^\w+: error\b")
_POINTER: Final = re.compile(r"root cause above|see (?:the )?(?:error|log)s? above", re.I)
# llama.cpp's server leads each line with its time and level: `0.00.010.760 E llama_model_load:`
_STAMPED: Final = re.compile(r"^\d+(?:\.\d+){3} [DIWE] ")


@dataclass(frozen=True)
class TargetReplica:
    id: str
    address: str


@dataclass(frozen=True)
class Target:
    """What the data plane needs to know about one endpoint."""

    endpoint_id: str
    name: str
    owner: str
    public: bool
    framework: str
    endpoint_type: str
    status: str
    replicas: tuple[TargetReplica, ...]
    health_route: str = DEFAULT_HEALTH_ROUTE
    predict_route: str = DEFAULT_PREDICT_ROUTE
    timeout_s: float | None = None  # per-endpoint upstream timeout; None: the api's setting
    max_concurrency: int | None = None  # per-replica cap; None: the api's setting
    status_reason: str = ""  # why it has the status (the builder's words); "" when none
    created_at: float = 0.0  # when the endpoint was made (Unix seconds): OpenAI's `created`
    max_replicas: int = 1  # its max_workers: 0 runs no replica, so none comes by waiting


@dataclass(frozen=True)
class RoutingTable:
    by_name: dict[str, Target]
    by_id: dict[str, Target]

    @classmethod
    def empty(cls) -> RoutingTable:
        return cls({}, {})


def check_coming(target: Target, owner: bool = True) -> None:
    """EndpointDownError when `target` has no ready replica and will get none by waiting: the
    builder gave up starting it (UPDATE_FAILED: a pull failed, its replica crash-looped), it
    is being deleted, or its max_workers is 0 (it runs no replica at all). Any other endpoint
    without one (READY scaled to zero, a first deploy UPDATE_PENDING or UPDATE_IN_PROGRESS)
    is worth waiting for; one with ready replicas is served whatever its status (a failed
    rolling update keeps the old generation). `owner`:
    the caller may change the endpoint; another team calling a public one is told no more
    than that it failed (its reasons and id are the owner's)."""
    if target.replicas:
        return
    if target.status == FAILED:
        if not owner:
            raise EndpointDownError(
                f"endpoint {target.name!r} failed to start; its owner must fix or restart it"
            )
        raise EndpointDownError(failed_message(target))
    if target.status == DELETING:
        raise EndpointDownError(f"endpoint {target.name!r} is being deleted")
    if target.max_replicas == 0:
        fix = (
            f"raise it (PUT /v1/model-endpoints/{target.endpoint_id})"
            if owner
            else "its owner must raise it"
        )
        raise EndpointDownError(
            f"endpoint {target.name!r} runs no replica: its max_workers is 0; {fix}"
        )


def failed_message(target: Target) -> str:
    """What a request to an endpoint that failed to start is told: why (the first line of the
    builder's reason, and from the log tail after it the lines that name the cause: a crash's
    last line is often only "container exited with code 1") and what to do."""
    lines = target.status_reason.strip().split("\n")
    reason = _clip(lines[0].strip(), REASON_MAX_CHARS)
    cause = "; ".join(_clip(line, CAUSE_LINE_MAX_CHARS) for line in telling_lines(lines[1:]))
    why = f": {reason}" if reason else ""
    if cause:
        why += f" ({cause})"
    where = f"/v1/model-endpoints/{target.endpoint_id}"
    return (
        f"endpoint {target.name!r} failed to start{why}; fix it (PUT {where}) or restart it "
        f"(POST {where}/restart)"
    )


def waiting_message(target: Target, waited_s: float, owner: bool = True) -> str:
    """What a request that waited its whole hold for a replica is told: why none is ready when
    the builder says (waiting for memory or a GPU, pulling its image, starting: its last log
    line), so that a wait a retry will not end soon reads as one. `owner`: as `check_coming`,
    another team calling a public endpoint is told no reason (its log is the owner's)."""
    reason = _clip(target.status_reason.strip().split("\n", 1)[0].strip(), REASON_MAX_CHARS)
    if not reason or not owner:
        return f"endpoint {target.name!r} has no ready replica yet; retry shortly"
    return f"endpoint {target.name!r} has no ready replica after {waited_s:.0f} s: {reason}"


def telling_lines(lines: list[str]) -> list[str]:
    """The lines of a log tail that name its error, the last CAUSE_LINES of them: Python's
    exceptions (`OSError: We couldn't connect to ...`) first, else error lines (llama.cpp's
    `error: failed to load model`, `llama_model_load: error loading model: ...`, without the
    time and level its server leads them with); never the ones that only point elsewhere
    ("See root cause above") or any other line (a log tail may hold anything)."""
    kept = [_STAMPED.sub("", line.strip()) for line in lines if not _POINTER.search(line)]
    raised = [line for line in kept if _RAISED.match(line)]
    found = raised or [line for line in kept if _ERROR.match(line)]
    return list(dict.fromkeys(found))[-CAUSE_LINES:]


def _clip(text: str, most: int) -> str:
    return text if len(text) <= most else text[: most - 3] + "..."
