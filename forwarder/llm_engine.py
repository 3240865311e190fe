"""LLM Engine's v1 completion and task formats, translated to and from a replica's OpenAI API.

`/v1/llm/completions-sync|stream` bodies become OpenAI `/v1/completions` bodies; replies come
back as CompletionSyncV1Response or a stream of CompletionStreamV1Response events (no `[DONE]`,
errors after the stream began sent in band). `/v1/sync-tasks|streaming-tasks` unwrap `args`
and wrap results the way LLM Engine's forwarder does (reference/llm-engine.md §2-3), as the
async worker does its tasks'. Called by the api's completion and task routes and the worker.
"""

from __future__ import annotations

import json
import time
from typing import Any

from appliance.errors import BadRequestError
from forwarder.paths import CHAT, COMPLETIONS, EMBEDDINGS, RESPONSES, upstream_for

Json = dict[str, Any]

# v1 request field -> OpenAI/vLLM completions field (same meaning)
PASSED_FIELDS = {
    "max_new_tokens": "max_tokens",
    "temperature": "temperature",
    "stop_sequences": "stop",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
    "top_k": "top_k",
    "top_p": "top_p",
    "include_stop_str_in_output": "include_stop_str_in_output",
    "skip_special_tokens": "skip_special_tokens",
}
# LLM Engine's guided decoding fields -> the kind of vLLM 0.32's `structured_outputs` (vLLM
# dropped the `guided_*` request fields and ignores them silently).
GUIDED_FIELDS = {
    "guided_json": "json",
    "guided_regex": "regex",
    "guided_choice": "choice",
    "guided_grammar": "grammar",
}
# What llama.cpp's server can honour: a JSON schema, or a GBNF grammar (a choice becomes one).
LLAMACPP_GUIDED = ("guided_json", "guided_choice", "guided_grammar")


def check_guided(request: Json, framework: str) -> str | None:
    """The one guided field the request sets (None: none); a BadRequestError naming the field
    when it sets several, or one its endpoint's framework cannot honour."""
    sent = [name for name in GUIDED_FIELDS if request.get(name) is not None]
    if len(sent) > 1:
        raise BadRequestError(
            f"{sent[1]}: only one guided decoding field may be set, and {sent[0]} is set too",
            field=sent[1],
        )
    if not sent:
        return None
    name = sent[0]
    if framework == "llamacpp" and name not in LLAMACPP_GUIDED:
        raise BadRequestError(
            f"{name} is not supported by llama.cpp endpoints; they honour "
            f"{', '.join(LLAMACPP_GUIDED)}",
            field=name,
        )
    if framework not in ("vllm", "llamacpp"):
        raise BadRequestError(
            f"{name}: guided decoding needs a vllm or llamacpp endpoint, not {framework}",
            field=name,
        )
    return name


def _choice_grammar(choices: list[str]) -> str:
    """A GBNF grammar whose only sentences are the choices (JSON string escapes suit GBNF)."""
    return "root ::= " + " | ".join(json.dumps(str(c)) for c in choices)


def guided_payload(request: Json, framework: str) -> Json:
    """The completion fields that make the framework's server honour the request's guided
    decoding ({} when it asks for none); BadRequestError when it cannot (`check_guided`)."""
    name = check_guided(request, framework)
    return {} if name is None else guided_body(name, request[name], framework)


def guided_body(name: str, value: Any, framework: str) -> Json:
    """The completion body fields that make the framework's server honour the guided field."""
    if framework == "llamacpp":
        if name == "guided_json":
            return {"json_schema": value}
        if name == "guided_choice":
            return {"grammar": _choice_grammar(list(value))}
        return {"grammar": value}
    return {"structured_outputs": {GUIDED_FIELDS[name]: value}}


def completion_payload(request: Json, model: str, *, stream: bool) -> Json:
    """The replica's `/v1/completions` request for a CompletionSyncV1Request/StreamV1Request,
    less its guided decoding (`guided_payload`, once the endpoint's framework is known)."""
    body: Json = {"model": model, "prompt": request["prompt"]}
    for ours, theirs in PASSED_FIELDS.items():
        value = request.get(ours)
        if value is not None:
            body[theirs] = value
    if request.get("return_token_log_probs"):
        body["logprobs"] = 1
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return body


def _set(fields: Json) -> Json:
    return {k: v for k, v in fields.items() if v is not None}


