"""Pages that stay open keep up with what changes, on the api alone (replicas and their logs
written as a builder would): the endpoint page's log view follows the new replica after a
roll, its Spec panel shows the server settings and a creation time that keeps counting, and
the Models page lists a file once its upload ends, the upload's message still shown."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from appliance import bus
from appliance.db import open_engine, session_scope
from appliance.models import Endpoint, EndpointStatus, Replica, ReplicaState
from tests.forwarder.test_async_support import seed_endpoint
from tests.harness import ADMIN_KEY, Appliance, RedisServer
from tests.web.browser import sign_in

SETTLE_MS = 30_000  # the page polls every 10 s while nothing is deploying


@pytest.fixture
def models_api(tmp_path: Path) -> Iterator[tuple[Appliance, Path]]:
    """The api alone with a models directory of its own."""
    models = tmp_path / "models"
    models.mkdir()
    store = RedisServer(tmp_path / "redis").start()
    appliance = Appliance(
        tmp_path / "api", store, env_extra={"APPLIANCE_MODELS_DIR": str(models)}
    ).start(roles=("api",))
    yield appliance, models
    print(appliance.logs())
    appliance.stop()
    store.stop()


def log_line(appliance: Appliance, replica_id: str, line: str) -> None:
    store = redis.Redis.from_url(appliance.redis.url)
    store.xadd(bus.LOGS_KEY.format(replica=replica_id), {"line": f"{line}\n"})
    store.close()


def roll(appliance: Appliance, endpoint_id: str, old: str, new: str) -> None:
    """What a roll leaves: the old replica gone, a new one of the next generation."""
    engine = open_engine(appliance.data_dir / "appliance.db")
    with session_scope(engine) as session:
        replica = session.get(Replica, old)
        assert replica is not None
        session.delete(replica)
        session.add(
            Replica(
                id=new,
                endpoint_id=endpoint_id,
                generation=2,
                container_name=new,
                address="127.0.0.1:9",
                state=ReplicaState.READY,
            )
        )
    engine.dispose()


def seed_rolling(appliance: Appliance) -> str:
    """A READY endpoint of one replica, made 3 s ago with two server settings."""
    endpoint_id = seed_endpoint(appliance.data_dir, "rolling", "127.0.0.1:9", endpoint_type="sync")
    engine = open_engine(appliance.data_dir / "appliance.db")
    with session_scope(engine) as session:
        row = session.get(Endpoint, endpoint_id)
        assert row is not None
        row.args = {"max_model_len": 1024, "enforce_eager": True}
        row.created_at = time.time() - 3
        session.add(row)
    engine.dispose()
    return endpoint_id


def test_the_spec_panel_shows_server_settings_and_a_current_age(
    api_only: Appliance, page: Any
) -> None:
    endpoint_id = seed_rolling(api_only)
    sign_in(page, api_only.url, ADMIN_KEY)
    page.goto(f"{api_only.url}/ui/endpoints/{endpoint_id}")
    created = page.locator("dl.spec time").first
    first = created.inner_text()
    assert first.endswith("s ago")
    page.wait_for_function(
        "t => document.querySelector('dl.spec time').textContent !== t", arg=first
    )
    assert created.inner_text().endswith("s ago")
    settings = page.inner_text("#server-settings")
    assert "max_model_len 1024" in settings and "enforce_eager true" in settings


def test_the_log_view_follows_the_new_replica_after_a_roll(api_only: Appliance, page: Any) -> None:
    endpoint_id = seed_rolling(api_only)
    log_line(api_only, "rep_rolling", "first generation says hello")
    sign_in(page, api_only.url, ADMIN_KEY)
    page.goto(f"{api_only.url}/ui/endpoints/{endpoint_id}")
    logs = "() => document.querySelector('[data-logs]').textContent.includes('{}')"
    page.wait_for_function(logs.format("first generation says hello"))
    roll(api_only, endpoint_id, "rep_rolling", "rep_rolled")
    log_line(api_only, "rep_rolled", "second generation says hello")
    page.wait_for_function(logs.format("second generation says hello"), timeout=SETTLE_MS)
    assert page.inner_text("[data-logs-state]") == "following"


def test_an_uploaded_file_is_listed_without_a_reload(
    models_api: tuple[Appliance, Path], page: Any, tmp_path: Path
) -> None:
    appliance, models = models_api
    sign_in(page, appliance.url, ADMIN_KEY)
    page.goto(appliance.url + "/ui/models")
    assert "No model files yet" in page.inner_text("#model-files")
    source = tmp_path / "small.gguf"
    source.write_bytes(b"GGUF" + os.urandom(4_000))
    page.set_input_files("#u-file", str(source))
    page.click("[data-upload-button]")
    page.wait_for_selector('tr[data-file="small.gguf"]')
    assert "Uploaded small.gguf" in page.inner_text("[data-upload-state]")
    assert "1 in the models directory" in page.inner_text("#model-files")
    assert os.listdir(models) == ["small.gguf"]


def seed_replicaless(appliance: Appliance, name: str, desired: int, most: int = 1) -> str:
    """An endpoint that may scale to zero, with no replica row: `desired` 0 is scaled to zero,
    1 is a first deploy (or a request waking it) whose replica the builder has not made yet;
    `most` its max replicas."""
    engine = open_engine(appliance.data_dir / "appliance.db")
    with session_scope(engine) as session:
        session.add(
            Endpoint(
                id=f"end_{name}",
                name=name,
                owner="admin",
                created_by="test",
                framework="llamacpp",
                model="model.gguf",
                endpoint_type="streaming",
                status=EndpointStatus.UPDATE_PENDING if desired else EndpointStatus.READY,
                min_replicas=0,
                max_replicas=most,
                desired_replicas=desired,
            )
        )
    engine.dispose()
    return f"end_{name}"


def test_a_replica_on_its_way_is_not_called_scaled_to_zero(api_only: Appliance, page: Any) -> None:
    starting = seed_replicaless(api_only, "starting", desired=1)
    idle = seed_replicaless(api_only, "idle", desired=0)
    sign_in(page, api_only.url, ADMIN_KEY)
    page.goto(f"{api_only.url}/ui/endpoints/{starting}")
    replicas = page.inner_text("[data-no-replicas]")
    assert "scaled to zero" not in replicas
    assert "1 starting" in replicas
    page.goto(f"{api_only.url}/ui/endpoints/{idle}")
    assert "scaled to zero; the first request starts one" in page.inner_text("[data-no-replicas]")
    none = seed_replicaless(api_only, "none", desired=0, most=0)  # no request starts one
    page.goto(f"{api_only.url}/ui/endpoints/{none}")
    replicas = page.inner_text("[data-no-replicas]")
    assert "max replicas is 0" in replicas and "the first request starts one" not in replicas


def test_an_endpoint_allowed_no_replica_does_not_read_as_deploying_or_serving(
    api_only: Appliance, page: Any
) -> None:
    """Max replicas 0: the deploy steps say no replica will run (none "in progress", no
    "serving"), and the status badge, here and in the endpoints table, is not the serving one."""
    none = seed_replicaless(api_only, "none", desired=0, most=0)
    sign_in(page, api_only.url, ADMIN_KEY)
    page.goto(f"{api_only.url}/ui/endpoints/{none}")
    steps = page.inner_text("ol.steps")
    assert "scaled to 0: no replicas allowed" in steps
    assert "in progress" not in steps and "serving" not in steps
    assert "ok" not in (page.get_attribute("[data-status] .badge", "class") or "").split()
    page.goto(f"{api_only.url}/ui/endpoints")
    badge = page.get_attribute('tr[data-endpoint="none"] [data-col="status"] .badge', "class")
    assert "ok" not in (badge or "").split()


def test_a_page_left_open_on_an_endpoint_that_is_gone_offers_no_actions(
    api_only: Appliance, page: Any
) -> None:
    """Once an endpoint's deletion is done, its open page says it is gone and no longer offers
    Try it, Edit or Delete, which would only answer 404."""
    endpoint_id = seed_rolling(api_only)
    sign_in(page, api_only.url, ADMIN_KEY)
    page.goto(f"{api_only.url}/ui/endpoints/{endpoint_id}")
    assert page.locator(f'a[href="/ui/endpoints/{endpoint_id}/edit"]').count() == 1
    engine = open_engine(api_only.data_dir / "appliance.db")
    with session_scope(engine) as session:  # what the builder does once its replicas stopped
        session.delete(session.get(Replica, "rep_rolling"))
        session.delete(session.get(Endpoint, endpoint_id))
    engine.dispose()
    page.wait_for_selector("text=This endpoint is gone", timeout=SETTLE_MS)
    assert page.locator(f'a[href="/ui/endpoints/{endpoint_id}/edit"]').count() == 0
    assert page.locator(f'form[action="/ui/endpoints/{endpoint_id}/delete"]').count() == 0
    assert page.locator('a[href^="/ui/playground"]:not(nav a)').count() == 0
