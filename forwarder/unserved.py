"""A replica's answer that it has no such route: llama.cpp's 501 ("does not support
embeddings"), or the 404 its web framework gives a path it never registered (vLLM registers
/v1/embeddings only for an embedding model, chat and completions only for a generative one).

The request is wrong for this endpoint, not the server broken: the caller gets a 400 that says
so, and no SDK retries it. The one rule for every way a request reaches a replica: the
inference core's routes (`api/inference/call.py`) and the async worker's tasks and batch lines
(`forwarder/worker/jobs.py`).
"""

from __future__ import annotations

import json
from typing import Final

from appliance.errors import BadRequestError

NOT_SERVED_STATUSES: Final = (404, 501)
UNREGISTERED: Final = "Not Found"  # Starlette's words for a path no route matches
EMBEDDINGS_HOW: Final = (
    "an endpoint whose env has LLAMA_ARG_EMBEDDINGS=1 serves embeddings, with "
    "LLAMA_ARG_POOLING=mean for a model that has no pooling of its own"
)
VLLM_EMBEDDINGS_HOW: Final = (
    "a vLLM endpoint serves embeddings for an embedding model, or for a generative one run "
    'with extra_flags {"--runner": "pooling"}'
)


def not_served(status: int, body: bytes, endpoint: str, path: str) -> BadRequestError | None:
    """The 400 to answer for a replica's reply that says it does not serve `path` (the path
    the caller asked for), or None."""
    if status == 501:
        words = replica_words(body)
        if "--embeddings" in words:  # llama.cpp's advice, as an endpoint here takes it
            words += f" (here: {EMBEDDINGS_HOW})"
    elif status == 404 and _unregistered(body):
        words = f"its server has no such route ({status} {UNREGISTERED})"
        if path == "/v1/embeddings":
            words += f"; {VLLM_EMBEDDINGS_HOW}"
    else:
        return None
    return BadRequestError(f"endpoint {endpoint!r} does not serve {path}: {words}")


def _unregistered(body: bytes) -> bool:
    """Starlette's bare `{"detail":"Not Found"}`, or the same words in OpenAI's envelope (as
    vLLM's handler of HTTP errors writes them); never a 404 that names what is missing (vLLM's
    "The model `x` does not exist.")."""
    try:
        reply = json.loads(body)
    except ValueError:
        return False
    if not isinstance(reply, dict):
        return False
    found = reply.get("error", reply)
    if isinstance(found, dict):
        found = found.get("detail", found.get("message"))
    return bool(found == UNREGISTERED)


def replica_words(body: bytes) -> str:
    """What a replica's error reply says, as its error envelope's `message` gives it (OpenAI's,
    llama.cpp's and vLLM's, old and new), its `detail` or its text: at most 300 characters."""
    try:
        reply = json.loads(body)
    except ValueError:
        return body.decode("utf-8", "replace")[:300]
    found = reply.get("error", reply) if isinstance(reply, dict) else reply
    if isinstance(found, dict):
        found = found.get("message") or found.get("detail") or found
    return str(found)[:300]
