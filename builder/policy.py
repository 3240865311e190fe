"""The container security policy: checks a spec before create and a container after it.

Users never send Docker fields; these checks hold the line against a spec the api let through by
mistake, and against an image or Docker daemon that changes what was asked for.
"""

from __future__ import annotations

import json
import math
import os
import posixpath
import re
from collections.abc import Collection, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from appliance.errors import InvalidSpecError, PolicyViolationError
from builder.frameworks import in_object_storage, object_storage_refusal, read_as_flag
from builder.specs import BUILDER_ENV, MODELS_MOUNT, REPLICA_KEY_ENV, ContainerSpec

# Environment names a user may set on a model container; everything else is refused
# (LD_PRELOAD, PATH, PYTHONPATH... would let a spec run arbitrary code in the server).
ENV_NAME_ALLOWED = re.compile(
    r"^(VLLM_[A-Z0-9_]+|NCCL_[A-Z0-9_]+|LLAMA_ARG_[A-Z0-9_]+|OMP_NUM_THREADS|TOKENIZERS_PARALLELISM"
    r"|HF_HUB_OFFLINE|HF_HUB_ENABLE_HF_TRANSFER|TRANSFORMERS_OFFLINE|PYTORCH_CUDA_ALLOC_CONF"
    r"|CUDA_DEVICE_MAX_CONNECTIONS|MODEL_[A-Z0-9_]+|APP_[A-Z0-9_]+)$"
)
ENV_NAME_DENIED = {
    "VLLM_API_KEY",
    "LLAMA_ARG_API_KEY",
    "LLAMA_ARG_API_KEY_FILE",
    "LLAMA_ARG_HOST",
    "LLAMA_ARG_PORT",
}

# vLLM 0.32 flags beyond the typed fields that a user may pass through `extra_flags` (each is
# checked against the real vLLM's parser by tests/images/test_vllm_contract.py), with the
# values each takes. Flags with a typed field, and those that would change what the appliance
# relies on (host, port, served model name, API key, parallelism), are not here.
SWITCH = "true or false (false sends its --no- form)"
SWITCH_ON = "true (vLLM has no --no- form; leave it out for vLLM's default)"
TEXT = "a non-empty text"
JSON_OBJECT = "a JSON object, as text"
# what a flag takes: a description (switches, text, JSON, sizes), its choices, or its bounds
Takes = str | tuple[str, ...] | tuple[float, float]
VLLM_EXTRA_FLAGS_ALLOWED: dict[str, Takes] = {
    "--max-logprobs": (-1, 1_000_000),  # -1: no cap (the api caps a request at 20 anyway)
    "--disable-log-stats": SWITCH_ON,
    "--generation-config": TEXT,
    "--override-generation-config": JSON_OBJECT,
    "--reasoning-parser": TEXT,
    "--structured-outputs-config": JSON_OBJECT,
    "--cpu-offload-gb": (0.0, 1_000_000.0),
    "--scheduling-policy": ("fcfs", "priority"),
    "--speculative-config": JSON_OBJECT,
    "--hf-overrides": JSON_OBJECT,
    "--uvicorn-log-level": ("critical", "debug", "error", "info", "trace", "warning"),
    "--kv-cache-memory-bytes": "a byte count (1073741824) or a size (4G, 512M, 1.5g)",
    "--enable-chunked-prefill": SWITCH,
    # a generative model served for embeddings (/v1/embeddings); not vLLM's draft runner nor
    # its classifiers, whose routes the appliance does not serve
    "--runner": ("auto", "generate", "pooling"),
    "--convert": ("auto", "none", "embed"),
}
# A key of a JSON flag that names code for vLLM to import (its structured outputs'
# `reasoning_parser_plugin`: a module, or any Python file in the container, such as one of a hub
# repository's files in the shared cache): it would run that code in the server, as
# `trust_remote_code` does, so no JSON flag carries one, at any depth.
PLUGIN_KEY = re.compile(r"plugin", re.IGNORECASE)
# vLLM's human_readable_int: K, M, G, T are binary, k, m, g, t decimal (the only ones with decimals)
SIZE = re.compile(r"^([1-9][0-9]{0,15}[kKmMgGtT]?|[0-9]{1,6}\.[0-9]{1,6}[kmgt])$")
MAX_BYTES = 1 << 62


def check_env(env: Mapping[str, str]) -> None:
    for name in env:
        if name in ENV_NAME_DENIED or not ENV_NAME_ALLOWED.fullmatch(name):
            raise PolicyViolationError(
                f"environment variable {name!r} is not allowed on a model container; allowed: "
                "VLLM_*, NCCL_*, LLAMA_ARG_*, MODEL_*, APP_*, OMP_NUM_THREADS and a few HF flags",
                field="env",
            )


