"""LLM Engine's shapes of an inference call (`api/inference/call.py`), translated to and from
the replica's OpenAI API by `forwarder/llm_engine.py`:

- `CompletionCall`: `/v1/llm/completions-sync` and `-stream` (`?model_endpoint_name=`), the
  body a CompletionSyncV1Request, the reply a CompletionSyncV1Response or a stream of
  CompletionStreamV1Response events (no `[DONE]`; errors after the stream began in band);
- `TaskCall`: `/v1/sync-tasks` and `/v1/streaming-tasks` (`?model_endpoint_id=`), the body's
  `args` sent to the replica, the result wrapped as LLM Engine's forwarder wraps it: a JSON
  string or an object, as `serialize_results_as_string` picks (`llm_engine.results_as_string`).

Errors before a reply answer `{"detail": ...}` with their status; a replica's non-200 reply
answers `{"detail": <its body>}` with its status, as LLM Engine's gateway does (a completion's:
`{"detail": <its message>}`, which LLM Engine's client raises as its exception's message).
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Mapping
from time import monotonic
from typing import Any, Final
from urllib.parse import parse_qs

from api.errors import status_of
from api.inference.call import SSE_HEADERS, Call, Client, Core, InvalidRequestError
from api.inference.schemas import CompletionV1Request, SyncEndpointPredictV1Request
from appliance.errors import ApplianceError, BadRequestError, NoReadyReplicaError, UpstreamError
from appliance.keys import Caller
from forwarder import llm_engine
from forwarder.paths import (
    CHAT,
    COMPLETION,
    COMPLETIONS,
    LIMIT_FIELDS,
    LLM_ENGINE,
    TASK,
    InferencePath,
    upstream_for,
)
from forwarder.relay import Headers
from forwarder.table import Target

# a payload's field -> the v1 request's field it came from, to name it as the client did
SPELLED = {
    **{theirs: ours for ours, theirs in llm_engine.PASSED_FIELDS.items()},
    # guided decoding as the replica takes it: of the guided fields only guided_json holds
    # numbers and nesting, which a refusal may be about (`call.replica_body`)
    "json_schema": "guided_json",
    "structured_outputs": "guided_json",
}

JSON_HEADERS = [(b"content-type", b"application/json")]
MISSING = "Field required"

# A task's replica that answers 429 or 503, or cannot be reached, is tried again, as LLM
# Engine's sync and streaming gateways do (tenacity: exponential waits of 1 s times 1.2 per
# try, at most 5 s): `num_retries` more sends (8 when unset) while `timeout_seconds` (10 s
# when unset) since the request came has not passed. (An async task's sends are the worker's,
# with its own statuses and attempts: `forwarder/worker/jobs.RETRIED_STATUSES`.)
GATEWAY_RETRIED_STATUSES: Final = (429, 503)
TASK_RETRIES: Final = 8
RETRY_WINDOW_S: Final = 10.0
RETRY_WAIT_MIN_S: Final = 1.0
RETRY_WAIT_MAX_S: Final = 5.0
RETRY_WAIT_BASE: Final = 1.2


def retry_wait(tries: int) -> float:
    """The wait before the send after `tries` failed ones (1, 1.2, 1.44, ... up to 5 s)."""
    return min(RETRY_WAIT_MAX_S, max(RETRY_WAIT_MIN_S, RETRY_WAIT_BASE ** (tries - 1)))


def query_value(query: str, name: str) -> str:
    """A query parameter the route requires; a 422 in FastAPI's shape when it is missing."""
    values = parse_qs(query).get(name)
    if not values or not values[0]:
        raise InvalidRequestError([{"type": "missing", "loc": ["query", name], "msg": MISSING}])
    return values[0]


