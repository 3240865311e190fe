"""The container policy's mounts: binds are read-only, except the Hugging Face cache directory
that replicas bind when no cache volume is named."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from appliance.errors import PolicyViolationError
from appliance.settings import Settings
from builder.policy import check_spec, violations
from builder.specs import Mount, container_spec
from tests.factories import make_endpoint


def test_only_the_cache_directory_may_be_bound_writable(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, models_dir=tmp_path / "models")
    spec = container_spec(
        make_endpoint(model="acme/m"),
        settings=settings,
        install_id="i",
        replica_id="rep_1",
        gpu_ids=(0,),
        gpu_fraction=1.0,
    )
    models, cache = str((tmp_path / "models").resolve()), str(settings.hf_cache_path.resolve())
    assert [(m.source, m.read_only) for m in spec.mounts] == [(models, True), (cache, False)]
    check_spec(spec, allowed_sources={models, cache}, writable_sources={cache})
    with pytest.raises(PolicyViolationError, match="read-only"):
        check_spec(spec, allowed_sources={models, cache})
    writable_models = replace(spec, mounts=(Mount(models, "/models", read_only=False),))
    with pytest.raises(PolicyViolationError, match="read-only"):
        check_spec(writable_models, allowed_sources={models, cache}, writable_sources={cache})
    inspect = {"Mounts": [{"Type": "bind", "Source": s, "RW": True} for s in (models, cache)]}
    found = violations(inspect, allowed_sources={models, cache}, writable_sources={cache})
    assert [f for f in found if "bind" in f] == [f"writable bind of {models!r}"]
