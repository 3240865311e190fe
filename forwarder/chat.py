"""What a chat completion (`/v1/chat/completions`, and the tasks and batch lines sent there) may
ask of OpenAI that no replica here honours, whatever its framework: vLLM 0.32 and llama.cpp
drop these fields unread, so a client would get an answer to another question. Each is a 400
naming the field (`refusal`, called by `api/inference/admission.fit_framework` for every entry):

- to be kept: OpenAI stores a chat completion sent with `store: true` (read back with
  `client.chat.completions.retrieve`, `list`, tagged by its `metadata`), and nothing here keeps
  a reply. So `store` other than absent, null or false (a server reads "true" and 1 as true)
  and `metadata` (which OpenAI refuses without `store`) are refused; the stored completions'
  routes answer 404 or 405 saying the same (`api/errors.OPENAI_UNSERVED`);
- OpenAI's deprecated `functions` and `function_call`: the servers read `tools` and
  `tool_choice` alone, so the model never saw the functions;
- spoken replies (`audio`, `modalities` other than text) and OpenAI's own web search
  (`web_search_options`): the servers make text, from the model alone.
"""

from __future__ import annotations

from typing import Any, Final

from appliance.errors import BadRequestError

NOT_KEPT: Final = (
    "this appliance keeps no chat completions (nothing serves client.chat.completions.retrieve "
    "or list): keep the reply yourself"
)
NOT_READ: Final = {  # refused unless absent or null
    "metadata": NOT_KEPT + "; `metadata` tags a stored completion: leave it out",
    "functions": "no server here reads OpenAI's deprecated `functions`: send each as a tool, "
    '`tools: [{"type": "function", "function": {...}}]`',
    "function_call": "no server here reads OpenAI's deprecated `function_call`: send "
    '`tool_choice` ("auto", "none", "required" or the function) with `tools`',
    "audio": "replies here are text: no server makes audio; leave `audio` out",
    "web_search_options": "no server here searches the web: the model answers from what it "
    "knows; search in your code and send what you found in `messages`",
}
FLAGS: Final = {  # refused unless absent, null or false (a server reads "true" or 1 as true)
    "store": NOT_KEPT + "; leave `store` out or send false",
}
TEXT_ONLY: Final = "text"
NAMED: Final = frozenset([*NOT_READ, *FLAGS, "modalities"])  # a chat with none of them: one test


def refusal(payload: Any) -> BadRequestError | None:
    """The 400 for the first field of a chat request that no server here honours, or None."""
    if not isinstance(payload, dict) or NAMED.isdisjoint(payload):
        return None
    for field, why in FLAGS.items():
        if payload.get(field) not in (None, False):
            return BadRequestError(f"{field}: {why}", field=field)
    for field, why in NOT_READ.items():
        if payload.get(field) is not None:
            return BadRequestError(f"{field}: {why}", field=field)
    modalities = payload.get("modalities")
    if modalities is not None and modalities != [TEXT_ONLY]:
        return BadRequestError(
            'modalities: replies here are text: send ["text"] or leave `modalities` out',
            field="modalities",
        )
    return None
