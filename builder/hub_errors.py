"""Failures of a Hugging Face download in words a user can act on: what huggingface_hub and
its HTTP client raise (an unknown repository or revision, a gated model, a refused token, a hub
out of reach, a body cut off, a full disk) turned into one sentence. Called by
`builder/weights.py`, whose `WeightsError` carries the sentence to the endpoint's status.
"""

from __future__ import annotations

import errno
from typing import Protocol

import httpx2
from huggingface_hub import constants
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from appliance.settings import Settings

TOKEN = "APPLIANCE_HF_TOKEN"  # noqa: S105 - the setting's name, not a secret


class Model(Protocol):
    """A repository at a revision (`builder.weights.HubModel`)."""

    @property
    def repository(self) -> str: ...

    @property
    def revision(self) -> str: ...


def explain(exc: BaseException, model: Model, settings: Settings) -> str:
    """The failure of a download in words a user can act on."""
    name, where = model.repository, settings.hf_endpoint or constants.ENDPOINT
    status = exc.response.status_code if isinstance(exc, HfHubHTTPError) else None
    if isinstance(exc, GatedRepoError):
        if not settings.hf_token:
            return (
                f"{name} is a gated model: it needs a Hugging Face token ({TOKEN}) of an "
                "account that accepted its terms"
            )
        return (
            f"{name} is a gated model, and the account of the Hugging Face token ({TOKEN}) "
            "has no access to it: accept its terms on its page with that account"
        )
    if isinstance(exc, RevisionNotFoundError):
        return f"{where} has no revision {model.revision!r} of {name}: check the revision"
    if isinstance(exc, RepositoryNotFoundError):
        private = "the token cannot see it" if settings.hf_token else f"no token is set ({TOKEN})"
        return f"{where} has no model {name!r} (or it is private and {private}): check the name"
    if status == 401:
        return (
            f"{where} refused the Hugging Face token (401, invalid credentials): "
            f"set a valid {TOKEN}"
        )
    if status == 403:
        return f"{where} denied access to {name} (403): the token ({TOKEN}) may not read it"
    if status is not None:
        return f"{where} answered {status} for {name}: try again later (restart the endpoint)"
    cause = exc.__cause__ if isinstance(exc, LocalEntryNotFoundError) and exc.__cause__ else exc
    if isinstance(cause, (httpx2.ConnectError, httpx2.ConnectTimeout)):
        return f"cannot reach {where} to download {name}: {_first_line(cause)}"
    if isinstance(cause, httpx2.TransportError):
        return f"the download of {name} from {where} broke off: {_first_line(cause)}"
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return f"the disk holding the Hugging Face cache filled up while downloading {name}"
    return f"downloading {name} failed: {_first_line(exc)}"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
