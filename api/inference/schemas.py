"""The request and response models of the inference routes: LLM Engine's, which its routes
validate (`api/inference/llm_engine.py`), and OpenAI's, which document the routes whose bodies
pass to the replica untouched. `doc_routes` declares every route of `forwarder/paths.py` to
FastAPI with them, for /openapi.json and /docs; the requests themselves never reach those
handlers (`api/inference/asgi.py` serves them first).
"""

from __future__ import annotations

import inspect
from typing import Any, Literal

from fastapi import APIRouter, Query
from pydantic import BaseModel, ConfigDict, Field

from api.body import Body
from api.schemas import Answerable
from forwarder.llm_engine import SERIALIZE_DOC
from forwarder.paths import BY_ID, BY_NAME, COMPLETION, PATHS, TASK, InferencePath

MAX_TOKENS_BOUND = 1_000_000  # far above any model's context; refuses absurd numbers early


class CompletionV1Request(Body):
    """LLM Engine's CompletionSyncV1Request and CompletionStreamV1Request (identical); a field
    they have not is refused (`forwarder.llm_engine.check_completion_fields`)."""

    model_config = ConfigDict(extra="allow")

    prompt: str
    max_new_tokens: int = Field(gt=0, le=MAX_TOKENS_BOUND)
    temperature: float = Field(ge=0.0, le=1.0)
    stop_sequences: list[str] | None = None
    return_token_log_probs: bool | None = False
    presence_penalty: float | None = Field(None, ge=0.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=0.0, le=2.0)
    top_k: int | None = Field(None, ge=-1, le=MAX_TOKENS_BOUND)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    include_stop_str_in_output: bool | None = None
    guided_json: dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    skip_special_tokens: bool | None = True


class TokenOutput(BaseModel):
    token: str
    log_prob: float


class CompletionOutput(BaseModel):
    text: str
    num_prompt_tokens: int | None = None
    num_completion_tokens: int
    tokens: list[TokenOutput] | None = None


class CompletionSyncV1Response(BaseModel):
    request_id: str
    output: CompletionOutput


class SyncEndpointPredictV1Request(Answerable):
    """EndpointPredictV1Request plus the sync variant's `timeout_seconds` and `num_retries`;
    what the appliance would drop unread is refused (`forwarder.llm_engine.check_task_fields`)."""

    model_config = ConfigDict(extra="allow")

    url: str | None = None
    args: Any = None
    cloudpickle: str | None = None
    callback_url: str | None = None
    callback_auth: dict[str, Any] | None = None
    return_pickled: bool = False
    destination_path: str | None = None
    timeout_seconds: float | None = Field(None, gt=0, le=86_400)
    num_retries: int | None = Field(None, ge=0, le=1000)
    # Any, not bool: `llm_engine.results_as_string` answers a 400 naming it where pydantic would
    # take "true" or 1 for true
    serialize_results_as_string: Any = Field(None, description=SERIALIZE_DOC)


class SyncEndpointPredictV1Response(BaseModel):
    status: Literal["SUCCESS", "FAILURE"]
    result: Any = None
    traceback: str | None = None
    status_code: int | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: Any = None


class ChatCompletionRequest(BaseModel):
    """OpenAI's chat completion request; every other field of OpenAI's or vLLM's goes to the
    replica as sent."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(description="The endpoint's name.")
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    stream: bool | None = False
    response_format: dict[str, Any] | None = None


class CompletionRequest(BaseModel):
    """OpenAI's (legacy) completion request; other fields go to the replica as sent."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(description="The endpoint's name.")
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    stream: bool | None = False
    logprobs: int | None = None


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str = Field(description="The endpoint's name.")
    input: str | list[str] | list[int] | list[list[int]]


