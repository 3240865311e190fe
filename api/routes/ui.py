"""The web UI's routes under `/ui`: pages rendered from `web`'s templates, reusing the REST
routes' own functions (create, update, delete, describe, logs, GPUs, keys) with the signed-in
caller, so the UI can do nothing the API would refuse. Also samples the data plane's counters
into Redis every few seconds for the charts (`sample_metrics`, run by this router's lifespan).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Annotated, Any

import redis.asyncio as aioredis
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response, StreamingResponse
from fastapi.templating import Jinja2Templates
from pydantic import BaseModel, Field, ValidationError
from redis.exceptions import RedisError
from sqlmodel import Session, col, select

from api import ui_session
from api.deps import AppState, SessionDep, StateDep
from api.errors import status_of
from api.routes import api_keys, gpus, model_endpoints
from api.routes.llm_endpoints import create_endpoint, delete_endpoint, update_endpoint
from api.schemas import CreateLLMEndpointRequest, UpdateLLMEndpointRequest
from api.ui_session import ChangeDep, SignedInDep, UiSession
from appliance import bus, queries
from appliance.db import session_scope
from appliance.errors import (
    ApplianceError,
    AuthError,
    ConflictError,
    ForbiddenError,
    InvalidSpecError,
    NotFoundError,
)
from appliance.keys import Caller
from appliance.models import Batch, Endpoint, Task
from forwarder.proxy import forward
from forwarder.usage import StreamUsage
from web import charts, forms, rates, render, views

logger = logging.getLogger(__name__)

SAMPLE_EVERY_S = 5.0
LIST_LIMIT = 200  # rows in the tasks and batches lists
MODEL_FILES_SHOWN = 50
NAV = (
    ("endpoints", "Endpoints", "/ui/endpoints"),
    ("playground", "Playground", "/ui/playground"),
    ("gpus", "GPUs", "/ui/gpus"),
    ("tasks", "Tasks", "/ui/tasks"),
    ("keys", "API keys", "/ui/keys"),
)
HEADERS = {
    "content-security-policy": "default-src 'self'; img-src 'self' data:; "
    "style-src 'self'; script-src 'self'; frame-ancestors 'none'; form-action 'self'",
    "x-frame-options": "DENY",
    "x-content-type-options": "nosniff",
    "referrer-policy": "same-origin",
    "cache-control": "no-store",
}


async def sample_metrics(state: AppState) -> None:
    """Every SAMPLE_EVERY_S, add what the data plane counted since last time into Redis."""
    client = aioredis.Redis.from_url(str(state.settings.redis_url), socket_connect_timeout=5)
    registry = state.forwarder.metrics.registry
    before = rates.totals(registry.collect())
    try:
        while True:
            await asyncio.sleep(SAMPLE_EVERY_S)
            after = rates.totals(registry.collect())
            try:
                await _store_rates(client, rates.deltas(before, after), time.time())
            except RedisError as exc:
                logger.warning("cannot store request rates in Redis: %s", exc)
                continue
            before = after
    finally:
        await client.aclose()


async def _store_rates(client: aioredis.Redis, changes: rates.Counters, now: float) -> None:
    if not changes:
        return
    bucket = str(rates.bucket_of(now))
    pipe = client.pipeline(transaction=False)
    names = []
    for endpoint, fields in changes.items():
        for field, value in fields.items():
            name = rates.RATES_KEY.format(endpoint=endpoint, field=field)
            names.append(name)
            pipe.hincrbyfloat(name, bucket, value)
            pipe.expire(name, rates.KEPT_S)
            pipe.hkeys(name)
    replies = await pipe.execute()
    prune = client.pipeline(transaction=False)
    for name, fields in zip(names, replies[2::3], strict=True):
        stale = rates.stale_buckets(dict.fromkeys(fields, 0), now)
        if stale:
            prune.hdel(name, *[str(b) for b in stale])
    await prune.execute()


@asynccontextmanager
async def _sampling(app: FastAPI) -> AsyncIterator[None]:
    task = asyncio.create_task(sample_metrics(app.state.appliance))
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


router = APIRouter(prefix="/ui", include_in_schema=False, lifespan=_sampling)
root = APIRouter(include_in_schema=False)
templates = Jinja2Templates(env=render.environment())


def page(
    request: Request,
    name: str,
    ui: UiSession | None,
    active: str = "",
    status: int = 200,
    **context: Any,
) -> Response:
    response = templates.TemplateResponse(
        request,
        name,
        {"ui": ui, "nav": NAV, "active": active, "now": time.time(), **context},
        status_code=status,
    )
    response.headers.update(HEADERS)
    return response


def redirect(url: str) -> Response:
    return RedirectResponse(url, status_code=303, headers=HEADERS)


async def form_data(request: Request) -> dict[str, str]:
    return {k: str(v) for k, v in (await request.form()).items()}


FormDep = Annotated[dict[str, str], Depends(form_data)]


def need(caller: Caller, scope: str) -> None:
    if not caller.can(scope):
        raise ForbiddenError(f"this key lacks the {scope!r} scope")


@root.get("/")
def read_root() -> Response:
    return redirect("/ui/endpoints")


@router.get("")
def read_ui() -> Response:
    return redirect("/ui/endpoints")


# --- sign-in ---------------------------------------------------------------------------------


def _safe_next(target: str | None) -> str:
    if not target or not target.startswith("/ui/") or target.startswith("/ui/sign"):
        return "/ui/endpoints"
    return "/ui/endpoints" if "\\" in target or "//" in target else target


@router.get("/sign-in")
def read_sign_in(request: Request, state: StateDep, next: str | None = None) -> Response:
    if ui_session.load(state, request.cookies.get(ui_session.SESSION_COOKIE)):
        return redirect(_safe_next(next))
    token = ui_session.signin_token(request)
    response = page(request, "signin.html", None, next=_safe_next(next), error="", csrf=token)
    ui_session.set_signin_cookie(response, request, token)
    return response


@router.post("/sign-in")
def sign_in(request: Request, state: StateDep, form: FormDep) -> Response:
    ui_session.check_signin_csrf(request, form.get("csrf", ""))
    target = _safe_next(form.get("next"))
    try:
        token, _ = ui_session.start(state, form.get("key", "").strip())
    except AuthError as exc:
        error = "That key was not accepted." if "invalid" in exc.message else exc.message
        csrf = form.get("csrf", "")
        return page(request, "signin.html", None, status=401, next=target, error=error, csrf=csrf)
    response = redirect(target)
    ui_session.set_session_cookie(response, request, token)
    return response


@router.post("/sign-out")
def sign_out(request: Request, state: StateDep, ui: ChangeDep) -> Response:
    ui_session.end(state, request.cookies.get(ui_session.SESSION_COOKIE))
    response = redirect("/ui/sign-in")
    ui_session.clear_cookies(response)
    return response


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
    described = model_endpoints.read_model_endpoints(caller, session)["model_endpoints"]
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


def model_files(state: AppState) -> list[str]:
    """Files in the models directory, offered as suggestions in the model field."""
    root = state.settings.models_dir
    try:
        found = sorted(p.name for p in root.iterdir() if not p.name.startswith("."))
    except OSError:
        return []
    return found[:MODEL_FILES_SHOWN]


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
        model_files=model_files(state),
    )


@router.get("/endpoints/new")
def read_new_endpoint(request: Request, ui: SignedInDep, state: StateDep) -> Response:
    need(ui.caller, "manage")
    return _form_page(request, ui, state, forms.DEFAULTS, {})


@router.post("/endpoints/new")
def create_endpoint_from_form(
    request: Request, ui: ChangeDep, form: FormDep, session: SessionDep, state: StateDep
) -> Response:
    need(ui.caller, "manage")
    try:
        body = CreateLLMEndpointRequest.model_validate(forms.create_request(form))
        endpoint = create_endpoint(body, ui.caller, session, state)
    except ValidationError as exc:
        return _form_page(request, ui, state, form, forms.validation_errors(exc.errors()))
    except (InvalidSpecError, ConflictError) as exc:
        session.rollback()
        return _form_page(request, ui, state, form, {forms.form_field(exc.field): exc.message})
    return redirect(f"/ui/endpoints/{endpoint.id}")


def current_values(endpoint: Endpoint) -> dict[str, str]:
    """An endpoint's spec as the edit form shows it."""
    return {
        "name": endpoint.name,
        "framework": endpoint.framework,
        "model": views.short_model(endpoint.model),
        "gpus": str(endpoint.gpus),
        "min_replicas": str(endpoint.min_replicas),
        "max_replicas": str(endpoint.max_replicas),
        "concurrency": str(endpoint.target_concurrency),
        "endpoint_type": endpoint.endpoint_type,
        "cpus": forms.cpus_text(endpoint.cpus),
        "memory": forms.memory_text(endpoint.memory_bytes),
        "idle_timeout": str(endpoint.idle_timeout_s),
        "public": "on" if endpoint.public_inference else "",
    }


