"""The appliance's images on this box: published to Redis for the api (`appliance:images`)
and pruned on request (requests from the list `appliance:images:prune-requests`, each outcome
written to `appliance:images:prune:{id}`). Driven by the builder's loop (`builder/loop.py`),
which calls `ImageKeeper.tick` every tick; the Docker calls run on a thread of their own, so
the loop never waits on them.

The appliance's images are those the settings name (the framework defaults), the approved
images and the images endpoints use; no other image is listed or removed. A prune removes
the names of those no endpoint uses, never one a container (of any install, or none) still
uses, and never a name given by digest (removing it would untag names that are not ours).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import redis

from appliance import bus
from appliance.models import Endpoint
from appliance.settings import Settings
from builder.docker_engine import ImageInfo, ImageInUseError
from builder.runtime import ContainerRuntime
from builder.specs import default_image

logger = logging.getLogger(__name__)

IMAGES_REFRESH_S = 15.0
PRUNES_PER_TICK = 10  # requests taken from the list at once; the rest wait for the next turn
SETTING_IMAGES = ("vllm_image", "vllm_cpu_image", "llamacpp_image", "llamacpp_cuda_image")


def appliance_images(settings: Settings, endpoints: Iterable[Endpoint]) -> dict[str, list[str]]:
    """Each of the appliance's image names, with the ids of the endpoints that use it."""
    users: dict[str, list[str]] = {getattr(settings, name): [] for name in SETTING_IMAGES}
    users.update({image: [] for image in settings.approved_images})
    for endpoint in endpoints:
        try:
            image = default_image(endpoint, settings)
        except ValueError:  # a custom endpoint without an image: nothing to keep
            continue
        users.setdefault(image, []).append(endpoint.id)
    return users


def sources(ref: str, settings: Settings) -> list[str]:
    """Why an image is the appliance's: the settings that name it, `approved`, `endpoint`."""
    named = [name for name in SETTING_IMAGES if getattr(settings, name) == ref]
    return named + (["approved"] if ref in settings.approved_images else [])


def keep_reason(image: ImageInfo, endpoint_ids: list[str]) -> str | None:
    """Why a prune keeps a present image (None: it goes)."""
    if endpoint_ids:
        return f"used by {len(endpoint_ids)} endpoint(s)"
    if image.containers:
        return f"used by {image.containers} container(s)"
    if "@" in image.ref:
        return "named by digest; remove it with the docker CLI if it is no longer needed"
    return None


class ImageKeeper:
    """Publishes the image list every IMAGES_REFRESH_S and runs the prunes asked for."""

    def __init__(self, runtime: ContainerRuntime, client: redis.Redis, settings: Settings):
        self.runtime = runtime
        self.redis = client
        self.settings = settings
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="images")
        self._running: Future[None] | None = None
        self._published_at = 0.0

    def tick(self, endpoints: Iterable[Endpoint]) -> None:
        """Start the next piece of image work if none runs; returns at once."""
        if self._running is not None:
            if not self._running.done():
                return
            if self._running.exception() is not None:
                logger.warning("image work failed: %s", self._running.exception())
            self._running = None
        requests = self._take_requests()
        if not requests and time.monotonic() - self._published_at < IMAGES_REFRESH_S:
            return
        users = appliance_images(self.settings, endpoints)
        self._published_at = time.monotonic()
        self._running = self._thread.submit(self._work, users, requests)

    def close(self) -> None:
        self._thread.shutdown(wait=False, cancel_futures=True)

    def _take_requests(self) -> list[dict[str, Any]]:
        try:
            raw = self.redis.lpop(bus.PRUNE_REQUESTS_KEY, PRUNES_PER_TICK)
        except redis.RedisError:
            return []
        requests = []
        for item in raw if isinstance(raw, list) else []:
            try:
                requests.append(dict(json.loads(item)))
            except (ValueError, TypeError):
                logger.warning("ignoring a malformed prune request: %r", item)
        return requests

    def _work(self, users: dict[str, list[str]], requests: list[dict[str, Any]]) -> None:
        for request in requests:
            try:
                result = self._prune(users)
            except Exception as exc:
                logger.exception("image prune failed")
                result = {"status": "failed", "message": f"the prune failed: {exc}"}
            self._record(str(request.get("id", "")), result)
        self._publish(self.runtime.images(sorted(users)), users)

    def _prune(self, users: Mapping[str, list[str]]) -> dict[str, Any]:
        started = time.time()
        removed: list[dict[str, Any]] = []
        kept: list[dict[str, Any]] = []
        for image in self.runtime.images(sorted(users)):
            if image.id is None:
                continue
            reason = keep_reason(image, users[image.ref])
            if reason is None:
                try:
                    done = self.runtime.remove_image(image.ref)
                except ImageInUseError as exc:
                    reason = f"a container uses it ({exc})"
                except Exception as exc:
                    logger.exception("could not remove image %s", image.ref)
                    reason = f"Docker refused: {exc}"
                else:
                    deleted = any(line.startswith("deleted") for line in done)
                    freed = image.size_bytes if deleted else 0
                    removed.append({"image": image.ref, "freed_bytes": freed, "docker": done})
                    logger.info("pruned image %s: %s", image.ref, "; ".join(done))
                    continue
            kept.append({"image": image.ref, "reason": reason, "endpoints": users[image.ref]})
        return {
            "status": "done",
            "removed": removed,
            "kept": kept,
            "freed_bytes": sum(int(r["freed_bytes"] or 0) for r in removed),
            "started_at": started,
            "finished_at": time.time(),
        }

    def _record(self, request_id: str, result: dict[str, Any]) -> None:
        if not request_id:
            return
        key = bus.PRUNE_RESULT_KEY.format(request=request_id)
        self.redis.set(key, json.dumps({"id": request_id, **result}), ex=bus.PRUNE_RESULT_TTL_S)

    def _publish(self, images: list[ImageInfo], users: Mapping[str, list[str]]) -> None:
        listed = [
            {
                "image": image.ref,
                "id": image.id,
                "present": image.id is not None,
                "size_bytes": image.size_bytes,
                "containers": image.containers,
                "sources": sources(image.ref, self.settings),
            }
            for image in images
        ]
        self.redis.set(bus.IMAGES_KEY, json.dumps({"at": time.time(), "images": listed}))
