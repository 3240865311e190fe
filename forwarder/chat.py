"""What a chat completion (`/v1/chat/completions`, and the tasks and batch lines sent there) may
ask that no replica here honours, whatever its framework: to be kept. OpenAI stores a chat
completion sent with `store: true` (read back with `client.chat.completions.retrieve`, `list`,
tagged by its `metadata`); vLLM and llama.cpp ignore both fields, and nothing here keeps a
reply. So `store` other than absent, null or false (a server reads "true" and 1 as true) and
`metadata` (which OpenAI refuses without `store`) are a 400 naming the field (`refusal`, called
by `api/inference/admission.fit_framework` for every entry), where they were dropped unread.
The stored completions' routes answer 404 or 405 saying the same (`api/errors.OPENAI_UNSERVED`).
"""

from __future__ import annotations

from typing import Any, Final

from appliance.errors import BadRequestError

NOT_KEPT: Final = (
    "this appliance keeps no chat completions (nothing serves client.chat.completions.retrieve "
    "or list): keep the reply yourself"
)
FIELDS: Final = {
    "store": NOT_KEPT + "; leave `store` out or send false",
    "metadata": NOT_KEPT + "; `metadata` tags a stored completion: leave it out",
}


def refusal(payload: Any) -> BadRequestError | None:
    """The 400 for the first field of a chat request that asks for it to be kept, or None."""
    if not isinstance(payload, dict):
        return None
    for field, why in FIELDS.items():
        if payload.get(field) not in (None, False):
            return BadRequestError(f"{field}: {why}", field=field)
    return None
