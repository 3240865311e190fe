"""llama.cpp's server where its OpenAI `/v1/completions` departs from OpenAI's (and vLLM's): the
request fields it ignores without a word, refused at admission (`refusal`, called by
`api/inference/admission.fit_framework` for every entry), and its replies reshaped into OpenAI's
legacy completion (`CompletionShape`, applied by `forwarder/relay.py` to llama.cpp's 200
completions replies, whole and streamed, before usage is read); its chat replies' usage is
summed over their `n` choices the same way.

What llama.cpp's server answers (the build in the image, llama.cpp 0c1e570):

- `echo`, `suffix` and `best_of` are dropped unread (its parser that refused them is no longer
  called), so a client asking for them gets an answer to another question; so is a
  completion's `response_format` (it constrains chats alone; vLLM's completions honour it) and
  an embeddings request's `dimensions` (its vectors are the model's own size);
- `max_tokens: 0` (or `max_completion_tokens`) makes one token, where vLLM refuses it;
- `stream_options` on a completion or chat that does not stream are read by nobody, where vLLM
  and OpenAI refuse them (on the Responses API they pass: vLLM's has no such field);
- a list of prompts is answered, with the usage of the first prompt alone (refused: the
  others would go uncounted);
- `logprobs` come in the chat format, `{"content": [{"token", "logprob", "top_logprobs":
  [{"token", "logprob", ...}]}]}`, where OpenAI's completions give `{"tokens",
  "token_logprobs", "top_logprobs": [{token: logprob}], "text_offset"}` (offsets into the
  generated text from 0, as vLLM gives them);
- `id` is `chatcmpl-...`, not `cmpl-...`;
- with `n` > 1 a whole reply's `usage` is its first choice's alone (the others' are dropped when
  it merges their choices), so it is counted for each choice, exact when they all ran to
  `max_tokens`; a stream's each finishing chunk carries its own choice's usage, asked for or
  not, so there the sum is exact, and it is sent once, after the last finishing chunk, in a
  chunk of its own (`choices: []`) as OpenAI and vLLM send it, which the appliance takes out
  of a stream that did not ask for it (`forwarder/usage.UsageStrip`);
- chat replies the same: a whole one's `usage` is its first choice's, and a stream sends one
  usage chunk (`choices: []`) for each choice, where OpenAI sends one for the stream (the
  others are dropped); and a stream may start choice 1 before choice 0, where OpenAI and vLLM
  open them in order (OpenAI's SDK stream helper fails otherwise), so a choice's lower ones
  that have had no chunk yet are opened first, with an empty delta (`CompletionShape._open`);
- `tool_choice` is read as a string alone ("auto", "none", "required"): an object naming the
  function to call is taken for "auto" (it logs "Wrong type supplied for parameter
  'tool_choice'"), in chats and responses alike, so it is refused (`_tool_choice`);
- its Responses API gives no log-probabilities (an empty list; `top_logprobs` alone is its own
  400 asking for `logprobs`, a field that API has not), so asking for them is refused;
- its Responses API stream lacks fields OpenAI's SDK needs to assemble a response, and a
  response cut short at `max_output_tokens` says `completed` (`ResponsesShape` mends both).
"""

from __future__ import annotations

from typing import Any, Final

import orjson

from appliance.errors import BadRequestError

FRAMEWORK: Final = "llamacpp"
COMPLETIONS_PATH: Final = b"/v1/completions"
CHAT_PATH: Final = b"/v1/chat/completions"
RESPONSES_PATH: Final = b"/v1/responses"
TEXT_EVENTS: Final = ("response.output_text.", "response.refusal.")  # a content part's
ID_PREFIX: Final = "chatcmpl-"
COMPLETION_ID_PREFIX: Final = "cmpl-"
EVENT_END: Final = b"\n\n"
DATA: Final = b"data: "
DONE: Final = b"[DONE]"
USAGE: Final = b'"usage"'
# What a completion stream's usage chunk carries besides it, as OpenAI's and vLLM's do
USAGE_CHUNK_FIELDS: Final = ("id", "object", "created", "model", "system_fingerprint")

