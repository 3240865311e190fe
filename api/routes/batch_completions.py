"""LLM Engine's batch completions (`Completion.batch_create`, `get_batch_completion`,
`cancel_batch_completion`): `POST /v1/llm/batch-completions` and `/v2/batch-completions`,
`GET /v2/batch-completions/{id}`, `POST /v2/batch-completions/{id}/actions/cancel`.

A job is an OpenAI batch (`api/routes/batches.py`): one low-priority task per prompt on the
async workers of the endpoint `model_config.model` names, each admitted as the request it will
be. The prompts come inline (`content`) or from a file uploaded to `/v1/files`
(`input_data_path`: its id; the file holds the same JSON as `content`). The output is a file
in `/v1/files` named `output_data_path`: OpenAI's batch output lines, in the prompts' order,
`custom_id` the prompt's index; the job's `metadata` names it and counts the progress.
Cancelling ends the prompts not yet answered and keeps the finished outputs.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

from fastapi import APIRouter
from pydantic import ConfigDict, Field, ValidationError
from sqlmodel import Session
from starlette.concurrency import run_in_threadpool

from api.batch_service import (
    COMPLETION_WINDOW_S,
    CreateBatchRequest,
    batch_public,
    cancel,
    cancellable,
    owned_batch,
    submit,
)
from api.body import Body
from api.deps import (
    AddressDep,
    AdmittedDep,
    AppState,
    CallerDep,
    SessionDep,
    StateDep,
    require,
)
from api.errors import invalid_field
from api.file_service import owned_file
from api.inference import admission
from api.inference.schemas import CompletionV1Request
from appliance.db import session_scope
from appliance.errors import ApplianceError, InvalidSpecError
from appliance.keys import Caller
from appliance.models import Batch
from forwarder import llm_engine
from forwarder.paths import BY_NAME, CHAT, COMPLETIONS
from forwarder.worker import batches

router = APIRouter(tags=["batch-completions"], dependencies=[require("inference")])
# Fields LLM Engine's client sends with these values when not told otherwise
CLIENT_DEFAULTS: dict[str, Any] = {"trust_remote_code": False, "num_shards": 1}
REFUSED = {  # top-level fields that would size a job's own hardware upstream
    name: "a batch runs on the replicas of the endpoint model_config.model names"
    for name in ("cpus", "gpus", "memory", "gpu_type", "storage", "nodes_per_worker")
}
REFUSED["tool_config"] = "tool use in batch completions is not available on this appliance"
REFUSED["priority"] = "batch completions always run at low priority on the async workers"
# The metadata key that keeps a job's model_config as sent (JSON), for its GET
MODEL_CONFIG = "llm_engine_model_config"
STATUS = {  # OpenAI batch status -> LLM Engine's BatchCompletionsJobStatus
    "in_progress": "running",
    "cancelling": "running",
    "completed": "completed",
    "cancelled": "cancelled",
    "failed": "failed",
}


class BatchCompletionsRequest(Body):
    """CreateBatchCompletionsV1Request and V2Request (`content` decides the shape)."""

    model_config = ConfigDict(extra="allow")

    engine_model: dict[str, Any] = Field(alias="model_config")
    content: Any = None
    input_data_path: str | None = None
    output_data_path: str = Field(min_length=1, max_length=255)
    labels: dict[str, str] | None = None
    data_parallelism: int | None = Field(None, ge=1, le=1)
    max_runtime_sec: int | None = Field(None, ge=1, le=COMPLETION_WINDOW_S)


@router.post("/v1/llm/batch-completions")
async def create_batch_completions_v1(
    body: BatchCompletionsRequest, caller: AdmittedDep, state: StateDep, address: AddressDep
) -> dict[str, Any]:
    """LLM Engine's CreateBatchCompletionsV1Response."""
    batch = await _create(body, caller, state, address)
    return {"job_id": batch.id}


@router.post("/v2/batch-completions")
async def create_batch_completions_v2(
    body: BatchCompletionsRequest, caller: AdmittedDep, state: StateDep, address: AddressDep
) -> dict[str, Any]:
    """LLM Engine's BatchCompletionsJob."""
    batch = await _create(body, caller, state, address)
    return job_public(batch, None)


@router.get("/v2/batch-completions/{job_id}")
def read_batch_completions(job_id: str, caller: CallerDep, session: SessionDep) -> dict[str, Any]:
    return {"job": job_public(owned_batch(job_id, caller, session=session), session)}


@router.post("/v2/batch-completions/{job_id}/actions/cancel")
def cancel_batch_completions(
    job_id: str, caller: CallerDep, session: SessionDep, state: StateDep, address: AddressDep
) -> dict[str, Any]:
    """The prompts not yet answered end at once, those a worker holds included (their
    requests to the replica are dropped); `success` false for a job that already ended."""
    batch = owned_batch(job_id, caller, session=session)
    if not cancellable(batch):
        return {"success": False}
    cancel(batch, caller, session, state, address)
    return {"success": True}


async def _create(
    body: BatchCompletionsRequest, caller: Caller, state: StateDep, address: str | None
) -> Batch:
    _check(body)
    model = str(body.engine_model["model"])
    try:  # named once, in model_config: refused there, not as its first prompt
        await admission.find_target(state, caller, BY_NAME, model)
    except ApplianceError as exc:
        raise exc.located("model_config.model") from exc
    content = body.content
    if body.input_data_path is not None:
        content = await run_in_threadpool(_read_input, body.input_data_path, caller, state)
    requests = prompts_of(content, model)
    metadata = {
        "llm_engine": "batch-completions",
        "model": model,
        "output_data_path": body.output_data_path,
        **(body.labels or {}),
        MODEL_CONFIG: json.dumps(body.engine_model),  # the GET answers it as sent
    }
    order = CreateBatchRequest(
        input_file_id=body.input_data_path or "",
        endpoint=requests[0].url,
        metadata=metadata,
    )
    return await submit(order, requests, caller, state, address)