class LlmEngineCall(Call):
    """What both of LLM Engine's shapes share: a reply gathered whole when it is not a 200
    stream, and the result written once the reply is complete."""

    def on_head(self, status: int, headers: Headers, length: int) -> None:
        self.status, self.length = status, length
        if status != 200 or not self.stream:
            self.gather = []
            return
        self.length = -1  # the client's stream, whatever the replica's framing: an error in band
        if not self.held:
            self.started = True
            self.client.start(200, SSE_HEADERS, -1, self._overhead(), self._waited())
        self.streaming(headers)

    def streaming(self, headers: Headers) -> None:
        """A 200 stream begins."""

    def on_end(self) -> None:
        if self.gather is not None:
            self.on_whole(self.status, [], b"".join(self.gather))
            return
        tail = self.closing()
        if tail:
            self.client.send(tail)
        self.client.end()
        self._settle()

    def closing(self) -> bytes:
        """What a stream sends after the replica's last event."""
        return b""

    def on_whole(self, status: int, headers: Headers, body: bytes) -> None:
        self.status = status
        if status != 200:
            if self.refuse_unserved(status, body):
                return
            if self.held:
                self._final(self.failed_event(status, body))
                return
            detail = json.dumps({"detail": self.error_detail(body)}).encode()
            self._whole(status, JSON_HEADERS, detail, self._overhead())
            return
        if self.stream:
            if not self.held:
                self.started = True
                self.client.start(200, SSE_HEADERS, -1, self._overhead(), self._waited())
            self.client.send(self.whole_event(body))
            self.client.end()
            self._settle()
            return
        self._whole(200, JSON_HEADERS, self.result(body), self._overhead())

    def whole_event(self, body: bytes) -> bytes:
        """A stream's events for a replica that answered all at once."""
        return b""

    def error_detail(self, body: bytes) -> Any:
        """A replica's error reply as our `detail`: its body, as LLM Engine's gateway passes
        a task's on."""
        return llm_engine.parse_result(body)

    def result(self, body: bytes) -> bytes:
        """The route's answer to the replica's 200 reply."""
        raise NotImplementedError

    def _overhead(self) -> float:
        return self.relay.overhead_s if self.relay is not None else -1.0

    def _waited(self) -> float:
        return self.relay.waited_s if self.relay is not None else 0.0


class CompletionCall(LlmEngineCall):
    """`/v1/llm/completions-sync|stream`."""

    request_id: str
    request: dict[str, Any]
    translator: llm_engine.StreamTranslator

    def interpret(self, body: bytes) -> None:
        self.request_id = uuid.uuid4().hex
        self.translator = llm_engine.StreamTranslator(self.request_id)
        self.name = query_value(self.query, self.entry.selector)
        request = CompletionV1Request.model_validate_json(body)
        llm_engine.check_completion_fields(request.model_extra)
        self.request = request.model_dump()
        self.stream = self.entry.stream > 0
        self.payload = llm_engine.completion_payload(self.request, self.name, stream=self.stream)
        self.changed = True
        self.path = COMPLETIONS

    def injects(self) -> str:
        return ""  # max_new_tokens is required

    def spelling(self) -> Mapping[str, str] | None:
        return SPELLED  # a refusal names `max_new_tokens`, which the client sent

    def fit(self, target: Target) -> None:
        guided = llm_engine.guided_payload(self.request, target.framework)
        if guided:
            self.payload.update(guided)

    def on_body(self, data: bytes) -> None:
        if self.gather is not None:
            self.gather.append(data)
            return
        out = self.translator.feed(data)
        if out:
            self.client.send(out)

    def closing(self) -> bytes:
        return self.translator.close()

    def whole_event(self, body: bytes) -> bytes:
        return self.translator.feed(body) + self.translator.close()

    def error_detail(self, body: bytes) -> Any:
        """The replica's message alone where its reply is an error envelope (vLLM's and
        llama.cpp's `{"error": {"message": ...}}`, vLLM's older `{"object": "error", ...}`):
        LLM Engine's client raises `detail` as its exception's message, which was a dict."""
        parsed = llm_engine.parse_result(body)
        if not isinstance(parsed, dict):
            return parsed
        error = parsed.get("error", parsed if parsed.get("object") == "error" else None)
        message = error.get("message") if isinstance(error, dict) else None
        return message if isinstance(message, str) else parsed

    def result(self, body: bytes) -> bytes:
        reply = llm_engine.sync_response(json.loads(body), self.request_id)
        return json.dumps(reply).encode()

    def in_band(self, exc: ApplianceError) -> bytes:
        return llm_engine.error_event(self.request_id, status_of(exc, LLM_ENGINE), exc.message)

    def failed_event(self, status: int, body: bytes) -> bytes:
        return llm_engine.error_event(self.request_id, status, body.decode("utf-8", "replace"))


