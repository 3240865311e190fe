"""LLM Engine's async tasks: `POST /v1/async-tasks` stores the task, then queues it (outbox),
through the api's group-commit submitter (`api.submit`); `GET /v1/async-tasks/{id}` reads its
status and result. The worker role runs them."""

from __future__ import annotations

import logging
import time
from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from api.deps import AdmittedDep, CallerDep, StateDep, require
from api.inference import admission
from api.schemas import Answerable
from api.submit import Draft, EndpointView, NewTask, team_limits_of
from appliance.errors import InvalidSpecError, NoSuchEndpointError, NoSuchTaskError
from appliance.ids import new_id
from appliance.keys import Caller
from appliance.models import EndpointStatus
from forwarder.llm_engine import (
    SERIALIZE_DOC,
    SERIALIZE_KEY,
    check_task_fields,
    declared_routes,
    results_as_string,
    task_path,
)
from forwarder.paths import BY_ID, CHAT, COMPLETIONS, LIMIT_FIELDS, RESPONSES, upstream_for
from forwarder.worker import taskstore
from forwarder.worker.callbacks import check_auth, check_url

logger = logging.getLogger(__name__)

router = APIRouter(tags=["tasks"], dependencies=[require("inference")])
OPENAI_ROUTES = (CHAT, COMPLETIONS, RESPONSES)


class CreateAsyncTaskRequest(Answerable):
    """LLM Engine's EndpointPredictV1Request, plus `route` to pick the replica's path. Its
    fields for pickled and remote inputs and outputs (`url`, `cloudpickle`,
    `destination_path`, `return_pickled`) are taken as its clients send them by default
    (null, false) and refused otherwise (`check_shape`), as is any field it has not."""

    model_config = ConfigDict(extra="allow")

    args: Any = None
    url: str | None = None
    cloudpickle: str | None = None
    destination_path: str | None = None
    callback_url: str | None = None
    callback_auth: dict[str, Any] | None = None
    return_pickled: bool = False
    route: str | None = Field(
        None, description="Replica path the args go to; default: by their shape (messages: chat)."
    )
    # Any, not bool: `results_as_string` answers a 400 naming it where pydantic would
    # take "true" or 1 for true
    serialize_results_as_string: Any = Field(None, description=SERIALIZE_DOC)


class CreateAsyncTaskResponse(BaseModel):
    task_id: str


class GetAsyncTaskResponse(BaseModel):
    task_id: str
    status: str
    result: Any = None
    traceback: str | None = None
    status_code: int | None = None


def usable_endpoint(
    endpoint_id: str, endpoint: EndpointView | None, caller: Caller
) -> EndpointView:
    """The endpoint, if the caller may send it tasks; else the same 404 as a missing one."""
    visible = endpoint is not None and caller.may_infer(endpoint.owner, endpoint.public_inference)
    if endpoint is None or not visible or endpoint.status == EndpointStatus.DELETE_IN_PROGRESS:
        raise NoSuchEndpointError(f"no endpoint with id {endpoint_id!r}")
    return endpoint


def check_shape(body: CreateAsyncTaskRequest) -> None:
    """A 400 for args that are no JSON object or array, a route that is no plain path, a
    field the appliance would drop unread, or callback credentials it could not send."""
    if body.args is not None and not isinstance(body.args, dict | list):
        raise InvalidSpecError("args must be a JSON object or array", field="args")
    if body.route is not None and (not body.route.startswith("/") or ".." in body.route):
        raise InvalidSpecError("route must be a path such as /v1/completions", field="route")
    check_task_fields(body, body.model_extra, callbacks=True)
    check_auth(body.callback_auth)