Json = dict[str, Any]


def refusal(payload: object) -> BadRequestError | None:
    """The 400 for a completions request asking what llama.cpp's server would silently ignore
    (`echo: true`, a `suffix`, `best_of` > 1, a `response_format` other than text: it
    constrains chats alone; `stream_options` without a stream: `_stream_options`) or do (no
    token, or more than it reads: `_token_count`), naming the field; None when it asks none."""
    if not isinstance(payload, dict):
        return None
    if payload.get("echo") is True:
        return _unsupported("echo", "echo the prompt: leave `echo` out or send false")
    if payload.get("suffix") is not None:
        return _unsupported("suffix", "take a suffix (no insertion): leave `suffix` out")
    best_of = payload.get("best_of")
    if isinstance(best_of, int | float) and not isinstance(best_of, bool) and best_of > 1:
        return _unsupported(
            "best_of", f"choose the best of several completions (best_of={best_of}): use `n`"
        )
    form = payload.get("response_format")
    kind = form.get("type") if isinstance(form, dict) else form
    if form is not None and kind != "text":
        named = kind if isinstance(kind, str) else "a format"
        return _unsupported(
            "response_format",
            f"constrain a completion to {named} (their server ignores it there): use chat "
            "completions with `response_format`, which they honour",
        )
    return _stream_options(payload) or _token_count(payload)


def prompts_refusal(prompts: int) -> BadRequestError | None:
    """The 400 for a completions request holding several prompts (`prompts`, as admission
    counts them): llama.cpp's server answers them all but reports the usage of the first
    alone, so the others would be served uncounted."""
    if prompts > 1:
        return _unsupported(
            "prompt",
            f"report the usage of {prompts} prompts in one request (only the first's), so "
            "they could not be counted: send one prompt per request",
        )
    return None


# The fields asking how many tokens to make, where llama.cpp's server makes one for 0
ZERO_TOKEN_FIELDS: Final = ("max_tokens", "max_completion_tokens", "max_output_tokens")
# The most tokens its server reads from any of them, or from its own `n_predict`: a 32-bit
# count, so 4294967298 would be 2 and 2147483648 its own 400 with a negative number in it
MOST_TOKENS: Final = 2**31 - 1
# The Responses API's media parts, which the server reads none of (no multimodal projector)
RESPONSE_MEDIA_PARTS: Final = ("input_image", "input_audio")
# Where an input item holds parts (a message's content, a function call's output), and the
# text part, whose text its server fails on with a 500 when it is no string
RESPONSE_PART_HOLDERS: Final = ("content", "output")
RESPONSE_TEXT_PART: Final = "input_text"
# Fields by which its server makes several responses to one (the Responses API has none), or
# a chat several choices; admission bounds them (`api/inference/admission.WORK_BOUNDS`)
RESPONSE_SEQUENCE_FIELDS: Final = ("n", "n_cmpl")
MOST_CHOICES: Final = 128


def _stream_options(payload: Json) -> BadRequestError | None:
    """The 400 for `stream_options` on a request that does not stream, which llama.cpp's server
    answers with the options unread, where vLLM (its `validate_stream_options`) and OpenAI
    refuse it: set options (not empty, not null) with `stream` false, null or absent."""
    if payload.get("stream_options") and not payload.get("stream"):
        return BadRequestError(
            "stream_options: stream options apply to a stream alone: send `stream: true` with "
            "them, or leave `stream_options` out",
            field="stream_options",
        )
    return None


