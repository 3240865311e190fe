"""Backup and restore of the data directory: a backup taken while writers commit is a
consistent database; restored into a fresh directory, its keys verify with the restored
secret and its files' rows point at the restored files; a non-empty directory is refused
unless forced; a file that is no backup, or carries other paths, is refused."""

from __future__ import annotations

import io
import sqlite3
import tarfile
import threading
import time
from pathlib import Path

import pytest
from sqlmodel import func, select

from appliance import backup, keys, migrations, running
from appliance.db import open_engine, session_scope
from appliance.install import install_id, key_secret
from appliance.models import Endpoint, Event, File, Replica
from tests.factories import make_endpoint


def make_install(data_dir: Path) -> str:
    engine = open_engine(data_dir / "appliance.db")
    install_id(data_dir)
    (data_dir / "files").mkdir()
    (data_dir / "files" / "file_1.jsonl").write_text('{"custom_id": "1"}\n')
    with session_scope(engine) as session:
        _, text = keys.create_key(
            session=session, secret=key_secret(data_dir), name="ci", team="red", user="r"
        )
        session.add(
            File(
                id="file_1",
                owner="red",
                created_by="r",
                purpose="batch",
                filename="in.jsonl",
                bytes=19,
                path=str(data_dir / "files" / "file_1.jsonl"),
            )
        )
        endpoint = make_endpoint(id="end_a", status="READY")
        session.add(endpoint)
        session.add(Replica(id="rep_a", endpoint_id="end_a", generation=1, container_name="c"))
    engine.dispose()
    return text


def test_backup_under_writes_restores_keys_and_files(tmp_path: Path) -> None:
    source = tmp_path / "source"
    key_text = make_install(source)
    engine = open_engine(source / "appliance.db")
    stop = threading.Event()
    written = [0]

    def write() -> None:  # the load: commits all along the backup
        while not stop.is_set():
            with session_scope(engine) as session:
                session.add(Event(endpoint_id="end_x", kind="k", message="m" * 200))
            written[0] += 1

    writer = threading.Thread(target=write)
    writer.start()
    deadline = time.monotonic() + 30
    while written[0] < 5 and time.monotonic() < deadline:
        time.sleep(0.05)
    target = tmp_path / "backups" / "one.tar.gz"
    target.parent.mkdir()
    before = written[0]
    manifest = backup.backup(source, target)
    stop.set()
    writer.join()
    assert before >= 5 and manifest["install_id"] == install_id(source)
    assert target.stat().st_mode & 0o077 == 0  # it holds the key secret: owner only

    restored = tmp_path / "restored"
    backup.restore(target, restored)
    assert install_id(restored) == install_id(source)
    fresh = open_engine(restored / "appliance.db")
    with session_scope(fresh) as session:
        caller = keys.verify(session=session, secret=key_secret(restored), key=key_text)
        events = session.exec(select(func.count()).select_from(Event)).one()
        row = session.get(File, "file_1")
    assert caller.team == "red" and before <= events <= written[0]
    assert row is not None and Path(row.path) == (restored / "files" / "file_1.jsonl").resolve()
    assert Path(row.path).read_text() == '{"custom_id": "1"}\n'
    check = sqlite3.connect(restored / "appliance.db").execute("PRAGMA integrity_check")
    assert check.fetchone()[0] == "ok"
    with session_scope(fresh) as session:  # the old install's containers are not this one's
        assert session.exec(select(func.count()).select_from(Replica)).one() == 0
        endpoint = session.get(Endpoint, "end_a")
    assert endpoint is not None and endpoint.status == "UPDATE_PENDING"


