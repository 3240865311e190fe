"""The appliance's images, for the storage routes and the UI's Models page. The api never talks
to Docker: the builder publishes the images to Redis (`builder/images.py`) and takes prune
requests from a Redis list; this module reads the one, writes the other, and reads a prune's
outcome. Which endpoints use each image is worked out here from the endpoint rows, with the
same rule the builder uses (`builder.images.appliance_images`).
"""

from __future__ import annotations

import json
import time
from typing import Any

import redis
from sqlmodel import Session

from api import storage
from appliance import audit, bus, queries
from appliance.errors import CapacityError, NotFoundError
from appliance.ids import new_id
from appliance.keys import Caller
from appliance.models import Endpoint
from appliance.settings import Settings
from builder.images import appliance_images, sources

PRUNE_ID = r"^prune_[0-9a-v]{1,40}$"  # the ids `request_prune` makes (`appliance.ids.new_id`)


def _published(client: redis.Redis) -> dict[str, Any]:
    try:
        raw = client.get(bus.IMAGES_KEY)
    except redis.RedisError as exc:
        raise CapacityError(f"cannot read the image list from Redis: {exc}") from exc
    return dict(json.loads(raw)) if raw else {}


def read_images(
    caller: Caller, session: Session, settings: Settings, client: redis.Redis
) -> dict[str, Any]:
    """`GET /v1/storage/images`: each of the appliance's images, present or not, with its size
    and users, as the builder last saw them (`checked_at`)."""
    endpoints = list(queries.all_endpoints(session=session))
    by_id = {e.id: e for e in endpoints}
    users = appliance_images(settings, endpoints)
    published = _published(client)
    seen = {item["image"]: item for item in published.get("images", [])}
    data = []
    for ref in sorted(users):
        item = seen.get(ref) or {"present": None, "size_bytes": None, "containers": None}
        data.append(
            {
                "image": ref,
                "present": item["present"],  # None: the builder has not looked at it yet
                "size_bytes": item["size_bytes"],
                "containers": item["containers"],
                "sources": [*sources(ref, settings), *(["endpoint"] if users[ref] else [])],
                **storage.used_by([by_id[i] for i in users[ref]], caller),
            }
        )
    return {"data": data, "checked_at": published.get("at")}


def request_prune(
    caller: Caller, session: Session, client: redis.Redis, address: str | None
) -> dict[str, Any]:
    """Queue a prune for the builder; its outcome is read with `read_prune`."""
    storage.require_admin(caller, "prune images")
    prune_id = new_id("prune")
    queued = {"id": prune_id, "status": "queued", "requested_at": time.time()}
    audit.record(session, caller, "image.prune", prune_id, {}, address)
    try:
        pipe = client.pipeline()
        pipe.set(bus.PRUNE_RESULT_KEY.format(request=prune_id), json.dumps(queued))
        pipe.expire(bus.PRUNE_RESULT_KEY.format(request=prune_id), bus.PRUNE_RESULT_TTL_S)
        pipe.rpush(bus.PRUNE_REQUESTS_KEY, json.dumps({"id": prune_id, "by": caller.user}))
        pipe.execute()
        bus.nudge_builder(client)
    except redis.RedisError as exc:
        raise CapacityError(f"cannot queue the prune in Redis: {exc}") from exc
    session.commit()
    return queued


def read_prune(
    prune_id: str, caller: Caller, session: Session, client: redis.Redis
) -> dict[str, Any]:
    """A prune's outcome: `queued` until the builder ran it, then `done` with what it removed
    and what it kept (and why), or `failed` with the reason."""
    try:
        raw = client.get(bus.PRUNE_RESULT_KEY.format(request=prune_id))
    except redis.RedisError as exc:
        raise CapacityError(f"cannot read the prune from Redis: {exc}") from exc
    if not raw:
        raise NotFoundError(f"no image prune {prune_id!r} (outcomes are kept an hour)")
    result = dict(json.loads(raw))
    names = {e.id: e for e in queries.all_endpoints(session=session)}
    for kept in result.get("kept", []):
        users: list[Endpoint] = [names[i] for i in kept.pop("endpoints", []) if i in names]
        kept.update(storage.used_by(users, caller))
    return result