def _token_count(payload: Json) -> BadRequestError | None:
    """The 400 for a request asking for no token at all, which vLLM (and OpenAI's chat) refuse
    and llama.cpp's server answers with one token all the same, or for more than its server
    reads (MOST_TOKENS), which it would take as another number."""
    for name in (*ZERO_TOKEN_FIELDS, "n_predict"):
        asked = payload.get(name)
        if not isinstance(asked, int | float) or isinstance(asked, bool):
            continue
        if asked == 0 and name != "n_predict":
            return _unsupported(
                name, "generate no token (their server makes one): ask for 1 or more"
            )
        if asked > MOST_TOKENS:
            return _unsupported(
                name, f"read a count of tokens above {MOST_TOKENS}: ask for at most that many"
            )
    return None


def embeddings_refusal(payload: object) -> BadRequestError | None:
    """The 400 for an embeddings request asking for `dimensions`, which llama.cpp's server
    ignores (it answers vectors of the model's own size); None when it asks none."""
    if isinstance(payload, dict) and payload.get("dimensions") is not None:
        return _unsupported(
            "dimensions",
            "shorten embeddings (they are the model's own size): leave `dimensions` out",
        )
    return None


def chat_refusal(payload: object) -> BadRequestError | None:
    """The 400 for a chat request with no message, which OpenAI and vLLM refuse and llama.cpp's
    server answers with text made from nothing, or with a message (`message_refusal`) or
    `tools` its server fails on with a 500, a named `tool_choice` it reads as "auto"
    (`_tool_choice`), `stream_options` without a stream (`_stream_options`), or for no token or
    more than it reads (`_token_count`); None when they are fine."""
    if not isinstance(payload, dict):
        return None
    messages = payload.get("messages")
    if not isinstance(messages, list) or not messages:
        return BadRequestError(
            "messages: a chat needs a list of at least one message", field="messages"
        )
    for at, message in enumerate(messages):
        if isinstance(message, dict):
            refused = message_refusal(message, f"messages[{at}]")
            if refused is not None:
                return refused
    tools = payload.get("tools")
    if tools is not None and not (isinstance(tools, list) and all(map(_tool, tools))):
        return BadRequestError(
            "tools must be a list of tools, each with a `type` and a `function` with its "
            "`name` (strings)",
            field="tools",
        )
    return _tool_choice(payload) or _stream_options(payload) or _token_count(payload)


def _tool_choice(payload: Json) -> BadRequestError | None:
    """The 400 for a `tool_choice` naming a function (an object), which llama.cpp's server
    reads as "auto": the model would be free not to call it."""
    if isinstance(payload.get("tool_choice"), dict):
        return _unsupported(
            "tool_choice",
            'force a named function (their server reads only "auto", "none" or "required", '
            'and takes any other for "auto"): send "required" with that function alone in '
            "`tools`",
        )
    return None


def responses_refusal(payload: object) -> BadRequestError | None:
    """The 400 for a Responses API request llama.cpp's server would fail on with a 500 (an
    image or audio part, in a message or a function call's output: it reads none; a text part
    whose text is no string; a function tool without its name, or with a description that is
    no string), answer in no shape of that API (`n` or `n_cmpl` above 1: a list of responses,
    whose usage is counted for the last alone), or ignore (`text.format` other than text: it
    constrains chats alone, with `response_format`; log-probabilities: `_response_logprobs`; a
    named `tool_choice`: `_tool_choice`), or for no token or more than it reads
    (`_token_count`); None when it is fine."""
    if not isinstance(payload, dict):
        return None
    items = payload.get("input")
    for at, item in enumerate(items if isinstance(items, list) else ()):
        for holder in RESPONSE_PART_HOLDERS:
            parts = item.get(holder) if isinstance(item, dict) else None
            for index, part in enumerate(parts if isinstance(parts, list) else ()):
                where = f"input[{at}].{holder}[{index}]"
                kind = part.get("type") if isinstance(part, dict) else None
                if kind in RESPONSE_MEDIA_PARTS:
                    return _unsupported(where, f"take {kind} parts: their server reads text only")
                if kind == RESPONSE_TEXT_PART and not isinstance(part.get("text"), str):
                    return BadRequestError(
                        f"{where}.text must be a string: a text part carries its text",
                        field=f"{where}.text",
                    )
    tools = payload.get("tools")
    for at, tool in enumerate(tools if isinstance(tools, list) else ()):
        if isinstance(tool, dict) and not isinstance(tool.get("name"), str):
            where = f"tools[{at}].name"
            return BadRequestError(f"{where}: a function tool needs its name", field=where)
        if isinstance(tool, dict) and not _described(tool):
            where = f"tools[{at}].description"
            return BadRequestError(f"{where} must be a string", field=where)
    for name in RESPONSE_SEQUENCE_FIELDS:
        asked = payload.get(name)
        if isinstance(asked, int | float) and not isinstance(asked, bool) and asked > 1:
            return _unsupported(
                name,
                f"answer several responses to one request ({name}={asked}): their server "
                "sends a list OpenAI's clients cannot read, its usage the last response's "
                "alone; send one request per response",
            )
    refused = _response_logprobs(payload)
    if refused is not None:
        return refused
    text = payload.get("text")
    form = text.get("format") if isinstance(text, dict) else None
    kind = form.get("type") if isinstance(form, dict) else None
    if kind is not None and kind != "text":
        return _unsupported(
            "text.format",
            f"constrain a response to {kind} (their server ignores it there): use chat "
            "completions with response_format, which they honour",
        )
    return _tool_choice(payload) or _token_count(payload)