def v2_request(request: Json) -> Json:
    """A v2 batch request (LLM Engine's FilteredChatCompletionV2Request or
    FilteredCompletionV2Request as its client serialises them, every unset field null) with
    only its set fields, as LLM Engine sends it on: nulls dropped at the top level, in each
    message, in each message's content parts and in a part's own object (`image_url`, `file`).
    vLLM refuses a message's `"name": null` (400), llama.cpp too (500). Nulls deeper down (a
    JSON schema's default, a tool's parameters) are the caller's data and stay."""
    body = _set(request)
    messages = body.get("messages")
    if isinstance(messages, list):
        body["messages"] = [_set_message(m) if isinstance(m, dict) else m for m in messages]
    return body


def _set_message(message: Json) -> Json:
    out = _set(message)
    parts = out.get("content")
    if isinstance(parts, list):
        out["content"] = [_set_part(p) if isinstance(p, dict) else p for p in parts]
    return out


def _set_part(part: Json) -> Json:
    return {k: _set(v) if isinstance(v, dict) else v for k, v in _set(part).items()}


def _tokens(choice: Json) -> list[Json] | None:
    """The choice's tokens with their log-probabilities (None: it carries none), read from
    either format a replica answers in: the legacy completions `logprobs.tokens` and
    `logprobs.token_logprobs` (vLLM), or `logprobs.content: [{"token", "logprob", ...}]`
    (llama.cpp's server, as in OpenAI's chat format)."""
    logprobs = choice.get("logprobs")
    if not isinstance(logprobs, dict):
        return None
    content = logprobs.get("content")
    if isinstance(content, list):
        return [
            {"token": str(item.get("token") or ""), "log_prob": float(item.get("logprob") or 0.0)}
            for item in content
            if isinstance(item, dict)
        ]
    tokens = logprobs.get("tokens") or []
    values = logprobs.get("token_logprobs") or []
    return [{"token": t, "log_prob": float(v or 0.0)} for t, v in zip(tokens, values, strict=False)]


def sync_response(reply: Json, request_id: str) -> Json:
    """CompletionSyncV1Response from an OpenAI text_completion."""
    choice = (reply.get("choices") or [{}])[0]
    usage = reply.get("usage") or {}
    output: Json = {
        "text": choice.get("text") or "",
        "num_prompt_tokens": usage.get("prompt_tokens"),
        "num_completion_tokens": int(usage.get("completion_tokens") or 0),
    }
    tokens = _tokens(choice)
    if tokens is not None:
        output["tokens"] = tokens
    return {"request_id": request_id, "output": output}


def error_event(request_id: str, status: int, message: str) -> bytes:
    """A CompletionStreamV1Response that carries an error, in band."""
    event = {
        "request_id": request_id,
        "output": None,
        "error": {
            "status_code": status,
            "content": {"error": message, "timestamp": time.strftime("%Y-%m-%d %H:%M:%S")},
        },
    }
    return b"data: " + json.dumps(event).encode() + b"\n\n"


def sse_events(buffer: bytearray, chunk: bytes) -> list[bytes]:
    """Append `chunk` and pop every complete event's `data:` payload from `buffer`."""
    buffer += chunk
    out: list[bytes] = []
    while True:
        end = buffer.find(b"\n\n")
        if end < 0:
            return out
        event = bytes(buffer[:end])
        del buffer[: end + 2]
        data = [line[5:].strip() for line in event.split(b"\n") if line.startswith(b"data:")]
        if data:
            out.append(b"\n".join(data))


def _pieces(choice: Json) -> list[tuple[str, Json | None]]:
    """A stream chunk's choice as LLM Engine's events carry it, one token an event: each of its
    tokens with its text when they spell the chunk's text (vLLM may send several in a chunk),
    else the chunk's text with its first token, if any."""
    text = str(choice.get("text") or "")
    tokens = _tokens(choice)
    if tokens and len(tokens) > 1 and "".join(t["token"] for t in tokens) == text:
        return [(t["token"], t) for t in tokens]
    return [(text, tokens[0] if tokens else None)]


