"""SQLModel tables of the appliance's state (DESIGN.md §4); schema changes go through migrations."""

from __future__ import annotations

import enum
import time
from typing import Any

from sqlalchemy import JSON, Column
from sqlmodel import Field, SQLModel


class EndpointStatus(enum.StrEnum):
    """LLM Engine's endpoint statuses: the state of the record, not of its containers."""

    READY = "READY"
    UPDATE_PENDING = "UPDATE_PENDING"
    UPDATE_IN_PROGRESS = "UPDATE_IN_PROGRESS"
    UPDATE_FAILED = "UPDATE_FAILED"
    DELETE_IN_PROGRESS = "DELETE_IN_PROGRESS"


class Framework(enum.StrEnum):
    VLLM = "vllm"
    LLAMACPP = "llamacpp"
    CUSTOM = "custom"


class EndpointType(enum.StrEnum):
    SYNC = "sync"
    STREAMING = "streaming"
    ASYNC = "async"


class ReplicaState(enum.StrEnum):
    STARTING = "starting"
    READY = "ready"
    UNHEALTHY = "unhealthy"
    STOPPING = "stopping"
    FAILED = "failed"


def _json_column() -> Any:
    return Field(default_factory=dict, sa_column=Column(JSON, nullable=False))


class Endpoint(SQLModel, table=True):
    """A model endpoint: spec columns written by the api, status columns by the builder."""

    __tablename__ = "endpoint"

    id: str = Field(primary_key=True)
    name: str = Field(unique=True, index=True)
    owner: str
    created_by: str
    framework: str
    model: str
    image: str | None = None
    args: dict[str, Any] = _json_column()
    env: dict[str, str] = _json_column()
    command: list[str] | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    port: int | None = None
    health_route: str | None = None
    gpus: int = 0
    gpu_memory_fraction: float | None = None
    cpus: float = 1.0
    memory_bytes: int = 8 * 1024**3
    min_replicas: int = 1
    max_replicas: int = 1
    target_concurrency: int = 4
    endpoint_type: str = EndpointType.STREAMING
    idle_timeout_s: int = 900
    scale_down_window_s: int = 300
    startup_timeout_s: int = 1800
    priority: int = 0
    public_inference: bool = False
    labels: dict[str, str] = _json_column()
    extra: dict[str, Any] = _json_column()
    generation: int = 1
    created_at: float = Field(default_factory=time.time)
    updated_at: float = Field(default_factory=time.time)
    # the last ask for a new generation (an update that rolls its replicas, a restart): with
    # created_at, what keeps an endpoint that scales to zero warm for its idle timeout
    rolled_at: float | None = None
    # Status columns (builder).
    status: str = EndpointStatus.UPDATE_PENDING
    status_reason: str | None = None
    desired_replicas: int = 1
    last_request_at: float | None = None


class Replica(SQLModel, table=True):
    """One container of an endpoint; the builder keeps this table in step with Docker's labels."""

    __tablename__ = "replica"

    id: str = Field(primary_key=True)
    endpoint_id: str = Field(index=True)
    generation: int
    container_id: str | None = None
    container_name: str
    address: str | None = None
    gpus: list[int] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    gpu_fraction: float = 1.0
    state: str = ReplicaState.STARTING
    restarts: int = 0
    last_error: str | None = None
    log_tail: str | None = None
    created_at: float = Field(default_factory=time.time)
    state_since: float = Field(default_factory=time.time)
    ready_at: float | None = None
    accounted_at: float | None = None  # its running time is in the usage table up to here


class Event(SQLModel, table=True):
    """Something that happened to an endpoint, for its timeline."""

    __tablename__ = "event"

    id: int | None = Field(default=None, primary_key=True)
    endpoint_id: str = Field(index=True)
    at: float = Field(default_factory=time.time)
    kind: str
    message: str


