"""The web UI's Models page: the disk, model files, Hugging Face cache models and the
appliance's images with sizes and users; upload (the page's script sends the file as the body
of `PUT /ui/models/files/{name}`, showing its progress), delete and prune. Every action goes
through the storage services the REST routes call (`api/model_files.py`, `api/model_upload.py`,
`api/hf_models.py`, `api/images.py`), with the signed-in caller. Included by `api.routes.ui`.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from sqlmodel import Session

from api import hf_downloads, hf_models, images, model_files, model_upload, storage
from api.deps import AppState, SessionDep, StateDep, address_of
from api.errors import invalid_field, status_of
from api.routes.ui.respond import FormDep, need, page, redirect
from api.ui_session import ChangeDep, SignedInDep, UiSession
from appliance.db import session_scope
from appliance.errors import ApplianceError, CapacityError, NotFoundError
from web import views

router = APIRouter(prefix="/ui", include_in_schema=False)


def _context(ui: UiSession, session: Session, state: AppState) -> dict[str, Any]:
    settings = state.settings
    try:
        listed_images: dict[str, Any] = images.read_images(
            ui.caller, session, settings, state.redis
        )
    except CapacityError as exc:
        listed_images = {"data": [], "checked_at": None, "message": exc.message}
    return {
        "files": model_files.read_model_files(ui.caller, session, settings)["data"],
        "hf": hf_models.read_hf_models(ui.caller, session, settings, state.redis),
        "downloads": hf_downloads.read_downloads(ui.caller, state.redis, settings)["downloads"],
        "images": listed_images,
        "disks": views.disk_cards(storage.disk(settings)),
        "limit": settings.model_upload_max_bytes,
    }


def _models_page(
    request: Request,
    ui: UiSession,
    state: AppState,
    error: ApplianceError | None = None,
    prune_id: str | None = None,
) -> Response:
    with session_scope(state.reader) as session:  # read only: never waits for a writer
        context = _context(ui, session, state)
    return page(
        request,
        "models.html",
        ui,
        "models",
        status=status_of(error) if error else 200,
        error=error.message if error else "",
        prune_id=prune_id,
        **context,
    )


def _refused(
    request: Request, ui: UiSession, session: Session, state: AppState, exc: ApplianceError
) -> Response:
    session.rollback()  # nothing of a refused change is kept
    return _models_page(request, ui, state, error=exc)


@router.get("/models")
def read_models_page(
    request: Request,
    ui: SignedInDep,
    state: StateDep,
    prune: str | None = Query(None, max_length=64, pattern=images.PRUNE_ID),
) -> Response:
    """`prune`: the prune the page polls (`/ui/models/prune/<id>`) and draws its reply from,
    held to a prune id's shape: `../` in it would have the page draw another page's reply."""
    need(ui.caller, "manage")
    return _models_page(request, ui, state, prune_id=prune)


@router.get("/models/files")
def read_model_files_card(
    request: Request, ui: SignedInDep, session: SessionDep, state: StateDep
) -> Response:
    """The page's "Model files" card alone: the page's script draws it again after an upload."""
    need(ui.caller, "manage")
    files = model_files.read_model_files(ui.caller, session, state.settings)["data"]
    return page(request, "_model_files.html", ui, files=files)


@router.put("/models/files/{name:path}")  # a name with a folder: refused by its rule, not 404
async def upload_model_file_from_page(
    name: str, request: Request, ui: ChangeDep, state: StateDep, overwrite: bool = False
) -> Response:
    """The page's upload: the body is the file; errors answer `{"detail": ...}` for the
    script to show."""
    need(ui.caller, "manage")
    answer = await model_upload.upload(
        name,
        request.stream(),
        request.headers.get("content-length"),
        overwrite,
        ui.caller,
        state.engine,
        state.settings,
        address_of(request),
    )
    return JSONResponse(answer, status_code=201)


@router.post("/models/files/{name}/delete")
def delete_model_file_from_page(
    request: Request, name: str, ui: ChangeDep, session: SessionDep, state: StateDep
) -> Response:
    need(ui.caller, "manage")
    try:
        model_files.delete_entry(name, ui.caller, session, state.settings, address_of(request))
    except ApplianceError as exc:
        return _refused(request, ui, session, state, exc)
    return redirect("/ui/models")


@router.post("/models/hf/{repo_id:path}/delete")
def delete_hf_model_from_page(
    request: Request, repo_id: str, ui: ChangeDep, session: SessionDep, state: StateDep
) -> Response:
    need(ui.caller, "manage")
    try:
        hf_models.delete_repo(
            repo_id, ui.caller, session, state.settings, state.redis, address_of(request)
        )
    except ApplianceError as exc:
        return _refused(request, ui, session, state, exc)
    return redirect("/ui/models")


@router.post("/models/hf-downloads")
def download_hf_model_from_page(
    request: Request, ui: ChangeDep, form: FormDep, state: StateDep
) -> Response:
    """The hub download form: the same request as `POST /v1/storage/hf-downloads`."""
    need(ui.caller, "manage")
    try:
        body = hf_downloads.HfDownloadCreate(
            repository=form.get("repository", "").strip(),
            revision=form.get("revision", "").strip() or "main",
        )
    except ValidationError as exc:
        return _models_page(request, ui, state, error=invalid_field(exc))
    try:
        hf_downloads.request_download(
            body, ui.caller, state.redis, state.engine, state.settings, address_of(request)
        )
    except ApplianceError as exc:
        return _models_page(request, ui, state, error=exc)
    return redirect("/ui/models#hub-download")


@router.post("/models/images/prune")
def prune_images_from_page(
    request: Request, ui: ChangeDep, session: SessionDep, state: StateDep
) -> Response:
    need(ui.caller, "manage")
    try:
        queued = images.request_prune(ui.caller, session, state.redis, address_of(request))
    except ApplianceError as exc:
        return _refused(request, ui, session, state, exc)
    return redirect(f"/ui/models?prune={queued['id']}")


@router.get("/models/prune/{prune_id}")
def read_prune_fragment(
    request: Request, prune_id: str, ui: SignedInDep, session: SessionDep, state: StateDep
) -> Response:
    """The prune's outcome, polled by the page until it is done."""
    need(ui.caller, "manage")
    try:
        result = images.read_prune(prune_id, ui.caller, session, state.redis)
    except NotFoundError as exc:
        return page(request, "_prune.html", ui, status=404, result=None, message=exc.message)
    return page(request, "_prune.html", ui, result=result, message="")
