"""The web UI's read-only pages: the endpoints list, an endpoint's page (its live parts and
logs), GPUs, tasks and batches (and a batch's cancel and files); and the redirects from `/`
and `/ui`.
Included by `api.routes.ui`."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, Response, StreamingResponse
from redis.exceptions import RedisError
from sqlmodel import Session, col, select

from api import (
    batch_service,
    endpoint_logs,
    endpoint_service,
    file_service,
    gpu_inventory,
    ui_session,
)
from api.deps import AddressDep, AppState, SessionDep, StateDep
from api.routes.ui.respond import HEADERS, home, need, not_found, page, redirect
from api.ui_session import ChangeDep, SignedInDep
from appliance import bus, queries
from appliance.errors import NotFoundError
from appliance.keys import Caller
from appliance.models import Batch, Endpoint, Task, TaskStatus
from forwarder.worker import batches as worker_batches
from web import charts, forms, rates, views
from web.render import STATIC_URL

logger = logging.getLogger(__name__)

LIST_LIMIT = 200  # rows in the tasks and batches lists

router = APIRouter(prefix="/ui", include_in_schema=False)
root = APIRouter(include_in_schema=False)


@root.get("/")
def read_root() -> Response:
    return redirect("/ui/endpoints")


@root.get("/favicon.ico")
def read_favicon() -> Response:
    """Browsers ask for it on every page; it needs no key (`api/gate.py`)."""
    return redirect(f"{STATIC_URL}/favicon.svg")


@router.get("")
def read_ui(request: Request, state: StateDep) -> Response:
    """The signed-in key's first page (`home`); signing in first when there is no session."""
    ui = ui_session.load(state, request.cookies.get(ui_session.SESSION_COOKIE))
    return redirect(home(ui.caller) if ui else "/ui/endpoints")


# --- endpoints -------------------------------------------------------------------------------


def _redis_replies(state: AppState, commands: Sequence[tuple[str, Sequence[Any]]]) -> list[Any]:
    """Pipelined reads of live numbers; on a Redis outage the pages show none."""
    pipe = state.redis.pipeline(transaction=False)
    for name, args in commands:
        getattr(pipe, name)(*args)
    try:
        return list(pipe.execute())
    except RedisError as exc:
        logger.warning("cannot read live numbers from Redis: %s", exc)
        return [{} for _ in commands]


def _decoded(raw: Any) -> dict[str, str]:
    def text(v: Any) -> str:
        return v.decode() if isinstance(v, bytes) else str(v)

    return {text(k): text(v) for k, v in (raw or {}).items()}


def endpoint_rows(caller: Caller, session: Session, state: AppState) -> list[views.EndpointRow]:
    described = [
        endpoint_service.describe(e, session)
        for e in endpoint_service.team_endpoints(caller, session, name=None, newest=False)
    ]
    commands: list[tuple[str, Sequence[Any]]] = [
        ("hgetall", (rates.RATES_KEY.format(endpoint=p["name"], field="requests"),))
        for p in described
    ]
    replies = _redis_replies(state, [*commands, ("hgetall", (bus.LAST_REQUEST_KEY,))])
    last = _decoded(replies[-1])
    now = time.time()
    return [
        views.endpoint_row(
            public,
            rates.per_minute(_decoded(raw), now),
            float(last[public["id"]]) if public["id"] in last else None,
        )
        for public, raw in zip(described, replies, strict=False)
    ]


@router.get("/endpoints")
def read_endpoints_page(
    request: Request, ui: SignedInDep, session: SessionDep, state: StateDep
) -> Response:
    need(ui.caller, "manage")
    rows = endpoint_rows(ui.caller, session, state)
    return page(request, "endpoints.html", ui, "endpoints", rows=rows)


@router.get("/endpoints/table")
def read_endpoints_table(
    request: Request, ui: SignedInDep, session: SessionDep, state: StateDep
) -> Response:
    need(ui.caller, "manage")
    rows = endpoint_rows(ui.caller, session, state)
    return page(request, "_endpoints_table.html", ui, rows=rows)