def check_extra_flags(flags: Mapping[str, Any]) -> None:
    """Each flag in the allowlist and its value one vLLM's parser takes; a replica sent any
    other would only fail to start."""
    for flag, value in flags.items():
        takes = VLLM_EXTRA_FLAGS_ALLOWED.get(flag)
        if takes is None:
            raise PolicyViolationError(
                f"flag {flag!r} is not in the allowlist of extra vLLM flags; use a typed field "
                "where one exists",
                field="extra_flags",
            )
        if not _takes(takes, value):
            raise InvalidSpecError(
                f"extra_flags {flag}: {value!r} is not a value it takes; it takes "
                f"{_described(takes)}",
                field="extra_flags",
            )
        parsed = json.loads(value) if takes == JSON_OBJECT else value
        stored = next((text for text in _texts(parsed) if in_object_storage(text)), None)
        if stored is not None:  # a draft model's or tokenizer's name, say
            raise object_storage_refusal(f"extra_flags {flag}", stored, "extra_flags")
        plugin = _plugin_key(parsed) if takes == JSON_OBJECT else None
        if plugin is not None:
            raise PolicyViolationError(
                f"extra_flags {flag}: {plugin!r} names code for the server to import, which "
                "would run it as trust_remote_code does; leave it out",
                field="extra_flags",
            )


def _nodes(value: Any) -> Iterator[Any]:
    """Every value in a JSON value, itself included, at any depth."""
    pending = [value]
    while pending:
        item = pending.pop()
        yield item
        if isinstance(item, dict):
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)


def _texts(value: Any) -> Iterator[str]:
    """Every string in a JSON value, at any depth, keys aside."""
    return (item for item in _nodes(value) if isinstance(item, str))


def _plugin_key(value: Any) -> str | None:
    """The first key, at any depth of a JSON value, that names a plugin; None if none."""
    for item in _nodes(value):
        if isinstance(item, dict):
            for key in item:
                if PLUGIN_KEY.search(str(key)):
                    return str(key)
    return None


def _described(takes: Takes) -> str:
    if isinstance(takes, str):
        return takes
    if isinstance(takes[0], str):
        return "one of " + ", ".join(map(str, takes))
    whole = "whole " if isinstance(takes[0], int) else ""
    return f"a {whole}number from {takes[0]} to {takes[1]}"


def _takes(takes: Takes, value: Any) -> bool:
    if takes in (SWITCH, SWITCH_ON):
        return value is True or value == "" or (value is False and takes == SWITCH)
    if isinstance(value, bool) or value == "":
        return False
    if isinstance(takes, tuple) and isinstance(takes[0], str):
        return value in takes
    if isinstance(takes, tuple):
        return _in_range(value, float(takes[0]), float(takes[1]), whole=isinstance(takes[0], int))
    if takes == JSON_OBJECT:
        try:
            return isinstance(json.loads(value), dict) if isinstance(value, str) else False
        except (ValueError, RecursionError):  # nested past what a JSON reader (vLLM's) takes
            return False
    if takes == TEXT:
        return isinstance(value, str) and bool(value.strip()) and not read_as_flag(value)
    return (isinstance(value, int) and 0 < value <= MAX_BYTES) or (  # a size
        isinstance(value, str) and SIZE.fullmatch(value) is not None
    )


def _in_range(value: Any, low: float, high: float, *, whole: bool) -> bool:
    """A number (or its text) from low to high; a whole one (an int, or digits) where `whole`."""
    if whole:
        text = value.removeprefix("-") if isinstance(value, str) else ""
        if not (isinstance(value, int) or text.isdigit()):
            return False
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):  # OverflowError: an int past any float
        return False
    return math.isfinite(number) and low <= number <= high


def models_path(text: str) -> str | None:
    """The path in the models directory that a setting's text names in a container, as
    `/models/<path>`, or None when it names none there: an absolute path under MODELS_MOUNT, or
    a relative one that reaches it from the container's folder (`models/x` from `/`,
    `../models/x` from a folder below `/`). No hub id starts `models/`: the hub keeps that name
    for its own pages."""
    named = posixpath.normpath(posixpath.join("/", text))
    return named if named == MODELS_MOUNT or named.startswith(MODELS_MOUNT + "/") else None


def resolve_model_path(
    models_dir: Path,
    requested: str,
    *,
    hidden: Collection[str],
    field: str = "model",
    what: str = "model file",
) -> str:
    """A path under the models directory, resolved with realpath; returns `/models/<path>`.
    A path in (or resolving into) a `hidden` top-level entry (another team's upload) is
    answered as a missing one, hint included. `field` and `what` name the setting in a refusal
    (a model; a tokenizer, `check_named_files`)."""
    root = Path(os.path.realpath(models_dir))
    named = models_path(requested)
    relative = (named or requested).removeprefix(MODELS_MOUNT).lstrip("/")
    try:
        target = Path(os.path.realpath(root / relative))
        exists = target.exists() and not _in_hidden(root, root / relative, target, hidden)
    except (OSError, ValueError):
        raise InvalidSpecError(f"{what} {requested!r} is not a usable path", field=field) from None
    if target != root and root not in target.parents:
        raise PolicyViolationError(
            f"{what} {requested!r} resolves outside the models directory", field=field
        )
    if not exists:
        raise InvalidSpecError(
            f"{what} {requested!r} does not exist in the models directory ({models_dir})"
            f"{_gguf_hint(root, relative, requested, hidden)}; upload it (the UI's Models page, "
            "or PUT /v1/storage/model-files/{name}) or copy it there first",
            field=field,
        )
    return f"{MODELS_MOUNT}/{target.relative_to(root).as_posix()}"