# What asks the Responses API for log-probabilities, which llama.cpp's server gives none of
LOGPROBS_INCLUDED: Final = "message.output_text.logprobs"
NO_RESPONSE_LOGPROBS: Final = (
    "give a response's log-probabilities (their server returns none): use chat completions "
    "with `logprobs` and `top_logprobs`, which they answer"
)


def _response_logprobs(payload: Json) -> BadRequestError | None:
    """The 400 for a response asking for log-probabilities (`top_logprobs` above 0, or
    `include` naming them): llama.cpp's server answers an empty list, and `top_logprobs` alone
    with its own 400 asking for `logprobs`, a field the Responses API has not."""
    asked = payload.get("top_logprobs")
    if isinstance(asked, int | float) and not isinstance(asked, bool) and asked > 0:
        return _unsupported("top_logprobs", NO_RESPONSE_LOGPROBS)
    included = payload.get("include")
    if isinstance(included, list) and LOGPROBS_INCLUDED in included:
        return _unsupported("include", NO_RESPONSE_LOGPROBS)
    return None


# A message's fields llama.cpp's server reads as strings when present: another type (null
# included) fails its parser, which answers 500 ("Failed to parse messages")
STRING_FIELDS: Final = ("role", "name", "tool_call_id", "reasoning_content")
MEDIA_PARTS: Final = ("image_url", "input_audio")  # the server has no multimodal projector


def message_refusal(message: Json, at: str) -> BadRequestError | None:
    """The 400, naming the field, for what in one chat message llama.cpp's server answers with
    a 500 where OpenAI and vLLM answer 400: a role missing or not a string, another string
    field that is not one, `tool_calls` that is not a list of objects, a text part without its
    text, an image or audio part (its server reads none: no multimodal projector is loaded)."""
    for name in STRING_FIELDS:
        if (name == "role" or name in message) and not isinstance(message.get(name), str):
            return BadRequestError(f"{at}.{name} must be a string", field=f"{at}.{name}")
    calls = message.get("tool_calls")
    if calls is not None and not (isinstance(calls, list) and all(map(_tool_call, calls))):
        return BadRequestError(
            f"{at}.tool_calls must be a list of tool calls, each with a `type` and a "
            "`function` with its `name` (strings) and `arguments`",
            field=f"{at}.tool_calls",
        )
    content = message.get("content")
    for index, part in enumerate(content if isinstance(content, list) else ()):
        where = f"{at}.content[{index}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in MEDIA_PARTS:
            return _unsupported(where, f"take {kind} parts: their server reads text only")
        if kind == "text" and not isinstance(part.get("text"), str):
            return BadRequestError(
                f"{where}.text must be a string: a text part carries its text",
                field=f"{where}.text",
            )
    return None