class StreamTranslator:
    """OpenAI completion chunks in, CompletionStreamV1Response events out."""

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.buffer = bytearray()
        self.completion_tokens = 0
        self.prompt_tokens: int | None = None
        self.pending: Json | None = None  # the finishing chunk, held for the usage after it
        self.finished = False

    def feed(self, chunk: bytes) -> bytes:
        out = bytearray()
        for data in sse_events(self.buffer, chunk):
            if data == b"[DONE]":
                continue
            try:
                item = json.loads(data)
            except ValueError:
                continue
            out += self._event(item)
        return bytes(out)

    def _event(self, item: Json) -> bytes:
        if "error" in item:
            error = item["error"] if isinstance(item["error"], dict) else {}
            message = str(error.get("message") or item["error"])
            return error_event(self.request_id, int(error.get("code") or 500), message)
        usage = item.get("usage")
        if isinstance(usage, dict):
            self.prompt_tokens = usage.get("prompt_tokens")
            self.completion_tokens = int(usage.get("completion_tokens") or 0)
        out = b""
        for choice in item.get("choices") or []:
            out += self._flush()
            pieces = _pieces(choice)
            for at, (text, token) in enumerate(pieces):
                self.completion_tokens += 1 if usage is None else 0
                output: Json = {"text": text, "finished": False}
                if token is not None:
                    output["token"] = token
                if at == len(pieces) - 1 and choice.get("finish_reason") is not None:
                    self.pending = output  # sent with the counts once the usage chunk is in
                else:
                    output["num_completion_tokens"] = self.completion_tokens
                    out += self._data(output)
        return out

    def _flush(self) -> bytes:
        if self.pending is None:
            return b""
        output, self.pending = self.pending, None
        output["finished"] = True
        output["num_prompt_tokens"] = self.prompt_tokens
        output["num_completion_tokens"] = self.completion_tokens
        self.finished = True
        return self._data(output)

    def _data(self, output: Json) -> bytes:
        event = {"request_id": self.request_id, "output": output}
        return b"data: " + json.dumps(event).encode() + b"\n\n"

    def close(self) -> bytes:
        """What to send once the replica's stream ended."""
        return self._flush()


OPENAI_FRAMEWORKS = ("vllm", "llamacpp")  # replicas that serve only their OpenAI routes
NO_ROUTE = (
    "args need prompt (a completion), messages (a chat) or input (embeddings): a {framework} "
    "endpoint serves only {routes} (no predict route), and an async task may name one of them "
    "as its route"
)


def declared_routes(framework: str, predict_route: str) -> tuple[str, ...]:
    """The replica paths a task may name as its `route`: the OpenAI routes of vLLM and
    llama.cpp replicas, a custom image's predict route. Others (`/tokenize`, `/slots`...) are
    the replica's own business and never reached through the appliance."""
    if framework in OPENAI_FRAMEWORKS:
        return (CHAT, COMPLETIONS, EMBEDDINGS, RESPONSES)
    return (predict_route,)


# LLM Engine's EndpointPredictV1Request fields for pickled and remote inputs and outputs,
# which the appliance does not serve: taken as its clients send them by default (null, false),
# refused otherwise, on every task entry (`check_task_fields`)
UNSERVED_TASK_FIELDS = {
    "url": "a task's input is its `args`; the appliance fetches no URL",
    "cloudpickle": "pickled inputs are not taken; send `args` as JSON",
    "destination_path": "results are answered, read with GET /v1/async-tasks/{id} or called back",
    "return_pickled": "results are JSON",
}
CALLBACK_FIELDS = ("callback_url", "callback_auth")


def check_task_fields(request: Any, extra: dict[str, Any] | None, *, callbacks: bool) -> None:
    """A task's body as LLM Engine's clients send it, on every task entry: a BadRequestError
    naming a field the appliance would drop unread (`UNSERVED_TASK_FIELDS` set, a callback
    where none is sent, a field `extra` holds that such a request has not)."""
    for name, why in UNSERVED_TASK_FIELDS.items():
        if getattr(request, name, None) not in (None, False):
            raise BadRequestError(f"{name} is refused: {why}", field=name)
    if not callbacks:
        for name in CALLBACK_FIELDS:
            if getattr(request, name, None) is not None:
                raise BadRequestError(
                    f"{name} is refused: a sync or streaming task answers in its reply; "
                    "callbacks are sent for async tasks",
                    field=name,
                )
    for name, value in (extra or {}).items():
        if value is not None:
            raise BadRequestError(f"{name} is refused: a task has no such field", field=name)


