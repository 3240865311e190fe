"""The storage API on a real api process (real Redis, SQLite, a private models directory and
Hugging Face cache): GGUF uploads streamed to disk with their sha256, refused names, bodies
over the limit and interrupted uploads that leave nothing behind, "used by" per team, deletes
refused while an endpoint uses the file or snapshot, and the disk figures."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import socket
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from api import model_upload
from appliance.errors import InsufficientStorageError
from appliance.settings import Settings
from tests.api.test_tenancy import team_key
from tests.e2e.lifecycle import standin_body
from tests.harness import (
    ADMIN_KEY,
    GEMMA_FILE,
    MODELS_DIR,
    Appliance,
    RedisServer,
    make_key,
    wait_until,
)

LIMIT_BYTES = 1024 * 1024
GGUF = b"GGUF" + os.urandom(300_000)


@contextmanager
def started_store(workdir: Path, limit: int, **env: str) -> Iterator[Appliance]:
    """The api alone, with its own models directory and HF cache, and an upload limit."""
    redis = RedisServer(workdir / "redis").start()
    (workdir / "models").mkdir()
    appliance = Appliance(
        workdir / "api",
        redis,
        env_extra={
            "APPLIANCE_MODELS_DIR": str(workdir / "models"),
            "APPLIANCE_HF_CACHE_DIR": str(workdir / "hf"),
            "APPLIANCE_MODEL_UPLOAD_MAX_BYTES": str(limit),
            **env,
        },
    ).start(roles=("api",))
    try:
        yield appliance
    finally:
        print(appliance.logs())
        appliance.stop()
        redis.stop()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Appliance]:
    with started_store(tmp_path, LIMIT_BYTES) as appliance:
        yield appliance


def models_dir(appliance: Appliance) -> Path:
    return Path(appliance.env()["APPLIANCE_MODELS_DIR"])


def everything_in(folder: Path) -> list[str]:
    """Every name in the folder, hidden ones (uploads in progress) included."""
    return sorted(os.listdir(folder))


def upload(client: httpx.Client, name: str, body: Any, **params: Any) -> httpx.Response:
    return client.put(f"/v1/storage/model-files/{name}", content=body, params=params)


def listed(client: httpx.Client) -> dict[str, dict[str, Any]]:
    reply = client.get("/v1/storage/model-files")
    assert reply.status_code == 200, reply.text
    return {entry["name"]: entry for entry in reply.json()["data"]}


def test_upload_is_streamed_checked_and_listed(store: Appliance) -> None:
    admin, folder = store.client(), models_dir(store)
    made = upload(admin, "tiny.gguf", GGUF)
    assert made.status_code == 201, made.text
    assert made.json() == {
        "name": "tiny.gguf",
        "bytes": len(GGUF),
        "sha256": hashlib.sha256(GGUF).hexdigest(),
        "replaced": False,
        "model": "/models/tiny.gguf",
    }
    assert (folder / "tiny.gguf").read_bytes() == GGUF
    entry = listed(admin)["tiny.gguf"]
    assert (entry["size_bytes"], entry["kind"], entry["gguf"]) == (len(GGUF), "file", True)
    assert (entry["used_by"], entry["used_by_other_teams"]) == ([], 0)

    # The same name again: refused unless an administrator asks to replace it.
    again = upload(admin, "tiny.gguf", b"GGUF" + b"x" * 10)
    assert again.status_code == 409 and "overwrite=true" in again.json()["detail"]
    assert (folder / "tiny.gguf").read_bytes() == GGUF
    team = httpx.Client(base_url=store.url, headers={"x-api-key": team_key(admin, "red")})
    assert upload(team, "tiny.gguf", b"GGUF1", overwrite="true").status_code == 403
    replaced = upload(admin, "tiny.gguf", b"GGUF" + b"y" * 10, overwrite="true")
    assert replaced.status_code == 201 and replaced.json()["replaced"] is True
    assert (folder / "tiny.gguf").read_bytes() == b"GGUF" + b"y" * 10

    # A team's key with `manage` uploads too; a key without it does not.
    assert upload(team, "red.gguf", GGUF).status_code == 201
    reader = admin.post("/v1/api-keys", json={"name": "ro", "scopes": ["inference"]}).json()
    ro = httpx.Client(base_url=store.url, headers={"x-api-key": reader["key"]})
    assert upload(ro, "ro.gguf", GGUF).status_code == 403
    assert everything_in(folder) == ["red.gguf", "tiny.gguf"]
    disk = admin.get("/v1/storage/disk").json()
    assert 0 < disk["models_dir"]["free_bytes"] <= disk["models_dir"]["total_bytes"]
    assert disk["hf_cache"]["path"].endswith("/hf")


@pytest.mark.parametrize(
    ("name", "status"),
    [
        ("notes.txt", 422),  # not .gguf
        (".hidden.gguf", 422),
        ("..gguf", 422),
        ("a b.gguf", 422),
        ("%2E%2E%2Fescape.gguf", 422),  # an encoded '/': refused by the name rule
        ("..%2F..%2Fescape.gguf", 422),
        ("sub%2Fescape.gguf", 422),
    ],
)
def test_bad_names_are_refused(store: Appliance, name: str, status: int) -> None:
    reply = upload(store.client(), name, GGUF)
    assert reply.status_code == status, reply.text
    assert everything_in(models_dir(store)) == []
    assert not (models_dir(store).parent / "escape.gguf").exists()


def test_a_file_that_is_not_gguf_leaves_nothing(store: Appliance) -> None:
    reply = upload(store.client(), "fake.gguf", b"PK\x03\x04" + b"z" * 100_000)
    assert reply.status_code == 422 and "GGUF" in reply.json()["detail"]
    assert everything_in(models_dir(store)) == []


def test_over_the_limit_leaves_nothing(store: Appliance) -> None:
    admin, folder = store.client(), models_dir(store)
    big = b"GGUF" + b"\0" * LIMIT_BYTES
    declared = upload(admin, "big.gguf", big)  # Content-Length: refused before reading
    assert declared.status_code == 413, declared.text
    page = httpx.put(store.url + "/ui/models/files/big.gguf", content=big)  # the UI's: one rule
    assert page.status_code == 413, page.text

    def chunks() -> Iterator[bytes]:  # no length: cut once it passes the limit
        for start in range(0, len(big), 64 * 1024):
            yield big[start : start + 64 * 1024]

    chunked = upload(admin, "big.gguf", chunks())
    assert chunked.status_code == 413, chunked.text
    wait_until(lambda: everything_in(folder) == [], 10, "no partial file left")
    assert "big.gguf" not in listed(admin)


def test_uploads_leave_the_disk_its_reserve(tmp_path: Path) -> None:
    """With less free than APPLIANCE_DISK_RESERVE_BYTES (here: more than any disk has), no
    upload is written, model file or batch file, declared or streamed: 507, nothing left."""
    with started_store(tmp_path, LIMIT_BYTES, APPLIANCE_DISK_RESERVE_BYTES=str(2**50)) as store:
        admin, folder = store.client(), models_dir(store)
        model = b"GGUF" + b"\0" * 1024
        declared = upload(admin, "m.gguf", model)
        assert declared.status_code == 507, declared.text
        assert "APPLIANCE_DISK_RESERVE_BYTES" in declared.text
        streamed = upload(admin, "m.gguf", iter([model[:512], model[512:]]))
        assert streamed.status_code == 507, streamed.text
        wait_until(lambda: everything_in(folder) == [], 10, "no partial file left")
        batch = admin.post(
            "/v1/files", data={"purpose": "batch"}, files={"file": ("in.jsonl", b"{}\n")}
        )
        assert batch.status_code == 507, batch.text
        assert admin.get("/v1/files").json()["data"] == []
        # OpenAI's SDK sends a 5xx twice more (the whole file each time) unless told not to:
        # no wait frees the disk
        sent: list[str] = []
        hooks = {"request": [lambda request: sent.append(request.url.path)]}
        sdk = openai.OpenAI(
            base_url=store.url + "/v1",
            api_key=ADMIN_KEY,
            http_client=httpx.Client(event_hooks=hooks),
        )
        with pytest.raises(openai.InternalServerError) as full:
            sdk.files.create(file=("in.jsonl", b"{}\n"), purpose="batch")
        assert full.value.status_code == 507
        assert full.value.response.headers["x-should-retry"] == "false"
        assert sent == ["/v1/files"]


def test_a_disk_that_fills_as_the_upload_ends_is_a_507_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The disk filled up under an upload's last bytes (held in the file's buffer until it is
    synced): a 500, and the partial file stayed in the models directory for good, since
    discarding it flushed the same buffer again, failed, and never removed it."""
    settings = Settings(models_dir=tmp_path / "models", data_dir=tmp_path / "data")
    settings.models_dir.mkdir()
    partial = settings.models_dir / ".partial-full-m.gguf"

    def on_a_full_disk(_: Settings, name: str) -> model_upload.Upload:
        partial.touch()
        return model_upload.Upload(settings.models_dir / name, partial, open("/dev/full", "wb"))

    async def body() -> AsyncIterator[bytes]:
        yield b"GGUF" + b"\0" * 1024

    monkeypatch.setattr(model_upload, "_open", on_a_full_disk)
    with pytest.raises(InsufficientStorageError, match="disk filled up"):
        asyncio.run(model_upload.receive("m.gguf", body(), settings, lambda size: None))
    assert list(settings.models_dir.iterdir()) == []


