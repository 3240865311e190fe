"""The api process's verified keys (`Keys`): who calls with a key, asked on every request (by
the inference core, `api/inference/`, and by `api/deps.authenticate` for every other route).

A key is verified against SQLite (`read`, given by `AppState`) and the answer kept for
KEY_CACHE_TTL_S: a revoked key is refused within that long. Compiled with the inference core
(`setup.py`), so a request with a key verified lately runs no interpreted code to find its
caller.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from time import monotonic
from typing import Final

from appliance import keys
from appliance.errors import AuthError

logger = logging.getLogger(__name__)

KEY_CACHE_TTL_S: Final = 1.0  # a revoked key is refused within this long
KEYS_KEPT: Final = 10_000  # entries before the cache starts again
INVALID: Final = "invalid API key"


class Keys:
    def __init__(self, read: Callable[[str], keys.Caller]) -> None:
        self.read = read  # verifies a key against SQLite; raises AuthError
        self.entries: dict[str, tuple[float, keys.Caller | None]] = {}  # None: not valid
        self.refusals: dict[str, str] = {}  # why each key found not valid is not (its 401)
        self.reverifying: set[str] = set()

    def known(self, key: str) -> keys.Caller | None:
        """The caller of a key found valid before: from the cache while fresh, else verified
        again now, in the calling thread (one SQLite read, a fraction of a millisecond). None
        for a key never verified or found invalid, or when it cannot be verified now: the
        caller then verifies it off the event loop (`verify`), which answers errors.

        So a burst on a key idle for over a second (its entry expired) is served from its
        first request, instead of every request of the burst waiting for a thread."""
        cached = self.entries.get(key)
        if cached is None or cached[1] is None:
            return None
        age = monotonic() - cached[0]
        if age < KEY_CACHE_TTL_S:
            return self._fresh(key, cached[1], age)
        try:
            return self.verify(key, fresh=True)
        except AuthError:
            return None  # revoked or expired since: `verify` answers 401
        except Exception:
            logger.exception("could not verify a key again; it will be verified off the loop")
            return None

    def found_valid(self, key: str) -> bool:
        """Whether this process has found the key valid, however long ago (not whether it still
        is: admission checks that)."""
        cached = self.entries.get(key)
        return cached is not None and cached[1] is not None

    def cached(self, key: str) -> keys.Caller | None:
        """The caller of a key verified less than KEY_CACHE_TTL_S ago; None on a miss (or when
        the key was found invalid).

        A key in use is verified again in a worker thread once its entry is half way to
        expiry, so steady traffic never finds it expired (and a revoked key is still refused
        in time)."""
        cached = self.entries.get(key)
        if cached is None:
            return None
        age = monotonic() - cached[0]
        if age >= KEY_CACHE_TTL_S:
            return None
        return self._fresh(key, cached[1], age)

    def _fresh(self, key: str, caller: keys.Caller | None, age: float) -> keys.Caller | None:
        if age >= KEY_CACHE_TTL_S / 2 and caller is not None:
            self.reverify_soon(key)
        return caller

    def verify(self, key: str, *, fresh: bool = False) -> keys.Caller:
        """The key's caller, from the cache unless `fresh`, else read from SQLite (a blocking
        read: off the event loop but for `known`'s). AuthError when it is not valid."""
        now = monotonic()
        cached = self.entries.get(key)
        if not fresh and cached is not None and now - cached[0] < KEY_CACHE_TTL_S:
            if cached[1] is None:
                raise AuthError(self.refusals.get(key, INVALID))
            return cached[1]
        try:
            caller = self.read(key)
        except AuthError as exc:
            self._forget_if_full()
            self.entries[key] = (now, None)
            self.refusals[key] = exc.message  # revoked, expired: said again, not "invalid"
            raise
        self._forget_if_full()
        self.entries[key] = (now, caller)
        return caller

    def counted_as(self, key: str) -> str:
        """Whose counts a key's bodies in flight are in (`api/bodies.py`): for a key found
        valid, the key whose limits and counts it shares (its maker's, for a key a key made);
        else (an address's bucket, a key not verified) the text as it is."""
        cached = self.entries.get(key)
        caller = cached[1] if cached is not None else None
        return f"key {caller.counter()}" if caller is not None else key

    def _forget_if_full(self) -> None:
        if len(self.entries) > KEYS_KEPT:
            self.entries.clear()
            self.refusals.clear()

    def reverify_soon(self, key: str) -> None:
        """Verify `key` again in a worker thread, once at a time per key."""
        if key in self.reverifying:
            return
        self.reverifying.add(key)
        asyncio.get_running_loop().run_in_executor(None, self._reverify, key)

    def _reverify(self, key: str) -> None:
        try:
            self.verify(key, fresh=True)
        except AuthError:
            pass  # cached as invalid: the next request is answered 401
        except Exception:
            logger.exception("could not verify a key again; the next miss retries")
        finally:
            self.reverifying.discard(key)
