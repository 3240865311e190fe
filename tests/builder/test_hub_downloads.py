"""Downloads asked for ahead of time, without Docker: the api's routes write the request and
read the state (real api process, real Redis), the builder's side (`HubDownloads`, driven here
tick by tick as the loop does) downloads from the loopback hub and publishes the state, a
failure is told in words and a new request retries it."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance import bus
from appliance.settings import Settings
from builder.hub_downloads import HubDownloads
from tests.harness import Appliance, make_key, wait_until
from tests.hub import Hub

REPO = "acme/tiny-model"


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[Hub]:
    folder = tmp_path / "repo"
    folder.mkdir()
    (folder / "config.json").write_text("{}\n")
    (folder / "model.safetensors").write_bytes(os.urandom(2 * 1024 * 1024))
    server = Hub.serving({REPO: folder})
    yield server
    server.stop()


def run_until_finished(downloads: HubDownloads, read: Any) -> dict[str, Any]:
    def finished() -> dict[str, Any] | None:
        downloads.tick()
        now: dict[str, Any] = read()
        return now if now["state"] in ("done", "failed") else None

    found: dict[str, Any] = wait_until(finished, 60, "the download to finish")
    return found


def test_asked_through_the_api_downloaded_by_the_builder_retried_after_a_failure(
    api_only: Appliance, hub: Hub, tmp_path: Path
) -> None:
    client = api_only.client()
    path = f"/v1/storage/hf-downloads/{REPO}"
    assert client.get(path).status_code == 404
    hub.answer = 404
    asked = client.post("/v1/storage/hf-downloads", json={"repository": REPO})
    assert asked.status_code == 202 and asked.json()["state"] == "pending", asked.text
    settings = Settings(data_dir=api_only.data_dir, hf_endpoint=hub.url)  # the api's cache
    downloads = HubDownloads(settings, bus.connect(api_only.redis.url))
    failed = run_until_finished(downloads, lambda: client.get(path).json())
    assert failed["state"] == "failed"
    assert f"{hub.url} has no model '{REPO}'" in failed["message"]

    hub.answer = None  # asked again: a new request, tried again
    assert client.post("/v1/storage/hf-downloads", json={"repository": REPO}).status_code == 202
    assert client.get(path).json()["state"] == "pending"
    done = run_until_finished(downloads, lambda: client.get(path).json())
    assert done["state"] == "done" and done["message"] is None, done
    snapshot = settings.hf_cache_path / "hub/models--acme--tiny-model/snapshots"
    assert {p.name for p in snapshot.glob("*/*")} == {"config.json", "model.safetensors"}
    fetched = len(hub.log)
    downloads.tick()  # a finished request is not looked at again
    assert len(hub.log) == fetched
    listed = client.get("/v1/storage/hf-downloads").json()["downloads"]
    assert [(d["repository"], d["state"]) for d in listed] == [(REPO, "done")]
    shutil.rmtree(snapshot.parent)  # deleted from the cache since
    assert client.get(path).json()["state"] == "removed"


def test_a_download_asked_for_runs_with_endpoint_downloads_off(
    api_only: Appliance, hub: Hub
) -> None:
    """APPLIANCE_HF_DOWNLOAD_WEIGHTS=false leaves an endpoint's weights to its replicas; a
    download asked for ahead of time still runs. It ended at once as `removed` ('deleted from
    the cache since'), with nothing fetched."""
    client = api_only.client()
    path = f"/v1/storage/hf-downloads/{REPO}"
    assert client.post("/v1/storage/hf-downloads", json={"repository": REPO}).status_code == 202
    settings = Settings(data_dir=api_only.data_dir, hf_endpoint=hub.url, hf_download_weights=False)
    downloads = HubDownloads(settings, bus.connect(api_only.redis.url))
    done = run_until_finished(downloads, lambda: client.get(path).json())
    assert done["state"] == "done", done
    snapshot = settings.hf_cache_path / "hub/models--acme--tiny-model/snapshots"
    assert {p.name for p in snapshot.glob("*/*")} == {"config.json", "model.safetensors"}
    assert client.get(path).json()["state"] == "done"


def test_the_routes_refuse_bad_names_and_keys_without_manage(api_only: Appliance) -> None:
    client = api_only.client()
    for body, field in (
        ({"repository": "no-owner"}, "repository"),
        ({"repository": "a/b", "revision": "../x y"}, "revision"),
        ({"repository": "a/b", "revision": "main/../../../x"}, "revision"),
        ({"repository": "a/b", "force": True}, "force"),
    ):
        refused = client.post("/v1/storage/hf-downloads", json=body)
        assert refused.status_code == 422 and field in refused.text, refused.text
    reader = api_only.client(make_key(api_only, "blue", scopes=("inference",)))
    assert reader.post("/v1/storage/hf-downloads", json={"repository": "a/b"}).status_code == 403
    assert reader.get("/v1/storage/hf-downloads").status_code == 403
