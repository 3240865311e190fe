"""The web UI's playground: a chat page over the endpoints the caller may use, and its streamed
chat completions through the data plane like any other request. Included by `api.routes.ui`."""

from __future__ import annotations

import json

from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import Field
from starlette.types import Receive, Scope, Send

from api.body import Body
from api.deps import StateDep
from api.inference.asgi import serve
from api.inference.call import Core
from api.routes.ui.respond import need, page
from api.ui_session import ChangeDep, SignedInDep
from appliance.keys import Caller
from forwarder.paths import PLAYGROUND

router = APIRouter(prefix="/ui", include_in_schema=False)


@router.get("/playground")
def read_playground(
    request: Request, ui: SignedInDep, state: StateDep, endpoint: str | None = None
) -> Response:
    need(ui.caller, "inference")
    caller = ui.caller
    routes = sorted(
        (r for r in state.forwarder.table.by_name.values() if caller.may_infer(r.owner, r.public)),
        key=lambda r: r.name,
    )
    chosen = endpoint if any(r.name == endpoint for r in routes) else None
    if chosen is None and routes:
        chosen = next((r.name for r in routes if r.replicas), routes[0].name)
    limit = caller.limits.max_tokens_per_request or 4096
    return page(
        request, "playground.html", ui, "playground", routes=routes, chosen=chosen, limit=limit
    )


class ChatMessage(Body):
    role: str = Field(pattern="^(system|user|assistant)$")
    content: str = Field(max_length=200_000)


class PlaygroundChat(Body):
    endpoint: str = Field(min_length=1)
    messages: list[ChatMessage] = Field(min_length=1, max_length=200)
    temperature: float = Field(0.7, ge=0, le=2)
    max_tokens: int | None = Field(None, ge=1, le=32_768)  # None: the key's cap, if any


@router.post("/playground/chat")
async def playground_chat(body: PlaygroundChat, ui: ChangeDep, request: Request) -> Response:
    """A streamed chat completion for the playground: an inference call like any other
    (`api/inference`), admitted for the signed-in key, counted in its metrics and usage."""
    payload = {
        "model": body.endpoint,
        "messages": [m.model_dump() for m in body.messages],
        "temperature": body.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if body.max_tokens is not None:
        payload["max_tokens"] = body.max_tokens
    return InferenceResponse(request.app.state.inference, ui.caller, json.dumps(payload).encode())


class InferenceResponse(Response):
    """A response that is an inference call, answered through the ASGI transport."""

    def __init__(self, core: Core, caller: Caller, body: bytes) -> None:
        super().__init__()
        self.core, self.caller, self.payload = core, caller, body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await serve(
            self.core, PLAYGROUND, scope, receive, send, caller=self.caller, body=self.payload
        )
