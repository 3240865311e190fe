"""Media a vLLM replica would fetch for a chat or a response: a content part's `image_url`,
`audio_url`, `video_url` or `file_url` given as a URL. vLLM fetches http(s) URLs from inside
the replica, which reaches the appliance's own containers and whatever the box's network
reaches (a cloud host's metadata address, services on the local network): a request could make
a replica call any of them. Only media sent inline (`data:` URLs) go on; any other URL is a 400
naming its part, for every entry that reaches a vLLM replica's chat, responses or embeddings
(whose `messages`, a chat to embed, vLLM reads as it reads a chat's: `refusal`), through
`api/inference/admission.fit_framework`.
"""

from __future__ import annotations

from typing import Any, Final

from appliance.errors import BadRequestError

FRAMEWORK: Final = "vllm"
URL_PARTS: Final = ("image_url", "audio_url", "video_url", "file_url")
INLINE: Final = "data:"
CONTENT: Final = ("content",)  # where a chat message holds its parts
# where a response's input item does: a message's content, a function call's output
ITEM_PARTS: Final = ("content", "output")


def refusal(payload: Any) -> BadRequestError | None:
    """The 400 for the first media part of a chat whose URL vLLM would fetch, or None."""
    messages = payload.get("messages") if isinstance(payload, dict) else None
    return _items_refusal(messages, "messages")


def input_refusal(payload: Any) -> BadRequestError | None:
    """The same for a Responses API request: its `input` items' content parts (`input_image`'s
    `image_url`, `input_file`'s `file_url`), a function call's output given as parts (vLLM
    reads them as a tool message's, fetching their URLs too), and items given as parts
    themselves."""
    items = payload.get("input") if isinstance(payload, dict) else None
    if not isinstance(items, list):
        return None  # a text
    for at, item in enumerate(items):
        refused = _part_refusal(item, f"input[{at}]")
        if refused is not None:
            return refused
    return _items_refusal(items, "input", ITEM_PARTS)


def _items_refusal(
    items: Any, field: str, holders: tuple[str, ...] = CONTENT
) -> BadRequestError | None:
    for at, item in enumerate(items if isinstance(items, list) else ()):
        for holder in holders:
            content = item.get(holder) if isinstance(item, dict) else None
            if not isinstance(content, list):
                continue  # text: the usual chat
            for index, part in enumerate(content):
                refused = _part_refusal(part, f"{field}[{at}].{holder}[{index}]")
                if refused is not None:
                    return refused
    return None


def _part_refusal(part: Any, where: str) -> BadRequestError | None:
    if not isinstance(part, dict):
        return None
    for kind in URL_PARTS:
        value = part.get(kind)
        url = value.get("url") if isinstance(value, dict) else value
        if isinstance(url, str) and url[:5].lower() != INLINE:
            place = f"{where}.{kind}" + (".url" if isinstance(value, dict) else "")
            return BadRequestError(
                f"{place}: replicas here fetch no URL; send the media inline, as a "
                "data: URL (data:image/png;base64,...)",
                field=place,
            )
    return None
