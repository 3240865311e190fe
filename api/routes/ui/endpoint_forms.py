"""The web UI's endpoint forms: new, edit and delete, through the REST routes' own functions
with the signed-in caller; errors go back to the form next to their field. Included by
`api.routes.ui`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response
from pydantic import ValidationError

from api.deps import AppState, SessionDep, StateDep, address_of
from api.endpoint_service import create_endpoint, delete_endpoint, owned, update_endpoint
from api.model_files import hidden_from, model_choices
from api.routes.ui.respond import FormDep, need, not_found, page, redirect
from api.schemas import CreateLLMEndpointRequest, UpdateLLMEndpointRequest
from api.ui_session import ChangeDep, SignedInDep, UiSession
from appliance.db import session_scope
from appliance.errors import ConflictError, InvalidSpecError, NotFoundError
from appliance.models import Endpoint
from web import forms

MODEL_FILES_SHOWN = 50
PREFILLED = ("model", "framework")  # what a link (the Models page's "Deploy") may fill in

router = APIRouter(prefix="/ui", include_in_schema=False)


def model_files(state: AppState, ui: UiSession) -> list[dict[str, Any]]:
    """Entries of the models directory the signed-in team may use (GGUF files first),
    offered in the model field."""
    with session_scope(state.reader) as session:
        hidden = hidden_from(ui.caller, session=session)
    return model_choices(state.settings, hidden)[:MODEL_FILES_SHOWN]


def _form_page(
    request: Request,
    ui: UiSession,
    state: AppState,
    values: Mapping[str, str],
    errors: Mapping[str, str],
    endpoint: Endpoint | None = None,
) -> Response:
    return page(
        request,
        "endpoint_form.html",
        ui,
        "endpoints",
        status=422 if errors else 200,
        values=values,
        errors=errors,
        endpoint=endpoint,
        model_files=model_files(state, ui),
    )


@router.get("/endpoints/new")
def read_new_endpoint(
    request: Request,
    ui: SignedInDep,
    state: StateDep,
    model: str = Query("", max_length=255),
    framework: str = Query("", max_length=16),
) -> Response:
    need(ui.caller, "manage")
    given = {name: value for name, value in zip(PREFILLED, (model, framework), strict=True)}
    values = {**forms.DEFAULTS, **{k: v for k, v in given.items() if v}}
    return _form_page(request, ui, state, values, {})


@router.post("/endpoints/new")
def create_endpoint_from_form(
    request: Request, ui: ChangeDep, form: FormDep, session: SessionDep, state: StateDep
) -> Response:
    need(ui.caller, "manage")
    try:
        body = CreateLLMEndpointRequest.model_validate(forms.create_request(form))
        endpoint = create_endpoint(body, ui.caller, session, state, address=address_of(request))
    except ValidationError as exc:
        return _form_page(request, ui, state, form, forms.validation_errors(exc.errors()))
    except (InvalidSpecError, ConflictError) as exc:
        session.rollback()
        return _form_page(
            request, ui, state, form, {forms.form_field(exc.field): forms.form_message(exc.message)}
        )
    return redirect(f"/ui/endpoints/{endpoint.id}")


@router.get("/endpoints/{endpoint_id}/edit")
def read_edit_endpoint(
    request: Request, endpoint_id: str, ui: SignedInDep, session: SessionDep, state: StateDep
) -> Response:
    need(ui.caller, "manage")
    try:
        endpoint = owned(endpoint_id, ui.caller, session=session)
    except NotFoundError as exc:
        return not_found(request, ui, exc)
    return _form_page(request, ui, state, forms.current_values(endpoint), {}, endpoint)


@router.post("/endpoints/{endpoint_id}/edit")
def update_endpoint_from_form(
    request: Request,
    endpoint_id: str,
    ui: ChangeDep,
    form: FormDep,
    session: SessionDep,
    state: StateDep,
) -> Response:
    need(ui.caller, "manage")
    try:
        endpoint = owned(endpoint_id, ui.caller, session=session)
    except NotFoundError as exc:
        return not_found(request, ui, exc)
    current = forms.current_values(endpoint)
    shown = {**current, **{k: form.get(k, "") for k in forms.EDITABLE}}
    try:
        body = UpdateLLMEndpointRequest.model_validate(forms.update_request(form, current))
        update_endpoint(endpoint, body, ui.caller, session, state, address=address_of(request))
    except ValidationError as exc:
        errors = forms.validation_errors(exc.errors())
    except (InvalidSpecError, ConflictError) as exc:
        errors = {forms.form_field(exc.field): forms.form_message(exc.message)}
    else:
        return redirect(f"/ui/endpoints/{endpoint_id}")
    session.rollback()  # apply_update changed the row in place before it found the error
    with session_scope(state.engine) as fresh:
        unchanged = fresh.get(Endpoint, endpoint_id)
    return _form_page(request, ui, state, shown, errors, unchanged)


@router.post("/endpoints/{endpoint_id}/delete")
def delete_endpoint_from_form(
    request: Request, endpoint_id: str, ui: ChangeDep, session: SessionDep, state: StateDep
) -> Response:
    need(ui.caller, "manage")
    try:
        endpoint = owned(endpoint_id, ui.caller, session=session)
    except NotFoundError as exc:
        return not_found(request, ui, exc)
    delete_endpoint(endpoint, ui.caller, session, state, address=address_of(request))
    return redirect("/ui/endpoints")
