"""The declared configuration over HTTP: `GET /v1/config` exports it (YAML is the CLI's
business), `POST /v1/config/apply` makes the install match a document. `appliance export`
and `appliance apply -f` call these with a key, so validation, tenancy, audit and builder
nudges happen exactly as for any other change."""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Literal

from fastapi import APIRouter, Query

from api import declared, declared_apply
from api.deps import AddressDep, CallerDep, SessionDep, StateDep, require

router = APIRouter(prefix="/v1/config", tags=["config"], dependencies=[require("manage")])


@router.get("")
def read_config(
    caller: CallerDep,
    session: SessionDep,
    state: StateDep,
    format: Literal["appliance", "llm-engine"] = Query(
        "appliance",
        description="`llm-engine`: LLM Engine's create-endpoint requests (`endpoints`), and "
        "the endpoints it cannot express, with why (`skipped`).",
    ),
) -> dict[str, Any]:
    if format == "llm-engine":
        endpoints, skipped = declared.llm_engine_export(caller, session)
        return {"format": "llm-engine", "endpoints": endpoints, "skipped": skipped}
    return declared.export(caller, session, state.settings, time.time())


@router.post("/apply")
def apply_config(
    document: declared_apply.Document,
    caller: CallerDep,
    state: StateDep,
    address: AddressDep,
    prune: bool = Query(False, description="Delete endpoints and revoke keys not named."),
    dry_run: bool = Query(False, description="Say what would change; change nothing."),
) -> dict[str, Any]:
    report = declared_apply.apply(
        document, caller, state, prune=prune, dry_run=dry_run, address=address
    )
    return dataclasses.asdict(report)
