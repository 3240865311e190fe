"""The one admission step of inference requests, in the order every entry applies it: who calls
(`caller_for`: a key, verified; 401), whether the key may (`check_scope`; 403), whether it is
within its counted limits (requests per minute and in flight: `api/limits.py`; 429), what the
request asks for and whether its key allows that many tokens (`cap_tokens`; 429), which
endpoint it may call (`find_target`: the tenancy rule of `Caller.may_infer`; 404), and a
replica (`forwarder/proxy.py`; 503).

Every inference entry calls these and nothing else decides: the relayed routes
(`api/inference/call.py`, on either transport), async tasks and batch lines
(`api/routes/tasks.py`, `api/routes/batches.py`) and the playground. So a request refused for
one reason gets the same status, in its route's envelope, wherever it was sent.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any, Final

from starlette.concurrency import run_in_threadpool

from api.callers import known_caller
from api.inference.resume import in_task
from appliance.errors import (
    AuthError,
    BadRequestError,
    ForbiddenError,
    NoSuchEndpointError,
    RateLimitedError,
)
from appliance.keys import Caller
from forwarder.paths import BY_ID, BY_MODEL
from forwarder.refresh import load_table
from forwarder.table import Target

if TYPE_CHECKING:
    from api.deps import AppState

SCOPE: Final = "inference"
# Every field by which a body asks for a number of tokens: OpenAI's two, LLM Engine's, and
# llama.cpp's own (where -1 means no limit)
TOKEN_FIELDS: Final = ("max_tokens", "max_completion_tokens", "max_new_tokens", "n_predict")
CAPPED_FIELD: Final = "max_tokens"  # set to the key's cap when a request names none
RELOAD_ON_MISS_S: Final = 0.5
NO_KEY: Final = "an API key is required: send `Authorization: Bearer <key>`"


async def caller_for(state: AppState, key: str | None) -> Caller:
    """The caller of a key: from the key cache when verified lately (no wait), else verified
    against SQLite off the event loop. AuthError (401) for a missing or invalid key."""
    if not key:
        raise AuthError(NO_KEY)
    caller = known_caller(state, key)
    if caller is None:
        await in_task()
        found: Caller = await run_in_threadpool(state.verify_key, key)
        return found
    return caller


def check_scope(caller: Caller) -> None:
    if not caller.can(SCOPE):
        raise ForbiddenError(f"this key lacks the {SCOPE!r} scope")


def cap_tokens(caller: Caller, payload: dict[str, Any], *, inject: bool) -> bool:
    """Refuse (429) a request that asks for more tokens than its key allows, by any of
    TOKEN_FIELDS, as an integer, a float or a number in a string. When it names none and the
    key has a cap, the cap becomes its limit if `inject` (a generating OpenAI route): then
    `payload` gets `max_tokens` and True is returned, so the caller sends the changed body."""
    most = caller.limits.max_tokens_per_request
    if not most:
        return False
    named = False
    for name in TOKEN_FIELDS:
        asked = payload.get(name)
        if asked is None:
            continue
        named = True
        count = _count(name, asked)
        if count > most or (name == "n_predict" and count < 0):
            raise RateLimitedError(
                f"{name}={asked} is over this key's limit of {most} tokens per request",
                retry_after_s=60,
            )
    if named or not inject:
        return False
    payload[CAPPED_FIELD] = most
    return True


def _count(name: str, asked: object) -> float:
    """A token count as a number; BadRequestError when it is not one."""
    if isinstance(asked, bool) or not isinstance(asked, int | float | str):
        raise BadRequestError(f"{name} must be a number of tokens", field=name)
    try:
        count = float(asked)
    except ValueError:
        raise BadRequestError(f"{name} must be a number of tokens", field=name) from None
    if math.isnan(count):
        raise BadRequestError(f"{name} must be a number of tokens", field=name)
    return count


async def find_target(state: AppState, caller: Caller, selector: str, value: str) -> Target:
    """The endpoint the request names, if the caller may send it inference; else the same
    404 as for one that does not exist."""
    if selector == BY_ID:
        target = state.forwarder.table.by_id.get(value)
    else:
        target = state.forwarder.table.by_name.get(value)
    if target is None:
        target = await _reloaded(state, selector, value)
    if target is None or not caller.may_infer(target.owner, target.public):
        raise missing(selector, value)
    return target


def missing(selector: str, value: str) -> NoSuchEndpointError:
    if selector == BY_MODEL:
        return NoSuchEndpointError(f"The model `{value}` does not exist.", field="model")
    if selector == BY_ID:
        return NoSuchEndpointError(f"no endpoint with id {value!r}", field=selector)
    return NoSuchEndpointError(f"no endpoint named {value!r}", field=selector)


async def _reloaded(state: AppState, selector: str, value: str) -> Target | None:
    """A miss re-reads the table (at most every RELOAD_ON_MISS_S), so an endpoint created a
    moment ago is found before the next periodic refresh."""
    forwarder = state.forwarder
    now = time.monotonic()
    if now - forwarder.loaded_at < RELOAD_ON_MISS_S:
        return None
    forwarder.loaded_at = now
    await in_task()
    forwarder.update(await run_in_threadpool(load_table, state.engine))
    table = forwarder.table
    return table.by_id.get(value) if selector == BY_ID else table.by_name.get(value)
