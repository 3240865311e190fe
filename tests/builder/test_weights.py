"""The weights downloader (`builder/weights.py`) against the loopback hub (`tests/hub.py`), no
Docker: the cache layout vLLM reads, progress, a body cut off mid-file resumed by range, the
disk checked before any download, and each hub failure in a user's words."""

from __future__ import annotations

import hashlib
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.settings import Settings
from builder import policy
from builder.specs import HF_CACHE_MOUNT, container_spec, server_env
from builder.weights import (
    HubModel,
    Transfer,
    WeightsError,
    check_space,
    download,
    hub_model,
    present,
)
from tests.factories import make_endpoint
from tests.hub import Hub

REPO = "acme/tiny-model"
WEIGHTS_BYTES = 12 * 1024 * 1024 + 17  # over one 10 MiB write of huggingface_hub


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "repo"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "gemma3_text"}\n')
    (folder / "tokenizer_config.json").write_text("{}\n")
    (folder / "model.safetensors").write_bytes(os.urandom(WEIGHTS_BYTES))
    return folder


@pytest.fixture
def hub(model_dir: Path) -> Iterator[Hub]:
    server = Hub.serving({REPO: model_dir})
    yield server
    server.stop()


def settings(tmp_path: Path, hub: Hub, **fields: object) -> Settings:
    return Settings(data_dir=tmp_path / "data", hf_endpoint=hub.url, **fields)  # type: ignore[arg-type]


def fetched(hub: Hub) -> list[str]:
    """Requests that fetched or looked up a file (not the repository's listing)."""
    return [e.path for e in hub.log if "/resolve/" in e.path or "/_cdn/" in e.path]


def test_snapshot_lands_where_vllm_reads_it_with_progress(
    tmp_path: Path, hub: Hub, model_dir: Path
) -> None:
    hub.rate_bytes_s = 8 * 1024 * 1024
    seen: list[Transfer] = []
    where = download(HubModel(REPO), settings(tmp_path, hub), seen.append)
    cache = tmp_path / "data/hf-cache/hub/models--acme--tiny-model"
    assert where == cache / "snapshots" / (cache / "refs/main").read_text()
    weights = (where / "model.safetensors").read_bytes()
    assert weights == (model_dir / "model.safetensors").read_bytes()
    assert seen[0].done_bytes == 0 and seen[0].total_files == 3
    assert seen[-1] == Transfer(seen[-1].total_bytes, seen[-1].total_bytes, 3, 3)
    assert any(0 < t.done_bytes < t.total_bytes for t in seen), "no progress in between"
    assert [t.done_bytes for t in seen] == sorted(t.done_bytes for t in seen)


def test_a_body_cut_off_mid_file_resumes_by_range(
    tmp_path: Path, hub: Hub, model_dir: Path
) -> None:
    hub.cut_after, hub.cuts = 11 * 1024 * 1024, 1
    where = download(HubModel(REPO), settings(tmp_path, hub), lambda _: None)
    body = (where / "model.safetensors").read_bytes()
    assert (
        hashlib.sha256(body).digest()
        == hashlib.sha256((model_dir / "model.safetensors").read_bytes()).digest()
    )
    gets = hub.gets("/model.safetensors")
    assert len(gets) == 2 and gets[0].range is None, gets
    assert gets[1].range is not None and gets[1].status == 206


def test_a_model_that_does_not_fit_is_refused_before_any_download(tmp_path: Path, hub: Hub) -> None:
    capped = settings(tmp_path, hub, hf_cache_max_bytes=1_000_000)
    with pytest.raises(WeightsError) as refused:
        download(HubModel(REPO), capped, lambda _: None)
    assert "it needs 12.6 MB, 1.0 MB free" in refused.value.message
    assert fetched(hub) == []
    assert not list((tmp_path / "data/hf-cache/hub").glob("models--*/blobs/*"))


def test_a_download_leaves_the_disk_its_reserve(tmp_path: Path, hub: Hub) -> None:
    """The cache shares its disk with the database (in compose, the host's disk): a download
    any team may ask for fills it only to APPLIANCE_DISK_RESERVE_BYTES, as uploads, tasks and
    batches do. Before, it was checked against the whole free space, down to the last byte."""
    reserved = settings(tmp_path, hub, disk_reserve_bytes=2**50)  # more than any disk has
    with pytest.raises(WeightsError) as refused:
        download(HubModel(REPO), reserved, lambda _: None)
    assert "it needs 12.6 MB, 0 B free" in refused.value.message, refused.value.message
    assert "APPLIANCE_DISK_RESERVE_BYTES" in refused.value.message
    assert fetched(hub) == []