def test_tasks_and_batches_leave_the_disk_its_reserve(tmp_path: Path) -> None:
    """Async tasks and the requests of a batch are rows of the database, on the data
    directory's disk: with less free than the reserve they are refused with 507 like uploads,
    and nothing is stored. Before, a team filled the disk with them, 2 MiB a task, or a whole
    batch file copied into the database again with each batch made from it."""
    with started_store(tmp_path, LIMIT_BYTES) as store:
        admin = store.client()
        key = team_key(admin, "red")
        red = httpx.Client(base_url=store.url, headers={"x-api-key": key}, timeout=60)
        body = standin_body("disk", gpus=0, min_workers=0)
        made = red.post("/v1/model-endpoints", json=body)
        assert made.status_code == 200, made.text
        endpoint_id = made.json()["endpoint_creation_task_id"]
        line = {
            "custom_id": "1",
            "method": "POST",
            "url": "/v1/completions",
            "body": {"model": "disk", "prompt": "p", "max_tokens": 1},
        }
        upload = red.post(
            "/v1/files",
            data={"purpose": "batch"},
            files={"file": ("in.jsonl", json.dumps(line).encode() + b"\n")},
        )
        assert upload.status_code == 200, upload.text
        # the same install, now with less free than its reserve
        store.stop_role("api")
        store.env_extra["APPLIANCE_DISK_RESERVE_BYTES"] = str(2**50)
        store.start(roles=())

        task = red.post(
            "/v1/async-tasks",
            params={"model_endpoint_id": endpoint_id},
            json={"args": {"prompt": "p", "max_tokens": 1}},
        )
        assert task.status_code == 507, task.text
        assert "APPLIANCE_DISK_RESERVE_BYTES" in task.json()["detail"]
        batch = red.post(
            "/v1/batches",
            json={
                "input_file_id": upload.json()["id"],
                "endpoint": "/v1/completions",
                "completion_window": "24h",
            },
        )
        assert batch.status_code == 507, batch.text
        assert "APPLIANCE_DISK_RESERVE_BYTES" in batch.json()["error"]["message"]
        completions = red.post(
            "/v2/batch-completions",
            json={
                "content": [{"prompt": "p", "max_tokens": 1}],
                "output_data_path": "out",
                "model_config": {"model": "disk"},
            },
        )
        assert completions.status_code == 507, completions.text
        assert red.get("/v1/batches").json()["data"] == []