def endpoint_context(
    endpoint_id: str, caller: Caller, session: Session, state: AppState
) -> dict[str, Any]:
    endpoint = endpoint_service.owned(endpoint_id, caller, session=session)
    progress = endpoint_service.progress_of(state).get(endpoint.id)
    public = endpoint_service.describe(endpoint, session, progress)
    events = [
        {"timestamp": e.at, "kind": e.kind, "message": e.message}
        for e in queries.list_events(endpoint.id, session=session, limit=200)
    ]
    fields = rates.FIELDS
    replies = _redis_replies(
        state,
        [("hgetall", (rates.RATES_KEY.format(endpoint=endpoint.name, field=f),)) for f in fields],
    )
    now = time.time()
    series = rates.series({f: _decoded(r) for f, r in zip(fields, replies, strict=True)}, now)
    start, step = now - rates.WINDOW_S, rates.BUCKET_S
    busy = endpoint.status in views.BUSY or any(r["state"] != "ready" for r in public["replicas"])
    return {
        "endpoint": endpoint,
        "public": public,
        "model": views.short_model(endpoint.model),
        "events": list(reversed(events))[:60],
        "steps": views.deploy_steps(events, endpoint.status, endpoint.max_replicas),
        "busy": busy,
        "charts": [
            charts.bar_chart("Requests", "req/s", series.requests_per_s, start, now, step),
            charts.bar_chart("Latency", "s", series.latency_s, start, now, step),
            charts.bar_chart("Tokens", "tok/s", series.tokens_per_s, start, now, step),
        ],
        "memory": forms.memory_text(endpoint.memory_bytes),
    }


@router.get("/endpoints/{endpoint_id}")
def read_endpoint_page(
    request: Request, endpoint_id: str, ui: SignedInDep, session: SessionDep, state: StateDep
) -> Response:
    need(ui.caller, "manage")
    try:
        context = endpoint_context(endpoint_id, ui.caller, session, state)
    except NotFoundError as exc:
        return not_found(request, ui, exc)
    return page(request, "endpoint.html", ui, "endpoints", **context)


@router.get("/endpoints/{endpoint_id}/live")
def read_endpoint_live(
    request: Request, endpoint_id: str, ui: SignedInDep, session: SessionDep, state: StateDep
) -> Response:
    """The endpoint page's changing parts, polled by the page's script."""
    need(ui.caller, "manage")
    try:
        context = endpoint_context(endpoint_id, ui.caller, session, state)
    except NotFoundError:
        return page(request, "_gone.html", ui, status=404)
    return page(request, "_endpoint_live.html", ui, **context)


@router.get("/endpoints/{endpoint_id}/logs")
def read_endpoint_logs(
    endpoint_id: str, ui: SignedInDep, state: StateDep, follow: bool = False
) -> Response:
    """The replicas' logs through the by-id route, following while the page is open."""
    need(ui.caller, "manage")
    lines = endpoint_logs.lines(endpoint_id, ui.caller, state, 200, follow, None)
    return StreamingResponse(lines, media_type=endpoint_logs.MEDIA_TYPE, headers=HEADERS)


# --- GPUs, tasks, batches --------------------------------------------------------------------


@router.get("/gpus")
def read_gpus_page(
    request: Request, ui: SignedInDep, session: SessionDep, state: StateDep
) -> Response:
    need(ui.caller, "manage")
    inventory = gpu_inventory.inventory(ui.caller, session, state)
    cards = views.gpu_cards(inventory["gpus"])
    return page(request, "gpus.html", ui, "gpus", cards=cards, inventory=inventory)


def _owned_rows(model: type[Task] | type[Batch], caller: Caller, session: Session) -> list[Any]:
    query = select(model).order_by(col(model.created_at).desc()).limit(LIST_LIMIT)
    query = queries.of_team(query, col(model.owner), caller)
    return list(session.exec(query).all())


