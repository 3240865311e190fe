"""The Hugging Face cache (`Settings.hf_cache_path / "hub"`) as the storage routes and the UI's
Models page see it: each cached repository with its snapshots (revisions), sizes and the
endpoints that use it, read with `huggingface_hub.scan_cache_dir`, listed to a team only where
it asked for the repository or may call an endpoint that uses it; and the deletion (by an
administrator) of a repository no endpoint uses. An endpoint uses a repository when it is a
vLLM endpoint whose `model` is the repository's id (not a path under `/models`).
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import redis
from huggingface_hub import CachedRepoInfo, scan_cache_dir
from huggingface_hub.errors import CacheNotFound
from sqlmodel import Session

from api import hf_downloads, storage
from appliance import audit, queries
from appliance.errors import ConflictError, NotFoundError
from appliance.keys import Caller
from appliance.models import Endpoint, Framework
from appliance.settings import Settings
from builder.specs import is_local_model


def hub_dir(settings: Settings) -> Path:
    return settings.hf_cache_path / "hub"


def users_of(repo_id: str, endpoints: Sequence[Endpoint]) -> list[Endpoint]:
    return [
        e
        for e in endpoints
        if e.framework == Framework.VLLM and not is_local_model(e.model) and e.model == repo_id
    ]


def _scan(settings: Settings) -> tuple[list[CachedRepoInfo], list[str]]:
    """The cached repositories by id, and what the scan could not read."""
    try:
        info = scan_cache_dir(hub_dir(settings))
    except CacheNotFound:
        return [], []
    repos = sorted(info.repos, key=lambda r: (r.repo_type, r.repo_id))
    return repos, [str(w) for w in info.warnings]


def _repo(repo: CachedRepoInfo) -> dict[str, Any]:
    revisions = sorted(repo.revisions, key=lambda r: r.last_modified, reverse=True)
    return {
        "repo_id": repo.repo_id,
        "repo_type": repo.repo_type,
        "size_bytes": repo.size_on_disk,
        "files": repo.nb_files,
        "last_accessed_at": repo.last_accessed,
        "last_modified_at": repo.last_modified,
        "revisions": [
            {
                "commit": r.commit_hash,
                "refs": sorted(r.refs),
                "size_bytes": r.size_on_disk,
                "files": r.nb_files,
                "last_modified_at": r.last_modified,
            }
            for r in revisions
        ],
    }


def visible_to(caller: Caller, repo_id: str, users: list[Endpoint], asked: set[str]) -> bool:
    """Whether a cached repository is listed to `caller`: an administrator sees every one, a
    team those it asked to download (`asked`) or that an endpoint it may call uses, so no team
    learns which models another fetched."""
    return (
        caller.is_admin
        or repo_id in asked
        or any(caller.may_infer(e.owner, e.public_inference) for e in users)
    )


def read_hf_models(
    caller: Caller, session: Session, settings: Settings, client: redis.Redis
) -> dict[str, Any]:
    """`GET /v1/storage/hf-models`: the cached repositories the caller sees (`visible_to`) with
    "used by", and the disk. The cache is scanned before the session reads: no transaction is
    open while it is."""
    repos, problems = _scan(settings)
    disk = storage.disk(settings)["hf_cache"]
    endpoints = queries.all_endpoints(session=session)
    asked = hf_downloads.asked_for_by(caller, client)
    data = []
    for repo in repos:
        users = users_of(repo.repo_id, endpoints)
        if visible_to(caller, repo.repo_id, users, asked):
            data.append({**_repo(repo), **storage.used_by(users, caller)})
    return {"data": data, "problems": problems, "disk": disk}


def delete_repo(
    repo_id: str,
    caller: Caller,
    session: Session,
    settings: Settings,
    client: redis.Redis,
    address: str | None,
) -> dict[str, Any]:
    """Delete a cached model repository (every snapshot) no endpoint uses and no download
    ahead of time is still fetching (409 naming those)."""
    storage.require_admin(caller, "delete a cached model")
    repos, _ = _scan(settings)
    found = next((r for r in repos if r.repo_id == repo_id and r.repo_type == "model"), None)
    if found is None:
        raise NotFoundError(f"no model {repo_id!r} in the Hugging Face cache", field="repo_id")
    users = users_of(repo_id, queries.all_endpoints(session=session))
    storage.refuse_in_use(f"model {repo_id!r}", users, "repo_id")
    running = hf_downloads.unfinished(client, repo_id)
    if running:
        raise ConflictError(
            f"model {repo_id!r} is being downloaded ahead of time (revision "
            f"{', '.join(running)}): wait until its download is done or failed "
            "(GET /v1/storage/hf-downloads), then delete it",
            field="repo_id",
        )
    audit.record(
        session, caller, "hf-model.delete", repo_id, {"bytes": found.size_on_disk}, address
    )
    path = Path(found.repo_path)
    if path.resolve().parent != hub_dir(settings).resolve():
        raise NotFoundError(f"no model {repo_id!r} in the Hugging Face cache", field="repo_id")
    shutil.rmtree(path)  # under the write lock: no endpoint is created on it meanwhile
    session.commit()
    return {"repo_id": repo_id, "deleted": True, "freed_bytes": found.size_on_disk}
