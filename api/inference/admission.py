"""The one admission step of inference requests, in the order every entry applies it: who calls
(a key, verified; 401), whether the key may (`check_scope`; 403), whether it is within its
counted limits (requests per minute and in flight: `api/limits.py`; 429), whether it asks for
more tokens than the key allows (`cap_tokens`; 400), which endpoint it may call
(`visible_target`: the tenancy rule of `Caller.may_infer`; 404), whether that endpoint's
framework honours what it asks (`fit_framework`: what a server would ignore unread, such as
llama.cpp's completions' `echo` or a `stream_options` without a stream, or should not do, such
as fetching a media URL, is refused; 400), and a replica
(`forwarder/proxy.py`; 503). An endpoint that will get no replica by waiting (it failed to
start, or is being deleted: `forwarder/table.check_coming`) is refused at once with 503 and
`x-should-retry: false`, on the relayed routes before any hold, and at submit for async tasks
and batch lines (`find_target`); a task queued before it failed fails when the worker takes it.

Every inference entry calls these and nothing else decides: the relayed routes
(`api/inference/call.Call._admit`, on either transport), async tasks and batch lines
(`api/routes/tasks.py`, `api/routes/batches.py`) and the playground. So a request refused for
one reason gets the same status, in its route's envelope, wherever it was sent. Each step that
may have to wait has a synchronous form that answers at once when it can (`Keys.known`,
`visible_target`) and says so when it cannot; the waiting is the caller's.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final

from starlette.concurrency import run_in_threadpool

from appliance.errors import (
    AuthError,
    BadRequestError,
    ForbiddenError,
    NoSuchEndpointError,
)
from appliance.keys import Caller
from forwarder import chat, llama_cpp, media, responses
from forwarder.paths import BY_ID, BY_MODEL, CHAT, COMPLETIONS, EMBEDDINGS, RESPONSES
from forwarder.refresh import load_table
from forwarder.table import RoutingTable, Target, check_coming

if TYPE_CHECKING:
    from api.deps import AppState

SCOPE: Final = "inference"
# Every field by which a body asks for a number of tokens: OpenAI's three, LLM Engine's, and
# llama.cpp's own (where -1 means no limit)
TOKEN_FIELDS: Final = (
    "max_tokens",
    "max_completion_tokens",
    "max_output_tokens",  # the Responses API's
    "max_new_tokens",
    "n_predict",
)
UNBOUNDED_FIELD: Final = "n_predict"  # llama.cpp's: -1 generates until the context is full
SEQUENCE_FIELDS: Final = ("n", "best_of", "n_cmpl")  # n_cmpl: llama.cpp's own name for n
# Fields that multiply a request's work past its tokens, and the most any request may ask:
# OpenAI's own bounds (top_logprobs 20, n 128), which vLLM keeps by default (max_logprobs 20);
# llama.cpp bounds none of them, and a million top log-probs a token exhausts its memory.
WORK_BOUNDS: Final = {
    "logprobs": 20,
    "top_logprobs": 20,
    "n_probs": 20,
    "n": 128,
    "best_of": 128,
    "n_cmpl": 128,
}
# A completion's `prompt` may be a list of prompts (texts, or lists of token ids), each one
# generating `n` sequences of up to `max_tokens`: a request asks for at most this many
# sequences in all (OpenAI's bound on `n`), so a long list neither escapes a key's token cap
# nor holds a replica for hours (llama.cpp goes on with a list its client has left)
MOST_SEQUENCES: Final = 128
PROMPT_FIELD: Final = "prompt"
# An embeddings request's `input` list: OpenAI's bound on how many texts one request embeds
MOST_INPUTS: Final = 2048
INPUT_FIELD: Final = "input"
# The paths whose vLLM requests are keyed in its prefix cache by `cache_salt`
SALTED: Final = frozenset({CHAT, COMPLETIONS, RESPONSES, EMBEDDINGS})
SALT_FIELD: Final = "cache_salt"
RELOAD_ON_MISS_S: Final = 0.5
NO_KEY: Final = "an API key is required: send `Authorization: Bearer <key>`"


def need_key(key: str | None) -> str:
    if not key:
        raise AuthError(NO_KEY)
    return key


async def caller_for(state: AppState, key: str | None) -> Caller:
    """The caller of a key: from the key cache when verified lately, else verified against
    SQLite off the event loop. AuthError (401) for a missing or invalid key."""
    key = need_key(key)
    caller = state.key_cache.known(key)
    if caller is None:
        found: Caller = await run_in_threadpool(state.key_cache.verify, key)
        return found
    return caller


def check_scope(caller: Caller) -> None:
    if not caller.can(SCOPE):
        raise ForbiddenError(f"this key lacks the {SCOPE!r} scope")


def cap_tokens(
    caller: Caller, payload: Any, *, inject: str, spelled: Mapping[str, str] | None = None
) -> bool:
    """Check the tokens a request asks for, by any of TOKEN_FIELDS, as an integer, a float or a
    number in a string, after the work it asks per token (`bound_work`). A count below 0 is
    refused (400), but llama.cpp's `n_predict: -1`
    ("until the context is full"). A key's cap holds for every sequence the request asks for
    (`n`, `best_of`): more is refused, and so is an unbounded `n_predict`, with a 400 (no
    retry of the same request can pass, so no client should be told to retry). When the key
    has a cap and the request leaves out `inject`, its route's own limit field
    (`forwarder/paths.InferencePath.limit_field`: `max_tokens`, or the Responses API's
    `max_output_tokens`; "" where the client must name one, or nothing is generated), the cap
    (shared by its sequences) becomes that field: `payload` gets it and True is returned, so
    the caller sends the changed body. That holds when another of TOKEN_FIELDS is named too,
    as a server reads its own alone (vLLM's chat ignores llama.cpp's `n_predict`): what it
    reads is within the cap either way. `spelled` names a field as the client wrote it, where
    the payload is a translation (LLM Engine's `max_new_tokens`, sent on as `max_tokens`)."""
    if not isinstance(payload, dict):
        return False
    bound_work(payload)
    most = caller.limits.max_tokens_per_request
    for field in TOKEN_FIELDS:
        asked = payload.get(field)
        if asked is None:
            continue
        name = spelled.get(field, field) if spelled else field
        count = _count(name, asked)
        if count < 0 and field != UNBOUNDED_FIELD:
            raise BadRequestError(
                f"{name}={asked} is below 0: send the most tokens to generate", field=name
            )
        if most and (count < 0 or count * _sequences(payload) > most):
            raise BadRequestError(
                f"{name}={asked}{_per(payload)} is over this key's limit of {most} tokens per "
                f"request: ask for at most {most // _sequences(payload)}",
                field=name,
            )
    if not inject or not most or payload.get(inject) is not None:
        return False
    share = most // _sequences(payload)
    if share < 1:
        raise BadRequestError(
            f"{_sequences(payload)} sequences are over this key's limit of {most} tokens per "
            "request: ask for fewer (n, best_of, prompts)",
            field="n",
        )
    payload[inject] = share
    return True


def bound_work(payload: dict[str, Any]) -> None:
    """Refuse (400) a request asking more of any WORK_BOUNDS field than it allows, as a number
    or a number in a string (a server may read either), more than MOST_SEQUENCES sequences
    over a list of prompts, or more than MOST_INPUTS inputs to embed; anything else is the
    server's to refuse. For every key: these bound what one request may cost a replica,
    whoever sends it."""
    for name, most in WORK_BOUNDS.items():
        asked = payload.get(name)
        if asked is None:  # the usual case: no call below
            continue
        count = _number(asked)
        if count is None:
            continue
        if count > most:
            raise BadRequestError(
                f"{name}={asked} is over the most a request may ask: at most {most}", field=name
            )
        if name in SEQUENCE_FIELDS and math.isfinite(count) and count != int(count):
            raise BadRequestError(  # llama.cpp would truncate it, vLLM refuse it
                f"{name}={asked} is not a whole number of sequences", field=name
            )
    inputs = _prompts(payload, INPUT_FIELD)
    if inputs > MOST_INPUTS:
        raise BadRequestError(
            f"{INPUT_FIELD}: {inputs} inputs are over the most a request may ask: at most "
            f"{MOST_INPUTS}; send them in several requests",
            field=INPUT_FIELD,
        )
    prompts = _prompts(payload)
    if prompts > 1 and _sequences(payload) > MOST_SEQUENCES:
        raise BadRequestError(
            f"{PROMPT_FIELD}: {prompts} prompts{_each(payload)} ask for {_sequences(payload)} "
            f"sequences, over the most a request may ask: at most {MOST_SEQUENCES}; send the "
            "prompts in several requests",
            field=PROMPT_FIELD,
        )


def _prompts(payload: dict[str, Any], field: str = PROMPT_FIELD) -> int:
    """How many prompts a body's `prompt` (or embeddings `input`) holds: a list of texts or of
    token-id lists is one prompt each; anything else (a text, one list of token ids) is one."""
    prompt = payload.get(field)
    if isinstance(prompt, list) and any(isinstance(p, str | list) for p in prompt):
        return len(prompt)
    return 1


def _sequences(payload: dict[str, Any]) -> int:
    """How many sequences a body asks the server to generate: `n` or `best_of` for each of its
    prompts, read as a server reads them (llama.cpp takes `2.0` as 2, vLLM `"2"`); 1 a prompt
    unless one is a number above 1 (`bound_work` refuses a fraction and more than 128; anything
    else is the server's to refuse)."""
    most = 1
    for name in SEQUENCE_FIELDS:
        sent = payload.get(name)
        asked = None if sent is None else _number(sent)
        if asked is not None and math.isfinite(asked) and asked > most:
            most = math.ceil(asked)
    return most * _prompts(payload)


def _number(asked: object) -> float | None:
    """A field's value as the number a server may read from it (an integer, a float or a number
    in a string; never a boolean); None when it is none of these."""
    if isinstance(asked, bool) or not isinstance(asked, int | float | str):
        return None
    try:
        return float(asked)
    except (ValueError, OverflowError):
        return None


def _each(payload: dict[str, Any]) -> str:
    sequences = _sequences(payload) // _prompts(payload)
    return f" of {sequences} sequences each" if sequences > 1 else ""


def _per(payload: dict[str, Any]) -> str:
    sequences = _sequences(payload)
    return f" for each of {sequences} sequences" if sequences > 1 else ""


def _count(name: str, asked: object) -> float:
    """A token count as a number; BadRequestError when it is not one."""
    if isinstance(asked, bool) or not isinstance(asked, int | float | str):
        raise BadRequestError(f"{name} must be a number of tokens", field=name)
    try:
        count = float(asked)
    except ValueError:
        raise BadRequestError(f"{name} must be a number of tokens", field=name) from None
    except OverflowError:  # an integer of hundreds of digits, as pydantic's JSON reads one
        raise BadRequestError(
            f"{name} is more tokens than any request may ask for", field=name
        ) from None
    if math.isnan(count):
        raise BadRequestError(f"{name} must be a number of tokens", field=name)
    if math.isfinite(count) and count != int(count):  # 100.0 is 100 tokens; 4.5 is none
        raise BadRequestError(f"{name}={asked} is not a whole number of tokens", field=name)
    return count


def visible_target(table: RoutingTable, caller: Caller, selector: str, value: str) -> Target | None:
    """The endpoint the request names, if the caller may send it inference (for one it may
    not, the same 404 as for one that does not exist); None when it is not in `table`: the
    caller then reloads the table once (`may_reload`, `reloaded`) or answers `missing`."""
    target = table.by_id.get(value) if selector == BY_ID else table.by_name.get(value)
    if target is not None and not caller.may_infer(target.owner, target.public):
        raise missing(selector, value)
    return target


def fit_framework(target: Target, path: str, payload: Any, caller: Caller) -> bool:
    """`refuse_unfit`, then `salt_prefix_cache`: what every entry that can reach a replica's
    completions applies once its endpoint and path are known (the relayed routes'
    `Call._replica`, async tasks and batch lines). True when `payload` was changed, so the
    caller sends it made again."""
    refuse_unfit(target, path, payload)
    return salt_prefix_cache(target, caller, path, payload)


def salt_prefix_cache(target: Target, caller: Caller, path: str, payload: Any) -> bool:
    """vLLM answers a prompt whose prefix it has cached sooner, so a team timing its requests
    on another team's public endpoint could tell which prompts that team sent. vLLM keys its
    prefix cache by `cache_salt` too: a request of any team but the owner's gets one of its own
    team (of the salt it sent too, if any), so no two teams share a cached prefix; the owner's
    requests without one pass as sent. A salt the owner sends is made its team's the same way,
    so no team can name another's namespace. llama.cpp has no such key (left open)."""
    if target.framework != media.FRAMEWORK or path not in SALTED or not isinstance(payload, dict):
        return False
    sent = payload.get(SALT_FIELD)
    if sent is None and caller.team == target.owner:
        return False
    if sent is not None and (not isinstance(sent, str) or not sent):
        raise BadRequestError(f"{SALT_FIELD} must be a non-empty text", field=SALT_FIELD)
    payload[SALT_FIELD] = hashlib.sha256(f"{caller.team}\0{sent or ''}".encode()).hexdigest()
    return True


def refuse_unfit(target: Target, path: str, payload: Any) -> None:
    """Refuse (400, naming the field) what the endpoint's server would silently ignore or
    should not do: `forwarder/responses.refusal` for any endpoint's responses (what needs a
    response kept, or a tool the server runs), `forwarder/chat.refusal` for any endpoint's chats
    (a chat completion to be kept), `forwarder/llama_cpp.refusal` and
    `prompts_refusal` (a list of prompts, whose usage it reports for the first alone) for a
    llama.cpp endpoint's completions (`echo`, `suffix`, `best_of`, a non-text
    `response_format`, `stream_options` without a stream), `chat_refusal` for its chats (no
    message, `stream_options` without a stream),
    `embeddings_refusal` for its embeddings (`dimensions`), `responses_refusal` for its
    responses (what its server ignores or fails on), `forwarder/media.refusal` and
    `input_refusal` for a vLLM endpoint's chats, embeddings (vLLM embeds a chat's `messages`
    too) and responses (a media URL the replica would fetch)."""
    refused: BadRequestError | None = None
    if path == RESPONSES:
        refused = responses.refusal(payload)
        if refused is None and target.framework == media.FRAMEWORK:
            refused = media.input_refusal(payload)  # no URL for the replica to fetch
        elif refused is None and target.framework == llama_cpp.FRAMEWORK:
            refused = llama_cpp.responses_refusal(payload)
    elif path == CHAT:
        refused = chat.refusal(payload)  # no replica keeps a chat completion
        if refused is None and target.framework == media.FRAMEWORK:
            refused = media.refusal(payload)
        elif refused is None and target.framework == llama_cpp.FRAMEWORK:
            refused = llama_cpp.chat_refusal(payload)
    elif path == EMBEDDINGS and target.framework == media.FRAMEWORK:
        refused = media.refusal(payload)  # vLLM embeds a chat (`messages`) too, media and all
    elif target.framework != llama_cpp.FRAMEWORK:
        return
    elif path == COMPLETIONS:
        refused = llama_cpp.refusal(payload) or llama_cpp.prompts_refusal(_prompts(payload))
    elif path == EMBEDDINGS:
        refused = llama_cpp.embeddings_refusal(payload)
    if refused is not None:
        raise refused


async def find_target(state: AppState, caller: Caller, selector: str, value: str) -> Target:
    """The endpoint an entry that waits for no replica now names (async tasks, batch lines):
    `find_endpoint`, refused (`check_coming`) when no replica will come by waiting."""
    target = await find_endpoint(state, caller, selector, value)
    check_coming(target, caller.owns(target.owner))
    return target


async def find_endpoint(state: AppState, caller: Caller, selector: str, value: str) -> Target:
    """`visible_target`, after one reload of the table on a miss (for routes that may await)."""
    target = visible_target(state.forwarder.table, caller, selector, value)
    if target is None:
        await fresh_table(state, time.monotonic())
        target = visible_target(state.forwarder.table, caller, selector, value)
    if target is None:
        raise missing(selector, value)
    return target


def missing(selector: str, value: str) -> NoSuchEndpointError:
    if selector == BY_MODEL:
        return NoSuchEndpointError(f"The model `{value}` does not exist.", field="model")
    if selector == BY_ID:
        return NoSuchEndpointError(f"no endpoint with id {value!r}", field=selector)
    return NoSuchEndpointError(f"no endpoint named {value!r}", field=selector)


async def fresh_table(state: AppState, since: float) -> None:
    """Wait for a reload of the routing table that began after `since` (a lookup missed then):
    an endpoint created a moment ago is found before the next periodic refresh. Misses share
    reloads, which begin at most every RELOAD_ON_MISS_S: names that do not exist cost the
    database one read per interval, however many there are."""
    forwarder = state.forwarder
    while forwarder.loaded_at <= since:
        if forwarder.reloading is None or forwarder.reloading.done():
            delay = forwarder.loaded_at + RELOAD_ON_MISS_S - time.monotonic()
            forwarder.reloading = asyncio.ensure_future(_reload(state, delay))
        await asyncio.shield(forwarder.reloading)


async def _reload(state: AppState, delay: float) -> None:
    if delay > 0:
        await asyncio.sleep(delay)
    forwarder = state.forwarder
    forwarder.loaded_at = read_at = time.monotonic()
    forwarder.update(await run_in_threadpool(load_table, state.engine), read_at)
