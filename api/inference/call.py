"""One inference request on its way through the appliance, whichever transport carries its bytes
(the fast lane's protocol, `api/lane/front.py`, or ASGI, `api/inference/asgi.py`: a `Client`):
the admission (`api/inference/admission.py`), then the relay (`forwarder/relay.py`), whose
reply `Call` passes to the client in its route's shape.

`Call` itself is the shape of the OpenAI routes and the playground: the replica's reply
untouched, errors in the route's envelope, in band once a stream began. A stream that has to
wait for a replica (a cold start, a full cap, its replica gone before a reply byte) starts its
SSE reply at once and sends keep-alive comments while it waits (`on_wait`); an endpoint that
gets no replica by waiting (it failed to start, it is being deleted:
`forwarder/table.check_coming`) is refused before any hold, and a hold ends with that error,
in band, once the routing table says so. LLM Engine's shapes are the
subclasses in `llm_engine.py`.

The admission is written once, in `_admit`, as plain calls in order. Where a step cannot answer
at once (a key to verify in SQLite, a limit to count in Redis, an endpoint to look up after a
reload, a replica to wait for), that one wait runs in a task, which then comes back to
`_admit`; the usual request (a key verified lately, no counted limit, a replica free now) runs
it straight through with no task, future or coroutine.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Coroutine, Mapping
from time import monotonic, perf_counter
from typing import TYPE_CHECKING, Any, Final, Protocol

import orjson
from pydantic import ValidationError

from api.bodies import BodyBudget, Reading
from api.callers import Keys
from api.errors import answer, invalid, openai_error, status_of
from api.inference import admission
from api.limits import Limiter, Release
from appliance.errors import ApplianceError, BadRequestError, UpstreamError
from appliance.keys import Caller
from forwarder.paths import CHAT, COMPLETIONS, OPENAI, PASSTHROUGH, InferencePath
from forwarder.proxy import Forwarder
from forwarder.relay import SHUTTING_DOWN, Headers, Plane, Relay
from forwarder.table import Target, TargetReplica, check_coming
from forwarder.unserved import NOT_SERVED_STATUSES, not_served
from forwarder.usage import UsageStrip, ask_usage

if TYPE_CHECKING:
    from api.deps import AppState

SSE_HEADERS: Final = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
]
KEEPALIVE: Final = b": keep-alive\n\n"
MESSAGE_MAX_CHARS: Final = 2000  # of a replica's error reply, sent in band
RECANCEL_EVERY_S: Final = 0.5  # at the api's stop, a wait still running is cancelled again
RECANCEL_FOR_S: Final = 5.0  # ...for so long at most
USAGE_FRAMEWORKS: Final = ("vllm", "llamacpp")  # servers that send a stream's usage when asked
USAGE_ASKED: Final = (CHAT, COMPLETIONS)  # streams whose usage comes when asked (a response's
# comes in its `response.completed` event, always)


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


class Core:
    """What every call of one api process reads, made in the lifespan: compiled, plain struct
    reads instead of attribute lookups on the app's state."""

    def __init__(self, state: AppState) -> None:
        self.state = state
        self.keys: Keys = state.key_cache
        self.forwarder: Forwarder = state.forwarder
        self.plane: Plane = state.forwarder.plane
        self.limiter: Limiter = state.limiter
        settings = state.settings
        self.hold_s: float = settings.activation_timeout_s
        self.keepalive_s: float = settings.stream_keepalive_s
        self.max_body_bytes: int = settings.max_body_bytes
        # held by calls; a key's bodies in the share of the key whose counts it shares
        self.bodies: BodyBudget = BodyBudget(
            settings.max_body_bytes_in_flight, self.keys.counted_as
        )
        self.cors: bool = bool(settings.cors_origins)
        self.waits: set[asyncio.Future[Any]] = set()  # releases (kept from the GC)
        self.holds: set[asyncio.Task[None]] = set()  # calls' waits (for a key, count, replica)
        self.stopping = False  # the api stops: a call still waiting is told so

    async def shut_down(self) -> None:
        """The api stops, past uvicorn's graceful wait: calls still waiting for their key, a
        count or a replica are told so, each in its route's format (a stream by an error
        event), and none starts a wait after; those relaying are told by the relay
        (`Forwarder.close`). A wait can drop its cancel (redis-py's can, as `api/main._stop`
        says) and wait on: one still waiting after RECANCEL_EVERY_S is cancelled again, until
        every one ended, for at most RECANCEL_FOR_S: the api's stop never hangs on one."""
        self.stopping = True
        loop = asyncio.get_running_loop()
        until = loop.time() + RECANCEL_FOR_S
        while self.holds and loop.time() < until:
            for hold in list(self.holds):
                hold.cancel()
            await asyncio.wait(list(self.holds), timeout=RECANCEL_EVERY_S)


