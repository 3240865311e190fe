"""Media a vLLM replica would fetch for a chat: a content part's `image_url`, `audio_url`,
`video_url` or `file_url` given as a URL. vLLM fetches http(s) URLs from inside the replica,
which reaches the appliance's own containers and whatever the box's network reaches (a cloud
host's metadata address, services on the local network): a request could make a replica call
any of them. Only media sent inline (`data:` URLs) go on; any other URL is a 400 naming its
part, for every entry that reaches a vLLM replica's chat (`api/inference/admission.fit_framework`).
"""

from __future__ import annotations

from typing import Any, Final

from appliance.errors import BadRequestError

FRAMEWORK: Final = "vllm"
URL_PARTS: Final = ("image_url", "audio_url", "video_url", "file_url")
INLINE: Final = "data:"


def refusal(payload: Any) -> BadRequestError | None:
    """The 400 for the first media part of a chat whose URL vLLM would fetch, or None."""
    messages = payload.get("messages") if isinstance(payload, dict) else None
    for at, message in enumerate(messages if isinstance(messages, list) else ()):
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, list):
            continue  # text: the usual chat
        for index, part in enumerate(content):
            if not isinstance(part, dict):
                continue
            for kind in URL_PARTS:
                value = part.get(kind)
                url = value.get("url") if isinstance(value, dict) else value
                if isinstance(url, str) and url[:5].lower() != INLINE:
                    where = f"messages[{at}].content[{index}].{kind}"
                    where += ".url" if isinstance(value, dict) else ""
                    return BadRequestError(
                        f"{where}: replicas here fetch no URL; send the media inline, as a "
                        "data: URL (data:image/png;base64,...)",
                        field=where,
                    )
    return None
