"""Hugging Face weights fetched into the cache before a vLLM replica starts.

The builder's preparation jobs (`builder/prepare.py`) call `download` in a background thread;
it uses `huggingface_hub` itself, into `Settings.hf_cache_path / "hub"`, the layout vLLM reads
at /root/.cache/huggingface, so the replica then starts with the hub offline. Before any byte
is fetched the repository's file sizes are checked against the space left; while it runs the
cache's blobs (finished and `.incomplete`) are measured for progress. A download cut short (a
builder restart) resumes from the same cache: finished files are not fetched again, a partial
one continues by range (`builder/partials.py`). Every failure is a `WeightsError` whose message
a user can act on (`builder/hub_errors.py`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import HfApi, snapshot_download

from appliance.models import Endpoint, Framework
from appliance.settings import Settings
from builder.hub_errors import explain
from builder.partials import partials, resume
from builder.prepare import Job, PrepareError, Progress, Report, size_text
from builder.specs import is_local_model

logger = logging.getLogger(__name__)

POLL_S = 0.5  # how often a running download's blobs are measured
# A repository id as the hub takes it (huggingface_hub's `validate_repo_id`): `owner/name`,
# each part at most 96 word characters, '.' and '-', starting and ending with a word character
# (the owner with a letter or digit); `is_hub_id` adds the rest of the hub's rule.
HUB_ID = re.compile(r"^[A-Za-z0-9](?:[\w.\-]{0,94}\w)?/\w(?:[\w.\-]{0,94}\w)?$")


def is_hub_id(name: str) -> bool:
    """A repository id the hub would take: HUB_ID, no '..' or '--', not ending '.git'. Anything
    else fails in huggingface_hub before a byte is fetched, so it is no hub model."""
    return (
        HUB_ID.fullmatch(name) is not None
        and ".." not in name
        and "--" not in name
        and not name.endswith(".git")
    )


class WeightsError(PrepareError):
    """A download that cannot go on; the message says why in a user's words."""


@dataclass(frozen=True)
class HubModel:
    """A repository on the hub at a revision (a branch, a tag or a commit)."""

    repository: str
    revision: str = "main"

    @property
    def ref(self) -> str:
        return f"{self.repository}@{self.revision}"


@dataclass(frozen=True)
class Transfer:
    """How far a download is: bytes and files done of the repository's total."""

    done_bytes: int
    total_bytes: int
    done_files: int
    total_files: int


@dataclass(frozen=True)
class Blob:
    path: str  # the file's path in the repository
    name: str  # its name in the cache's blobs/: its sha256 (LFS) or git blob id
    size: int


@dataclass(frozen=True)
class Listing:
    """The repository's files at the revision, and the commit the revision points at."""

    commit: str
    blobs: list[Blob]


def hub_model(endpoint: Endpoint, settings: Settings) -> HubModel | None:
    """The snapshot a vLLM endpoint's replicas load from the hub, when the builder fetches it
    for them: a repository id (not a model in the models directory), downloads switched on."""
    if endpoint.framework != Framework.VLLM or not settings.hf_download_weights:
        return None
    if is_local_model(endpoint.model) or not is_hub_id(endpoint.model):
        return None
    revision = endpoint.args.get("revision") or "main"
    return HubModel(endpoint.model, str(revision))


def weights_job(endpoint: Endpoint, settings: Settings) -> Job | None:
    """The download a vLLM endpoint of a hub model waits on before any replica starts (the
    Preparer's source of `weights:` jobs); None for every other endpoint."""
    model = hub_model(endpoint, settings)
    return None if model is None else hub_job(model, settings)


def hub_job(model: HubModel, settings: Settings) -> Job:
    """One snapshot's download, shared by every endpoint (and request) that needs it."""

    def progress(now: Transfer) -> Progress:
        return Progress(
            "weights", model.ref, now.done_bytes, now.total_bytes, now.done_files, now.total_files
        )

    def run(report: Report) -> None:
        download(model, settings, lambda now: report(progress(now)))

    return Job(
        f"weights:{model.ref}",
        Progress("weights", model.ref),
        lambda: present(model, settings),
        run,
    )


def hub_dir(settings: Settings) -> Path:
    return settings.hf_cache_path / "hub"


def _api(settings: Settings) -> HfApi:
    return HfApi(endpoint=settings.hf_endpoint, token=settings.hf_token or False)


def repository_dir(model: HubModel, settings: Settings) -> Path:
    return hub_dir(settings) / ("models--" + model.repository.replace("/", "--"))