class InvalidRequestError(Exception):
    """A request that fails its route's validation (pydantic's problems): 422, or 400 on
    OpenAI's routes."""

    def __init__(self, problems: list[Any]) -> None:
        super().__init__(problems)
        self.problems = problems


class Call:
    """One inference request: admitted, relayed, answered (a `forwarder.relay.Reply`)."""

    def __init__(
        self,
        core: Core,
        entry: InferencePath,
        client: Client,
        key: str | None,
        query: str,
        caller: Caller | None,
    ) -> None:
        self.core = core
        self.entry = entry
        self.client = client
        self.key = key
        self.query = query  # the request's query string
        self.caller = caller  # known once verified (or given: the playground's)
        self.started_at = perf_counter()
        self.key_id = "-"
        self.counted = False  # the key's counted limits were checked
        self.may_reload = True
        self.release: Release | None = None
        self.body = b""  # the request's, then the replica's
        self.name = ""  # the endpoint as the route's selector names it
        self.payload: Any = None  # the replica's request, parsed
        self.changed = False  # `payload` was changed: `body` is made again from it
        self.stream = False
        self.path = ""  # the replica's; "" until known
        self.timeout_s = 0.0  # 0: the endpoint's or the api's
        self.target: Target | None = None
        self.relay: Relay | None = None
        self.task: asyncio.Task[None] | None = None
        self.held = False  # an SSE reply began while waiting for a replica
        self.started = False  # the client has the reply's head
        self.length = -1
        self.gather: list[bytes] | None = None  # a reply read whole before it is shaped
        self.reply_headers: Headers = []  # of a reply read whole
        self.status = 0
        self.keepalive: asyncio.TimerHandle | None = None
        self.over = False
        self.strip: UsageStrip | None = None  # the usage chunk asked for on the client's behalf
        self.reading: Reading | None = None  # its body's bytes of the budget, until it ends

    # admission
    def start(self, body: bytes) -> None:
        self.body = body
        self._admit()

    def _admit(self) -> None:
        """The one admission step (`api/inference/admission.py`), in its order. A step that
        must wait does so in a task (`_wait`), which comes back here."""
        core = self.core
        try:
            caller = self.caller
            if caller is None:
                caller = core.keys.known(admission.need_key(self.key))
                if caller is None:
                    self._wait(self._verify())
                    return
                self.caller = caller
            admission.check_scope(caller)
            self.key_id = caller.key_id
            if not self.counted and caller.limits.counted():
                self._wait(self._count(caller))
                return
            self.interpret(self.body)
            if admission.cap_tokens(
                caller, self.payload, inject=self.injects(), spelled=self.spelling()
            ):
                self.changed = True
            selector = self.entry.selector
            target = admission.visible_target(core.plane.table, caller, selector, self.name)
            if target is None:
                if self.may_reload:  # once: after a fresh table, a miss is a 404
                    self._wait(self._reload(monotonic()))
                    return
                raise admission.missing(selector, self.name)
            self.target = target
            self.path = self.path or self.path_for(target)
            if admission.fit_framework(target, self.path, self.payload, caller):
                self.changed = True
            self._replica(target)
        except ApplianceError as exc:
            self.refuse(exc)
        except ValidationError as exc:
            self._invalid(list(exc.errors(include_url=False)))
        except InvalidRequestError as exc:
            self._invalid(exc.problems)

    def _replica(self, target: Target) -> None:
        """The request fitted to `target`'s server, sent to a replica (or waiting for one);
        again from here when LLM Engine's route retries it."""
        self.fit(target)
        if self.changed:
            self.body = replica_body(self.payload, self.spelling())
        replica = self.core.plane.balancer.try_acquire(target, None)
        if replica is None:
            check_coming(target, self.owns(target))  # no replica by waiting: refused at once
            self.on_wait(True)
            self._wait(self._acquire(target))
            return
        self._send(target, replica, 0.0)

    def _send(self, target: Target, replica: TargetReplica, waited_s: float) -> None:
        relay = Relay(
            self.core.plane, target, replica, self.path.encode(), self.body, self, self.key_id,
            self.stream, self.started_at, waited_s, self.timeout_s, self.core.hold_s,
            self.owns(target),
        )  # fmt: skip
        self.relay = relay
        relay.send()

    def _wait(self, step: Coroutine[Any, Any, bool]) -> None:
        if self.core.stopping:  # a wait that ended as the api stopped: no next one
            step.close()
            self.on_failed(UpstreamError(SHUTTING_DOWN, status_code=503))
            self._settle()
            return
        task = asyncio.get_running_loop().create_task(self._waiting(step))
        self.task = task
        self.core.holds.add(task)
        task.add_done_callback(self.core.holds.discard)

    async def _waiting(self, step: Coroutine[Any, Any, bool]) -> None:
        try:
            again = await step
        except ApplianceError as exc:
            self.refuse(exc)
            return
        except asyncio.CancelledError:
            if self.core.stopping:
                self.on_failed(UpstreamError(SHUTTING_DOWN, status_code=503))
            self._settle()  # else the client went away while it waited
            return
        self.task = None
        if again:
            self._admit()

    async def _verify(self) -> bool:
        self.caller = await admission.caller_for(self.core.state, self.key)
        return True

    async def _count(self, caller: Caller) -> bool:
        self.release = await self.core.limiter.admit(caller)
        self.counted = True
        return True

    async def _reload(self, since: float) -> bool:
        await admission.fresh_table(self.core.state, since)
        self.may_reload = False
        return True

    async def _acquire(self, target: Target) -> bool:
        target, replica, waited = await self.core.forwarder.acquire(
            target, self.core.hold_s, self.owns(target)
        )
        self._send(target, replica, waited)
        return False

    def interpret(self, body: bytes) -> None:
        """What the request asks of the replica (OpenAI's routes: the body itself)."""
        payload = parse_object(body)
        model = payload.get("model")
        if not isinstance(model, str) or not model:
            raise BadRequestError("`model` must name an endpoint", field="model")
        self.name = model
        self.payload = payload
        entry = self.entry
        stream = payload.get("stream")
        if entry.stream < 0 and not isinstance(stream, bool | None):  # a server reads "true"
            raise BadRequestError("stream must be true or false", field="stream")
        self.stream = stream is True if entry.stream < 0 else entry.stream > 0
        self.path = entry.upstream

    def injects(self) -> str:
        """The field a key's token cap fills in a request that leaves it out ("": none)."""
        return self.entry.limit_field

    def owns(self, target: Target) -> bool:
        """Whether the caller may change the endpoint (is told why it failed, and its id)."""
        return self.caller is not None and self.caller.owns(target.owner)

    def spelling(self) -> Mapping[str, str] | None:
        """Payload fields as the client named them, where the payload translates its body."""
        return None

    def path_for(self, target: Target) -> str:
        """The replica's path when the route does not fix it (LLM Engine's tasks)."""
        return self.entry.upstream

    def fit(self, target: Target) -> None:
        """Fit the request to the endpoint's framework (LLM Engine's guided decoding); an
        ApplianceError when the framework cannot honour it. Here (the replica's own reply):
        a stream from vLLM or llama.cpp asks for its usage, so its tokens are counted
        (`forwarder/usage.py`), and the usage chunk goes to the client only if it asked."""
        entry = self.entry
        if (
            self.stream
            and entry.shape == PASSTHROUGH
            and self.path in USAGE_ASKED
            and target.framework in USAGE_FRAMEWORKS
            and ask_usage(self.payload)
        ):
            self.changed = True
            self.strip = UsageStrip()

    # answers before the reply
    def refuse(self, exc: ApplianceError) -> None:
        """An error before any reply byte (or in band, once a held stream began: counted as
        the status it carries). A refusal of a known endpoint (no replica to give it) counts
        in its metrics, and one of 500 or more is logged as a replica's failures are
        (`FailureLog`), with `-` for the replica; a relay's failure was counted and logged by
        the relay (`Relay._finish`), once."""
        status, headers, body = answer(exc, self.entry.envelope)
        if self.relay is None:
            if self.target is not None and status >= 500:
                self.core.plane.failures.note(self.target.name, "-", status, exc.message)
            self._record(status)
        if self.held:
            self._in_band(exc)
            return
        self._whole(status, headers, body, -1.0)

    def _invalid(self, problems: list[Any]) -> None:
        status, headers, body = invalid(problems, self.entry.envelope)
        self._whole(status, headers, body, -1.0)

    def _record(self, status: int) -> None:
        """A refusal once the endpoint is known counts in its metrics."""
        if self.target is not None:
            duration_s = perf_counter() - self.started_at
            stats = self.core.plane.stats
            stats.add(self.target.name, self.key_id, status, duration_s, None, None, None)

    def on_wait(self, waiting: bool) -> None:
        """The request waits for a replica (True; False once one takes it): at a cold start
        or a full cap, or after its replica failed it before a reply byte (`Relay._again`).
        A stream's SSE reply begins then and is kept alive until a replica answers, so a
        client with a read timeout outlasts the wait."""
        if waiting and self.stream and not self.held and not self.over:
            self._hold()

    def _hold(self) -> None:
        """Begin the SSE reply now and keep it alive until a replica answers."""
        self.held = self.started = True
        self.client.start(200, SSE_HEADERS, -1, -1.0, 0.0)
        self._keep_alive()

    def _keep_alive(self) -> None:
        if self.held and not self.over:
            loop = asyncio.get_running_loop()
            self.keepalive = loop.call_later(self.core.keepalive_s, self._tick)

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
        if status in NOT_SERVED_STATUSES:  # read whole: it may say the route is not served
            self.gather, self.reply_headers = [], headers
            return
        self.started = True
        relay = self.relay
        assert relay is not None
        self.client.start(status, headers, length, relay.overhead_s, relay.waited_s)

    def on_body(self, data: bytes) -> None:
        if self.gather is not None:
            self.gather.append(data)
            return
        if self.strip is not None:
            data = self.strip.feed(data)
            if not data:
                return
        self.client.send(data)

    def on_end(self) -> None:
        if self.gather is not None:
            body, self.gather = b"".join(self.gather), None
            self.on_whole(self.status, self.reply_headers, body)
            return
        if self.strip is not None:
            tail = self.strip.close()
            if tail:
                self.client.send(tail)
        self.client.end()
        self._settle()

    def on_whole(self, status: int, headers: Headers, body: bytes) -> None:
        self.status = status
        if self.refuse_unserved(status, body):
            return
        if self.held:
            self._final(body if status == 200 else self.failed_event(status, body))
            return
        relay = self.relay
        assert relay is not None
        self._whole(status, headers, body, relay.overhead_s)

    def unserved(self, status: int, body: bytes) -> BadRequestError | None:
        """The 400 for a replica's reply that says it has no such route
        (`forwarder/unserved.py`, the one rule every route's shape applies), or None."""
        if status not in NOT_SERVED_STATUSES or self.target is None:
            return None
        return not_served(status, body, self.target.name, self.entry.path)

    def refuse_unserved(self, status: int, body: bytes) -> bool:
        """Answers a reply that says the replica has no such route as that 400, in the route's
        envelope (in band once a stream began); False for any other reply."""
        refused = self.unserved(status, body)
        if refused is None:
            return False
        if self.held:
            self._in_band(refused)
            return True
        status, headers, reply = answer(refused, self.entry.envelope)
        self._whole(status, headers, reply, self.relay.overhead_s if self.relay else -1.0)
        return True

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

    def shut_down(self) -> None:
        """Uvicorn ended the request past its graceful wait (the ASGI transport's): the client
        is told so, as `Core.shut_down` tells the lane's."""
        if self.relay is not None:
            self.relay.shut_down()
        elif not self.over:
            self.on_failed(UpstreamError(SHUTTING_DOWN, status_code=503))
            if self.task is not None:
                self.task.cancel()

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
        """The call is over: its keep-alives stop, its key's slot and its body's bytes of the
        budget of bodies in flight (`api/bodies.py`) are given back."""
        if self.over:
            return
        self.over = True
        self.relay = None  # which refers back to this call: no cycle left to the collector
        reading, self.reading = self.reading, None
        if reading is not None:
            reading.done()
        if self.keepalive is not None:
            self.keepalive.cancel()
            self.keepalive = None
        release, self.release = self.release, None
        if release is not None:
            releasing = asyncio.ensure_future(release())
            self.core.waits.add(releasing)
            releasing.add_done_callback(self.core.waits.discard)