def test_an_interrupted_upload_leaves_nothing(store: Appliance) -> None:
    """The client sends half of a declared body and closes the connection."""
    folder = models_dir(store)
    head = (
        "PUT /v1/storage/model-files/cut.gguf HTTP/1.1\r\n"
        f"Host: 127.0.0.1:{store.port}\r\n"
        f"Authorization: Bearer {ADMIN_KEY}\r\n"
        "Content-Type: application/octet-stream\r\n"
        f"Content-Length: {len(GGUF)}\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", store.port)) as sock:
        sock.sendall(head.encode() + GGUF[: len(GGUF) // 2])
        wait_until(
            lambda: any(n.startswith(".upload-") for n in everything_in(folder)),
            10,
            "the upload to start writing",
        )
    wait_until(lambda: everything_in(folder) == [], 15, "the partial upload to be removed")
    assert "cut.gguf" not in listed(store.client())


def test_delete_is_refused_while_in_use_and_used_by_is_per_team(store: Appliance) -> None:
    admin, folder = store.client(), models_dir(store)
    red_key, blue_key = team_key(admin, "red"), team_key(admin, "blue")
    red = httpx.Client(base_url=store.url, headers={"x-api-key": red_key})
    blue = httpx.Client(base_url=store.url, headers={"x-api-key": blue_key})
    assert upload(admin, "used.gguf", GGUF).status_code == 201
    assert upload(admin, "spare.gguf", GGUF).status_code == 201
    body = {
        "name": "red-gemma",
        "model_name": "used.gguf",
        "inference_framework": "llamacpp",
        "gpus": 0,
        "min_workers": 0,
        "max_workers": 1,
        "per_worker": 1,
        "labels": {},
        "metadata": {},
    }
    made = red.post("/v1/llm/model-endpoints", json=body)
    assert made.status_code == 200, made.text

    mine, theirs = listed(red)["used.gguf"], listed(blue)["used.gguf"]
    assert [u["name"] for u in mine["used_by"]] == ["red-gemma"]
    assert (mine["used_by_other_teams"], theirs["used_by"], theirs["used_by_other_teams"]) == (
        0,
        [],
        1,
    )
    assert red.delete("/v1/storage/model-files/spare.gguf").status_code == 403  # admins only
    refused = admin.delete("/v1/storage/model-files/used.gguf")
    assert refused.status_code == 409
    assert "red-gemma" in refused.json()["detail"]
    assert (folder / "used.gguf").read_bytes() == GGUF
    replace = upload(admin, "used.gguf", GGUF, overwrite="true")
    assert replace.status_code == 409 and "red-gemma" in replace.json()["detail"]

    gone = admin.delete("/v1/storage/model-files/spare.gguf")
    assert gone.status_code == 200, gone.text
    assert gone.json() == {"name": "spare.gguf", "deleted": True, "freed_bytes": len(GGUF)}
    assert everything_in(folder) == ["used.gguf"]
    assert admin.delete("/v1/storage/model-files/spare.gguf").status_code == 404
    actions = [
        e["action"] for e in admin.get("/v1/audit", params={"action": "model."}).json()["entries"]
    ]
    assert actions == ["model.delete", "model.upload", "model.upload"]


def fake_hub_repo(hub: Path, repo_id: str, content: bytes) -> None:
    """A model in the Hugging Face cache's layout, as huggingface_hub writes it."""
    repo = hub / ("models--" + repo_id.replace("/", "--"))
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    blob = hashlib.sha256(content).hexdigest()
    (repo / "blobs").mkdir(parents=True)
    (repo / "blobs" / blob).write_bytes(content)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot / "model.safetensors").symlink_to(f"../../blobs/{blob}")


def test_hf_models_listed_with_users_and_deleted_when_unused(store: Appliance) -> None:
    admin = store.client()
    hub = Path(store.env()["APPLIANCE_HF_CACHE_DIR"]) / "hub"
    assert admin.get("/v1/storage/hf-models").json()["data"] == []  # no cache yet
    fake_hub_repo(hub, "acme/cached-1b", b"w" * 5000)
    fake_hub_repo(hub, "acme/unused-1b", b"u" * 3000)
    body = standin_body("cached", model_name="acme/cached-1b", gpus=0, min_workers=0)
    assert admin.post("/v1/llm/model-endpoints", json=body).status_code == 200

    found = {r["repo_id"]: r for r in admin.get("/v1/storage/hf-models").json()["data"]}
    assert sorted(found) == ["acme/cached-1b", "acme/unused-1b"]
    cached = found["acme/cached-1b"]
    assert (cached["size_bytes"], cached["files"]) == (5000, 1)
    assert [r["refs"] for r in cached["revisions"]] == [["main"]]
    assert [u["name"] for u in cached["used_by"]] == ["cached"]
    assert found["acme/unused-1b"]["used_by"] == []

    refused = admin.delete("/v1/storage/hf-models/acme/cached-1b")
    assert refused.status_code == 409 and "cached" in refused.json()["detail"]
    gone = admin.delete("/v1/storage/hf-models/acme/unused-1b")
    assert gone.status_code == 200, gone.text
    assert gone.json()["freed_bytes"] == 3000
    assert not (hub / "models--acme--unused-1b").exists()
    assert admin.delete("/v1/storage/hf-models/acme/unused-1b").status_code == 404
    left = [r["repo_id"] for r in admin.get("/v1/storage/hf-models").json()["data"]]
    assert left == ["acme/cached-1b"]


def test_a_model_being_downloaded_ahead_is_not_deleted_under_its_download(
    store: Appliance,
) -> None:
    """No builder runs here: the download asked for stays pending, as it would while the
    builder fetches it."""
    admin = store.client()
    fake_hub_repo(Path(store.env()["APPLIANCE_HF_CACHE_DIR"]) / "hub", "acme/fetching-1b", b"f")
    asked = admin.post("/v1/storage/hf-downloads", json={"repository": "acme/fetching-1b"})
    assert asked.status_code == 202, asked.text
    refused = admin.delete("/v1/storage/hf-models/acme/fetching-1b")
    assert refused.status_code == 409, refused.text
    assert "being downloaded ahead of time (revision main)" in refused.json()["detail"]
    found = [r["repo_id"] for r in admin.get("/v1/storage/hf-models").json()["data"]]
    assert found == ["acme/fetching-1b"]


@pytest.mark.parametrize(
    "repository",
    ["acme/..", "acme/x..y", "acme--x/y", "acme/y-", "acme/.y", "acme/y.git", "a/" + "b" * 97],
)
def test_a_repository_id_the_hub_refuses_is_refused_when_asked(
    store: Appliance, repository: str
) -> None:
    """The hub's own rule for an id (no '..' or '--', no name starting or ending with '.' or
    '-', none ending '.git', at most 96 characters a part): taken, the download failed in the
    builder with huggingface_hub's words after it was listed as pending."""
    admin = store.client()
    refused = admin.post("/v1/storage/hf-downloads", json={"repository": repository})
    assert refused.status_code == 422, refused.text
    assert "repository" in json.dumps(refused.json()["detail"]), refused.text
    assert admin.get("/v1/storage/hf-downloads").json()["downloads"] == []


def test_a_team_has_a_few_downloads_open_at_once(tmp_path: Path) -> None:
    """Each download ahead of time runs a download of its own in the builder: a team has at
    most APPLIANCE_MAX_DOWNLOADS_PER_TEAM open (asking again for an open one counts once; an
    administrator is never refused), and the one too many is refused with nothing written
    for the builder. No builder runs here: downloads stay pending."""
    with started_store(tmp_path, LIMIT_BYTES, APPLIANCE_MAX_DOWNLOADS_PER_TEAM="2") as store:
        team = store.client(make_key(store, "acme"))
        for name in ("acme/one-1b", "acme/two-1b", "acme/one-1b"):
            asked = team.post("/v1/storage/hf-downloads", json={"repository": name})
            assert asked.status_code == 202, asked.text
        refused = team.post("/v1/storage/hf-downloads", json={"repository": "acme/three-1b"})
        assert refused.status_code == 409, refused.text
        said = refused.json()["detail"]
        assert "2 Hugging Face downloads pending or under way" in said, said
        assert "APPLIANCE_MAX_DOWNLOADS_PER_TEAM" in said, said
        admin = store.client()
        assert admin.post("/v1/storage/hf-downloads", json={"repository": "x/y"}).status_code == 202
        listed = [
            d["repository"] for d in admin.get("/v1/storage/hf-downloads").json()["downloads"]
        ]
        assert sorted(listed) == ["acme/one-1b", "acme/two-1b", "x/y"]


def peak_memory_bytes(pid: int) -> int:
    """The process's largest resident size so far (VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc")


def test_a_large_upload_is_streamed_not_held_in_memory(tmp_path: Path) -> None:
    """The real model (about 240 MiB) goes through while the api's peak memory grows by far
    less than its size."""
    gemma = MODELS_DIR / GEMMA_FILE
    with started_store(tmp_path, 2**40) as appliance, gemma.open("rb") as body:
        pid = appliance.procs["api"].pid
        before = peak_memory_bytes(pid)
        made = upload(appliance.client(), GEMMA_FILE, body)
        assert made.status_code == 201, made.text
        grown = peak_memory_bytes(pid) - before
        assert made.json()["sha256"] == hashlib.sha256(gemma.read_bytes()).hexdigest()
        assert grown < gemma.stat().st_size / 4, f"the api grew by {grown} bytes"
        assert everything_in(models_dir(appliance)) == [GEMMA_FILE]


def test_an_upload_cut_by_a_stopped_api_is_removed_at_the_next_start(store: Appliance) -> None:
    """The api killed mid-upload leaves its hidden partial file; the next start removes it."""
    folder = models_dir(store)
    head = (
        "PUT /v1/storage/model-files/killed.gguf HTTP/1.1\r\n"
        f"Host: 127.0.0.1:{store.port}\r\n"
        f"Authorization: Bearer {ADMIN_KEY}\r\n"
        f"Content-Length: {len(GGUF)}\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", store.port)) as sock:
        sock.sendall(head.encode() + GGUF[:100_000])
        wait_until(
            lambda: any(n.startswith(".upload-") for n in everything_in(folder)),
            10,
            "the upload to start writing",
        )
        store.stop_role("api", signal.SIGKILL)
    assert any(n.startswith(".upload-") for n in everything_in(folder))
    store.start_role("api")
    wait_until(lambda: everything_in(folder) == [], 30, "the partial file to be removed")


def test_a_team_uploads_at_most_its_quota_of_model_files(tmp_path: Path) -> None:
    """Any team's key with `manage` uploads model files, and only an administrator deletes
    them: one team's uploads count against APPLIANCE_MAX_MODEL_BYTES_PER_TEAM, so it cannot
    fill the models disk every team shares; refused before the body is read when its length
    is declared, as it passes the quota when it is not, leaving nothing behind."""
    quota = 2 * len(GGUF) + 1000
    with started_store(
        tmp_path, LIMIT_BYTES, APPLIANCE_MAX_MODEL_BYTES_PER_TEAM=str(quota)
    ) as store:
        admin, folder = store.client(), models_dir(store)
        red = store.client(make_key(store, "red"))
        assert upload(red, "a.gguf", GGUF).status_code == 201
        assert upload(red, "b.gguf", GGUF).status_code == 201
        refused = upload(red, "c.gguf", GGUF)
        assert refused.status_code == 409, refused.text
        said = refused.json()["detail"]
        assert "APPLIANCE_MAX_MODEL_BYTES_PER_TEAM" in said and str(2 * len(GGUF)) in said, said
        assert "administrator" in said, said

        def chunks() -> Iterator[bytes]:  # no length declared: refused as it passes
            yield from (GGUF[i : i + 65536] for i in range(0, len(GGUF), 65536))

        cut = upload(red, "c.gguf", chunks())
        assert cut.status_code == 409, cut.text
        assert everything_in(folder) == ["a.gguf", "b.gguf"]
        listing = red.get("/v1/storage/model-files").json()
        assert (listing["team_bytes"], listing["team_max_bytes"]) == (2 * len(GGUF), quota)

        blue = store.client(make_key(store, "blue"))
        assert upload(blue, "c.gguf", GGUF).status_code == 201  # its own room
        assert upload(admin, "big.gguf", GGUF * 3).status_code == 201  # never refused
        assert admin.delete("/v1/storage/model-files/a.gguf").status_code == 200
        assert upload(red, "d.gguf", GGUF).status_code == 201  # room again
