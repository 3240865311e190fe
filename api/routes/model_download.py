"""LLM Engine's `Model.download` (`POST /v1/llm/model-endpoints/download`): the files of an
endpoint's model as URLs the appliance serves (`GET /v1/llm/model-endpoints/{name}/files/...`,
with the same key), for models that live in the models directory (a GGUF file, a checkpoint
directory). A model its replicas fetch from Hugging Face is a 400 saying where to get it.
Only the endpoint's team (or an admin) may download its weights, and only weights the team may
use: never another team's upload (`api.model_files.hidden_from`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse
from pydantic import ConfigDict, Field

from api.body import Body
from api.deps import CallerDep, SessionDep, StateDep, require
from api.endpoint_service import owned_by_name
from api.model_files import hidden_from
from appliance.errors import BadRequestError, NotFoundError
from appliance.models import Endpoint
from builder.policy import resolve_model_path
from builder.specs import MODELS_MOUNT, is_local_model

router = APIRouter(
    prefix="/v1/llm/model-endpoints", tags=["llm-endpoints"], dependencies=[require("manage")]
)
MAX_FILES = 10_000


class ModelDownloadRequest(Body):
    model_config = ConfigDict(extra="forbid")

    model_name: str = Field(min_length=1, max_length=63, description="The endpoint's name")
    download_format: Literal["hugging_face"] = "hugging_face"


@router.post("/download")
def download_model(
    body: ModelDownloadRequest,
    request: Request,
    caller: CallerDep,
    session: SessionDep,
    state: StateDep,
) -> dict[str, Any]:
    """LLM Engine's ModelDownloadResponse: `{urls: {file name: URL}}`."""
    endpoint = owned_by_name(body.model_name, caller, session=session)
    hidden = hidden_from(caller, session=session)
    files = model_files(endpoint, state.settings.models_dir, hidden)
    base = f"{str(request.base_url).rstrip('/')}/v1/llm/model-endpoints/{endpoint.name}/files/"
    return {"urls": {name: base + quote(name) for name in sorted(files)}}


@router.api_route("/{name}/files/{path:path}", methods=["GET", "HEAD"], response_class=FileResponse)
def read_model_file(
    name: str, path: str, caller: CallerDep, session: SessionDep, state: StateDep
) -> FileResponse:
    """One file of the endpoint's model, named as `download` lists it."""
    endpoint = owned_by_name(name, caller, session=session)
    hidden = hidden_from(caller, session=session)
    found = model_files(endpoint, state.settings.models_dir, hidden).get(path)
    if found is None:
        raise NotFoundError(f"the model of {name!r} has no file {path!r}", field="path")
    return FileResponse(found, filename=found.name)


def model_files(endpoint: Endpoint, models_dir: Path, hidden: frozenset[str]) -> dict[str, Path]:
    """The files of the endpoint's model by their path inside it (a file: its name), each
    resolved inside the models directory; symbolic links that leave it are left out. A model
    in another team's upload (`hidden`: an endpoint made before uploads were a team's) is
    answered as a missing one."""
    if not is_local_model(endpoint.model):
        raise BadRequestError(
            f"the model of {endpoint.name!r} ({endpoint.model!r}) is not in the appliance's "
            "models directory: its replicas fetch it from Hugging Face (or a custom image "
            "carries it), so download it from there",
            field="model_name",
        )
    root = Path(os.path.realpath(models_dir))
    relative = resolve_model_path(models_dir, endpoint.model, hidden=hidden).removeprefix(
        MODELS_MOUNT + "/"
    )
    top = root / relative
    if top.is_file():
        return {top.name: top}
    files: dict[str, Path] = {}
    for folder, _, names in os.walk(top):
        for file_name in names:
            real = Path(os.path.realpath(Path(folder) / file_name))
            if root in real.parents and real.is_file():
                files[(Path(folder) / file_name).relative_to(top).as_posix()] = real
            if len(files) > MAX_FILES:
                raise BadRequestError(
                    f"the model of {endpoint.name!r} has over {MAX_FILES} files; copy it from "
                    "the models directory instead",
                    field="model_name",
                )
    return files