def check_named_files(
    args: Mapping[str, Any], models_dir: Path, *, hidden: Collection[str]
) -> None:
    """Every server setting whose text names a path in the models directory (`models_path`: a
    tokenizer, a chat template file, a generation config, a draft model at any depth of a JSON
    flag) names one the caller may use, by the model's rule (`resolve_model_path`): another
    team's upload is answered as a missing file, in the same words, and a replica never loads it
    (nor tells, by starting or not, that it is there)."""
    for name, value in args.items():
        texts = value.values() if name == "extra_flags" and isinstance(value, dict) else [value]
        for text in texts:
            for item in _texts(_parsed(text)):
                if models_path(item) is not None:
                    resolve_model_path(
                        models_dir, item, hidden=hidden, field=name, what=f"{name}: file"
                    )


def _parsed(value: Any) -> Any:
    """A JSON object's text parsed (a JSON flag's value), anything else as it is."""
    if isinstance(value, str) and value.startswith("{"):
        try:
            return json.loads(value)
        except (ValueError, RecursionError):
            return value
    return value


def _in_hidden(root: Path, asked: Path, target: Path, hidden: Collection[str]) -> bool:
    """Whether the path as asked, or what it resolves to, lies in a hidden top-level entry."""
    if not hidden:
        return False
    tops = {path.relative_to(root).parts[:1] for path in (asked, target) if root in path.parents}
    return any(top and top[0] in hidden for top in tops)


def _gguf_hint(root: Path, relative: str, requested: str, hidden: Collection[str]) -> str:
    """': did you mean NAME.gguf?' when that file is there (the suffix left off) and not
    hidden, else ''."""
    try:
        asked = root / f"{relative}.gguf"
        candidate = Path(os.path.realpath(asked))
        there = root in candidate.parents and candidate.is_file()
        there = there and not _in_hidden(root, asked, candidate, hidden)
    except (OSError, ValueError):
        return ""
    return f": did you mean {requested + '.gguf'!r}?" if there else ""


def check_image(image: str, *, default_images: Iterable[str], approved: Iterable[str]) -> None:
    if image not in set(default_images) and image not in set(approved):
        raise PolicyViolationError(
            f"image {image!r} is not approved by an administrator", field="image"
        )


def check_spec(
    spec: ContainerSpec, *, allowed_sources: Iterable[str], writable: Iterable[str] = ()
) -> None:
    """Before create: only known mounts, binds read-only but the `writable` ones (the Hugging
    Face cache), allowed env names."""
    # the builder's own: refused in any request's env
    own = set(REPLICA_KEY_ENV.values()) | BUILDER_ENV
    check_env({name: value for name, value in spec.env.items() if name not in own})
    sources = set(allowed_sources)
    for mount in spec.mounts:
        if mount.source not in sources:
            raise PolicyViolationError(f"mount source {mount.source!r} is not allowed")
        if mount.kind == "bind" and not mount.read_only and mount.source not in set(writable):
            raise PolicyViolationError("bind mounts of the models directory are read-only")


def violations(
    inspect: Mapping[str, Any], *, allowed_sources: Iterable[str], writable: Iterable[str] = ()
) -> list[str]:
    """After create: what the created container does that the policy forbids (empty if none)."""
    host = inspect.get("HostConfig") or {}
    found = []
    if host.get("Privileged"):
        found.append("privileged")
    for key in ("NetworkMode", "PidMode", "IpcMode", "UTSMode", "UsernsMode"):
        if host.get(key) == "host":
            found.append(f"{key} is host")
    if host.get("CapAdd"):
        found.append(f"capabilities added: {host['CapAdd']}")
    if "ALL" not in (host.get("CapDrop") or []):
        found.append("capabilities not dropped")
    if not any("no-new-privileges" in opt for opt in host.get("SecurityOpt") or []):
        found.append("no-new-privileges missing")
    if host.get("Devices"):
        found.append("host devices mapped")
    sources = set(allowed_sources)
    for mount in inspect.get("Mounts") or []:
        source = mount.get("Name") if mount.get("Type") == "volume" else mount.get("Source")
        if source not in sources:
            found.append(f"mount of {source!r}")
        elif mount.get("Type") == "bind" and mount.get("RW") and source not in set(writable):
            found.append(f"writable bind of {source!r}")
    return found