def _tool(tool: object) -> bool:
    """Whether `tool` is a tool as llama.cpp's server reads one (it fails with a 500 on one
    without a string `type`, a `function` object or its string `name`, or with a
    `description` that is no string)."""
    if not isinstance(tool, dict) or not isinstance(tool.get("type"), str):
        return False
    function = tool.get("function")
    return (
        isinstance(function, dict)
        and isinstance(function.get("name"), str)
        and _described(function)
    )


def _described(function: Json) -> bool:
    """Whether a function's `description` is absent or a string (its server fails with a 500
    on any other, null included)."""
    return "description" not in function or isinstance(function["description"], str)


def _tool_call(call: object) -> bool:
    """Whether `call` is a tool call as llama.cpp's server reads one (it fails with a 500 on
    one without a string `type`, a `function` object, its string `name` or its `arguments`)."""
    if not isinstance(call, dict) or not isinstance(call.get("type"), str):
        return False
    function = call.get("function")
    return (
        isinstance(function, dict)
        and isinstance(function.get("name"), str)
        and "arguments" in function
    )


def _unsupported(field: str, what: str) -> BadRequestError:
    return BadRequestError(f"{field}: llama.cpp endpoints do not {what}", field=field)


def shape_for(framework: str, path: bytes, body: bytes = b"") -> Shape | None:
    """The reshaping a reply from this replica path needs: llama.cpp's completions (their
    shape and usage), chats (their usage) and responses (`ResponsesShape`, which reads the
    request `body`'s limit)."""
    if framework != FRAMEWORK:
        return None
    if path == COMPLETIONS_PATH:
        return CompletionShape()
    if path == CHAT_PATH:
        return CompletionShape(legacy=False, choices=_choices(_object(body) if body else None))
    if path == RESPONSES_PATH:
        request = (_object(body) if body else None) or {}
        limit = request.get("max_output_tokens")
        echo = {name: _echoed(request, name, default) for name, default in RESPONSE_ECHO.items()}
        if isinstance(limit, int | float) and not isinstance(limit, bool) and limit > 0:
            return ResponsesShape(int(limit), echo)
        return ResponsesShape(echo=echo)
    return None


# What an OpenAI response object says of its request, which llama.cpp's server leaves out (the
# first three OpenAI's SDK declares required), with OpenAI's value for a request that has none
RESPONSE_ECHO: Final[Json] = {
    "tools": [],
    "tool_choice": "auto",
    "parallel_tool_calls": True,
    "instructions": None,
    "metadata": None,
    "max_output_tokens": None,
    "temperature": None,
    "top_p": None,
}
# What OpenAI's SDK requires of a response's usage besides its counts
USAGE_DETAILS: Final[Json] = {
    "input_tokens_details": {"cached_tokens": 0},
    "output_tokens_details": {"reasoning_tokens": 0},
}


def _echoed(request: Json, name: str, default: object) -> object:
    """The request's `name` as a response echoes it, or `default` where it has none, or one
    nested too deep for a reply to carry: the request is read to 1,024 levels (orjson), a reply
    written to fewer, and a stream's event holds a response that holds it, so such a value
    left the reply unwritten and the call unanswered."""
    value = request.get(name, default)
    if not isinstance(value, dict | list):
        return value
    try:
        orjson.dumps([[value]])  # as deep as an event's response holds it
    except orjson.JSONEncodeError:
        return default
    return value


def _choices(request: Json | None) -> int:
    """How many choices a chat request asks for (`n`, or llama.cpp's `n_cmpl`; 1 when neither
    is a number above 1), as its server reads them."""
    most = 1
    for name in RESPONSE_SEQUENCE_FIELDS:
        asked = request.get(name) if request is not None else None
        if isinstance(asked, str):
            try:
                asked = float(asked)
            except ValueError:
                continue
        if isinstance(asked, int | float) and not isinstance(asked, bool) and asked > most:
            most = int(min(asked, MOST_CHOICES))
    return most


