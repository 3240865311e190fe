"""One inference request on its way through the appliance, whichever transport carries its bytes
(the fast lane's protocol, `api/lane/front.py`, or ASGI, `api/inference/asgi.py`: a `Client`):
the admission (`api/inference/admission.py`), then the relay (`forwarder/relay.py`), whose
reply `Call` passes to the client in its route's shape.

`Call` itself is the shape of the OpenAI routes and the playground: the replica's reply
untouched, errors in the route's envelope, in band once a stream began. A stream that has to
wait for a replica (a cold start, a full cap) starts its SSE reply at once and sends keep-alive
comments while it waits. LLM Engine's shapes are the subclasses in `llm_engine.py`.

The admission is one coroutine (`_admit`). `start` drives it by hand: when nothing in it waits
(a key verified lately, no limit counted in Redis, an endpoint in the table, a replica free
now: the usual case) it runs to its end with no task made; only when it does wait is the rest
handed to a task (`api/inference/resume.py`).
"""

from __future__ import annotations

import asyncio
import json
import time
from json.scanner import make_scanner
from typing import TYPE_CHECKING, Any, Final, Protocol, cast

from pydantic import ValidationError

from api.errors import answer, invalid, openai_error, status_of
from api.inference import admission
from api.inference.resume import in_task, resumed
from api.limits import Release
from appliance.errors import ApplianceError, BadRequestError, UpstreamError
from appliance.keys import Caller
from forwarder.paths import OPENAI, InferencePath
from forwarder.relay import Headers, Relay
from forwarder.table import Target

if TYPE_CHECKING:
    from api.deps import AppState

SSE_HEADERS: Final = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
]
KEEPALIVE: Final = b": keep-alive\n\n"
# json.loads(bytes) would first guess the encoding, a third of its cost; and the scanner that
# JSONDecoder.raw_decode wraps, called directly, saves an interpreted frame (typeshed types
# its argument as a scanner; it reads a decoder's settings, as json does)
_scan = make_scanner(cast(Any, json.JSONDecoder()))
MESSAGE_MAX_CHARS: Final = 2000  # of a replica's error reply, sent in band
RELEASING: set[asyncio.Future[None]] = set()  # slots being given back (kept from the collector)


class Client(Protocol):
    """The connection a call answers on. `overhead_s` < 0: no overhead to report."""

    def start(
        self, status: int, headers: Headers, length: int, overhead_s: float, waited_s: float
    ) -> None:
        """The reply's head; `length` -1 when its body's length is not known."""

    def send(self, data: bytes) -> None: ...

    def end(self) -> None: ...

    def whole(
        self, status: int, headers: Headers, body: bytes, overhead_s: float, waited_s: float
    ) -> None:
        """A whole reply at once (`headers` without a Content-Length)."""

    def cut(self) -> None:
        """The reply broke after its head went out: the client must see a short reply."""


class InvalidRequestError(Exception):
    """A request that fails its route's validation (pydantic's problems): 422, or 400 on
    OpenAI's routes."""

    def __init__(self, problems: list[Any]) -> None:
        super().__init__(problems)
        self.problems = problems


class Ask:
    """What an admitted request asks of a replica."""

    __slots__ = ("body", "name", "path", "payload", "stream", "timeout_s")

    def __init__(
        self,
        name: str,
        payload: Any,
        body: bytes,
        stream: bool,
        path: str = "",
        timeout_s: float = 0.0,
    ) -> None:
        self.name = name  # the endpoint, as the route's selector names it
        self.payload = payload  # the replica's request, parsed
        self.body = body  # ... as bytes; b"": made from `payload`
        self.stream = stream
        self.path = path  # the replica's; "" when the endpoint decides
        self.timeout_s = timeout_s  # 0: the endpoint's or the api's