class ApiKey(SQLModel, table=True):
    """An API key, stored as an HMAC of the secret and found by its public prefix."""

    __tablename__ = "api_key"

    id: str = Field(primary_key=True)
    prefix: str = Field(unique=True, index=True)
    digest: str
    name: str
    owner: str
    user: str
    scopes: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    is_admin: bool = False
    created_at: float = Field(default_factory=time.time)
    expires_at: float | None = None
    revoked_at: float | None = None
    last_used_at: float | None = None
    # Limits; None means the install's default (APPLIANCE_KEY_* settings), 0 means no limit.
    requests_per_minute: int | None = None
    max_concurrent_requests: int | None = None
    max_queued_tasks: int | None = None
    max_tokens_per_request: int | None = None
    # A key a non-admin made shares its maker's limits and counters: the id of the key they
    # belong to (the maker's own `limits_from` when it has one); None: this key's own.
    limits_from: str | None = None
    # The key a non-admin made this one with: revoking that key revokes this one, and this
    # one expires no later than it. None: made by an administrator (or at install).
    made_by: str | None = None


class TaskStatus(enum.StrEnum):
    """LLM Engine's async task statuses."""

    PENDING = "PENDING"
    STARTED = "STARTED"
    SUCCESS = "SUCCESS"
    FAILURE = "FAILURE"


class Task(SQLModel, table=True):
    """An async request; committed before its job is queued, so Redis losing a job loses none."""

    __tablename__ = "task"

    id: str = Field(primary_key=True)
    endpoint_id: str = Field(index=True)
    owner: str = Field(index=True)
    created_by: str
    status: str = Field(default=TaskStatus.PENDING, index=True)
    payload: dict[str, Any] = _json_column()
    result: Any = Field(default=None, sa_column=Column(JSON, nullable=True))
    traceback: str | None = None
    status_code: int | None = None
    callback_url: str | None = None
    callback_auth: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))
    attempts: int = 0
    priority: int = 0
    batch_id: str | None = Field(default=None, index=True)
    created_at: float = Field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    expires_at: float | None = None
    enqueued_at: float | None = None  # last put on its RQ queue; the sweeper's grace starts here
    key_id: str | None = None  # the key it was sent with, for usage
    bytes: int = 0  # of its stored request (`payload`): what its team's task quota counts


class ModelFile(SQLModel, table=True):
    """A model file uploaded into the models directory, and the team whose upload it was: its
    bytes count against that team's quota (`api/team_limits.py`). A team's upload is the team's
    own (`api/model_files.hidden_from`); one an administrator uploaded (`shared`) is the box's,
    every team's, as are files put there another way (by the operator): those have no row and
    count for no team."""

    __tablename__ = "model_file"

    name: str = Field(primary_key=True)
    owner: str = Field(index=True)
    bytes: int
    shared: bool = False
    uploaded_at: float = Field(default_factory=time.time)


class File(SQLModel, table=True):
    """An uploaded file (OpenAI Files API), kept under the data dir."""

    __tablename__ = "file"

    id: str = Field(primary_key=True)
    owner: str = Field(index=True)
    created_by: str
    purpose: str
    filename: str
    bytes: int
    path: str
    created_at: float = Field(default_factory=time.time)


class Batch(SQLModel, table=True):
    """An OpenAI-style batch of requests run on the async workers at low priority."""

    __tablename__ = "batch"

    id: str = Field(primary_key=True)
    owner: str = Field(index=True)
    created_by: str
    endpoint: str
    input_file_id: str
    output_file_id: str | None = None
    error_file_id: str | None = None
    completion_window: str = "24h"
    status: str = "validating"
    request_counts: dict[str, int] = _json_column()
    metadata_: dict[str, Any] = Field(
        default_factory=dict, sa_column=Column("metadata", JSON, nullable=False)
    )
    errors: Any = Field(default=None, sa_column=Column(JSON, nullable=True))
    created_at: float = Field(default_factory=time.time)
    in_progress_at: float | None = None
    finalizing_at: float | None = None
    completed_at: float | None = None
    failed_at: float | None = None
    cancelling_at: float | None = None
    cancelled_at: float | None = None
    key_id: str | None = None  # the key it was sent with, for usage


class AuditEntry(SQLModel, table=True):
    """One management action: who, when, from where, what changed (never a secret).
    Append-only (a trigger refuses updates); entries older than the retention are deleted."""

    __tablename__ = "audit"

    id: int | None = Field(default=None, primary_key=True)
    at: float = Field(default_factory=time.time, index=True)
    actor: str
    team: str
    actor_key_id: str | None = None
    action: str
    target: str
    change: dict[str, Any] = _json_column()
    address: str | None = None
