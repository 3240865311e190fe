"""`GET /v1/gpus`: each GPU of the box as the builder last read it, and which replicas hold it."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from api import gpu_inventory
from api.deps import CallerDep, SessionDep, StateDep, require

router = APIRouter(tags=["gpus"], dependencies=[require("manage")])


@router.get("/v1/gpus")
def read_gpus(caller: CallerDep, session: SessionDep, state: StateDep) -> dict[str, Any]:
    return gpu_inventory.inventory(caller, session, state)