def task_payload(
    body: CreateAsyncTaskRequest, endpoint: EndpointView, path: str, as_string: bool
) -> dict[str, Any]:
    """The stored task: its args (with the endpoint's name and no stream for an OpenAI route,
    `path`), the route it named, if any, and how the worker wraps its result (`as_string`)."""
    payload: dict[str, Any] = {"args": body.args, SERIALIZE_KEY: as_string}
    if body.route:
        payload["route"] = body.route
    if path in OPENAI_ROUTES and isinstance(body.args, dict):
        # a task cannot stream; the replica serves the endpoint under its name
        payload["args"] = {**body.args, "model": body.args.get("model") or endpoint.name}
        payload["args"]["stream"] = False
    return payload


@router.post("/v1/async-tasks", response_model=CreateAsyncTaskResponse)
async def create_async_inference_task(
    model_endpoint_id: str,
    body: CreateAsyncTaskRequest,
    caller: AdmittedDep,
    state: StateDep,
) -> CreateAsyncTaskResponse:
    """The admission of every inference request (api/inference/admission.py): the key, its
    scope and counted limits (the dependencies), its token cap, the endpoint's tenancy."""
    check_shape(body)
    as_string = results_as_string(body.serialize_results_as_string, body.args, stream=False)
    if isinstance(body.args, dict):
        limit_field = LIMIT_FIELDS.get(body.route or upstream_for(body.args), "")
        admission.cap_tokens(caller, body.args, inject=limit_field)
    target = await admission.find_target(state, caller, BY_ID, model_endpoint_id)
    declared = declared_routes(target.framework, target.predict_route)
    if body.route is not None and body.route not in declared:
        raise InvalidSpecError(
            f"route {body.route!r} is not one this endpoint serves; it takes "
            f"{', '.join(declared)} (or leave route out: the args' shape decides)",
            field="route",
        )
    path = task_path(target.framework, target.predict_route, body.args, body.route)
    admission.fit_framework(target, path, body.args, caller)
    if body.callback_url:  # resolves the host: not on the event loop
        await run_in_threadpool(check_url, body.callback_url, state.settings.callback_allowed_hosts)

    def build(found: EndpointView | None) -> NewTask:
        endpoint = usable_endpoint(model_endpoint_id, found, caller)
        own = body.callback_url is not None
        # the endpoint's default callback reports its own team's tasks only: another team's
        # task on a public endpoint must not reach the owner's receiver, with its credentials
        default = endpoint.owner == caller.team and not own
        return NewTask(
            id=new_id("tsk"),
            endpoint_id=endpoint.id,
            owner=caller.team,
            created_by=caller.user,
            payload=task_payload(body, endpoint, path, as_string),
            callback_url=endpoint.default_callback_url if default else body.callback_url,
            callback_auth=endpoint.default_callback_auth if default else body.callback_auth,
            created_at=time.time(),
            key_id=caller.key_id,  # usage is counted per key when the task ends
        )

    # the outbox: the row is committed, then its job queued, before the answer; the key's
    # queued-task limit is checked in the same transaction (api.submit)
    team_max_queued, team_max_bytes = team_limits_of(caller, state.settings)
    draft = Draft(
        endpoint_id=model_endpoint_id,
        owner=caller.team,
        created_by=caller.user,
        max_queued=caller.limits.max_queued_tasks,
        team_max_queued=team_max_queued,
        team_max_bytes=team_max_bytes,
        build=build,
    )
    task = await state.submitter.submit(draft)
    return CreateAsyncTaskResponse(task_id=task.id)


@router.get("/v1/async-tasks/{task_id}", response_model=GetAsyncTaskResponse)
async def get_async_inference_task(
    task_id: str, caller: CallerDep, state: StateDep
) -> GetAsyncTaskResponse:
    task = taskstore.view(state.reader, task_id)  # async: clients poll this one
    if task is None or not caller.owns(task.owner):
        raise NoSuchTaskError(f"no task with id {task_id!r}")
    return GetAsyncTaskResponse(
        task_id=task_id,
        status=task.status,
        result=task.result,
        traceback=task.traceback,
        status_code=task.status_code,
    )
