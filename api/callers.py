"""Who is calling and which endpoints they may reach, asked on every inference request (by
`api/deps.py` and the routes on the general path, by `api/lane/admit.py` on the fast lane):
the caller of a key verified lately, from the key cache, and the visibility of an endpoint.
Compiled with the fast lane (`setup.py`), so a request with a known key runs no interpreted
code for either. The cache itself is `AppState`'s; a key is verified against SQLite only there
(`AppState.verify_key`).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Final

from appliance import keys
from appliance.errors import AuthError
from forwarder.table import Target

if TYPE_CHECKING:
    from api.deps import AppState

logger = logging.getLogger(__name__)

KEY_CACHE_TTL_S: Final = 1.0  # a revoked key is refused within this long


def known_caller(state: AppState, key: str) -> keys.Caller | None:
    """The caller of a key found valid before: from the cache while fresh, else verified
    again now, in the calling thread (one SQLite read, a fraction of a millisecond). None for
    a key never verified or found invalid, or when it cannot be verified now: the caller then
    takes the path that verifies it off the event loop and answers errors.

    So a burst on a key idle for over a second (its entry expired) is served on the fast lane
    from its first request, instead of every request of the burst missing the cache at once."""
    cached = state._key_cache.get(key)
    if cached is None or cached[1] is None:
        return None
    if time.monotonic() - cached[0] < KEY_CACHE_TTL_S:
        return cached_caller(state, key)
    try:
        return state.verify_key(key, fresh=True)
    except AuthError:
        return None  # revoked or expired since: the general path answers 401
    except Exception:
        logger.exception("could not verify a key again; the general path will")
        return None


def cached_caller(state: AppState, key: str) -> keys.Caller | None:
    """The caller of a key verified less than KEY_CACHE_TTL_S ago; None on a miss (or when the
    key was found invalid): the caller then takes the path that verifies it.

    A key in use is verified again in a worker thread once its entry is half way to expiry,
    so steady traffic never finds it expired (and a revoked key is still refused in time)."""
    cached = state._key_cache.get(key)
    if cached is None:
        return None
    age = time.monotonic() - cached[0]
    if age >= KEY_CACHE_TTL_S:
        return None
    if age >= KEY_CACHE_TTL_S / 2 and cached[1] is not None:
        state.reverify_soon(key)
    return cached[1]


def visible(route: Target | None, caller: keys.Caller) -> Target | None:
    """`route` if the caller may call its endpoint (its team's, a public one, or any for an
    admin key), else None: an endpoint the caller may not call is one that does not exist."""
    if route is None or not caller.may_infer(route.owner, route.public):
        return None
    return route