INT_MIN: Final = -(2**63)  # the integers orjson writes: 64 bits, signed or not
INT_MAX: Final = 2**64 - 1
MAX_DEPTH: Final = 254  # the arrays and objects orjson nests when it writes


def replica_body(payload: Any, spelled: Mapping[str, str] | None = None) -> bytes:
    """The replica's request, written again from `payload` (a body read by pydantic, whose
    JSON reads integers of any size, or one nested deeper than orjson writes, read by orjson
    up to 1,024 deep): a value orjson cannot write is a 400 naming the request's field that
    holds it (as the client spelled it, `spelled`), not a TypeError that ends the connection
    unanswered (the fast lane) or a 500 (ASGI)."""
    try:
        return orjson.dumps(payload)
    except orjson.JSONEncodeError as exc:
        where, what = unwritable(payload)
        top = where.split(".")[0]
        if not top:
            raise BadRequestError(f"the request cannot be sent on as JSON: {exc}") from None
        field = (spelled or {}).get(top, top)
        at = f" (at {where})" if where != top else ""
        raise BadRequestError(f"{field}: {what}{at}", field=field) from None


def unwritable(payload: Any) -> tuple[str, str]:
    """Where in `payload` (a dotted path) orjson cannot write it, and why; ("", "") if none."""
    pending: list[tuple[Any, str, int]] = [(payload, "", 0)]
    while pending:
        value, where, depth = pending.pop()
        if isinstance(value, bool):
            continue
        if isinstance(value, int) and not INT_MIN <= value <= INT_MAX:
            return where, "an integer past 64 bits, which no replica's request carries"
        if depth >= MAX_DEPTH and isinstance(value, (dict, list)):
            return where.split(".")[0], f"nested more than {MAX_DEPTH} levels deep"
        # plain lists of pairs, reversed in place: mypyc cannot compile reversed() over a
        # view or enumerate of a value typed Any
        pairs: list[tuple[Any, Any]] = []
        if isinstance(value, dict):
            pairs = list(value.items())
        elif isinstance(value, list):
            pairs = list(enumerate(value))
        pairs.reverse()
        for key, item in pairs:
            pending.append((item, f"{where}.{key}" if where else str(key), depth + 1))
    return "", ""


def parse_object(body: bytes) -> dict[str, Any]:
    """The body as a JSON object; BadRequestError (400) otherwise. orjson reads the bytes as
    they are, in 60% of the standard library's instructions here (4.5k against 7.6k for a
    chat body, `bench/lane_cost.py`), and is strict where JSON is: no
    NaN or Infinity, no lone surrogate, nesting at most 1,024 deep (the standard library's
    recursion ends in a RecursionError far past that, which would be a 500)."""
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as exc:  # what is wrong and where: 'line 1 column 7'
        raise BadRequestError(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise BadRequestError("the request body must be a JSON object")
    return payload
