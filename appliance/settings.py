"""The appliance's settings, read once from APPLIANCE_* variables by each process's entry point."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from appliance import keys

# a chosen admin key's secret, at the least: the key's id (its 12 hex digits) is no secret
ADMIN_SECRET_MIN_CHARS = 16
# A key may hold this fraction (1/BODY_SHARES) of the bytes of bodies in flight (`api/bodies.py`).
BODY_SHARES = 4


class Settings(BaseSettings):
    """Every tunable of the appliance; each field is documented in the README's table."""

    model_config = SettingsConfigDict(env_prefix="APPLIANCE_", frozen=True, extra="ignore")

    data_dir: Path = Field(Path("./.data"), description="SQLite database, install id, admin key.")
    models_dir: Path = Field(Path("./models"), description="Model files as the builder sees them.")
    models_host_dir: Path | None = Field(
        None, description="The models directory as the Docker Engine sees it (default: models_dir)."
    )
    models_volume: str | None = Field(
        None, description="Named volume holding the models (compose); replaces the bind mount."
    )
    hf_cache_dir: Path | None = Field(
        None,
        description="The Hugging Face cache as the appliance's processes see it: weights are "
        "downloaded into it before a vLLM replica starts (default: `hf-cache` in the data dir).",
    )
    hf_cache_volume: str | None = Field(
        None,
        description="Named volume holding the Hugging Face cache (compose), mounted into vLLM "
        "replicas; unset, replicas bind the cache directory.",
    )
    hf_token: str | None = Field(None, description="Hugging Face token for gated models.")
    hf_endpoint: str | None = Field(
        None,
        description="The Hugging Face hub weights are downloaded from (a mirror); unset: "
        "`HF_ENDPOINT`, else huggingface.co.",
    )
    hf_download_weights: bool = Field(
        True,
        description="Download a vLLM endpoint's Hugging Face weights into the cache before its "
        "replicas start (with progress; they then run with the hub offline); off, each replica "
        "fetches them itself.",
    )
    hf_cache_max_bytes: int | None = Field(
        None,
        ge=0,
        description="Most bytes the Hugging Face cache may hold; a download that would pass it "
        "is refused before it starts (unset: the disk's free space less its reserve, "
        "APPLIANCE_DISK_RESERVE_BYTES, is the limit).",
    )
    redis_url: str | None = Field(
        None, description="Redis URL; unset with `appliance up` starts a private redis-server."
    )
    docker_host: str | None = Field(None, description="Docker Engine URL (default: DOCKER_HOST).")
    replica_network: str | None = Field(
        None,
        description="Docker network replicas join and are reached on by name (compose: one of "
        "their own, which Redis is not on); unset publishes replica ports on 127.0.0.1.",
    )
    host: str = Field("127.0.0.1", description="Address the api listens on.")
    port: int = Field(8000, ge=1, le=65535, description="Port the api listens on.")
    log_level: str = Field("INFO", description="Log level of every role.")
    gpu_inventory_file: Path | None = Field(
        None, description="JSON GPU inventory used instead of NVML (tests, GPU-less hosts)."
    )
    vllm_image: str = Field(
        "vllm/vllm-openai:v0.32.0", description="Default vLLM image (GPU replicas)."
    )
    vllm_cpu_image: str = Field(
        "public.ecr.aws/q9t5s3a7/vllm-cpu-release-repo:v0.32.0",
        description="Default vLLM image for replicas without GPUs (`gpus: 0`): vLLM's CPU build.",
    )
    llamacpp_image: str = Field(
        "ghcr.io/ggml-org/llama.cpp:server", description="Default llama.cpp image (CPU)."
    )
    llamacpp_cuda_image: str = Field(
        "ghcr.io/ggml-org/llama.cpp:server-cuda", description="Default llama.cpp image (GPU)."
    )
    approved_images: list[str] = Field(
        default_factory=list,
        description="Images an admin approved for the custom framework and image overrides.",
    )
    gpu_agent_image: str | None = Field(
        None,
        description="Image of the GPU agent the builder starts with the box's GPUs to read "
        "NVML (compose: the appliance's own image); unset, the builder reads NVML itself.",
    )
    gpu_agent_network: str | None = Field(
        None,
        description="Docker network the GPU agent joins to reach Redis (compose: the "
        "appliance's own, which replicas do not join); unset: the replicas' network.",
    )
    docker_gpu_runtime: bool = Field(
        True, description="Request GPUs from the NVIDIA container runtime for GPU replicas."
    )
    replica_memory_bytes: int | None = Field(
        None,
        ge=128 * 2**20,
        description="Memory the limits of replicas without GPUs (each endpoint's `memory`) may "
        "add up to; a replica that would pass it waits for memory. Unset: what the Docker "
        "Engine reports, less 10% (at least 1 GiB, at most half) for the appliance and the OS.",
    )
    reconcile_interval_s: float = Field(
        2.0, gt=0, description="Builder tick when nothing nudges it."
    )
    routing_refresh_s: float = Field(
        2.0, gt=0, description="How often the api re-reads the routes."
    )
    activation_timeout_s: float = Field(
        120.0, ge=0, description="How long a request waits for a ready replica before a 503."
    )
    max_body_bytes: int = Field(
        16 * 1024 * 1024, ge=1, description="Largest request body accepted."
    )
    max_body_bytes_in_flight: int = Field(
        2**30,
        ge=8 * 2**20,
        le=2**40,
        description="Bytes of request bodies that one api process holds at once (bodies over 64 "
        "KiB count, from their head until their request ends: an inference body while its call "
        "waits for a replica and is relayed, a management route's or UI form's until it is "
        "read; uploads stream to disk and do not); one key (or, where no key is asked, one "
        "client address) may hold a quarter of it (429 past that: 16 bodies of 16 MiB, 256 of "
        "1 MiB), and past the whole a body is refused 503 with Retry-After. At least 4 times "
        "APPLIANCE_MAX_BODY_BYTES (and 8 MiB: a management body may be 2 MiB), so every body a "
        "key may send fits its share.",
    )
    disk_reserve_bytes: int = Field(
        2 * 2**30,
        ge=0,
        le=2**50,
        description="Free space uploads (model files, batch files), async tasks and batches "
        "(rows of the database holding their requests, then their results) and Hugging Face "
        "downloads leave on their disk: one that would leave less is refused (507; a download "
        "or a task's result fails saying so), so no request fills the disk the database, logs "
        "and models share.",
    )
    model_upload_max_bytes: int = Field(
        128 * 2**30,
        ge=1,
        le=2**50,
        description="Largest model file an upload (`PUT /v1/storage/model-files/{name}`, the "
        "UI's Models page) may send; a larger one is refused with 413 and leaves nothing behind.",
    )
    upstream_timeout_s: float = Field(
        600.0,
        gt=0,
        description="Longest a replica may stay silent (before its reply, or between stream "
        "chunks) before the request ends with 504; an endpoint's `timeout_seconds` overrides it.",
    )
    api_workers: int = Field(
        1,
        ge=1,
        le=64,
        description="api processes sharing the port; one carries about 20-35k small requests/s "
        "on the 2-core benchmark VM (`bench/RESULTS.md`). Requests in flight are counted "
        "across all of them.",
    )
    fast_lane: bool = Field(
        True,
        description="Carry inference requests on the api's fast lane (its own HTTP/1.1 "
        "protocol, no ASGI cycle); off, uvicorn's ASGI carries them. Both answer the same.",
    )
    replica_max_concurrency: int = Field(
        256, ge=1, description="Requests the api sends one replica at once; more wait briefly."
    )
    queue_wait_s: float = Field(
        5.0, ge=0, description="How long a request waits for a replica under its cap before 503."
    )
    stream_keepalive_s: float = Field(
        5.0, gt=0, description="SSE keep-alive comment interval while a stream waits for a replica."
    )
    key_requests_per_minute: int = Field(
        0, ge=0, description="Default requests per minute per API key (0: no limit)."
    )
    key_max_concurrent_requests: int = Field(
        0, ge=0, description="Default concurrent inference requests per API key (0: no limit)."
    )
    key_max_management_requests: int = Field(
        8,
        ge=0,
        description="Management requests (all but inference and async tasks) one API key has "
        "in flight at once in each api process; one more is answered 429 (0: no limit).",
    )
    header_timeout_s: float = Field(
        10.0,
        gt=0,
        le=3600,
        description="A request's head must arrive within this from its first byte, and its "
        "body bring at least 16 KiB (or its rest) in each such interval, or it is answered 408 "
        "and its connection closed; an idle connection is closed after uvicorn's 5 s keep-alive.",
    )
    max_connections: int = Field(
        4096, ge=16, le=1_000_000, description="Connections the api holds at most; more are closed."
    )
    max_connections_per_address: int = Field(
        512,
        ge=0,
        le=1_000_000,
        description="Connections the api holds at most from one client address (0: no limit); "
        "one more is answered 429 and closed, so no one address holds every connection. Behind "
        "a proxy every client shares its address: raise it there.",
    )
    forwarded_allow_ips: list[str] = Field(
        default_factory=lambda: ["127.0.0.1", "::1"],
        description="Addresses of reverse proxies whose X-Forwarded-For and X-Forwarded-Proto "
        "the api believes (`*`: any): set it to a TLS proxy's address so the UI's session cookie "
        "is Secure and the audit log names each client, not the proxy.",
    )
    max_head_bytes: int = Field(
        64 * 1024,
        ge=16 * 1024,
        le=1024 * 1024,
        description="Longest request head (request line and headers) the api reads; a longer one "
        "is answered 431 and its connection closed.",
    )
    inflight_lease_s: float = Field(
        15.0,
        gt=0,
        le=3600,
        description="A request in flight holds its key's concurrency slot on a lease its api "
        "process renews; a slot of a process that died is free again after this long.",
    )
    key_max_queued_tasks: int = Field(
        0, ge=0, description="Default queued async tasks per API key (0: no limit)."
    )
    key_max_tokens_per_request: int = Field(
        0, ge=0, description="Default largest max_tokens a request may ask for (0: no limit)."
    )
    max_endpoints_per_team: int = Field(
        50,
        ge=0,
        description="Endpoints one team may have (0: no limit); one more is refused, saying "
        "so. Endpoints an administrator made for the team count too, but an administrator's "
        "own creates are never refused.",
    )
    max_keys_per_team: int = Field(
        100,
        ge=0,
        description="Active (neither revoked nor expired) API keys one team may have (0: no "
        "limit); as for endpoints, an administrator's keys count and an administrator is never "
        "refused.",
    )
    max_downloads_per_team: int = Field(
        8,
        ge=0,
        le=10_000,
        description="Hugging Face downloads ahead of time (`/v1/storage/hf-downloads`) one team "
        "may have pending or under way at once (0: no limit); each runs a download of its own "
        "in the builder. An administrator is never refused.",
    )
    max_queued_tasks_per_team: int = Field(
        100_000,
        ge=0,
        le=10_000_000,
        description="Async tasks and batch requests one team may have waiting or running, "
        "whichever keys sent them (0: no limit); one more is a 429 until some have finished, "
        "a batch larger than it a 400 saying to split it. Each holds its request in the "
        "database and a job in Redis. An administrator is never refused.",
    )
    max_task_bytes_per_team: int = Field(
        10 * 2**30,
        ge=0,
        le=2**50,
        description="Bytes of requests one team's async tasks and batch requests may hold in the "
        "database (0: no limit), from when they are sent until their results expire "
        "(APPLIANCE_TASK_RESULT_TTL_S); one more is a 429 until older ones have expired, a batch "
        "holding more than it a 400 saying to split it. An administrator is never refused.",
    )
    max_model_bytes_per_team: int = Field(
        256 * 2**30,
        ge=0,
        le=2**50,
        description="Bytes of model files one team may upload into the models directory "
        "(`PUT /v1/storage/model-files/{name}`, the UI's Models page) and keep there (0: no "
        "limit); an upload that would pass it is refused (409) until an administrator deletes "
        "some of the team's. An administrator is never refused.",
    )
    max_file_bytes_per_team: int = Field(
        10 * 2**30,
        ge=0,
        le=2**50,
        description="Bytes of files (`/v1/files`: uploads, and batches' output and error files) "
        "one team may keep (0: no limit), each file counting at least 4 KiB; an upload that "
        "would pass it is refused (409) until the team deletes files. A batch's output is "
        "written whatever its team keeps. An administrator is never refused.",
    )
    cors_origins: list[str] = Field(
        default_factory=list,
        description="Origins whose pages may call the API from a browser (JSON list); none by "
        "default.",
    )
    admin_key: str | None = Field(
        None,
        description="Admin API key to install on first start instead of a random one; shaped "
        f"like every key: `{keys.SHAPE}` (no `_` in the secret, which has at least "
        f"{ADMIN_SECRET_MIN_CHARS} characters).",
    )
    worker_concurrency: int = Field(
        64,
        ge=1,
        description=(
            "Async tasks one worker process runs at once (requests in flight); of one endpoint "
            "no more than its ready replicas run at once (llama.cpp: per_worker each)."
        ),
    )
    task_result_ttl_s: float = Field(
        86400.0, description="How long a finished async task and its result are kept."
    )
    task_result_max_bytes: int = Field(
        64 * 2**20,
        ge=2**20,
        le=2**31,
        description="Longest reply an async task or batch request keeps: the worker gathers "
        "a reply whole before it stores it, so a longer one ends its task FAILURE, saying so.",
    )
    task_lease_s: float = Field(
        30.0,
        description="A running task whose worker stopped renewing its lease this long is "
        "re-enqueued by the sweeper.",
    )
    task_max_attempts: int = Field(
        5, ge=1, description="Runs of an async task (failed replicas, lost workers) before FAILURE."
    )
    sweep_interval_s: float = Field(
        5.0,
        description="How often the worker's sweeper re-enqueues lost tasks, finishes "
        "batches, publishes backlogs and drops expired results.",
    )
    callback_allowed_hosts: list[str] = Field(
        default_factory=list,
        description="Callback hosts (`host` or `host:port`) allowed even on loopback or private "
        "addresses; admin only, e.g. a receiver on the local network.",
    )
    callback_max_attempts: int = Field(6, ge=1, description="Deliveries tried per callback.")
    callback_timeout_s: float = Field(10.0, gt=0, description="Timeout of one callback delivery.")
    audit_retention_days: int = Field(
        365,
        ge=1,
        le=36500,
        description="Days the audit log keeps an entry; the worker's sweeper deletes older ones.",
    )
    audit_max_entries_per_team: int = Field(
        100000,
        ge=0,
        description="Audit entries the log keeps of one team (0: no limit); past it the worker's "
        "sweeper deletes the team's oldest, hourly, its sign-ins and sign-outs before its other "
        "actions and its key creations, changes and revocations after them, so no team's keys "
        "grow the database without bound. An administrator's entries are kept for the whole "
        "retention.",
    )

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        level = value.upper()
        if level not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
            raise ValueError("log_level must be DEBUG, INFO, WARNING or ERROR")
        return level

    @field_validator("hf_endpoint")
    @classmethod
    def _hub_url(cls, value: str | None) -> str | None:
        """Blank (compose passes it through empty) is unset; a URL must say its scheme."""
        if not value or not value.strip():
            return None
        if not value.startswith(("http://", "https://")):
            raise ValueError("hf_endpoint must be an http:// or https:// URL")
        return value.strip().rstrip("/")

    @field_validator("admin_key")
    @classmethod
    def _key_shaped(cls, value: str | None) -> str | None:
        """Blank (compose passes it through empty) is unset; a bad one is refused here, before
        any role starts, rather than by the api once the others run."""
        if not value:
            return None
        if keys.split(value) is None:
            raise ValueError(f"an API key looks like {keys.SHAPE}")
        if len(value.rsplit("_", 1)[1]) < ADMIN_SECRET_MIN_CHARS:
            raise ValueError(
                f"the admin key's secret (after its last `_`) needs at least "
                f"{ADMIN_SECRET_MIN_CHARS} characters; a key the appliance makes has 32"
            )
        return value

    @field_validator("max_body_bytes_in_flight")
    @classmethod
    def _bodies_fit(cls, value: int, info: ValidationInfo) -> int:
        """A body under APPLIANCE_MAX_BODY_BYTES must fit a key's share of the bodies in flight,
        or it would be refused however long its sender waited."""
        largest = info.data.get("max_body_bytes")
        if isinstance(largest, int) and value < BODY_SHARES * largest:
            raise ValueError(
                f"must be at least {BODY_SHARES} times APPLIANCE_MAX_BODY_BYTES "
                f"({BODY_SHARES * largest}): a key may hold 1/{BODY_SHARES} of it, and its "
                "largest body must fit"
            )
        return value

    @property
    def database_path(self) -> Path:
        return self.data_dir / "appliance.db"

    @property
    def hf_cache_path(self) -> Path:
        """The Hugging Face cache directory (`hub/` inside holds the snapshots)."""
        return self.hf_cache_dir or self.data_dir / "hf-cache"

    @property
    def models_source_dir(self) -> Path:
        """The models directory as the Docker Engine resolves bind mounts."""
        return self.models_host_dir or self.models_dir


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, read once; bad values fail here, at start."""
    return Settings()


def settings_table() -> str:
    """The README's configuration table, made from the fields above (`appliance settings`)."""
    rows = ["| variable | default | meaning |", "| --- | --- | --- |"]
    for name, field in Settings.model_fields.items():
        default = field.default_factory() if field.default_factory else field.default  # type: ignore[call-arg]
        shown = "unset" if default is None else f"`{default}`"
        text = (field.description or "").replace("|", "\\|")
        rows.append(f"| `APPLIANCE_{name.upper()}` | {shown} | {text} |")
    return "\n".join(rows)