def not_found(request: Request, ui: UiSession, exc: NotFoundError) -> Response:
    return page(request, "notfound.html", ui, status=404, message=exc.message)


@router.get("/endpoints/{endpoint_id}/edit")
def read_edit_endpoint(
    request: Request, endpoint_id: str, ui: SignedInDep, session: SessionDep, state: StateDep
) -> Response:
    need(ui.caller, "manage")
    try:
        endpoint = model_endpoints.owned(endpoint_id, ui.caller, session=session)
    except NotFoundError as exc:
        return not_found(request, ui, exc)
    return _form_page(request, ui, state, current_values(endpoint), {}, endpoint)


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
        endpoint = model_endpoints.owned(endpoint_id, ui.caller, session=session)
    except NotFoundError as exc:
        return not_found(request, ui, exc)
    current = current_values(endpoint)
    shown = {**current, **{k: form.get(k, "") for k in forms.EDITABLE}}
    try:
        body = UpdateLLMEndpointRequest.model_validate(forms.update_request(form, current))
        update_endpoint(endpoint, body, ui.caller, session, state)
    except ValidationError as exc:
        errors = forms.validation_errors(exc.errors())
    except (InvalidSpecError, ConflictError) as exc:
        errors = {forms.form_field(exc.field): exc.message}
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
        endpoint = model_endpoints.owned(endpoint_id, ui.caller, session=session)
    except NotFoundError as exc:
        return not_found(request, ui, exc)
    delete_endpoint(endpoint, ui.caller, session, state)
    return redirect("/ui/endpoints")


