"""Container specs per framework (vllm, llamacpp, custom): what the builder asks Docker for.

Called by the reconciler when it creates a replica, and by the api to validate a spec early.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import astuple, dataclass, field
from typing import Literal

from appliance.install import replica_key
from appliance.models import Endpoint, Framework
from appliance.settings import Settings
from builder.frameworks import LLAMACPP_FLAGS, VLLM_FLAGS, flag_values

MODELS_MOUNT = "/models"
HF_CACHE_MOUNT = "/root/.cache/huggingface"
HF_TOKEN_FILE = "/root/.hf-token"  # noqa: S105 - a path: a replica's own, outside the cache
HF_MODULES_DIR = "/root/.hf-modules"  # transformers' copies of a model's code, its own
BUILDER_ENV = frozenset({"HF_MODULES_CACHE", "HF_TOKEN_PATH"})  # set by the builder alone
VLLM_PORT = 8000
LLAMACPP_PORT = 8080
CUSTOM_PORT = 8080
VLLM_SHM_BYTES = 8 * 1024**3
DEFAULT_SHM_BYTES = 256 * 1024**2
PIDS_LIMIT = 4096
LOG_MAX_SIZE = "10m"
LOG_MAX_FILES = "3"

LABEL_PREFIX = "appliance."
LABEL_INSTALL = "appliance.install"
LABEL_ENDPOINT = "appliance.endpoint"
LABEL_REPLICA = "appliance.replica"
LABEL_GENERATION = "appliance.generation"
LABEL_SPEC_HASH = "appliance.spec-hash"
LABEL_GPUS = "appliance.gpus"
LABEL_GPU_FRACTION = "appliance.gpu-fraction"
LABEL_NETWORK = "appliance.network"  # the network the replica joined ("": ports published)
LABEL_ROLE = "appliance.role"  # a container of the appliance's own that is not a replica
# How the replica's API key was made: "per-replica" (`appliance/install.replica_key`). A vLLM or
# llama.cpp container without it was started by an older version with one key for the whole
# install, which the api no longer sends: the planner replaces it (`builder/reconcile.py`).
LABEL_REPLICA_KEY = "appliance.replica-key"
REPLICA_KEY_SCHEME = "per-replica"
# vLLM on CPU sizes its KV cache from the host's free memory, not the container's limit: a
# CPU replica gets this share of its memory limit instead (VLLM_CPU_KVCACHE_SPACE, GiB), unless
# its env says otherwise.
VLLM_CPU_KV_CACHE_SHARE = 0.25
# ...and by default it pins its compute threads to the first cores it sees, which are the same
# in every container (each sees all the host's cores): two replicas (a rolling update, a second
# replica under load, another endpoint) would share one core and leave the rest idle. Unpinned,
# the kernel spreads them within each container's CPU limit.
VLLM_CPU_THREADS_BIND = "nobind"
# ...and it starts as many compute threads as the host has cores, whatever the container's CPU
# limit (so does llama-server): a replica of `cpus: 4` on a 32-core host would run 32 threads
# on 4 cores' worth of time, each step waiting on the ones the limit throttled. One thread per
# whole CPU it has.


def box_share(cpus: float) -> float:
    """The CPUs a container gets: what the endpoint asks, at most the host's."""
    return min(cpus, os.cpu_count() or 1)


def compute_threads(cpus: float) -> int:
    return max(1, int(box_share(cpus)))


@dataclass(frozen=True)
class Mount:
    """A read-only bind of a models path, or a named volume."""

    source: str
    target: str
    read_only: bool = True
    kind: Literal["bind", "volume"] = "bind"


@dataclass(frozen=True)
class ContainerSpec:
    """Everything the Docker adapter needs to create one replica; no user-supplied Docker field."""

    name: str
    image: str
    command: tuple[str, ...]
    entrypoint: tuple[str, ...] | None
    env: dict[str, str]
    port: int
    health_route: str
    mounts: tuple[Mount, ...]
    labels: dict[str, str]
    gpu_ids: tuple[int, ...]
    request_gpus: bool
    nano_cpus: int
    memory_bytes: int
    shm_bytes: int
    network: str | None
    files: dict[str, bytes] = field(default_factory=dict)  # written before start; not in inspect
    pids_limit: int = PIDS_LIMIT
    log_options: dict[str, str] = field(
        default_factory=lambda: {"max-size": LOG_MAX_SIZE, "max-file": LOG_MAX_FILES}
    )


def is_local_model(model: str) -> bool:
    """Local models are stored by their path inside the container: `/models/<path>`."""
    return model.startswith(MODELS_MOUNT + "/")


