"""Storage routes (`/v1/storage/...`): the disk, model files in the models directory (list,
upload, delete), models in the Hugging Face cache (list, delete) and the appliance's images
(list, prune). Listing and uploading need the `manage` scope; deleting, replacing and pruning
need an administrator (the services check it). `docs/storage.md` describes them."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse

from api import hf_models, images, model_files, model_upload, storage
from api.deps import AddressDep, CallerDep, SessionDep, StateDep, require

router = APIRouter(prefix="/v1/storage", tags=["storage"], dependencies=[require("manage")])


@router.get("/disk")
def read_disk(state: StateDep) -> dict[str, Any]:
    """Total, used and free bytes of the models directory's and the HF cache's filesystems."""
    return storage.disk(state.settings)


@router.get("/model-files")
def read_model_files(caller: CallerDep, session: SessionDep, state: StateDep) -> dict[str, Any]:
    return model_files.read_model_files(caller, session, state.settings)


GGUF_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    }
}


# {name:path}: a name with a folder in it is refused by the name rule (422), not a 404
@router.put("/model-files/{name:path}", status_code=201, openapi_extra=GGUF_BODY)
async def upload_model_file(
    name: str,
    request: Request,
    caller: CallerDep,
    state: StateDep,
    address: AddressDep,
    overwrite: bool = Query(False, description="Replace an existing file (administrators)."),
) -> JSONResponse:
    """The request body is the GGUF file, streamed to disk; answers its size and sha256."""
    answer = await model_upload.upload(
        name,
        request.stream(),
        request.headers.get("content-length"),
        overwrite,
        caller,
        state.engine,
        state.settings,
        address,
    )
    return JSONResponse(answer, status_code=201)


@router.delete("/model-files/{name}")
def delete_model_file(
    name: str, caller: CallerDep, session: SessionDep, state: StateDep, address: AddressDep
) -> dict[str, Any]:
    return model_files.delete_entry(name, caller, session, state.settings, address)


@router.get("/hf-models")
def read_hf_models(caller: CallerDep, session: SessionDep, state: StateDep) -> dict[str, Any]:
    """The cached repositories the key's team asked to download or may call an endpoint of
    (every one for an administrator)."""
    return hf_models.read_hf_models(caller, session, state.settings, state.redis)


@router.delete("/hf-models/{repo_id:path}")
def delete_hf_model(
    repo_id: str, caller: CallerDep, session: SessionDep, state: StateDep, address: AddressDep
) -> dict[str, Any]:
    return hf_models.delete_repo(repo_id, caller, session, state.settings, state.redis, address)


@router.get("/images")
def read_images(caller: CallerDep, session: SessionDep, state: StateDep) -> dict[str, Any]:
    return images.read_images(caller, session, state.settings, state.redis)


@router.post("/images/prune", status_code=202)
def prune_images(
    caller: CallerDep, session: SessionDep, state: StateDep, address: AddressDep
) -> dict[str, Any]:
    """Ask the builder to remove the appliance's images no endpoint or container uses."""
    return images.request_prune(caller, session, state.redis, address)


@router.get("/images/prune/{prune_id}")
def read_prune(
    prune_id: str, caller: CallerDep, session: SessionDep, state: StateDep
) -> dict[str, Any]:
    return images.read_prune(prune_id, caller, session, state.redis)
