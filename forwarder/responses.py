"""OpenAI's Responses API (`POST /v1/responses`) as the appliance serves it: one response to one
request, passed to the replica's own `/v1/responses` (vLLM's and llama.cpp's servers both have
one) and kept nowhere. What would need a response kept, or a tool the server runs for itself,
is refused with a 400 naming the field (`refusal`, called by
`api/inference/admission.fit_framework` for every entry), where a replica would ignore it or
answer from state it may not have:

- a replica keeps no responses (vLLM's store is off unless its server is told otherwise, and
  then each replica holds its own, lost when it stops): `previous_response_id`, `conversation`,
  `store` and `background` (which needs the store) other than false are refused (vLLM reads
  `"true"` and `1` as true); a client sends the earlier turns in `input`, as with chat;
- a stored prompt template (`prompt`) names one kept by OpenAI;
- the server runs no tool of its own here (web search, file search, code interpreter, computer
  use, MCP servers: vLLM runs them only with a tool server configured, and then reaches out to
  them): only `function` tools, which the client runs, go on;
- an `input` that is missing, empty or neither a text nor a list (a server answers an empty
  one with text made from nothing, vLLM until its context is full);
- the chat's token fields (`max_tokens`, `max_completion_tokens`) are not the Responses API's:
  its servers ignore them, so the reply would not be limited as asked; `max_output_tokens` is.

A response's usage (`input_tokens`, `output_tokens`; a stream's in its `response.completed`
event) is counted like a chat's (`forwarder/usage.py`).
"""

from __future__ import annotations

from typing import Any, Final

from appliance.errors import BadRequestError

NOT_KEPT: Final = (
    "this appliance keeps no responses: send the earlier turns of the conversation in `input`"
)
STATEFUL: Final = {
    "previous_response_id": NOT_KEPT,
    "conversation": NOT_KEPT,
    "prompt": "stored prompt templates are not kept here: send `instructions` and `input`",
}
FLAGS: Final = {  # refused unless absent, null or false (a server reads "true" or 1 as true)
    "store": NOT_KEPT + "; leave `store` out or send false",
    "background": "responses run while their request waits here (stream it, or batch many "
    "with POST /v1/batches); leave `background` out or send false",
}
TOKEN_FIELDS: Final = ("max_tokens", "max_completion_tokens")
FUNCTION: Final = "function"


def refusal(payload: Any) -> BadRequestError | None:
    """The 400 for the first field of a Responses API request the appliance cannot honour (the
    module's list), or None."""
    if not isinstance(payload, dict):
        return None
    given = payload.get("input")
    if not isinstance(given, str | list):
        return BadRequestError(
            "input: a response needs a text or a list of items (messages, function call outputs)",
            field="input",
        )
    if not (given.strip() if isinstance(given, str) else given):  # a server answers from nothing
        return BadRequestError("input: a response needs a text or at least one item", field="input")
    for field, why in STATEFUL.items():
        if payload.get(field) is not None:
            return BadRequestError(f"{field}: {why}", field=field)
    for field, why in FLAGS.items():
        if payload.get(field) not in (None, False):
            return BadRequestError(f"{field}: {why}", field=field)
    for field in TOKEN_FIELDS:
        if field in payload:
            return BadRequestError(
                f"{field}: the Responses API limits a reply with `max_output_tokens`",
                field=field,
            )
    tools = payload.get("tools")
    for at, tool in enumerate(tools if isinstance(tools, list) else ()):
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind != FUNCTION:
            where = f"tools[{at}].type"
            return BadRequestError(
                f"{where}: {kind!r} is a tool the server would run; replicas here run none "
                "(web search, file search, code interpreter, computer use, MCP): define "
                "`function` tools and run them in your code",
                field=where,
            )
    return None