class ResponseRequest(BaseModel):
    """OpenAI's Responses API request (`client.responses.create`); other fields of OpenAI's or
    vLLM's go to the replica as sent. Nothing is stored: `previous_response_id`,
    `conversation`, `store: true`, `background: true`, a stored `prompt`, and tools other than
    `function` are 400s (`forwarder/responses.py`)."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(description="The endpoint's name.")
    input: str | list[dict[str, Any]] = Field(
        description="A text, or the conversation's items (messages, function calls and their "
        "outputs), earlier turns included."
    )
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    tools: list[dict[str, Any]] | None = Field(None, description="`function` tools only.")
    text: dict[str, Any] | None = None
    stream: bool | None = False


class ResponseUsage(BaseModel):
    model_config = ConfigDict(extra="allow")

    input_tokens: int
    output_tokens: int
    total_tokens: int | None = None


class ResponseObject(BaseModel):
    """OpenAI's response object, as the replica sent it."""

    model_config = ConfigDict(extra="allow")

    id: str
    object: str
    created_at: int
    model: str
    status: str | None = None
    output: list[dict[str, Any]]
    usage: ResponseUsage | None = None


class Usage(BaseModel):
    model_config = ConfigDict(extra="allow")

    prompt_tokens: int
    completion_tokens: int | None = None
    total_tokens: int | None = None


class ChatCompletion(BaseModel):
    """OpenAI's chat.completion, as the replica sent it (only `model` is the endpoint's)."""

    model_config = ConfigDict(extra="allow")

    id: str
    object: str
    created: int
    model: str
    choices: list[dict[str, Any]]
    usage: Usage | None = None


class Completion(ChatCompletion):
    """OpenAI's text_completion, as the replica sent it."""


class EmbeddingList(BaseModel):
    model_config = ConfigDict(extra="allow")

    object: str
    data: list[dict[str, Any]]
    model: str
    usage: Usage | None = None


REQUESTS: dict[str, type[BaseModel]] = {
    "/v1/chat/completions": ChatCompletionRequest,
    "/v1/completions": CompletionRequest,
    "/v1/embeddings": EmbeddingRequest,
    "/v1/responses": ResponseRequest,
}
REPLIES: dict[str, type[BaseModel]] = {
    "/v1/chat/completions": ChatCompletion,
    "/v1/completions": Completion,
    "/v1/embeddings": EmbeddingList,
    "/v1/responses": ResponseObject,
}
SSE = {"text/event-stream": {"schema": {"type": "string", "description": "Server-sent events"}}}


def doc_routes(router: APIRouter, responses: dict[int | str, dict[str, Any]]) -> None:
    """Declare each inference route with its request and reply models."""
    for entry in PATHS:
        request, reply = _models(entry)
        extra: dict[int | str, dict[str, Any]] = {}
        if entry.stream != 0:  # a stream answers text/event-stream
            extra[200] = {"content": SSE, "description": "The reply, or its events"}
        router.add_api_route(
            entry.path,
            _handler(entry, request),
            methods=["POST"],
            response_model=reply,
            summary=entry.summary,
            responses={**responses, **extra},
            name=entry.path.strip("/").replace("/", "_").replace("-", "_"),
        )


def _models(entry: InferencePath) -> tuple[type[BaseModel], type[BaseModel]]:
    if entry.shape == COMPLETION:
        return CompletionV1Request, CompletionSyncV1Response
    if entry.shape == TASK:
        return SyncEndpointPredictV1Request, SyncEndpointPredictV1Response
    return REQUESTS[entry.upstream], REPLIES[entry.upstream]


def _handler(entry: InferencePath, request: type[BaseModel]) -> Any:
    async def handler(**_: Any) -> Any:  # never called: api/inference/asgi.py serves first
        raise RuntimeError(f"{entry.path} is served by the inference core")

    params = [inspect.Parameter("body", inspect.Parameter.KEYWORD_ONLY, annotation=request)]
    if entry.selector in (BY_NAME, BY_ID):
        what = "name" if entry.selector == BY_NAME else "id"
        params.append(
            inspect.Parameter(
                entry.selector,
                inspect.Parameter.KEYWORD_ONLY,
                annotation=str,
                default=Query(description=f"The endpoint's {what}."),
            )
        )
    handler.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    return handler
