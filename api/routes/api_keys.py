"""API key routes: an admin makes keys for any user and team, a user makes keys for themself;
a key's text is shown once; keys can expire, be revoked and carry scopes and limits
(`api/key_service.py` does the work)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from api import key_service
from api.deps import AddressDep, CallerDep, SessionDep, StateDep
from api.key_service import CreateKeyRequest
from appliance.models import ApiKey

router = APIRouter(prefix="/v1/api-keys", tags=["api-keys"])


@router.post("", status_code=201)
def create_api_key(
    body: CreateKeyRequest,
    caller: CallerDep,
    session: SessionDep,
    state: StateDep,
    address: AddressDep,
) -> dict[str, Any]:
    return key_service.create(body, caller, session, state, address)


@router.get("")
def read_api_keys(caller: CallerDep, session: SessionDep) -> dict[str, Any]:
    return {"api_keys": key_service.listed(caller, session)}


@router.get("/{key_id}")
def read_api_key(key_id: str, caller: CallerDep, session: SessionDep) -> dict[str, Any]:
    return key_service.public(key_service.visible(session.get(ApiKey, key_id), caller))


@router.delete("/{key_id}")
def revoke_api_key(
    key_id: str, caller: CallerDep, session: SessionDep, address: AddressDep
) -> dict[str, Any]:
    row = key_service.visible(session.get(ApiKey, key_id), caller)
    key_service.revoke(row, caller, session, address=address)
    return key_service.public(row)