@router.get("/tasks")
def read_tasks_page(request: Request, ui: SignedInDep, session: SessionDep) -> Response:
    need(ui.caller, "inference")  # as the API's task and batch routes: prompts and replies
    names = {e.id: e.name for e in queries.all_endpoints(session=session)}
    tasks = _owned_rows(Task, ui.caller, session)
    batches = _owned_rows(Batch, ui.caller, session)
    shown = {t.id: shown_status(t) for t in tasks}
    counts = {b.id: batch_service.batch_public(b, session)["request_counts"] for b in batches}
    return page(
        request,
        "tasks.html",
        ui,
        "tasks",
        tasks=tasks,
        shown=shown,
        batches=batches,
        counts=counts,
        names=names,
    )


@router.get("/batches/{batch_id}")
def read_batch_page(
    request: Request, batch_id: str, ui: SignedInDep, session: SessionDep
) -> Response:
    """A batch as OpenAI's API shows it (live counts while it runs), and its lines."""
    need(ui.caller, "inference")  # as the API's batch routes
    try:
        batch = batch_service.owned_batch(batch_id, ui.caller, session=session)
    except NotFoundError as exc:
        return not_found(request, ui, exc)
    query = select(Task).where(Task.batch_id == batch.id)
    lines = list(session.exec(query.order_by(col(Task.created_at), col(Task.id)).limit(LIST_LIMIT)))
    return page(
        request,
        "batch.html",
        ui,
        "tasks",
        batch=batch_service.batch_public(batch, session),
        cancellable=batch_service.cancellable(batch),
        lines=lines,
        shown={t.id: shown_status(t) for t in lines},
        metadata=views.pretty_json(batch.metadata_) if batch.metadata_ else "",
        errors=views.pretty_json(batch.errors) if batch.errors else "",
    )


@router.get("/files/{file_id}/content")
def read_file_from_page(
    request: Request, file_id: str, ui: SignedInDep, session: SessionDep
) -> Response:
    """A file of the team's (a batch's output or errors) downloaded from its page, as
    `GET /v1/files/{id}/content` gives it: an attachment, never rendered."""
    need(ui.caller, "inference")  # as the API's file routes
    try:
        row = file_service.owned_file(file_id, ui.caller, session=session)
    except NotFoundError as exc:
        return not_found(request, ui, exc)
    response = FileResponse(row.path, media_type="application/jsonl", filename=row.filename)
    response.headers.update(HEADERS)
    return response


@router.post("/batches/{batch_id}/cancel")
def cancel_batch_from_page(
    request: Request,
    batch_id: str,
    ui: ChangeDep,
    session: SessionDep,
    state: StateDep,
    address: AddressDep,
) -> Response:
    """The API's cancel; a batch that already ended is left as it is (its page says so)."""
    need(ui.caller, "inference")  # as the API's batch routes
    try:
        batch = batch_service.owned_batch(batch_id, ui.caller, session=session)
    except NotFoundError as exc:
        return not_found(request, ui, exc)
    if batch_service.cancellable(batch):
        batch_service.cancel(batch, ui.caller, session, state, address)
    return redirect(f"/ui/batches/{batch.id}")


def shown_status(task: Task) -> str:
    """A task's status as the pages show it: CANCELLED for a batch line its batch's cancel
    ended (the API says FAILURE, LLM Engine's statuses having no other word, and its batch
    counts it as neither completed nor failed)."""
    if task.status == TaskStatus.FAILURE and task.traceback == worker_batches.CANCELLED:
        return "CANCELLED"
    return str(task.status)


@router.get("/tasks/{task_id}")
def read_task_page(
    request: Request, task_id: str, ui: SignedInDep, session: SessionDep
) -> Response:
    need(ui.caller, "inference")  # as the API's task routes
    task = session.get(Task, task_id)
    if task is None or not ui.caller.owns(task.owner):
        return not_found(request, ui, NotFoundError(f"no task with id {task_id!r}"))
    endpoint = session.get(Endpoint, task.endpoint_id)
    return page(
        request,
        "task.html",
        ui,
        "tasks",
        task=task,
        shown=shown_status(task),
        endpoint_name=endpoint.name if endpoint else task.endpoint_id,
        payload=views.pretty_json(task.payload),
        result=views.pretty_json(task.result) if task.result is not None else "",
        took=views.duration(task.started_at, task.finished_at),
    )
