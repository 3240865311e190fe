"""The mount policy before and after create: the models directory is bound read-only, the
Hugging Face cache may be written (vLLM keeps locks and compiled kernels there), and nothing
else is mounted."""

from __future__ import annotations

from dataclasses import replace

import pytest

from appliance.errors import PolicyViolationError
from builder import policy
from builder.specs import ContainerSpec, Mount

MODELS, CACHE = "/srv/models", "/srv/hf-cache"
SPEC = ContainerSpec(
    name="r",
    image="img",
    command=(),
    entrypoint=None,
    env={},
    port=8000,
    health_route="/health",
    mounts=(Mount(MODELS, "/models"), Mount(CACHE, "/root/.cache/huggingface", False)),
    labels={},
    gpu_ids=(),
    request_gpus=False,
    nano_cpus=10**9,
    memory_bytes=2**30,
    shm_bytes=2**20,
    network=None,
)


def test_the_cache_may_be_written_the_models_directory_may_not() -> None:
    policy.check_spec(SPEC, allowed_sources={MODELS, CACHE}, writable={CACHE})
    writable_models = replace(SPEC, mounts=(Mount(MODELS, "/models", False),))
    with pytest.raises(PolicyViolationError, match="read-only"):
        policy.check_spec(writable_models, allowed_sources={MODELS, CACHE}, writable={CACHE})
    with pytest.raises(PolicyViolationError, match="not allowed"):
        policy.check_spec(SPEC, allowed_sources={MODELS}, writable=())


def test_after_create_a_writable_bind_is_a_violation_unless_it_is_the_cache() -> None:
    base = {"CapDrop": ["ALL"], "SecurityOpt": ["no-new-privileges:true"]}
    mounts = [
        {"Type": "bind", "Source": MODELS, "RW": True},
        {"Type": "bind", "Source": CACHE, "RW": True},
    ]
    found = policy.violations(
        {"HostConfig": base, "Mounts": mounts}, allowed_sources={MODELS, CACHE}, writable={CACHE}
    )
    assert found == [f"writable bind of {MODELS!r}"]
