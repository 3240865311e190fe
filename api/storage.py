"""What the storage services share (`api/model_files.py`, `api/model_upload.py`,
`api/hf_models.py`, `api/images.py`): the disk figures, and the "used by" rule.

Model files, Hugging Face snapshots and images are the box's, not a team's: every key with the
`manage` scope sees every model file and image; a Hugging Face snapshot is listed to a team
only where it asked for it or may call an endpoint that uses it (`api/hf_models.py`), so no
team learns which models another fetched. Which endpoints use one is named only for the
endpoints the caller may see (its team's; every team's for an admin) and counted for the rest,
so a listing never tells one team another's endpoint names.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from appliance.disk import check_room, nearest_folder
from appliance.errors import ConflictError, ForbiddenError
from appliance.keys import Caller
from appliance.models import Endpoint
from appliance.settings import Settings


def _usage(path: Path) -> dict[str, Any]:
    """The filesystem `path` is on (its nearest existing folder when it is not made yet)."""
    where = nearest_folder(path)
    usage = shutil.disk_usage(where)
    return {
        "path": str(path),
        "total_bytes": usage.total,
        "used_bytes": usage.used,
        "free_bytes": usage.free,
        "device": os.stat(where).st_dev,
    }


def disk(settings: Settings) -> dict[str, Any]:
    """Total and free bytes of the models directory's and the Hugging Face cache's
    filesystems; `same_filesystem` when they share one (their free space is one pool)."""
    models, cache = _usage(settings.models_dir), _usage(settings.hf_cache_path)
    same = models.pop("device") == cache.pop("device")
    return {"models_dir": models, "hf_cache": cache, "same_filesystem": same}


def check_database_room(settings: Settings, adding: int, what: str) -> None:
    """`check_room` for rows of the database: async tasks and the requests of batches, which
    hold what their requests sent (up to 2 MiB a task, a whole batch file a batch)."""
    check_room(settings.database_path, adding, settings.disk_reserve_bytes, what)


def used_by(users: list[Endpoint], caller: Caller) -> dict[str, Any]:
    """The endpoints that use something: named where the caller may see them, else counted."""
    seen = [e for e in users if caller.owns(e.owner)]
    return {
        "used_by": [{"id": e.id, "name": e.name} for e in seen],
        "used_by_other_teams": len(users) - len(seen),
    }


def refuse_in_use(what: str, users: list[Endpoint], field: str) -> None:
    """A 409 naming every endpoint that uses `what` (only administrators delete, and they see
    every team's endpoints)."""
    if users:
        names = ", ".join(sorted(e.name for e in users))
        raise ConflictError(
            f"{what} is in use by endpoint(s) {names}: delete those endpoints or point them at "
            "another model first",
            field=field,
        )


def require_admin(caller: Caller, action: str) -> None:
    """Deleting and pruning change the whole box: administrators only."""
    if not caller.is_admin:
        raise ForbiddenError(f"only an administrator may {action}")