def endpoint_context(
    endpoint_id: str, caller: Caller, session: Session, state: AppState
) -> dict[str, Any]:
    endpoint = model_endpoints.owned(endpoint_id, caller, session=session)
    public = model_endpoints.describe(endpoint, session)
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
        "steps": views.deploy_steps(events, endpoint.status),
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
    return model_endpoints.read_endpoint_logs(
        endpoint_id, ui.caller, state, tail=200, follow=follow, replica_id=None
    )


# --- GPUs, tasks, batches --------------------------------------------------------------------


@router.get("/gpus")
def read_gpus_page(
    request: Request, ui: SignedInDep, session: SessionDep, state: StateDep
) -> Response:
    need(ui.caller, "manage")
    inventory = gpus.read_gpus(ui.caller, session, state)
    cards = views.gpu_cards(inventory["gpus"])
    return page(request, "gpus.html", ui, "gpus", cards=cards, inventory=inventory)


def _owned_rows(model: type[Task] | type[Batch], caller: Caller, session: Session) -> list[Any]:
    query = select(model).order_by(col(model.created_at).desc()).limit(LIST_LIMIT)
    if not caller.is_admin:
        query = query.where(col(model.owner) == caller.team)
    return list(session.exec(query).all())


@router.get("/tasks")
def read_tasks_page(request: Request, ui: SignedInDep, session: SessionDep) -> Response:
    names = {e.id: e.name for e in queries.all_endpoints(session=session)}
    tasks = _owned_rows(Task, ui.caller, session)
    batches = _owned_rows(Batch, ui.caller, session)
    return page(request, "tasks.html", ui, "tasks", tasks=tasks, batches=batches, names=names)