def test_the_space_check_counts_what_is_already_downloaded(tmp_path: Path, hub: Hub) -> None:
    first = settings(tmp_path, hub)
    download(HubModel(REPO), first, lambda _: None)
    again = settings(tmp_path, hub, hf_cache_max_bytes=WEIGHTS_BYTES + 100_000)
    assert download(HubModel(REPO), again, lambda _: None).is_dir()  # nothing left to fetch


@pytest.mark.parametrize(
    ("switch", "model", "token", "words"),
    [
        ({"answer": 404}, HubModel(REPO), None, "has no model 'acme/tiny-model'"),
        ({}, HubModel("acme/nothing-here"), None, "has no model 'acme/nothing-here'"),
        ({}, HubModel(REPO, "v9"), None, "has no revision 'v9' of acme/tiny-model"),
        ({}, HubModel(REPO, "../../../x"), None, "is not a branch, tag or commit"),
        ({"answer": 401}, HubModel(REPO), "hf_wrong", "refused the Hugging Face token (401"),
        ({"gated": {REPO}}, HubModel(REPO), None, "is a gated model: it needs a Hugging Face"),
        ({"gated": {REPO}}, HubModel(REPO), "hf_other", "token (APPLIANCE_HF_TOKEN) has no access"),
    ],
)
def test_hub_refusals_in_words(
    tmp_path: Path,
    hub: Hub,
    switch: dict[str, object],
    model: HubModel,
    token: str | None,
    words: str,
) -> None:
    for name, value in switch.items():
        setattr(hub, name, value)
    with pytest.raises(WeightsError) as failed:
        download(model, settings(tmp_path, hub, hf_token=token), lambda _: None)
    assert words in failed.value.message
    assert fetched(hub) == []


def test_a_gated_model_downloads_with_a_granted_token(tmp_path: Path, hub: Hub) -> None:
    hub.gated, hub.granted_tokens = {REPO}, {"hf_granted"}
    where = download(HubModel(REPO), settings(tmp_path, hub, hf_token="hf_granted"), print)
    assert (where / "config.json").is_file()