def listing(model: HubModel, settings: Settings) -> Listing:
    """The repository's files at the revision, as the blobs the cache will hold."""
    info = _api(settings).model_info(model.repository, revision=model.revision, files_metadata=True)
    blobs: dict[str, Blob] = {}
    for sibling in info.siblings or []:
        name = sibling.lfs.sha256 if sibling.lfs else sibling.blob_id
        size = sibling.lfs.size if sibling.lfs else sibling.size or 0
        if name:
            blobs[name] = Blob(sibling.rfilename, name, size)
    return Listing(info.sha or model.revision, list(blobs.values()))


def measure(blobs: list[Blob], folder: Path) -> Transfer:
    """What the cache holds of these blobs: finished ones whole, `.incomplete` ones so far."""
    done_bytes = done_files = 0
    for blob in blobs:
        path = folder / blob.name
        if path.is_file():
            done_bytes, done_files = done_bytes + blob.size, done_files + 1
        elif found := partials(folder, blob.name):
            with contextlib.suppress(OSError):
                done_bytes += min(found[0].stat().st_size, blob.size)
    total = sum(b.size for b in blobs)
    return Transfer(done_bytes, total, done_files, len(blobs))


def cache_bytes(folder: Path) -> int:
    """Bytes of the files under `folder` (links not followed: a snapshot's files are links)."""
    total = 0
    for root, _, names in os.walk(folder):
        for name in names:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total


def free_bytes(settings: Settings) -> int:
    """Space the cache may still grow by: the disk's free space less its reserve
    (`APPLIANCE_DISK_RESERVE_BYTES`, which uploads, tasks and batches leave too: the database
    may share the disk), within the cap if one is set."""
    folder = hub_dir(settings)
    free = shutil.disk_usage(folder).free - settings.disk_reserve_bytes
    if settings.hf_cache_max_bytes is not None:
        free = min(free, settings.hf_cache_max_bytes - cache_bytes(settings.hf_cache_path))
    return max(free, 0)


def check_space(model: HubModel, now: Transfer, free: int, capped: bool) -> None:
    """Refuses a download that would not fit, with the numbers and what to do."""
    needed = now.total_bytes - now.done_bytes
    if needed > free:
        held = f" ({size_text(now.done_bytes)} already downloaded)" if now.done_bytes else ""
        fix = (
            "raise APPLIANCE_HF_CACHE_MAX_BYTES"
            if capped
            else "add disk space (APPLIANCE_DISK_RESERVE_BYTES of it stay free)"
        )
        raise WeightsError(
            f"{model.repository} does not fit in the Hugging Face cache: it needs "
            f"{size_text(needed)}, {size_text(free)} free{held}; delete models no endpoint "
            f"uses, or {fix}"
        )


def present(model: HubModel, settings: Settings) -> bool:
    """True when the cache holds the whole snapshot, as huggingface_hub itself judges it
    offline (the revision's ref, and every file of the commit's listing): what vLLM will load
    with the hub offline. Reads the disk only."""
    try:
        snapshot_download(
            model.repository,
            revision=model.revision,
            cache_dir=hub_dir(settings),
            local_files_only=True,
        )
    except Exception:
        return False
    return True


def download(model: HubModel, settings: Settings, report: Callable[[Transfer], None]) -> Path:
    """Fetches the snapshot into the cache, reporting progress; returns its folder."""
    if ".." in model.revision.split("/") or model.revision.startswith("/"):
        raise WeightsError(f"revision {model.revision!r} is not a branch, tag or commit")
    hub_dir(settings).mkdir(parents=True, exist_ok=True)
    try:
        files = listing(model, settings)
        blob_dir = repository_dir(model, settings) / "blobs"
        start = measure(files.blobs, blob_dir)
        check_space(model, start, free_bytes(settings), settings.hf_cache_max_bytes is not None)
        report(start)
        path = _fetch(model, files, settings, lambda: report(measure(files.blobs, blob_dir)))
    except WeightsError:
        raise
    except Exception as exc:
        raise WeightsError(explain(exc, model, settings)) from exc
    report(measure(files.blobs, blob_dir))
    return Path(path)


def _fetch(model: HubModel, files: Listing, settings: Settings, tick: Callable[[], None]) -> str:
    """Partial files resumed, then snapshot_download, in a thread; `tick` called meanwhile."""
    result: list[str] = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            resume(
                [(b.path, b.name, b.size) for b in files.blobs],
                repository=model.repository,
                commit=files.commit,
                repository_dir=repository_dir(model, settings),
                endpoint=settings.hf_endpoint,
                token=settings.hf_token,
            )
            result.append(
                snapshot_download(
                    model.repository,
                    revision=model.revision,
                    cache_dir=hub_dir(settings),
                    endpoint=settings.hf_endpoint,
                    token=settings.hf_token or False,
                )
            )
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=run, name=f"download {model.ref}", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(POLL_S)
        tick()
    if failure:
        raise failure[0]
    return result[0]