class Shape:
    """A reply made OpenAI's, as `forwarder/relay.py` applies it to a replica's 200 reply:
    `whole` for a plain reply (as it came, unless a subclass reshapes it), or `feed`...
    `close` for a stream, whose complete events each pass through `_event`."""

    buffer = b""  # a stream's incomplete event

    def whole(self, body: bytes) -> bytes:
        return body

    def feed(self, data: bytes) -> bytes:
        """A stream's bytes in, the reshaped events complete so far out (b"" when none)."""
        buffer = self.buffer + data if self.buffer else data
        out: list[bytes] = []
        start = 0
        end = buffer.find(EVENT_END)
        while end >= 0:
            out.append(self._event(buffer[start : end + 2]))
            start = end + 2
            end = buffer.find(EVENT_END, start)
        self.buffer = buffer[start:]
        return b"".join(out)

    def close(self) -> bytes:
        """What the stream still owes once the replica's reply ended."""
        rest, self.buffer = self.buffer, b""
        return rest

    def _event(self, event: bytes) -> bytes:
        return event


class ResponsesShape(Shape):
    """llama.cpp's Responses API stream made OpenAI's. Its events lack what OpenAI's SDK reads
    to assemble the response as it streams (`client.responses.stream` fails on them): the
    first events' response has no `output` list, no event has a `sequence_number`, and the
    item and content events have no `output_index` or `content_index`. Each event gets the
    ones it lacks, counted as the stream goes; what it has is kept. And a response cut short
    at `max_output_tokens` (`limit`, as the request sent it) says `completed`, where OpenAI's
    and vLLM's say `incomplete` with the reason: its server reports no finish reason here, so
    a response whose output reached the limit is marked so, whole or as a stream's last
    response. Its response objects, whole or in events, also lack what OpenAI's say of the
    request (`tools`, `tool_choice` and `parallel_tool_calls`, which OpenAI's SDK declares
    required; `instructions`, `metadata`...) and their usage's details: `_mend` fills them
    from the request (`RESPONSE_ECHO`), as vLLM does."""

    def __init__(self, limit: int = 0, echo: Json | None = None) -> None:
        self.limit = limit  # the request's max_output_tokens; 0: none
        self.echo = echo or {}  # what the response says of its request (`RESPONSE_ECHO`)
        self.number = 0  # the next event's sequence number
        self.item = -1  # the output item being streamed
        self.part = -1  # its content part being streamed

    def whole(self, body: bytes) -> bytes:
        reply = _object(body)
        if reply is None:
            return body
        self._mend(reply)
        self._cut(reply)
        return orjson.dumps(reply)

    def _mend(self, response: Json) -> None:
        """What the response lacks of OpenAI's: `output`, the request's fields, its usage's
        details (what the server sent is kept)."""
        response.setdefault("output", [])
        for name, value in self.echo.items():
            if response.get(name) is None:
                response[name] = value
        usage = response.get("usage")
        if isinstance(usage, dict):
            for name, value in USAGE_DETAILS.items():
                if not isinstance(usage.get(name), dict):
                    usage[name] = dict(value)

    def _cut(self, response: Json) -> bool:
        """Mark a completed response whose output reached the limit incomplete; whether so."""
        usage = response.get("usage")
        output = usage.get("output_tokens") if isinstance(usage, dict) else None
        if response.get("status") != "completed" or not isinstance(output, int):
            return False
        if self.limit <= 0 or output < self.limit:
            return False
        response["status"] = "incomplete"
        response["incomplete_details"] = {"reason": "max_output_tokens"}
        return True

    def _event(self, event: bytes) -> bytes:
        at = 0
        if not event.startswith(DATA):  # `event: <type>` first
            at = event.find(b"\n" + DATA) + 1
            if at == 0:
                return event  # a comment
        head = event[: at + len(DATA)]
        chunk = _object(event[at + len(DATA) : -2])
        if chunk is None:
            return event
        kind = chunk.get("type")
        if kind == "response.output_item.added":
            self.item += 1
            self.part = -1
        elif kind == "response.content_part.added":
            self.part += 1
        chunk.setdefault("sequence_number", self.number)
        self.number += 1
        response = chunk.get("response")
        if isinstance(response, dict):
            self._mend(response)
            if kind == "response.completed":
                self._cut(response)
        if "item" in chunk or "item_id" in chunk:
            chunk.setdefault("output_index", max(self.item, 0))
        if "item_id" in chunk and ("part" in chunk or str(kind).startswith(TEXT_EVENTS)):
            chunk.setdefault("content_index", max(self.part, 0))
        return head + orjson.dumps(chunk) + EVENT_END