@router.get("/tasks/{task_id}")
def read_task_page(
    request: Request, task_id: str, ui: SignedInDep, session: SessionDep
) -> Response:
    task = session.get(Task, task_id)
    if task is None or not (ui.caller.is_admin or task.owner == ui.caller.team):
        return not_found(request, ui, NotFoundError(f"no task with id {task_id!r}"))
    endpoint = session.get(Endpoint, task.endpoint_id)
    return page(
        request,
        "task.html",
        ui,
        "tasks",
        task=task,
        endpoint_name=endpoint.name if endpoint else task.endpoint_id,
        payload=views.pretty_json(task.payload),
        result=views.pretty_json(task.result) if task.result is not None else "",
        took=views.duration(task.started_at, task.finished_at),
    )


# --- API keys --------------------------------------------------------------------------------


def _keys_page(
    request: Request,
    ui: UiSession,
    state: AppState,
    *,
    made: Mapping[str, Any] | None = None,
    errors: Mapping[str, str] | None = None,
    values: Mapping[str, str] | None = None,
) -> Response:
    with session_scope(state.engine) as session:  # the route's session may have committed
        listed = api_keys.read_api_keys(ui.caller, session)["api_keys"]
    now = time.time()
    for key in listed:
        key["state"] = views.key_state(key, now)
    return page(
        request,
        "keys.html",
        ui,
        "keys",
        status=422 if errors else 200,
        keys=listed,
        made=made,
        errors=errors or {},
        values=values or {"scope_inference": "on", "scope_manage": "on"},
    )


@router.get("/keys")
def read_keys_page(request: Request, ui: SignedInDep, state: StateDep) -> Response:
    return _keys_page(request, ui, state)


def _key_request(form: Mapping[str, str]) -> dict[str, Any]:
    body: dict[str, Any] = {
        "name": form.get("name", "").strip(),
        "scopes": [s for s in ("inference", "manage") if form.get(f"scope_{s}") == "on"],
    }
    days = form.get("expires_days", "").strip()
    if days:
        try:
            body["expires_in_seconds"] = int(float(days) * 86400)
        except ValueError:
            raise InvalidSpecError("Enter a number of days.", field="expires") from None
    if not body["scopes"]:
        raise InvalidSpecError("Pick at least one scope.", field="scopes")
    return body


KEY_FIELDS = {
    "name": "name",
    "scopes": "scopes",
    "expires": "expires",
    "expires_in_seconds": "expires",
}


@router.post("/keys")
def create_key_from_form(
    request: Request, ui: ChangeDep, form: FormDep, session: SessionDep, state: StateDep
) -> Response:
    try:
        body = api_keys.CreateKeyRequest.model_validate(_key_request(form))
        made = api_keys.create_api_key(body, ui.caller, session, state)
    except ValidationError as exc:
        errors = {
            KEY_FIELDS.get(str((e.get("loc") or ("",))[0]), ""): (
                "Use letters, digits, spaces and . _ @ - (at most 64)."
                if e.get("type") == "string_pattern_mismatch"
                else str(e.get("msg"))
            )
            for e in reversed(exc.errors())
        }
        return _keys_page(request, ui, state, errors=errors, values=form)
    except (InvalidSpecError, ForbiddenError) as exc:
        session.rollback()
        errors = {KEY_FIELDS.get(exc.field or "", ""): exc.message}
        return _keys_page(request, ui, state, errors=errors, values=form)
    return _keys_page(request, ui, state, made=made)