def test_an_unreachable_hub_is_named(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    gone = Settings(data_dir=tmp_path / "data", hf_endpoint=f"http://127.0.0.1:{port}")
    with pytest.raises(WeightsError) as failed:
        download(HubModel(REPO), gone, lambda _: None)
    assert f"cannot reach http://127.0.0.1:{port} to download acme/tiny-model" in str(failed.value)


def test_which_endpoints_get_their_weights_fetched_and_run_offline(tmp_path: Path) -> None:
    on = Settings(data_dir=tmp_path)
    off = Settings(data_dir=tmp_path, hf_download_weights=False)
    hub_vllm = make_endpoint(model="acme/tiny-model", args={"revision": "v1"})
    assert hub_model(hub_vllm, on) == HubModel("acme/tiny-model", "v1")
    assert server_env(hub_vllm, on)["HF_HUB_OFFLINE"] == "1"
    assert hub_model(hub_vllm, off) is None and "HF_HUB_OFFLINE" not in server_env(hub_vllm, off)
    local = make_endpoint(model="/models/gemma-hf")
    assert hub_model(local, on) is None and server_env(local, off)["HF_HUB_OFFLINE"] == "1"
    assert hub_model(make_endpoint(framework="llamacpp", model="/models/m.gguf"), on) is None
    other_tokenizer = make_endpoint(model="acme/tiny-model", args={"tokenizer": "acme/tok"})
    assert hub_model(other_tokenizer, on) == HubModel("acme/tiny-model")
    assert "HF_HUB_OFFLINE" not in server_env(other_tokenizer, on)  # it fetches the tokenizer


def test_only_a_replica_that_asks_the_hub_may_write_the_shared_cache_or_read_the_token(
    tmp_path: Path,
) -> None:
    """Every team's vLLM replicas mount the one Hugging Face cache: those that never ask the
    hub get it read-only and no token; one that does gets the token in a file of its own
    container, never in the cache the others read."""
    on = Settings(data_dir=tmp_path, hf_token="hf_secret")
    off = Settings(data_dir=tmp_path, hf_token="hf_secret", hf_download_weights=False)

    def spec(endpoint: object, settings: Settings) -> tuple[bool, dict[str, bytes], dict[str, str]]:
        made = container_spec(
            endpoint,  # type: ignore[arg-type]
            settings=settings,
            install_id="i",
            replica_id="rep_1",
            gpu_ids=(),
            gpu_fraction=0.0,
        )
        cache = next(m for m in made.mounts if m.target == HF_CACHE_MOUNT)
        sources = [m.source for m in made.mounts]
        policy.check_spec(made, allowed_sources=sources, writable=[cache.source])  # creatable
        return cache.read_only, made.files, made.env

    hub_vllm = make_endpoint(model="acme/tiny-model")
    for endpoint, settings in ((hub_vllm, on), (make_endpoint(model="/models/gemma-hf"), off)):
        read_only, files, env = spec(endpoint, settings)
        assert read_only and files == {} and "HF_TOKEN_PATH" not in env
        assert env["HF_MODULES_CACHE"] == "/root/.hf-modules"  # not the read-only cache
    read_only, files, env = spec(hub_vllm, off)  # the replica downloads its weights itself
    assert not read_only and "HF_HUB_OFFLINE" not in env
    assert files == {env["HF_TOKEN_PATH"]: b"hf_secret"}
    assert not env["HF_TOKEN_PATH"].startswith(HF_CACHE_MOUNT)


def test_present_only_when_the_whole_snapshot_is_in_the_cache(tmp_path: Path, hub: Hub) -> None:
    cache = settings(tmp_path, hub)
    assert not present(HubModel(REPO), cache)
    hub.cut_after, hub.cuts = 11 * 1024 * 1024, 10  # huggingface_hub gives up after 5 tries
    with pytest.raises(WeightsError) as broken:
        download(HubModel(REPO), cache, lambda _: None)
    assert "the download of acme/tiny-model from http://127.0.0.1" in broken.value.message
    assert not present(HubModel(REPO), cache)  # the listing is there, the weights are not
    hub.cuts = 0
    download(HubModel(REPO), cache, lambda _: None)
    assert present(HubModel(REPO), cache) and not present(HubModel(REPO, "v2"), cache)


def test_a_partial_file_left_by_a_stopped_download_is_resumed_by_range(
    tmp_path: Path, hub: Hub, model_dir: Path
) -> None:
    weights = (model_dir / "model.safetensors").read_bytes()
    sha = hashlib.sha256(weights).hexdigest()
    blobs = tmp_path / "data/hf-cache/hub/models--acme--tiny-model/blobs"
    blobs.mkdir(parents=True)
    (blobs / f"{sha}.0badc0de.incomplete").write_bytes(weights[:5_000_000])  # a killed process's
    (blobs / f"{sha}.deadbeef.incomplete").write_bytes(weights[:1_000])  # an older one
    seen: list[Transfer] = []
    where = download(HubModel(REPO), settings(tmp_path, hub), seen.append)
    assert (where / "model.safetensors").read_bytes() == weights
    assert seen[0].done_bytes >= 5_000_000  # counted as done from the start
    (again,) = hub.gets("/model.safetensors")
    assert again.range == "bytes=5000000-" and again.sent == len(weights) - 5_000_000
    assert not list(blobs.glob("*.incomplete"))


def test_the_refusal_says_the_numbers_and_what_to_do() -> None:
    big = HubModel("acme/big")
    with pytest.raises(WeightsError) as disk:
        check_space(big, Transfer(0, 16_100_000_000, 0, 9), 9_800_000_000, capped=False)
    assert disk.value.message == (
        "acme/big does not fit in the Hugging Face cache: it needs 16.1 GB, 9.8 GB free; "
        "delete models no endpoint uses, or add disk space (APPLIANCE_DISK_RESERVE_BYTES of it "
        "stay free)"
    )
    with pytest.raises(WeightsError) as capped:
        check_space(big, Transfer(4_000_000_000, 16_100_000_000, 3, 9), 2_000_000_000, True)
    assert "it needs 12.1 GB, 2.0 GB free (4.0 GB already downloaded)" in capped.value.message
    assert capped.value.message.endswith("raise APPLIANCE_HF_CACHE_MAX_BYTES")
    check_space(big, Transfer(4_000_000_000, 16_100_000_000, 3, 9), 12_100_000_000, True)