class CompletionShape(Shape):
    """One llama.cpp `/v1/completions` reply made OpenAI's: `whole` for a plain reply, or
    `feed`... `close` for a stream, event by event as they pass (one finishing event is held
    until the next, to carry the stream's summed usage if it is the last). `legacy` false: a
    chat reply, whose usage alone is summed."""

    def __init__(self, *, legacy: bool = True, choices: int = 1) -> None:
        self.legacy = legacy
        self.choices = choices  # a chat's `n`: its choices, opened in order (`_open`)
        self.opened = 1 if legacy else 0  # choices 0 .. opened-1 have had a chunk
        self.offsets: dict[int, int] = {}  # a choice's text offset so far
        self.held: Json | None = None  # a finishing chunk, with its choice's usage
        self.prompt_tokens = -1
        self.completion_tokens = 0

    def whole(self, body: bytes) -> bytes:
        """A plain 200 reply, reshaped; the body untouched when it is not a completion."""
        reply = _object(body)
        if reply is None or not isinstance(reply.get("choices"), list):
            return body
        choices: list[Any] = reply["choices"]
        if not self.legacy and len(choices) < 2:
            return body  # a chat of one choice: its usage is right
        if self.legacy:
            self._chunk(reply)
        usage = reply.get("usage")
        if isinstance(usage, dict) and len(choices) > 1:
            completion = usage.get("completion_tokens")
            if isinstance(completion, int):
                _set_usage(usage, usage.get("prompt_tokens"), completion * len(choices))
        return orjson.dumps(reply)

    def close(self) -> bytes:
        rest, self.buffer = self.buffer, b""
        return self._release(last=True) + rest

    def _event(self, event: bytes) -> bytes:
        if not event.startswith(DATA):
            return event  # a comment: passed on, past any held chunk
        data = event[len(DATA) : -2].strip()
        opening = self.opened < self.choices
        if not self.legacy and not opening and self.held is None and USAGE not in data:
            return event  # a chat's delta: passed as its bytes
        if data == DONE:
            return self._release(last=True) + event
        chunk = _object(data)
        if chunk is None or not isinstance(chunk.get("choices"), list):
            return self._release(last=True) + event  # an error: the stream ends
        if self.legacy:
            self._chunk(chunk)
        usage = chunk.get("usage")
        out = self._release(last=False)
        if opening:
            out += self._open(chunk)
        if not isinstance(usage, dict):
            return out + _data(chunk)
        completion = usage.get("completion_tokens")
        prompt = usage.get("prompt_tokens")
        self.completion_tokens += completion if isinstance(completion, int) else 0
        if self.prompt_tokens < 0 and isinstance(prompt, int):
            self.prompt_tokens = prompt  # the n choices share their prompt
        self.held = chunk
        return out

    def _open(self, chunk: Json) -> bytes:
        """Openers (an empty delta) for the choices below the one `chunk` carries that have had
        no chunk yet: llama.cpp's server may start choice 1 before choice 0, and OpenAI's SDK
        stream helper takes a choice's first chunk for its place in a list (choice 1 first
        failed it with an IndexError), where OpenAI and vLLM open them in order."""
        out = b""
        for choice in chunk["choices"]:
            index = choice.get("index") if isinstance(choice, dict) else None
            if not isinstance(index, int) or isinstance(index, bool) or index >= self.choices:
                continue
            while self.opened < index:
                head = {k: chunk[k] for k in USAGE_CHUNK_FIELDS if k in chunk}
                opener = {"index": self.opened, "delta": {}, "finish_reason": None}
                out += _data(head | {"choices": [opener]})
                self.opened += 1
            self.opened = max(self.opened, index + 1)
        return out

    def _release(self, *, last: bool) -> bytes:
        """The held finishing chunk: with the stream's usage if it is the last, else without."""
        chunk, self.held = self.held, None
        if chunk is None:
            return b""
        if last:
            usage = chunk["usage"]
            prompt = self.prompt_tokens if self.prompt_tokens >= 0 else usage.get("prompt_tokens")
            _set_usage(usage, prompt, self.completion_tokens)
            if self.legacy and chunk["choices"]:  # OpenAI's: the usage in a chunk of its own
                del chunk["usage"]
                alone = {k: chunk[k] for k in USAGE_CHUNK_FIELDS if k in chunk}
                return _data(chunk) + _data(alone | {"choices": [], "usage": usage})
        elif not chunk["choices"]:
            return b""  # a chat's usage chunk, nothing else in it: the last one carries the sum
        else:
            del chunk["usage"]
        return _data(chunk)

    def _chunk(self, reply: Json) -> None:
        """The id and each choice's log-probabilities, in OpenAI's completion shape."""
        reply_id = reply.get("id")
        if isinstance(reply_id, str) and reply_id.startswith(ID_PREFIX):
            reply["id"] = COMPLETION_ID_PREFIX + reply_id[len(ID_PREFIX) :]
        reply["object"] = "text_completion"
        for choice in reply["choices"]:
            if isinstance(choice, dict) and isinstance(choice.get("logprobs"), dict):
                index = choice.get("index")
                at = index if isinstance(index, int) else 0
                logprobs, self.offsets[at] = legacy_logprobs(
                    choice["logprobs"], self.offsets.get(at, 0)
                )
                choice["logprobs"] = logprobs


