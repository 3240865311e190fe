"""Domain errors of the appliance, raised by every layer and translated to HTTP in one place.

ApplianceError
├── InvalidSpecError            a request asks for something the appliance will not do (422)
│   ├── PolicyViolationError    a container spec breaks the security policy (422)
│   └── BadRequestError         a request the route cannot read, or its endpoint cannot honour (400)
├── BodyTooLargeError           the request body is over the limit (413)
├── InsufficientStorageError    the disk has no room for what the request would store (507)
├── NotFoundError               no such object, or not the caller's (404)
│   ├── NoSuchEndpointError
│   └── NoSuchTaskError
├── ConflictError               the object exists or is busy (409)
│   ├── OperationInProgressError
│   ├── TeamLimitError          the team has as many endpoints or keys as it may (409)
│   └── FinishedError           the object has ended and no wait changes it (409, no retry)
├── AuthError                   no valid key (401)
│   └── ForbiddenError          a valid key without the scope (403)
├── RateLimitedError            over a per-key limit (429)
├── CapacityError               nothing can serve the request now (503)
│   ├── NoFreeGpuError          placement found no GPUs for a replica
│   └── NoReadyReplicaError     the endpoint has no ready replica in time
├── EndpointDownError           the endpoint will get no replica until someone acts (503, no retry)
└── UpstreamError               a replica failed (502), timed out (504)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Self


class ApplianceError(Exception):
    """Base of every error the appliance raises on purpose."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field

    def located(self, where: str) -> Self:
        """The same refusal with its message led by where it was found (`line 3 (custom_id
        'a'): ...`): the same class, so the same status, and the same `field`, `retry_after_s`
        and the rest; for checks made on one part of a larger request (a batch's lines)."""
        message = f"{where}: {self.message}"
        copy = type(self).__new__(type(self), message)  # no __init__: subclasses differ in theirs
        copy.__dict__.update(vars(self))
        copy.message = message
        return copy


class InvalidSpecError(ApplianceError):
    """The request asks for something invalid; the message says what to fix."""


class PolicyViolationError(InvalidSpecError):
    """A container spec breaks the security policy."""


class BadRequestError(InvalidSpecError):
    """The request cannot be read at all (not JSON, a missing part), or its endpoint cannot
    honour it as asked (LLM Engine answers 400): 400 on every route."""


class BodyTooLargeError(ApplianceError):
    """The request body is over `max_body_bytes`."""


class InsufficientStorageError(ApplianceError):
    """What the request would store does not fit on the disk; the message gives the numbers."""


class NotFoundError(ApplianceError):
    """No such object, or one the caller may not see."""


class NoSuchEndpointError(NotFoundError):
    """No endpoint with that id or name for this caller."""


class NoSuchTaskError(NotFoundError):
    """No task with that id for this caller."""


class ConflictError(ApplianceError):
    """The object already exists, or another change is under way."""


class OperationInProgressError(ConflictError):
    """A change to the endpoint is still in progress."""


class TeamLimitError(ConflictError):
    """The team already has as many endpoints (or active keys) as the install allows; the
    message names the setting and how to free room."""


class FinishedError(ConflictError):
    """The object has ended (a batch completed, failed or cancelled): what the request asks
    of it would be refused again, however long a client waits."""


class AuthError(ApplianceError):
    """No key, or a key that is not valid."""


class ForbiddenError(AuthError):
    """A valid key that lacks the scope for this action."""


class RateLimitedError(ApplianceError):
    """The key is over one of its limits."""

    def __init__(self, message: str, *, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class CapacityError(ApplianceError):
    """Nothing can serve this now; the client may retry later."""

    def __init__(self, message: str, *, retry_after_s: int = 5) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class NoFreeGpuError(CapacityError):
    """Placement found no set of GPUs for a replica."""


class NoReadyReplicaError(CapacityError):
    """The endpoint had no ready replica within its activation timeout."""


class EndpointDownError(ApplianceError):
    """The endpoint has no ready replica and will get none by itself: it failed to start
    (UPDATE_FAILED) or is being deleted. Answered 503 at once, telling clients not to retry
    (`x-should-retry: false`, no Retry-After): only a fix, a restart or a new endpoint helps."""


class UpstreamError(ApplianceError):
    """A replica refused, failed or timed out."""

    def __init__(self, message: str, *, status_code: int = 502) -> None:
        super().__init__(message)
        self.status_code = status_code


# What pydantic puts before a validator's own words ("Value error, limits must be an object"):
# they say nothing to whoever reads the message.
VALIDATOR_PREFIXES = ("Value error, ", "Assertion failed, ")


def validation_message(problem: Mapping[str, Any]) -> str:
    """A pydantic problem's message as a user reads it, without pydantic's prefix."""
    message = str(problem.get("msg", "is not valid"))
    for prefix in VALIDATOR_PREFIXES:
        message = message.removeprefix(prefix)
    return message