@router.post("/keys/{key_id}/revoke")
def revoke_key_from_form(
    request: Request, key_id: str, ui: ChangeDep, session: SessionDep
) -> Response:
    try:
        api_keys.revoke_api_key(key_id, ui.caller, session)
    except NotFoundError as exc:
        return not_found(request, ui, exc)
    return redirect("/ui/keys")


# --- playground ------------------------------------------------------------------------------


@router.get("/playground")
def read_playground(
    request: Request, ui: SignedInDep, state: StateDep, endpoint: str | None = None
) -> Response:
    need(ui.caller, "inference")
    caller = ui.caller
    routes = sorted(
        (
            r
            for r in state.forwarder.table.by_name.values()
            if caller.is_admin or r.owner == caller.team or r.public
        ),
        key=lambda r: r.name,
    )
    chosen = endpoint if any(r.name == endpoint for r in routes) else None
    if chosen is None and routes:
        chosen = next((r.name for r in routes if r.replicas), routes[0].name)
    limit = caller.limits.max_tokens_per_request or 4096
    return page(
        request, "playground.html", ui, "playground", routes=routes, chosen=chosen, limit=limit
    )


class ChatMessage(BaseModel):
    role: str = Field(pattern="^(system|user|assistant)$")
    content: str = Field(max_length=200_000)


class PlaygroundChat(BaseModel):
    endpoint: str = Field(min_length=1)
    messages: list[ChatMessage] = Field(min_length=1, max_length=200)
    temperature: float = Field(0.7, ge=0, le=2)
    max_tokens: int = Field(256, ge=1, le=32_768)


@router.post("/playground/chat")
async def playground_chat(body: PlaygroundChat, ui: ChangeDep, state: StateDep) -> Response:
    """A streamed chat completion for the playground, through the data plane like any other
    request (counted in the metrics and usage of the signed-in key)."""
    caller = ui.caller
    need(caller, "inference")
    route = state.forwarder.table.by_name.get(body.endpoint)
    if route is None or not (caller.is_admin or route.owner == caller.team or route.public):
        return JSONResponse({"detail": f"no endpoint named {body.endpoint!r}"}, 404)
    cap = caller.limits.max_tokens_per_request
    if cap and body.max_tokens > cap:
        return JSONResponse({"detail": f"this key allows at most {cap} tokens"}, 422)
    payload = {
        "model": route.name,
        "messages": [m.model_dump() for m in body.messages],
        "temperature": body.temperature,
        "max_tokens": body.max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    started = time.perf_counter()
    try:
        reply = await forward(
            state.forwarder,
            route,
            "/v1/chat/completions",
            json.dumps(payload).encode(),
            "application/json",
            hold_s=state.settings.activation_timeout_s,
        )
    except ApplianceError as exc:
        return JSONResponse({"detail": exc.message}, status_of(exc))

    async def relay() -> AsyncIterator[bytes]:
        watch, first_at, code = StreamUsage(), None, reply.status
        try:
            async for chunk in reply.body:
                first_at = first_at or time.perf_counter()
                watch.feed(chunk)
                yield chunk
        except ApplianceError as exc:
            code = status_of(exc)
            yield b"data: " + json.dumps({"error": {"message": exc.message}}).encode() + b"\n\n"
        finally:
            state.forwarder.record(
                route,
                caller.key_id,
                code,
                duration_s=time.perf_counter() - started,
                ttft_s=first_at - started if first_at else None,
                usage=watch.result() if code == 200 else None,
            )

    media = "text/event-stream" if reply.status == 200 else "application/json"
    return StreamingResponse(
        relay(), status_code=reply.status, media_type=media, headers={"cache-control": "no-cache"}
    )