class TaskCall(LlmEngineCall):
    """`/v1/sync-tasks` and `/v1/streaming-tasks`: sends are tried again (`retries`, within
    `retry_by`) while the client has had nothing but keep-alives."""

    wrapper: llm_engine.TaskEvents | None = None
    as_string: bool = True  # the result as a JSON string (or as an object)
    retries: int = 0  # sends left to try after a replica's 429 or 503 or a failed connect
    tries: int = 0  # sends that failed so
    retry_by: float = 0.0  # monotonic: no send is tried after it

    def interpret(self, body: bytes) -> None:
        self.name = query_value(self.query, self.entry.selector)
        request = SyncEndpointPredictV1Request.model_validate_json(body)
        llm_engine.check_task_fields(request, request.model_extra, callbacks=False)
        if request.args is None:
            raise BadRequestError(
                "this endpoint takes `args` (url and cloudpickle are not served)", field="args"
            )
        self.stream = self.entry.stream > 0
        self.as_string = llm_engine.results_as_string(
            request.serialize_results_as_string, request.args, stream=self.stream
        )
        self.payload = request.args
        self.changed = True
        self.timeout_s = request.timeout_seconds or 0.0
        self.retries = TASK_RETRIES if request.num_retries is None else request.num_retries
        self.retry_by = monotonic() + (request.timeout_seconds or RETRY_WINDOW_S)

    def injects(self) -> str:
        args = self.payload
        return LIMIT_FIELDS.get(upstream_for(args), "")

    def path_for(self, target: Target) -> str:
        args = self.payload
        path = llm_engine.task_path(target.framework, target.predict_route, args)
        if isinstance(args, dict) and path in (CHAT, COMPLETIONS):
            args["stream"] = self.stream
        return path

    def refuse(self, exc: ApplianceError) -> None:
        if isinstance(exc, UpstreamError) and exc.status_code == 504 and not self.stream:
            exc = UpstreamError(exc.message, status_code=408)  # LLM Engine's sync task timeout
        super().refuse(exc)

    def streaming(self, headers: Headers) -> None:
        kind = next((v for k, v in headers if k == b"content-type"), b"")
        self.wrapper = llm_engine.TaskEvents(self.as_string)
        if b"text/event-stream" not in kind:
            self.gather = []  # one event with the whole reply, at its end

    def on_body(self, data: bytes) -> None:
        if self.gather is not None:
            self.gather.append(data)
            return
        assert self.wrapper is not None
        out = self.wrapper.feed(data)
        if out:
            self.client.send(out)

    def on_end(self) -> None:
        if self.gather is not None and self.status == 200 and self.wrapper is not None:
            body, self.gather = b"".join(self.gather), None
            self.client.send(self.whole_event(body))
            self.client.end()
            self._settle()
            return
        super().on_end()

    def whole_event(self, body: bytes) -> bytes:
        return llm_engine.task_event(llm_engine.parse_result(body), 200, self.as_string)

    def result(self, body: bytes) -> bytes:
        return json.dumps(llm_engine.sync_task_response(200, body, self.as_string)).encode()

    def on_whole(self, status: int, headers: Headers, body: bytes) -> None:
        if status in GATEWAY_RETRIED_STATUSES and self._try_again():
            return
        if status != 200 and not self.stream:  # a sync task answers 200 with its FAILURE
            self.status = status
            refused = self.unserved(status, body)
            if refused is not None:  # the FAILURE says so, as the other routes' 400 does
                status, body = status_of(refused, LLM_ENGINE), refused.message.encode()
            answer = llm_engine.sync_task_response(status, body, self.as_string)
            self._whole(200, JSON_HEADERS, json.dumps(answer).encode(), self._overhead())
            return
        super().on_whole(status, headers, body)

    def on_failed(self, exc: ApplianceError) -> None:
        # no reply at all (a reply that broke off may have been acted on: not sent again)
        unreached = isinstance(exc, NoReadyReplicaError) or (
            isinstance(exc, UpstreamError) and exc.status_code == 502
        )
        if unreached and self.status == 0 and self._try_again():
            return
        super().on_failed(exc)

    def _try_again(self) -> bool:
        """Send the request again after a wait, when sends are left, the wait ends before
        `retry_by`, and the client has had no byte of a reply; False otherwise."""
        target = self.target
        if self.retries <= 0 or target is None or self.over or (self.started and not self.held):
            return False
        wait = retry_wait(self.tries + 1)
        if monotonic() + wait > self.retry_by:
            return False
        self.retries -= 1
        self.tries += 1
        self.status, self.relay = 0, None
        if self.held and self.keepalive is None:
            self._keep_alive()  # a held stream's keep-alives go on meanwhile
        asyncio.get_running_loop().call_later(wait, self._send_again, target)
        return True

    def _send_again(self, target: Target) -> None:
        if self.over:  # the client went away meanwhile
            return
        try:
            self._replica(target)
        except ApplianceError as exc:
            self.refuse(exc)

    def in_band(self, exc: ApplianceError) -> bytes:
        status = status_of(exc, LLM_ENGINE)
        return llm_engine.task_event({"detail": exc.message}, status, self.as_string)

    def failed_event(self, status: int, body: bytes) -> bytes:
        return llm_engine.task_event(llm_engine.parse_result(body), status, self.as_string)


def make_call(
    core: Core,
    entry: InferencePath,
    client: Client,
    key: str | None,
    query: str,
    caller: Caller | None = None,
) -> Call:
    """The call for a request to `entry`, in its route's shape (used by both transports)."""
    if entry.shape == COMPLETION:
        return CompletionCall(core, entry, client, key, query, caller)
    if entry.shape == TASK:
        return TaskCall(core, entry, client, key, query, caller)
    return Call(core, entry, client, key, query, caller)
