"""The web UI's playground: a chat page over the endpoints the caller may use, and its streamed
chat completions through the data plane like any other request. Included by `api.routes.ui`."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, Field

from api.deps import StateDep
from api.errors import status_of
from api.routes.ui.respond import need, page
from api.ui_session import ChangeDep, SignedInDep
from appliance.errors import ApplianceError
from forwarder.proxy import forward
from forwarder.usage import StreamUsage

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
    if route is None or not caller.may_infer(route.owner, route.public):
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