def server_command(endpoint: Endpoint) -> tuple[tuple[str, ...], int, str]:
    """The server's arguments, port and health route for the endpoint's framework.

    llama-server runs `per_worker` slots (`--parallel`) and splits `--ctx-size` evenly among
    them, each slot's KV cache its own. `max_model_len` is the context of each request (as
    vLLM's `--max-model-len`), so the cache holds that many tokens per slot. Not
    `--kv-unified` (one cache of `max_model_len` that all slots share): there a request fits
    only while the others leave room, and when the shared cache fills every running request
    fails ("Context size has been exceeded"). Left out, no `--ctx-size` is sent: llama-server
    gives each slot the model's whole training context, as docs/fields.md says."""
    args = dict(endpoint.args)
    if endpoint.framework == Framework.VLLM:
        if endpoint.gpu_memory_fraction is not None:
            args.setdefault("gpu_memory_utilization", endpoint.gpu_memory_fraction)
        # `vllm serve MODEL`: vLLM 0.32 deprecates --model
        cmd = [endpoint.model, "--served-model-name", endpoint.name]
        cmd += ["--host", "0.0.0.0", "--port", str(VLLM_PORT)]
        # the replica's GPUs are split into pipeline stages of tensor-parallel sets
        stages = int(args.get("pipeline_parallel_size") or 1)
        cmd += ["--tensor-parallel-size", str(max(endpoint.gpus // stages, 1))]
        return tuple(cmd + flag_values(args, VLLM_FLAGS)), VLLM_PORT, "/health"
    if endpoint.framework == Framework.LLAMACPP:
        slots = max(endpoint.target_concurrency, 1)
        cmd = ["-m", endpoint.model, "--host", "0.0.0.0"]
        cmd += ["--port", str(LLAMACPP_PORT), "--alias", endpoint.name, "--jinja", "--metrics"]
        cmd += ["--parallel", str(slots)]
        if endpoint.gpus:
            cmd += ["-ngl", "999"]
        if args.get("max_model_len") is not None:
            args["max_model_len"] = int(args["max_model_len"]) * slots
        return tuple(cmd + flag_values(args, LLAMACPP_FLAGS)), LLAMACPP_PORT, "/health"
    port = endpoint.port or CUSTOM_PORT
    return tuple(endpoint.command or ()), port, endpoint.health_route or "/readyz"


def default_image(endpoint: Endpoint, settings: Settings) -> str:
    if endpoint.image:
        return endpoint.image
    if endpoint.framework == Framework.VLLM:
        return settings.vllm_image if endpoint.gpus else settings.vllm_cpu_image
    if endpoint.framework == Framework.LLAMACPP:
        return settings.llamacpp_cuda_image if endpoint.gpus else settings.llamacpp_image
    raise ValueError("a custom endpoint names its image")


def spec_hash(endpoint: Endpoint, settings: Settings) -> str:
    """A digest of what the endpoint's replicas would run: image, command line, environment,
    mounts and limits, all but what is each replica's own (its name, GPUs, key). A new digest
    means a new container: an update rolls the replicas exactly when it changes the digest
    (`api.endpoint_specs.rolls`)."""
    command, port, health = server_command(endpoint)
    blob = json.dumps(
        [
            default_image(endpoint, settings),
            command,
            port,
            health,
            server_env(endpoint, settings),
            [astuple(mount) for mount in _mounts(endpoint, settings)],
            shm_bytes(endpoint),
            endpoint.gpus,
            endpoint.gpu_memory_fraction,
            endpoint.cpus,
            endpoint.memory_bytes,
        ],
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def shm_bytes(endpoint: Endpoint) -> int:
    return VLLM_SHM_BYTES if endpoint.framework == Framework.VLLM else DEFAULT_SHM_BYTES


def _mounts(endpoint: Endpoint, settings: Settings) -> tuple[Mount, ...]:
    if settings.models_volume:
        models = Mount(settings.models_volume, MODELS_MOUNT, kind="volume")
    else:
        models = Mount(str(settings.models_source_dir.resolve()), MODELS_MOUNT)
    mounts = [models]
    if endpoint.framework == Framework.VLLM:
        # every team's replicas share the cache: one that never asks the hub only reads it
        read_only = offline(endpoint, settings)
        if settings.hf_cache_volume:
            mounts.append(Mount(settings.hf_cache_volume, HF_CACHE_MOUNT, read_only, "volume"))
        else:
            cache = str(settings.hf_cache_path.resolve())
            mounts.append(Mount(cache, HF_CACHE_MOUNT, read_only))
    return tuple(mounts)


def container_spec(
    endpoint: Endpoint,
    *,
    settings: Settings,
    install_id: str,
    replica_id: str,
    gpu_ids: tuple[int, ...],
    gpu_fraction: float,
    key_secret: bytes = b"",
) -> ContainerSpec:
    """The full container spec for one replica of the endpoint's current generation; vLLM and
    llama.cpp replicas demand their own replica key of every request (none when `key_secret` is
    empty)."""
    command, port, health = server_command(endpoint)
    labels = {
        LABEL_INSTALL: install_id,
        LABEL_ENDPOINT: endpoint.id,
        LABEL_REPLICA: replica_id,
        LABEL_GENERATION: str(endpoint.generation),
        LABEL_SPEC_HASH: spec_hash(endpoint, settings),
        LABEL_GPUS: ",".join(str(i) for i in gpu_ids),
        LABEL_GPU_FRACTION: str(gpu_fraction),
        LABEL_REPLICA_KEY: REPLICA_KEY_SCHEME,
    }
    key = replica_key(key_secret, replica_id)
    return ContainerSpec(
        name=f"appliance-{install_id}-{endpoint.name}-g{endpoint.generation}-{replica_id[-6:]}",
        image=default_image(endpoint, settings),
        command=command,
        entrypoint=None,
        env={**server_env(endpoint, settings), **replica_key_env(endpoint.framework, key)},
        port=port,
        health_route=health,
        mounts=_mounts(endpoint, settings),
        labels=labels,
        gpu_ids=gpu_ids,
        request_gpus=bool(gpu_ids) and settings.docker_gpu_runtime,
        nano_cpus=int(box_share(endpoint.cpus) * 1e9),
        memory_bytes=endpoint.memory_bytes,
        shm_bytes=shm_bytes(endpoint),
        network=settings.replica_network,
        files=_secret_files(endpoint, settings),
    )


# Where each server reads the API key it demands (a custom image has its own ways).
REPLICA_KEY_ENV = {Framework.VLLM: "VLLM_API_KEY", Framework.LLAMACPP: "LLAMA_API_KEY"}


def replica_key_env(framework: str, key: str) -> dict[str, str]:
    name = REPLICA_KEY_ENV.get(Framework(framework))
    return {name: key} if name and key else {}


def has_stale_key(framework: str, labels: dict[str, str]) -> bool:
    """True for a vLLM or llama.cpp container started with the install-wide key of an older
    version (no per-replica key label): the api's requests to it are refused."""
    return Framework(framework) in REPLICA_KEY_ENV and (
        labels.get(LABEL_REPLICA_KEY) != REPLICA_KEY_SCHEME
    )


def server_env(endpoint: Endpoint, settings: Settings) -> dict[str, str]:
    """The endpoint's env, plus what a vLLM replica needs where the endpoint leaves it unset: a
    model from the models directory, or one the builder downloaded into the cache before the
    replica started (`builder/weights.py`), never asks the hub; on CPU, a KV cache within its
    memory and as many compute threads as it has CPUs, which do not all crowd onto the first
    core. A llama.cpp replica gets as many threads as it has CPUs (llama-server starts one per
    host core)."""
    env = dict(endpoint.env)
    if endpoint.framework == Framework.LLAMACPP:
        env.setdefault("LLAMA_ARG_THREADS", str(compute_threads(endpoint.cpus)))
    if endpoint.framework != Framework.VLLM:
        return env
    if offline(endpoint, settings):
        env.setdefault("HF_HUB_OFFLINE", "1")
        # its cache is read-only: the copies of a model's own code (trust_remote_code) go here
        env["HF_MODULES_CACHE"] = HF_MODULES_DIR
    elif settings.hf_token:
        env["HF_TOKEN_PATH"] = HF_TOKEN_FILE
    if not endpoint.gpus:
        gib = int(endpoint.memory_bytes * VLLM_CPU_KV_CACHE_SHARE) // 2**30
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(gib, 1)))
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", VLLM_CPU_THREADS_BIND)
        env.setdefault("OMP_NUM_THREADS", str(compute_threads(endpoint.cpus)))
    return env


def offline(endpoint: Endpoint, settings: Settings) -> bool:
    """Whether a vLLM replica of the endpoint never asks the hub: its model is in the models
    directory, or the builder downloaded it into the cache before the replica started."""
    return is_local_model(endpoint.model) or _weights_in_cache(endpoint, settings)


def _weights_in_cache(endpoint: Endpoint, settings: Settings) -> bool:
    """The builder fetches a hub model before its replicas start, unless switched off; a
    tokenizer from another repository is left for the replica to fetch, so it stays online."""
    tokenizer = endpoint.args.get("tokenizer")
    other_tokenizer = bool(tokenizer) and tokenizer != endpoint.model
    return settings.hf_download_weights and not other_tokenizer


def _secret_files(endpoint: Endpoint, settings: Settings) -> dict[str, bytes]:
    """The Hugging Face token, for a vLLM replica that asks the hub itself, in a file of its
    own container (`HF_TOKEN_PATH`): never in the cache every team's replicas share."""
    vllm = endpoint.framework == Framework.VLLM
    if vllm and settings.hf_token and not offline(endpoint, settings):
        return {HF_TOKEN_FILE: settings.hf_token.encode()}
    return {}
