"""The disk's reserve, the one rule for everything a request makes the appliance write: model
and batch files, async tasks and batch requests (the api), task results (the worker)."""

from __future__ import annotations

import shutil
from pathlib import Path

from appliance.errors import InsufficientStorageError


def nearest_folder(path: Path) -> Path:
    """`path`, or its nearest existing parent when it is not made yet."""
    where = path.resolve()
    while not where.exists() and where != where.parent:
        where = where.parent
    return where


def free_bytes(path: Path) -> int:
    return shutil.disk_usage(nearest_folder(path)).free


def check_room(path: Path, adding: int, reserve: int, what: str) -> None:
    """Refuse (507) writing `adding` more bytes of `what` to the disk of `path` when it would
    leave less than `reserve` free (`APPLIANCE_DISK_RESERVE_BYTES`): uploads (model files,
    batch files), the rows requests add to the database (async tasks, a batch's requests)
    and the results the worker stores fill the disk only to there, so the database, logs and
    replicas keep room."""
    free = free_bytes(path)
    if free - adding < reserve:
        raise InsufficientStorageError(
            f"{what}: the disk has {free} bytes free and keeps {reserve} in reserve "
            "(APPLIANCE_DISK_RESERVE_BYTES); free some space (delete unused models and files)"
        )