def check_completion_fields(extra: dict[str, Any] | None) -> None:
    """A completion's body (`/v1/llm/completions-sync|stream`): a BadRequestError naming a
    field LLM Engine's completion has not, which would be dropped unread (null ones are
    taken, as on the task entries)."""
    for name, value in (extra or {}).items():
        if value is not None:
            raise BadRequestError(
                f"{name} is refused: LLM Engine's completion request has no such field",
                field=name,
            )


def task_path(framework: str, predict_route: str, args: Any, route: str | None = None) -> str:
    """Where a `{"args": ...}` task goes, the one rule of every task entry (sync, streaming and
    async tasks, and the worker that runs the async ones): the `route` it names (its entry
    checked it against `declared_routes`); for vLLM and llama.cpp replicas, whose `/predict`
    routes are gone, the OpenAI route the args' shape fits (`forwarder/paths.upstream_for`),
    and a BadRequestError saying what to send when none does; a custom image's predict route
    otherwise, whatever the args."""
    if route:
        return route
    if framework not in OPENAI_FRAMEWORKS:
        return predict_route
    path = upstream_for(args)
    if not path:
        routes = ", ".join(declared_routes(framework, predict_route))
        raise BadRequestError(NO_ROUTE.format(framework=framework, routes=routes), field="args")
    return path


def parse_result(body: bytes) -> Any:
    """The replica's reply as LLM Engine's forwarder reads it: JSON regardless of type."""
    try:
        return json.loads(body)
    except ValueError:
        return body.decode("utf-8", "replace")


SERIALIZE_KEY = "serialize_results_as_string"
SERIALIZE_DOC = (
    'true: the result is `{"result": "<the reply as a JSON string>"}`; false: '
    '`{"result": <the reply>}`. Default: strings for sync and async tasks, objects for a '
    "stream's events, as LLM Engine's forwarder does. Also read from `args`, and taken out of "
    "them: the replica never sees it."
)


def results_as_string(given: Any, args: Any, *, stream: bool) -> bool:
    """Whether a task's result is wrapped as a JSON string, the one rule of every task entry
    (sync, streaming and async tasks): the body's `serialize_results_as_string` (`given`), else
    the one in its `args`, which is taken out of them before they go to the replica; else LLM
    Engine's forwarder's default, strings but for a stream's events. null counts as unset;
    anything else than a boolean is a BadRequestError naming it."""
    in_args = args.pop(SERIALIZE_KEY, None) if isinstance(args, dict) else None
    for value, name in ((given, SERIALIZE_KEY), (in_args, f"args.{SERIALIZE_KEY}")):
        if value is not None and not isinstance(value, bool):
            shown = json.dumps(value)[:40]
            raise BadRequestError(f"{name} must be true or false, not {shown}", field=name)
    if isinstance(given, bool):
        return given
    if isinstance(in_args, bool):
        return in_args
    return not stream


def wrap_result(result: Any, as_string: bool) -> Json:
    """The forwarder's `{"result": ...}` around a parsed reply: its JSON text, or itself."""
    return {"result": json.dumps(result) if as_string else result}


def sync_task_response(status: int, body: bytes, as_string: bool = True) -> Json:
    """SyncEndpointPredictV1Response; `result` is the forwarder's `{"result": "<json>"}` (or
    `{"result": <reply>}` when the request asked for objects)."""
    result = parse_result(body)
    if status == 200:
        return {
            "status": "SUCCESS",
            "result": wrap_result(result, as_string),
            "traceback": None,
            "status_code": status,
        }
    return {
        "status": "FAILURE",
        "result": None,
        "traceback": result if isinstance(result, str) else json.dumps(result),
        "status_code": status,
    }


def task_event(result: Any, status: int = 200, as_string: bool = False) -> bytes:
    outcome = "SUCCESS" if status == 200 else "FAILURE"
    event = {"status": outcome, "result": wrap_result(result, as_string), "status_code": status}
    return b"data: " + json.dumps(event).encode() + b"\n\n"


class TaskEvents:
    """Each of the replica's SSE events re-emitted as `{"status","result":{"result":...},...}`;
    the replica's `[DONE]` is dropped, as LLM Engine's gateway skips it."""

    def __init__(self, as_string: bool = False) -> None:
        self.buffer = bytearray()
        self.as_string = as_string

    def feed(self, chunk: bytes) -> bytes:
        return b"".join(
            task_event(parse_result(data), as_string=self.as_string)
            for data in sse_events(self.buffer, chunk)
            if data != b"[DONE]"
        )