class Call:
    """One inference request: admitted, relayed, answered (a `forwarder.relay.Reply`)."""

    def __init__(
        self,
        state: AppState,
        entry: InferencePath,
        client: Client,
        key: str | None,
        query: str,
        caller: Caller | None,
    ) -> None:
        self.state = state
        self.entry = entry
        self.client = client
        self.key = key
        self.query = query  # the request's query string
        self.caller = caller  # given when the route authenticated already (the playground)
        self.started_at = time.perf_counter()
        self.key_id = "-"
        self.target: Target | None = None
        self.relay: Relay | None = None
        self.task: asyncio.Task[None] | None = None
        self.release: Release | None = None
        self.stream = False
        self.held = False  # an SSE reply began while waiting for a replica
        self.started = False  # the client has the reply's head
        self.length = -1
        self.gather: list[bytes] | None = None  # a reply read whole before it is shaped
        self.status = 0
        self.keepalive: asyncio.TimerHandle | None = None
        self.over = False

    # admission
    def start(self, body: bytes) -> None:
        coro = self._admit(body)
        try:
            waiting = coro.send(None)
        except StopIteration:
            return
        self.task = asyncio.get_running_loop().create_task(resumed(coro, waiting))

    async def _admit(self, body: bytes) -> None:
        state = self.state
        try:
            caller = self.caller
            if caller is None:
                caller = await admission.caller_for(state, self.key)
            admission.check_scope(caller)
            self.key_id = caller.key_id
            self.release = await state.limiter.admit(caller)
            ask = self.interpret(body)
            if admission.cap_tokens(caller, ask.payload, inject=self.injects(ask)):
                ask.body = b""
            target = await admission.find_target(state, caller, self.entry.selector, ask.name)
            self.target = target
            await self._relay(target, ask)
        except ApplianceError as exc:
            self.refuse(exc)
        except ValidationError as exc:
            self._invalid(list(exc.errors(include_url=False)))
        except InvalidRequestError as exc:
            self._invalid(exc.problems)
        except asyncio.CancelledError:
            self._settle()  # the client went away while it waited

    async def _relay(self, target: Target, ask: Ask) -> None:
        path = ask.path or self.path_for(target, ask)
        body = ask.body or json.dumps(ask.payload).encode()
        self.stream = ask.stream
        fwd = self.state.forwarder
        replica = fwd.balancer.try_acquire(target, None)
        waited = 0.0
        if replica is None:
            if ask.stream:
                self._hold()
            await in_task()
            target, replica, waited = await fwd.acquire(
                target, self.state.settings.activation_timeout_s
            )
        relay = Relay(
            fwd, target, replica, path.encode(), body, self, self.key_id,
            ask.stream, self.started_at, waited, ask.timeout_s,
        )  # fmt: skip
        self.relay = relay
        relay.send()

    def interpret(self, body: bytes) -> Ask:
        """The request as the replica gets it (OpenAI's routes: the body itself)."""
        payload = parse_object(body)
        model = payload.get("model")
        if not isinstance(model, str) or not model:
            raise BadRequestError("`model` must name an endpoint", field="model")
        stream = payload.get("stream") is True if self.entry.stream < 0 else self.entry.stream > 0
        return Ask(model, payload, body, stream, self.entry.upstream)

    def injects(self, ask: Ask) -> bool:
        """Whether a key's token cap becomes the limit of a request that names none."""
        return self.entry.generates

    def path_for(self, target: Target, ask: Ask) -> str:
        """The replica's path when the route does not fix it (LLM Engine's tasks)."""
        return self.entry.upstream

    # answers before the reply
    def refuse(self, exc: ApplianceError) -> None:
        """An error before any reply byte (or in band, once a held stream began)."""
        if self.held:
            self._in_band(exc)
            return
        status, headers, body = answer(exc, self.entry.envelope)
        self._record(status)
        self._whole(status, headers, body, -1.0)

    def _invalid(self, problems: list[Any]) -> None:
        status, headers, body = invalid(problems, self.entry.envelope)
        self._whole(status, headers, body, -1.0)

    def _record(self, status: int) -> None:
        """A refusal once the endpoint is known counts in its metrics."""
        if self.target is not None:
            duration_s = time.perf_counter() - self.started_at
            stats = self.state.forwarder.metrics.stats
            stats.add(self.target.name, self.key_id, status, duration_s, None, None, None)

    def _hold(self) -> None:
        """Begin the SSE reply now and keep it alive until a replica answers."""
        self.held = self.started = True
        self.client.start(200, SSE_HEADERS, -1, -1.0, 0.0)
        self._keep_alive()

    def _keep_alive(self) -> None:
        if not self.held or self.over:
            return
        every_s = self.state.settings.stream_keepalive_s
        self.keepalive = asyncio.get_running_loop().call_later(every_s, self._tick)

    def _tick(self) -> None:
        self.keepalive = None
        if self.status == 0 and not self.over:
            self.client.send(KEEPALIVE)
            self._keep_alive()

    # the reply (forwarder.relay.Reply); this class: passed through
    def on_head(self, status: int, headers: Headers, length: int) -> None:
        self.status, self.length = status, length
        if self.held:
            if status != 200:
                self.gather = []  # becomes an error in band
            return
        self.started = True
        relay = self.relay
        assert relay is not None
        self.client.start(status, headers, length, relay.overhead_s, relay.waited_s)

    def on_body(self, data: bytes) -> None:
        if self.gather is not None:
            self.gather.append(data)
            return
        self.client.send(data)

    def on_end(self) -> None:
        if self.gather is not None:
            self._final(self.failed_event(self.status, b"".join(self.gather)))
            return
        self.client.end()
        self._settle()

    def on_whole(self, status: int, headers: Headers, body: bytes) -> None:
        self.status = status
        if self.held:
            self._final(body if status == 200 else self.failed_event(status, body))
            return
        relay = self.relay
        assert relay is not None
        self._whole(status, headers, body, relay.overhead_s)

    def on_failed(self, exc: ApplianceError) -> None:
        if not self.started:
            self.refuse(exc)
        elif self.held or (self.stream and self.status == 200 and self.length < 0):
            self._in_band(exc)
        else:
            self.client.cut()
            self._settle()

    def in_band(self, exc: ApplianceError) -> bytes:
        """An error as one event of a stream that began (OpenAI's envelope, whose `error`
        the playground reads too)."""
        status = status_of(exc, OPENAI)
        return b"data: " + json.dumps(openai_error(status, exc.message)).encode() + b"\n\n"

    def failed_event(self, status: int, body: bytes) -> bytes:
        """The event for a replica's non-200 reply to a stream that began."""
        message = body.decode("utf-8", "replace")[:MESSAGE_MAX_CHARS]
        return self.in_band(UpstreamError(message, status_code=status))

    # the client
    def pause(self) -> None:
        """The client's connection is full: the relay stops reading the replica."""
        if self.relay is not None:
            self.relay.pause()

    def resume(self) -> None:
        if self.relay is not None:
            self.relay.resume()

    def client_gone(self) -> None:
        """The client disconnected: stop the relay (the replica stops generating too)."""
        if self.relay is not None:
            self.relay.cancel()
        elif self.task is not None:
            self.task.cancel()
        self._settle()

    # ends
    def _in_band(self, exc: ApplianceError) -> None:
        self._final(self.in_band(exc))

    def _final(self, data: bytes) -> None:
        """The last bytes of a stream that began."""
        self.client.send(data)
        self.client.end()
        self._settle()

    def _whole(self, status: int, headers: Headers, body: bytes, overhead_s: float) -> None:
        waited = self.relay.waited_s if self.relay is not None else 0.0
        self.client.whole(status, headers, body, overhead_s, waited)
        self._settle()

    def _settle(self) -> None:
        """The call is over: its keep-alives stop and its key's slot is given back."""
        if self.over:
            return
        self.over = True
        if self.keepalive is not None:
            self.keepalive.cancel()
            self.keepalive = None
        release, self.release = self.release, None
        if release is not None:
            releasing = asyncio.ensure_future(release())
            RELEASING.add(releasing)
            releasing.add_done_callback(RELEASING.discard)


def parse_object(body: bytes) -> dict[str, Any]:
    """The body as a JSON object; BadRequestError (400) otherwise."""
    try:
        text = body.decode()
        payload, end = _scan(text, 0)
    except (StopIteration, ValueError):  # no JSON value at 0; bad JSON or UTF-8
        raise BadRequestError("the request body is not valid JSON") from None
    if end != len(text) and text[end:].strip():
        raise BadRequestError("the request body is not valid JSON")
    if not isinstance(payload, dict):
        raise BadRequestError("the request body must be a JSON object")
    return payload
