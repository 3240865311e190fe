"""LLM Engine's completion routes: `/v1/llm/completions-sync` and `/v1/llm/completions-stream`
(`?model_endpoint_name=`), in LLM Engine's request and response formats, served by the
replica's OpenAI `/v1/completions`. Errors answer `{"detail": ...}` as its client expects;
errors after a stream began are sent in band, and v1 streams never carry `[DONE]`.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from api.deps import AdmittedDep, AppState, StateDep, require
from api.routes import relay
from appliance.errors import ApplianceError, UpstreamError
from appliance.keys import Caller
from forwarder import llm_engine
from forwarder.proxy import Upstream

router = APIRouter(prefix="/v1/llm", tags=["llm-completions"], dependencies=[require("inference")])
COMPLETIONS_PATH = "/v1/completions"  # the replica's


class CompletionV1Request(BaseModel):
    """CompletionSyncV1Request and CompletionStreamV1Request (identical fields)."""

    model_config = ConfigDict(extra="ignore")

    prompt: str
    max_new_tokens: int = Field(gt=0)
    temperature: float = Field(ge=0.0, le=1.0)
    stop_sequences: list[str] | None = None
    return_token_log_probs: bool | None = False
    presence_penalty: float | None = Field(None, ge=0.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=0.0, le=2.0)
    top_k: int | None = Field(None, ge=-1)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    include_stop_str_in_output: bool | None = None
    guided_json: dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    skip_special_tokens: bool | None = True


class CompletionEvents:
    """CompletionStreamV1Response events from the replica's OpenAI completion stream."""

    def __init__(self, request_id: str, started: float) -> None:
        self.request_id = request_id
        self.started = started
        self.translator = llm_engine.StreamTranslator(request_id)
        self.ttft_s: float | None = None

    @property
    def usage(self) -> tuple[int, int] | None:
        prompt_tokens = self.translator.prompt_tokens
        if prompt_tokens is None:
            return None
        return int(prompt_tokens), self.translator.completion_tokens

    async def relay(self, upstream: Upstream) -> AsyncIterator[bytes]:
        translator = self.translator
        async for chunk in upstream.chunks():
            self.ttft_s = self.ttft_s or time.perf_counter() - self.started
            out = translator.feed(chunk)
            if out:
                yield out
        tail = translator.close()
        if tail:
            yield tail

    def failed(self, status: int, data: bytes) -> bytes:
        return llm_engine.error_event(self.request_id, status, data.decode("utf-8", "replace"))

    def error(self, status: int, message: str) -> bytes:
        return llm_engine.error_event(self.request_id, status, message)


def detail_error(exc: ApplianceError) -> Response:
    """A domain error raised after the route began, answered like the one handler would."""
    status = exc.status_code if isinstance(exc, UpstreamError) else 503
    headers = {"Retry-After": str(getattr(exc, "retry_after_s", 5))} if status == 503 else None
    return JSONResponse({"detail": exc.message}, status_code=status, headers=headers)


async def read_completion(
    request: Request, state: AppState, caller: Caller, name: str, *, stream: bool
) -> relay.UpstreamCall:
    started = time.perf_counter()
    req = await relay.read_model(request, state, CompletionV1Request)
    route = await relay.find_route(state, caller, name=name)
    body = llm_engine.completion_body(req.model_dump(), route.name, route.framework, stream=stream)
    return relay.UpstreamCall(route, caller, COMPLETIONS_PATH, body, started)


@router.post("/completions-sync")
async def create_completion_sync(
    request: Request, state: StateDep, caller: AdmittedDep, model_endpoint_name: str = Query()
) -> Response:
    call = await read_completion(request, state, caller, model_endpoint_name, stream=False)
    try:
        status, data = await relay.forward(state, call, count_usage=True)
    except UpstreamError as exc:
        return detail_error(exc)
    if status != 200:
        return JSONResponse({"detail": llm_engine.parse_result(data)}, status_code=status)
    return JSONResponse(llm_engine.sync_response(json.loads(data), uuid.uuid4().hex))


@router.post("/completions-stream")
async def create_completion_stream(
    request: Request, state: StateDep, caller: AdmittedDep, model_endpoint_name: str = Query()
) -> Response:
    call = await read_completion(request, state, caller, model_endpoint_name, stream=True)
    return await relay.stream(state, call, CompletionEvents(uuid.uuid4().hex, call.started))
