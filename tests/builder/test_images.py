"""Which images are the appliance's, who uses each, and which a prune keeps: the pure part of
`builder/images.py` (the Docker part is tests/api/test_storage_images.py)."""

from __future__ import annotations

from appliance.models import Endpoint
from appliance.settings import Settings
from builder.docker_engine import ImageInfo
from builder.images import appliance_images, keep_reason, sources

SETTINGS = Settings(
    vllm_image="v:gpu",
    vllm_cpu_image="v:cpu",
    llamacpp_image="l:cpu",
    llamacpp_cuda_image="l:gpu",
    approved_images=["custom:1", "l:cpu"],
)


def endpoint(eid: str, framework: str, gpus: int = 0, image: str | None = None) -> Endpoint:
    return Endpoint(
        id=eid,
        name=eid,
        owner="t",
        created_by="u",
        framework=framework,
        model="/models/x.gguf",
        gpus=gpus,
        image=image,
    )


def test_the_appliance_images_and_their_users() -> None:
    users = appliance_images(
        SETTINGS,
        [
            endpoint("a", "llamacpp"),
            endpoint("b", "vllm", gpus=1),
            endpoint("c", "custom", image="custom:1"),
            endpoint("d", "vllm", image="mine:2"),  # an approved override it was allowed
            endpoint("e", "custom"),  # no image: not a use of anything
        ],
    )
    assert users == {
        "v:gpu": ["b"],
        "v:cpu": [],
        "l:cpu": ["a"],
        "l:gpu": [],
        "custom:1": ["c"],
        "mine:2": ["d"],
    }
    assert sources("l:cpu", SETTINGS) == ["llamacpp_image", "approved"]
    assert sources("mine:2", SETTINGS) == []


def test_a_prune_keeps_what_endpoints_or_containers_use_and_digests() -> None:
    free = ImageInfo("l:gpu", "sha256:1", 10, 0)
    assert keep_reason(free, []) is None
    assert keep_reason(free, ["a"]) == "used by 1 endpoint(s)"
    assert keep_reason(ImageInfo("v:cpu", "sha256:2", 10, 2), []) == "used by 2 container(s)"
    pinned = ImageInfo("v@sha256:" + "0" * 64, "sha256:3", 10, 0)
    assert "digest" in str(keep_reason(pinned, []))
