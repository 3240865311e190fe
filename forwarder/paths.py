"""The table of inference routes: our path, the replica's path, the error envelope, the shape of
the reply, whether batches may use it. The transports (`api/inference/asgi.py`,
`api/lane/front.py`), the key gate, the error handler, the OpenAPI document
(`api/inference/schemas.py`), batches and tasks all read it; adding an OpenAI route is one line
here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

# How errors are answered (`api/errors.py`): OpenAI's `{"error": {...}}`; LLM Engine's
# `{"detail": ...}` with LLM Engine's statuses (what its client `llmengine` maps to its
# exceptions); both at once on the routes both clients call; or `{"detail": ...}` with the
# appliance's own statuses (its own routes and the web UI)
OPENAI: Final = "openai"
LLM_ENGINE: Final = "llm-engine"
BOTH: Final = "openai+llm-engine"
DETAIL: Final = "detail"
# What a reply looks like: the replica's, untouched; or LLM Engine's completion or task formats
PASSTHROUGH: Final = "passthrough"
COMPLETION: Final = "llm-completion"
TASK: Final = "llm-task"
# How the request names its endpoint
BY_MODEL: Final = "model"  # the body's `model`
BY_NAME: Final = "model_endpoint_name"  # a query parameter
BY_ID: Final = "model_endpoint_id"  # a query parameter

CHAT: Final = "/v1/chat/completions"  # the replica's OpenAI paths
COMPLETIONS: Final = "/v1/completions"
EMBEDDINGS: Final = "/v1/embeddings"
RESPONSES: Final = "/v1/responses"  # OpenAI's Responses API: one response, kept nowhere
# The field that limits a generating request's tokens, set to a key's cap when absent
MAX_TOKENS: Final = "max_tokens"
MAX_OUTPUT_TOKENS: Final = "max_output_tokens"  # the Responses API's


@dataclass(frozen=True)
class InferencePath:
    path: str  # ours
    upstream: str  # the replica's; "" when the request decides (LLM Engine's tasks)
    envelope: str
    shape: str
    selector: str
    stream: int  # 1 or 0 when the route decides; -1 when the body's `stream` does
    batchable: bool
    # the field that limits its tokens, which a key's cap fills when the request leaves it
    # out; "" for a route that generates none (embeddings)
    limit_field: str
    summary: str


PATHS: Final = (
    InferencePath(
        CHAT, CHAT, OPENAI, PASSTHROUGH, BY_MODEL, -1, True, MAX_TOKENS,
        "OpenAI chat completion",
    ),
    InferencePath(
        COMPLETIONS, COMPLETIONS, OPENAI, PASSTHROUGH, BY_MODEL, -1, True, MAX_TOKENS,
        "OpenAI completion",
    ),
    InferencePath(
        RESPONSES, RESPONSES, OPENAI, PASSTHROUGH, BY_MODEL, -1, True, MAX_OUTPUT_TOKENS,
        "OpenAI response (the Responses API; nothing is stored: send the whole conversation)",
    ),
    InferencePath(
        EMBEDDINGS, EMBEDDINGS, OPENAI, PASSTHROUGH, BY_MODEL, 0, True, "",
        "OpenAI embeddings",
    ),
    InferencePath(
        "/v2/chat/completions", CHAT, OPENAI, PASSTHROUGH, BY_MODEL, -1, False, MAX_TOKENS,
        "LLM Engine v2 chat completion (OpenAI's format)",
    ),
    InferencePath(
        "/v2/completions", COMPLETIONS, OPENAI, PASSTHROUGH, BY_MODEL, -1, False, MAX_TOKENS,
        "LLM Engine v2 completion (OpenAI's format)",
    ),
    InferencePath(
        "/v1/llm/completions-sync", COMPLETIONS, LLM_ENGINE, COMPLETION, BY_NAME, 0, False,
        MAX_TOKENS,
        "LLM Engine completion",
    ),
    InferencePath(
        "/v1/llm/completions-stream", COMPLETIONS, LLM_ENGINE, COMPLETION, BY_NAME, 1, False,
        MAX_TOKENS,
        "LLM Engine completion, streamed",
    ),
    InferencePath(
        "/v1/sync-tasks", "", LLM_ENGINE, TASK, BY_ID, 0, False, MAX_TOKENS,
        "LLM Engine sync task",
    ),
    InferencePath(
        "/v1/streaming-tasks", "", LLM_ENGINE, TASK, BY_ID, 1, False, MAX_TOKENS,
        "LLM Engine streaming task",
    ),
)  # fmt: skip
BY_PATH: Final = {p.path: p for p in PATHS}
# A replica's path's limit field (async tasks name the replica's path, or their args' shape does)
LIMIT_FIELDS: Final = {p.upstream: p.limit_field for p in PATHS if p.path == p.upstream}
# The playground's chat (`api/routes/ui/playground.py`): OpenAI's request, the UI's errors
PLAYGROUND: Final = InferencePath(
    "/ui/playground/chat", CHAT, DETAIL, PASSTHROUGH, BY_MODEL, 1, False, MAX_TOKENS,
    "Playground chat",
)  # fmt: skip
BATCH_PATHS: Final = tuple(p.path for p in PATHS if p.batchable)
# Every path answered in OpenAI's envelope, the model lists and /v1/batches included (the
# /v2 routes are OpenAI's too: its SDK pointed at .../v2 lists models there)
OPENAI_PATHS: Final = (
    *(p.path for p in PATHS if p.envelope == OPENAI),
    "/v1/models",
    "/v2/models",
    "/v1/batches",
)
# LLM Engine's routes (prefixes): management, tasks, batch completions, completions
LLM_ENGINE_PATHS: Final = (
    "/v1/llm/",
    "/v1/model-endpoints",
    "/v1/async-tasks",
    "/v1/sync-tasks",
    "/v1/streaming-tasks",
    "/v2/batch-completions",
)
# Routes that OpenAI's SDK and `llmengine` both call (their file APIs)
SHARED_PATHS: Final = ("/v1/files",)


def upstream_for(args: object) -> str:
    """The replica's OpenAI path a task's `args` fit, by their shape; "" when none does."""
    if isinstance(args, dict):
        if "messages" in args:
            return CHAT
        if "prompt" in args:
            return COMPLETIONS
        if "input" in args:
            return EMBEDDINGS
    return ""