def test_restore_refuses_what_it_should(tmp_path: Path) -> None:
    source = tmp_path / "source"
    make_install(source)
    target = tmp_path / "b.tar.gz"
    backup.backup(source, target, with_files=False)
    with pytest.raises(backup.BackupError, match="not empty"):
        backup.restore(target, source)
    backup.restore(target, source, force=True)
    assert not (source / "files").exists()  # left out of this backup; the dir was emptied

    evil = tmp_path / "evil.tar.gz"
    with tarfile.open(evil, "w:gz") as archive:
        for name, data in (("manifest.json", b'{"format": 1}'), ("../escape", b"x")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    with pytest.raises(backup.BackupError, match="unexpected entries"):
        backup.restore(evil, tmp_path / "empty")
    not_one = tmp_path / "plain.txt"
    not_one.write_text("hello")
    with pytest.raises(backup.BackupError) as refused:  # one line, not tarfile's four methods
        backup.restore(not_one, tmp_path / "empty2")
    assert str(refused.value) == f"{not_one} is not an appliance backup (not a tar file)"
    cut = tmp_path / "cut.tar.gz"  # a copy that stopped half way
    cut.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    with pytest.raises(backup.BackupError, match=f"{cut} is not a whole backup: "):
        backup.restore(cut, tmp_path / "empty4")
    assert not (tmp_path / "empty4").exists()
    with pytest.raises(backup.BackupError, match=r"cannot read .*No such file"):
        backup.restore(tmp_path / "missing.tar.gz", tmp_path / "empty3")
    with pytest.raises(backup.BackupError, match="no database"):
        backup.backup(tmp_path / "nowhere", tmp_path / "x.tar.gz")


def test_a_backup_it_cannot_write_says_where_and_why(tmp_path: Path) -> None:
    """`appliance backup` onto a directory, or where it may not write, printed a traceback
    (IsADirectoryError, PermissionError) rather than a line; nothing is left behind."""
    source = tmp_path / "source"
    make_install(source)
    with pytest.raises(backup.BackupError, match=f"cannot write {tmp_path}: .*a directory"):
        backup.backup(source, tmp_path)
    blocked = tmp_path / "blocked"
    blocked.write_text("a file, where a directory would have to be")
    with pytest.raises(backup.BackupError, match=f"cannot write {blocked / 'b.tar.gz'}: "):
        backup.backup(source, blocked / "b.tar.gz")
    mistyped = tmp_path / "bakcups" / "daily" / "b.tar.gz"  # no folders are made for it
    with pytest.raises(backup.BackupError, match=f"no directory {mistyped.parent}; make it"):
        backup.backup(source, mistyped)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocked", "source"]


def test_the_admin_key_the_api_keeps_is_restored(tmp_path: Path) -> None:
    """The admin key the api printed once and keeps in the data directory (where the README
    sends the operator for it, and `appliance export` and `apply` read it) comes back with a
    restore, owner-only; an install started with APPLIANCE_ADMIN_KEY keeps none, and its
    backup restores without one."""
    source = tmp_path / "source"
    make_install(source)
    (source / "admin-key").write_text("mea_0123456789ab_abcdefghijklmnopqrstuvwx\n")
    backup.backup(source, tmp_path / "with.tar.gz")
    restored = tmp_path / "restored"
    backup.restore(tmp_path / "with.tar.gz", restored)
    kept = restored / "admin-key"
    assert kept.read_text() == (source / "admin-key").read_text()
    assert kept.stat().st_mode & 0o077 == 0

    (source / "admin-key").unlink()
    backup.backup(source, tmp_path / "without.tar.gz")
    backup.restore(tmp_path / "without.tar.gz", tmp_path / "bare")
    assert not (tmp_path / "bare" / "admin-key").exists()


def test_restore_refuses_a_data_directory_a_running_appliance_uses(tmp_path: Path) -> None:
    """`restore --force` into the data directory of a running appliance emptied it under its
    roles: their database was deleted while they held it open, so what they wrote after (an
    endpoint made a moment later) went to a file no one would read again. Refused while any
    role runs there; allowed once they stop."""
    source = tmp_path / "source"
    make_install(source)
    target = tmp_path / "b.tar.gz"
    backup.backup(source, target, with_files=False)
    api = running.hold(source, "api")
    try:
        with pytest.raises(backup.BackupError, match="an appliance is running on"):
            backup.restore(target, source, force=True)
        assert (source / "files" / "file_1.jsonl").is_file()  # nothing was emptied
    finally:
        api.release()
    backup.restore(target, source, force=True)


def test_a_second_builder_on_one_data_directory_refuses_to_start(tmp_path: Path) -> None:
    first = running.hold(tmp_path, "builder")
    try:
        with pytest.raises(running.AlreadyRunningError, match="another builder runs on"):
            running.hold(tmp_path, "builder")
        running.hold(tmp_path, "worker").release()  # other roles are many
    finally:
        first.release()
    running.hold(tmp_path, "builder").release()  # free again once the first stopped


def test_a_backup_a_later_release_took_is_refused_and_nothing_is_touched(tmp_path: Path) -> None:
    """A backup whose schema is newer than this release's was restored as if it were this
    release's: its roles then ran on tables they do not know. It is refused, naming both
    versions, before the target (even with --force) is emptied."""
    source = tmp_path / "source"
    make_install(source)
    conn = sqlite3.connect(source / "appliance.db")
    conn.execute(f"PRAGMA user_version = {len(migrations.MIGRATIONS) + 1}")
    conn.close()
    backup.backup(source, tmp_path / "later.tar.gz")
    newer = (
        f"schema version {len(migrations.MIGRATIONS) + 1}.*knows up to {len(migrations.MIGRATIONS)}"
    )
    with pytest.raises(backup.BackupError, match=newer):
        backup.restore(tmp_path / "later.tar.gz", tmp_path / "fresh")
    assert not (tmp_path / "fresh").exists()
    kept = tmp_path / "kept"
    make_install(kept)
    with pytest.raises(backup.BackupError, match=newer):
        backup.restore(tmp_path / "later.tar.gz", kept, force=True)
    assert (kept / "appliance.db").exists() and (kept / "files" / "file_1.jsonl").exists()
