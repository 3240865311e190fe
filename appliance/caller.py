"""Who is calling (`Caller`) and the limits of their key (`KeyLimits`), as verified from an API
key by `appliance/keys.py`, which re-exports both.

Every inference request reads a caller's fields; compiled with the fast lane (`setup.py`),
these are native classes whose fields the lane reads as plain struct reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from appliance.models import ApiKey


@dataclass(frozen=True)
class KeyLimits:
    """Per-key limits; 0 means no limit."""

    requests_per_minute: int = 0
    max_concurrent_requests: int = 0
    max_queued_tasks: int = 0
    max_tokens_per_request: int = 0

    def counted(self) -> bool:
        """Whether requests are counted (in Redis, `api/limits.py`) against these limits."""
        return self.requests_per_minute > 0 or self.max_concurrent_requests > 0

    def resolve(self, row: ApiKey) -> KeyLimits:
        """The key's own limits where set, these defaults elsewhere."""

        def pick(own: int | None, default: int) -> int:
            return default if own is None else own

        return KeyLimits(
            pick(row.requests_per_minute, self.requests_per_minute),
            pick(row.max_concurrent_requests, self.max_concurrent_requests),
            pick(row.max_queued_tasks, self.max_queued_tasks),
            pick(row.max_tokens_per_request, self.max_tokens_per_request),
        )


@dataclass(frozen=True)
class Caller:
    """Who is calling: the key's user, its team (the owner of what it creates) and its scopes."""

    key_id: str
    user: str
    team: str
    scopes: frozenset[str]
    is_admin: bool
    limits: KeyLimits = KeyLimits()
    # the key whose requests-per-minute and in-flight counts this caller's requests add to:
    # its own id, or the key whose limits it shares (`ApiKey.limits_from`)
    counted_as: str = ""

    def counter(self) -> str:
        return self.counted_as or self.key_id

    def can(self, scope: str) -> bool:
        return self.is_admin or scope in self.scopes

    # The tenancy rule, the one place it is written: an object belongs to a team; an admin
    # key reaches every team's; a public endpoint may also be called for inference by anyone.
    # Everything else is, to the caller, an object that does not exist (404).
    def owns(self, owner: str) -> bool:
        """May see and change an object of team `owner`."""
        return self.is_admin or owner == self.team

    def may_infer(self, owner: str, public: bool) -> bool:
        """May send inference to an endpoint of team `owner`, public or not."""
        return self.is_admin or owner == self.team or public