def _check(body: BatchCompletionsRequest) -> None:
    """422 naming a field this appliance would not honour."""
    if (body.content is None) == (body.input_data_path is None):
        raise InvalidSpecError("send one of content and input_data_path", field="content")
    if body.input_data_path is not None and "://" in body.input_data_path:
        raise InvalidSpecError(
            f"input_data_path {body.input_data_path!r} is read from no object storage here: "
            "upload it to /v1/files (purpose batch) and send the id it gets (file_...)",
            field="input_data_path",
        )
    model = body.engine_model.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidSpecError("model_config.model must name an endpoint", field="model_config")
    for name, value in body.engine_model.items():
        if name in ("model", "labels") or value is None or CLIENT_DEFAULTS.get(name) == value:
            continue
        raise InvalidSpecError(
            f"model_config.{name} is refused: the endpoint's own settings apply; set them on "
            f"endpoint {model!r}",
            field=f"model_config.{name}",
        )
    for name, value in (body.model_extra or {}).items():
        if value is not None:
            why = REFUSED.get(name, "LLM Engine's batch completions have no such field")
            raise InvalidSpecError(f"{name} is refused: {why}", field=name)


def _read_input(file_id: str, caller: Caller, state: AppState) -> Any:
    """The JSON of an uploaded file the caller's team owns; on a thread (SQLite and the disk)."""
    with session_scope(state.engine) as session:
        source = owned_file(file_id, caller, session=session)
    try:
        return batches.read_json(Path(source.path).read_bytes())
    except ValueError:
        raise InvalidSpecError(
            "the input file must hold the JSON of `content`", field="input_data_path"
        ) from None


def _completion(settings: dict[str, Any], prompt: Any, index: int) -> dict[str, Any]:
    """One prompt of v1 content as LLM Engine's completion request; a 422 naming the field
    (`content.temperature`, `content.prompts[3]`) when it is not one."""
    try:
        return CompletionV1Request.model_validate({**settings, "prompt": prompt}).model_dump()
    except ValidationError as exc:
        raise invalid_field(exc, "content.", {"prompt": f"prompts[{index}]"}) from None


def _bounded(prompts: int) -> None:
    """Counted before any prompt is made a request (a file of millions held the api's time
    and memory for each first)."""
    if prompts > batches.MAX_REQUESTS:
        raise InvalidSpecError(f"a batch holds at most {batches.MAX_REQUESTS} prompts")


def prompts_of(content: Any, model: str) -> list[batches.BatchRequest]:
    """One request per prompt: LLM Engine's v1 content (`prompts` and their settings) as
    `/v1/completions` requests, or v2's list of OpenAI completion or chat requests."""
    if isinstance(content, dict):
        prompts = content.get("prompts")
        if not isinstance(prompts, list):
            raise InvalidSpecError("content.prompts must be a list of prompts", field="content")
        if not prompts:
            raise InvalidSpecError("content.prompts must hold at least one prompt", field="content")
        _bounded(len(prompts))
        settings = {k: v for k, v in content.items() if k != "prompts"}
        bodies = [
            llm_engine.completion_payload(_completion(settings, p, i), model, stream=False)
            for i, p in enumerate(prompts)
        ]
    elif isinstance(content, list) and content and all(isinstance(c, dict) for c in content):
        _bounded(len(content))
        bodies = [{**llm_engine.v2_request(c), "model": model, "stream": False} for c in content]
    else:
        raise InvalidSpecError(
            "content must be LLM Engine's {prompts, max_new_tokens, ...} or a list of "
            "completion or chat requests",
            field="content",
        )
    where = "content.prompts" if isinstance(content, dict) else "content"
    return [
        batches.BatchRequest(str(i), CHAT if "messages" in b else COMPLETIONS, b, f"{where}[{i}]")
        for i, b in enumerate(bodies)
    ]


def job_public(batch: Batch, session: Session | None) -> dict[str, Any]:
    """LLM Engine's BatchCompletionsJob for the batch; the progress and the output file in
    `metadata` (strings, as the client's model wants)."""
    public = batch_public(batch, session)
    counts = public["request_counts"]
    started = batch.status != "in_progress" or counts["completed"] or counts["failed"]
    meta = dict(batch.metadata_)
    sent = meta.pop(MODEL_CONFIG, None)
    return {
        "job_id": batch.id,
        "input_data_path": batch.input_file_id or None,
        "output_data_path": meta.get("output_data_path", ""),
        "model_config": json.loads(sent) if sent else {"model": meta.get("model", "")},
        "priority": "low",
        "status": STATUS.get(batch.status, "unknown") if started else "queued",
        "created_at": _iso(batch.created_at),
        "expires_at": _iso(batch.created_at + COMPLETION_WINDOW_S),
        "completed_at": _iso(batch.completed_at or batch.cancelled_at),
        "metadata": {
            **{k: str(v) for k, v in meta.items()},
            **{k: str(v) for k, v in counts.items()},
            "output_file_id": batch.output_file_id or "",
            "error_file_id": batch.error_file_id or "",
        },
    }


def _iso(stamp: float | None) -> str | None:
    return None if stamp is None else dt.datetime.fromtimestamp(stamp, dt.UTC).isoformat()
