"""Hugging Face models downloaded ahead of time, without an endpoint: a request is written
for the builder (Redis `appliance:hf-downloads`), which fetches the snapshot into the cache as
it does for an endpoint (one job for both) and publishes how far it got. Called by
`api/routes/hf_downloads.py`."""

from __future__ import annotations

import json
import time
from typing import Any

import redis
from pydantic import ConfigDict, Field, field_validator
from sqlalchemy.engine import Engine

from api import team_limits
from api.body import Body
from api.schemas import Revision
from appliance import audit, bus
from appliance.caller import Caller
from appliance.errors import NotFoundError
from appliance.settings import Settings
from builder.hub_downloads import FINISHED
from builder.weights import HUB_ID, HubModel, is_hub_id, present


class HfDownloadCreate(Body):
    """A repository on the hub and its revision (a branch, a tag or a commit)."""

    model_config = ConfigDict(extra="forbid")

    repository: str = Field(
        max_length=200,
        pattern=HUB_ID.pattern,
        description="The model's repository id on the hub, `owner/name`.",
        examples=["google/gemma-3-270m"],
    )
    revision: Revision = Field("main", description="A branch, tag or commit of the repository.")

    @field_validator("repository")
    @classmethod
    def _as_the_hub_takes_it(cls, repository: str) -> str:
        if not is_hub_id(repository):
            raise ValueError(
                "not a repository id the hub takes: no '..' or '--', no part starting or "
                "ending with '.' or '-', not ending '.git'"
            )
        return repository


def ref(repository: str, revision: str) -> str:
    return f"{repository}@{revision}"


def request_download(
    body: HfDownloadCreate,
    caller: Caller,
    client: redis.Redis,
    engine: Engine,
    settings: Settings,
    address: str | None,
) -> dict[str, Any]:
    """Asks the builder for the snapshot; asking again retries one that failed. A team has at
    most `max_downloads_per_team` open at once (`api/team_limits.py`); asking again for one of
    them counts once."""
    key = ref(body.repository, body.revision)
    mine = [k for k, request in _open(client) if request.get("requested_by") == caller.team]
    if key not in mine:
        team_limits.check_downloads(caller.team, caller, settings, have=len(mine))
    request = {
        "repository": body.repository,
        "revision": body.revision,
        "requested_at": time.time(),
        "requested_by": caller.team,
    }
    client.hset(bus.HF_DOWNLOADS_KEY, key, json.dumps(request))
    bus.nudge_builder(client)
    audit.record_now(engine, caller, "hf_download.create", key, request, address)
    return view(request, None, None)


def read_downloads(client: redis.Redis, settings: Settings) -> dict[str, Any]:
    """Every download asked for, with its state, newest request first."""
    requests = _hash(client, bus.HF_DOWNLOADS_KEY)
    states = _hash(client, bus.HF_DOWNLOAD_STATE_KEY)
    found = [view(request, states.get(key), settings) for key, request in requests.items()]
    found.sort(key=lambda d: -float(d["requested_at"]))
    return {"downloads": found}


def read_download(
    repository: str, revision: str, client: redis.Redis, settings: Settings
) -> dict[str, Any]:
    key = ref(repository, revision)
    raw = client.hget(bus.HF_DOWNLOADS_KEY, key)
    if raw is None:
        raise NotFoundError(
            f"no download of {repository} at {revision!r} was asked for", field="repository"
        )
    state = client.hget(bus.HF_DOWNLOAD_STATE_KEY, key)
    return view(json.loads(raw), json.loads(state) if state else None, settings)


def view(
    request: dict[str, Any], state: dict[str, Any] | None, settings: Settings | None
) -> dict[str, Any]:
    """A request as the api shows it; a state older than the request is not its answer yet,
    and a snapshot deleted from the cache since it was done is `removed`."""
    current = state is not None and state.get("requested_at") == request["requested_at"]
    shown = dict(state) if current and state else {}
    model = HubModel(request["repository"], request["revision"])
    if shown.get("state") == "done" and settings is not None and not present(model, settings):
        shown.update(state="removed", message="deleted from the cache since; ask again for it")
    return {
        "repository": request["repository"],
        "revision": request["revision"],
        "requested_at": request["requested_at"],
        "state": shown.get("state", "pending"),
        "progress": shown.get("progress"),
        "message": shown.get("message"),
        "updated_at": shown.get("at"),
    }


def unfinished(client: redis.Redis, repository: str) -> list[str]:
    """The revisions of `repository` whose download ahead of time is asked for and has not
    ended (pending or downloading): deleting the repository under them would cut them off."""
    return sorted(
        request["revision"] for _, request in _open(client) if request["repository"] == repository
    )


def _open(client: redis.Redis) -> list[tuple[str, dict[str, Any]]]:
    """The downloads asked for that have not ended (pending or downloading), by ref."""
    requests = _hash(client, bus.HF_DOWNLOADS_KEY)
    states = _hash(client, bus.HF_DOWNLOAD_STATE_KEY)
    return [
        (key, request)
        for key, request in requests.items()
        if view(request, states.get(key), None)["state"] not in FINISHED
    ]


def _hash(client: redis.Redis, key: str) -> dict[str, dict[str, Any]]:
    raw = client.hgetall(key)
    return {_text(k): json.loads(v) for k, v in raw.items()}


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