def legacy_logprobs(logprobs: Json, offset: int) -> tuple[Json, int]:
    """llama.cpp's `{"content": [{"token", "logprob", "top_logprobs"}]}` as OpenAI's legacy
    `{"text_offset", "token_logprobs", "tokens", "top_logprobs"}` (vLLM's order), the offsets
    counted in characters of the generated text from `offset`; and the offset after them. Any
    other shape is returned as it is."""
    content = logprobs.get("content")
    if not isinstance(content, list):
        return logprobs, offset
    offsets: list[int] = []
    values: list[Any] = []
    tokens: list[str] = []
    tops: list[dict[str, Any]] = []
    for item in content:
        if not isinstance(item, dict):
            continue
        token = item.get("token")
        text = token if isinstance(token, str) else ""
        offsets.append(offset)
        offset += len(text)
        values.append(item.get("logprob"))
        tokens.append(text)
        top = item.get("top_logprobs")
        tops.append(
            {
                str(alt.get("token")): alt.get("logprob")
                for alt in (top if isinstance(top, list) else [])
                if isinstance(alt, dict)
            }
        )
    shaped = {
        "text_offset": offsets,
        "token_logprobs": values,
        "tokens": tokens,
        "top_logprobs": tops,
    }
    return shaped, offset


def _set_usage(usage: Json, prompt: object, completion: int) -> None:
    usage["completion_tokens"] = completion
    if isinstance(prompt, int):
        usage["prompt_tokens"] = prompt
        usage["total_tokens"] = prompt + completion


def _object(data: bytes) -> Json | None:
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def _data(chunk: Json) -> bytes:
    return DATA + orjson.dumps(chunk) + EVENT_END
