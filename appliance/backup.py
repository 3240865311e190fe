"""`appliance backup FILE` and `appliance restore FILE`: the state of an install in one file.

A backup is a gzip'd tar holding a consistent copy of the SQLite database taken with SQLite's
online backup API while the appliance runs (endpoints, replicas, events, keys as digests,
tasks, files' rows, batches, usage, the audit log), the install id (labels on every
container), the key secret (without it no stored key digest matches its key again), the
admin key the api printed on its first start when it keeps one, the uploaded and batch
files, and a manifest. It holds no model files, images, Hugging Face
cache, or Redis (queues are rebuilt from SQLite; live numbers and UI sessions start afresh).
It holds secrets: it is written readable by its owner only.

`restore` writes a backup into an empty data directory (or, with `force`, one it empties
first), points the files' rows at their new place, migrates the schema to this version, and
drops the replica rows: the builder starts every endpoint's replicas afresh.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import sqlite3
import tarfile
import tempfile
import time
import zlib
from pathlib import Path, PurePosixPath
from typing import Any

from appliance import __version__, running
from appliance.migrations import NewerSchemaError, check_known, migrate

FORMAT = 1
DATABASE = "appliance.db"
SECRETS = ("install-id", "key-secret")
# the admin key the api printed on its first start, kept where the README sends the operator
# for it; none when APPLIANCE_ADMIN_KEY chose it
KEPT = ("admin-key",)
MANIFEST = "manifest.json"
FILES_DIR = "files"
BUSY_TIMEOUT_S = 30


class BackupError(Exception):
    """A backup or restore that cannot be made; the message says why and what to do."""


def _snapshot(database: Path, target: Path) -> int:
    """A consistent copy of a live WAL database; returns its schema version."""
    source = sqlite3.connect(database, timeout=BUSY_TIMEOUT_S)
    copy = sqlite3.connect(target)
    try:
        source.backup(copy)  # one step: one read transaction, writers carry on (WAL)
        copy.execute("PRAGMA journal_mode=DELETE")  # a single self-contained file
        check = copy.execute("PRAGMA integrity_check").fetchone()[0]
        if check != "ok":
            raise BackupError(f"the copied database failed its integrity check: {check}")
        return int(copy.execute("PRAGMA user_version").fetchone()[0])
    finally:
        copy.close()
        source.close()


def _add_bytes(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), int(time.time()), 0o600
    archive.addfile(info, io.BytesIO(data))


def backup(data_dir: Path, target: Path, *, with_files: bool = True) -> dict[str, Any]:
    """Write the backup of the install in `data_dir` to `target`; returns its manifest."""
    database = data_dir / DATABASE
    if not database.is_file():
        raise BackupError(f"no database at {database}: is APPLIANCE_DATA_DIR right?")
    missing = [name for name in SECRETS if not (data_dir / name).is_file()]
    if missing:
        raise BackupError(f"{', '.join(missing)} missing from {data_dir}")
    if target.is_dir():
        raise BackupError(f"cannot write {target}: it is a directory; name a file in it")
    if not target.parent.is_dir():  # a mistyped path: no folders made for it
        raise BackupError(f"cannot write {target}: no directory {target.parent}; make it first")
    try:
        return _write(data_dir, database, target, with_files=with_files)
    except OSError as exc:  # no room, no right to write there, a file where a folder goes
        raise BackupError(f"cannot write {target}: {exc.strerror or exc}") from None


def _write(data_dir: Path, database: Path, target: Path, *, with_files: bool) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".backup-") as work:
        schema = _snapshot(database, Path(work) / DATABASE)
        files = sorted((data_dir / FILES_DIR).glob("*.jsonl")) if with_files else []
        manifest = {
            "format": FORMAT,
            "created_at": time.time(),
            "appliance_version": __version__,
            "schema_version": schema,
            "install_id": (data_dir / "install-id").read_text().strip(),
            "files": len(files),
        }
        partial = Path(work) / "backup.tar.gz"
        with tarfile.open(partial, "w:gz") as archive:
            _add_bytes(archive, MANIFEST, json.dumps(manifest, indent=2).encode())
            archive.add(Path(work) / DATABASE, DATABASE)
            for name in SECRETS:
                _add_bytes(archive, name, (data_dir / name).read_bytes())
            for name in KEPT:
                if (data_dir / name).is_file():
                    _add_bytes(archive, name, (data_dir / name).read_bytes())
            for path in files:
                archive.add(path, f"{FILES_DIR}/{path.name}")
        os.chmod(partial, 0o600)
        os.replace(partial, target)
    return manifest


def _allowed(name: str) -> bool:
    path = PurePosixPath(name)
    if name in (MANIFEST, DATABASE, *SECRETS, *KEPT):
        return True
    return len(path.parts) == 2 and path.parts[0] == FILES_DIR and path.name.endswith(".jsonl")


def _read_manifest(archive: tarfile.TarFile) -> dict[str, Any]:
    try:
        member = archive.extractfile(MANIFEST)
        manifest: dict[str, Any] = json.loads(member.read()) if member else {}
    except (KeyError, ValueError):
        raise BackupError("this file is not an appliance backup (no manifest)") from None
    if manifest.get("format") != FORMAT:
        raise BackupError(f"backup format {manifest.get('format')!r} is not {FORMAT}")
    try:  # before the target is emptied; migrate() checks the database itself again
        check_known(int(manifest.get("schema_version", 0)), "this backup")
    except NewerSchemaError as exc:
        raise BackupError(str(exc)) from None
    return manifest


def _empty(data_dir: Path, force: bool) -> None:
    if not data_dir.exists() or not any(data_dir.iterdir()):
        return
    if not force:
        raise BackupError(
            f"{data_dir} is not empty; restore into a fresh data directory, or pass --force "
            "to delete what it holds first (stop the appliance before)"
        )
    for child in data_dir.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def _repoint_files(database: Path, files_dir: Path) -> None:
    """Files' rows name their path; after a restore that is the new data directory's."""
    conn = sqlite3.connect(database, timeout=BUSY_TIMEOUT_S)
    try:
        rows = conn.execute("SELECT id, path FROM file").fetchall()
        with conn:
            for file_id, path in rows:
                moved = files_dir / PurePosixPath(str(path)).name
                conn.execute("UPDATE file SET path = ? WHERE id = ?", (str(moved), file_id))
    finally:
        conn.close()


def _forget_replicas(database: Path, manifest: dict[str, Any]) -> None:
    """The replica rows describe containers of the install the backup was taken from, which
    run no more (or, on the same box, no longer match the restored rows): drop them, so no
    request is routed to them and the builder starts each endpoint's replicas afresh (and
    removes any container of this install still running). Endpoints that were serving say
    so until their new replicas are ready."""
    taken = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(manifest.get("created_at", 0)))
    conn = sqlite3.connect(database, timeout=BUSY_TIMEOUT_S)
    try:
        with conn:
            conn.execute("DELETE FROM replica")
            now = time.time()
            conn.execute(
                "INSERT INTO event (endpoint_id, at, kind, message) "
                "SELECT id, ?, 'restored', ? FROM endpoint",
                (now, f"restored from a backup taken {taken}; starting its replicas"),
            )
            conn.execute(
                "UPDATE endpoint SET status = 'UPDATE_PENDING', status_reason = NULL "
                "WHERE status IN ('READY', 'UPDATE_IN_PROGRESS')"
            )
    finally:
        conn.close()


def restore(archive_path: Path, data_dir: Path, *, force: bool = False) -> dict[str, Any]:
    """Write the backup at `archive_path` into `data_dir`; returns its manifest."""
    if running.in_use(data_dir):
        raise BackupError(
            f"an appliance is running on {data_dir}; stop it first (a restore replaces the "
            "database its roles hold open, and what they wrote next would be lost)"
        )
    try:
        with tarfile.open(archive_path, "r:*") as archive:
            manifest = _unpack(archive, data_dir, force)
    except tarfile.ReadError:  # what tarfile says is a line for each compression it tried
        raise BackupError(f"{archive_path} is not an appliance backup (not a tar file)") from None
    except (EOFError, zlib.error) as exc:  # a copy cut short, or damaged on its way
        raise BackupError(f"{archive_path} is not a whole backup: {exc}") from None
    except (OSError, tarfile.TarError) as exc:
        raise BackupError(f"cannot read {archive_path}: {exc}") from None
    (data_dir / MANIFEST).unlink()
    kept = [name for name in KEPT if (data_dir / name).is_file()]
    for name in (DATABASE, *SECRETS, *kept):
        os.chmod(data_dir / name, 0o600)
    _repoint_files(data_dir / DATABASE, (data_dir / FILES_DIR).resolve())
    migrate(data_dir / DATABASE)
    _forget_replicas(data_dir / DATABASE, manifest)
    return manifest


def _unpack(archive: tarfile.TarFile, data_dir: Path, force: bool) -> dict[str, Any]:
    """Check the backup's entries, empty the target if allowed, extract; the manifest."""
    manifest = _read_manifest(archive)
    members = archive.getmembers()
    wrong = [m.name for m in members if not (_allowed(m.name) and m.isfile())]
    if wrong:
        raise BackupError(f"unexpected entries in the backup: {wrong[:5]}")
    if DATABASE not in {m.name for m in members}:
        raise BackupError("the backup holds no database")
    _empty(data_dir, force)
    data_dir.mkdir(parents=True, exist_ok=True)
    archive.extractall(data_dir, members=members, filter="data")
    return manifest
