"""Partial files left in the Hugging Face cache by a download that was cut short (the builder
killed or restarted mid-file), resumed where they stopped before the snapshot download runs.

huggingface_hub writes each file to a temporary `<blob>.<random>.incomplete` of its own and
never picks one up again in a later process; for a model of tens of GB that would mean
starting the file over. `resume` continues the largest partial of each missing blob with
huggingface_hub's own `http_get` (a `Range` request from its size), under the same lock file
huggingface_hub takes for that blob, then moves it into place; the snapshot download that
follows finds the blob there and only links it. Called by `builder/weights.py`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path

from filelock import Timeout
from huggingface_hub import hf_hub_url
from huggingface_hub.file_download import http_get
from huggingface_hub.utils import WeakFileLock, build_hf_headers

logger = logging.getLogger(__name__)

LOCK_WAIT_S = 0.1  # a blob whose lock is held is being downloaded right now: leave it


def partials(blob_dir: Path, blob: str) -> list[Path]:
    """The partial files of one blob, largest first."""
    found = [*blob_dir.glob(f"{blob}.*.incomplete"), *blob_dir.glob(f"{blob}.incomplete")]
    return sorted(found, key=lambda p: _size(p), reverse=True)


def resume(
    files: Iterable[tuple[str, str, int]],
    *,
    repository: str,
    commit: str,
    repository_dir: Path,
    endpoint: str | None,
    token: str | None,
) -> None:
    """Continues each partial blob: `files` lists (path in the repository, blob name, size)."""
    blob_dir = repository_dir / "blobs"
    lock_dir = repository_dir.parent / ".locks" / repository_dir.name
    for path, blob, size in files:
        found = partials(blob_dir, blob)
        if not found:
            continue
        try:
            with WeakFileLock(lock_dir / f"{blob}.lock", timeout=LOCK_WAIT_S):
                if (blob_dir / blob).exists():  # finished since: the leftovers only take space
                    for stale in found:
                        stale.unlink(missing_ok=True)
                    continue
                url = hf_hub_url(repository, path, revision=commit, endpoint=endpoint)
                _continue(found, blob_dir / blob, url, size, token)
        except Timeout:
            continue


def _continue(found: list[Path], target: Path, url: str, size: int, token: str | None) -> None:
    best, *rest = found
    for stale in rest:
        stale.unlink(missing_ok=True)
    have = _size(best)
    if have > size:  # not this blob's bytes after all
        best.unlink(missing_ok=True)
        return
    logger.info("resuming %s at %d of %d bytes", url, have, size)
    with best.open("ab") as file:
        http_get(
            url,
            file,
            resume_size=have,
            headers=build_hf_headers(token=token or False),
            expected_size=size,
        )
    os.replace(best, target)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0
