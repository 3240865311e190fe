"""Hugging Face models downloaded ahead of time, without an endpoint: a request is written
for the builder (Redis `appliance:hf-downloads`), which fetches the snapshot into the cache as
it does for an endpoint (one job for both) and publishes how far it got. The download is the
box's, but who asked is not: it remembers every team that asked for it, and a team sees only
the downloads it asked for (an administrator every one, with the teams). Called by
`api/routes/hf_downloads.py`, the UI's Models page and `api/hf_models.py`."""

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

STATE_KEY = bus.HF_DOWNLOAD_STATE_KEY


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
    """Asks the builder for the snapshot; asking again retries one that failed. Every team
    that asks is remembered on the one download (one under way goes on as it is). A team has
    at most `max_downloads_per_team` open at once (`api/team_limits.py`); asking again for one
    of them counts once."""
    key = ref(body.repository, body.revision)
    mine = [k for k, request in _open(client) if caller.team in asked_by(request)]
    if key not in mine:
        team_limits.check_downloads(caller.team, caller, settings, have=len(mine))
    now = time.time()

    written: list[dict[str, Any]] = []  # what the last (successful) try wrote

    def write(pipe: redis.client.Pipeline) -> None:
        before, state = pipe.hget(bus.HF_DOWNLOADS_KEY, key), pipe.hget(STATE_KEY, key)
        written[:] = [_asked_again(_json(before), _json(state), body, caller, now)]
        pipe.multi()
        pipe.hset(bus.HF_DOWNLOADS_KEY, key, json.dumps(written[0]))

    # watched: two teams asking at once are both remembered
    client.transaction(write, bus.HF_DOWNLOADS_KEY)
    bus.nudge_builder(client)
    asked = {"repository": body.repository, "revision": body.revision, "requested_at": now}
    audit.record_now(
        engine, caller, "hf_download.create", key, {**asked, "requested_by": caller.team}, address
    )
    return shown_to(caller, written[0], None, None)


def _asked_again(
    before: dict[str, Any] | None,
    state: dict[str, Any] | None,
    body: HfDownloadCreate,
    caller: Caller,
    now: float,
) -> dict[str, Any]:
    """The request once `caller` asked (again): a new download, or a retry of one that ended,
    is asked for now; one pending or under way goes on, with the caller's team added."""
    going = before is not None and view(before, state, None)["state"] not in FINISHED
    return {
        "repository": body.repository,
        "revision": body.revision,
        "requested_at": before["requested_at"] if before and going else now,
        "requested_by": before["requested_by"] if before else caller.team,
        "asked_by": {**(asked_by(before) if before else {}), caller.team: now},
    }


def asked_by(request: dict[str, Any]) -> dict[str, float]:
    """The teams that asked for a download, each with when it last did (a request written
    before every team was remembered names only the first, `requested_by`)."""
    asked = request.get("asked_by")
    if isinstance(asked, dict):
        return {str(team): float(at) for team, at in asked.items()}
    return {str(request["requested_by"]): float(request["requested_at"])}


def shown_to(
    caller: Caller,
    request: dict[str, Any],
    state: dict[str, Any] | None,
    settings: Settings | None,
) -> dict[str, Any]:
    """A download as `caller` sees it: the teams that asked that it may see (its own; every
    one for an administrator) and when the last of those asked."""
    asked = asked_by(request)
    teams = sorted(team for team in asked if caller.owns(team))
    latest = max(asked[team] for team in teams)
    return {**view(request, state, settings), "requested_at": latest, "requested_by": teams}


def visible_to(caller: Caller, request: dict[str, Any]) -> bool:
    """Whether `caller`'s team (any team, for an administrator) asked for the download."""
    return any(caller.owns(team) for team in asked_by(request))


def read_downloads(caller: Caller, client: redis.Redis, settings: Settings) -> dict[str, Any]:
    """The downloads the caller's team asked for (every one, for an administrator), with their
    state, newest request first."""
    requests = _hash(client, bus.HF_DOWNLOADS_KEY)
    states = _hash(client, bus.HF_DOWNLOAD_STATE_KEY)
    found = [
        shown_to(caller, request, states.get(key), settings)
        for key, request in requests.items()
        if visible_to(caller, request)
    ]
    found.sort(key=lambda d: -float(d["requested_at"]))
    return {"downloads": found}


def asked_for_by(caller: Caller, client: redis.Redis) -> set[str]:
    """The repositories the caller's team asked to download (every one, for an administrator)."""
    requests = _hash(client, bus.HF_DOWNLOADS_KEY).values()
    return {request["repository"] for request in requests if visible_to(caller, request)}


def read_download(
    repository: str, revision: str, caller: Caller, client: redis.Redis, settings: Settings
) -> dict[str, Any]:
    """One download the caller's team asked for; another team's is, to it, one never asked."""
    key = ref(repository, revision)
    raw = client.hget(bus.HF_DOWNLOADS_KEY, key)
    request = json.loads(raw) if raw is not None else None
    if request is None or not visible_to(caller, request):
        raise NotFoundError(
            f"no download of {repository} at {revision!r} was asked for", field="repository"
        )
    state = client.hget(bus.HF_DOWNLOAD_STATE_KEY, key)
    return shown_to(caller, request, json.loads(state) if state else None, settings)


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


def _json(raw: bytes | str | None) -> dict[str, Any] | None:
    return json.loads(raw) if raw else None


def _hash(client: redis.Redis, key: str) -> dict[str, dict[str, Any]]:
    raw = client.hgetall(key)
    return {_text(k): json.loads(v) for k, v in raw.items()}


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
