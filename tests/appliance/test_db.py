"""The SQLite store: migrations build exactly the tables the models describe, and keep rows."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.exc import OperationalError
from sqlmodel import SQLModel, select

from api.submit import HELD_OF_TEAM
from appliance import migrations
from appliance.db import open_engine, open_reader, session_scope
from appliance.models import Endpoint
from tests.factories import make_endpoint


def test_migrated_schema_matches_the_models(tmp_path: Path) -> None:
    path = tmp_path / "a.db"
    assert migrations.migrate(path) == len(migrations.MIGRATIONS)
    conn = sqlite3.connect(path)
    for table in SQLModel.metadata.sorted_tables:
        columns = {row[1] for row in conn.execute(f"PRAGMA table_info({table.name})")}
        assert columns == {c.name for c in table.columns}, table.name


def test_pragmas_are_set_on_every_connection(tmp_path: Path) -> None:
    engine = open_engine(tmp_path / "a.db")
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30_000


def test_the_reader_sees_commits_and_never_waits_for_a_writer(tmp_path: Path) -> None:
    path = tmp_path / "a.db"
    engine, reader = open_engine(path), open_reader(path)
    writer = sqlite3.connect(path, isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")  # a writer holds the write lock, as the builder may
    writer.execute("INSERT INTO event (endpoint_id, at, kind, message) VALUES ('e', 1, 'k', 'm')")
    started = time.monotonic()
    with session_scope(reader) as session:
        assert session.exec(select(Endpoint)).all() == []
    assert time.monotonic() - started < 1  # the engine would wait up to 30 s for that lock
    writer.execute("COMMIT")
    with reader.connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM event").scalar() == 1
        with pytest.raises(OperationalError, match="readonly"):
            conn.exec_driver_sql("DELETE FROM event")
    engine.dispose()
    reader.dispose()


def test_reopening_keeps_rows_and_version(tmp_path: Path) -> None:
    path = tmp_path / "a.db"
    engine = open_engine(path)
    with session_scope(engine) as session:
        session.add(
            Endpoint(
                id="end_1",
                name="x",
                owner="t",
                created_by="u",
                framework="vllm",
                model="a/b",
                endpoint_type="streaming",
            )
        )
    engine.dispose()
    engine = open_engine(path)
    with session_scope(engine) as session:
        assert [e.name for e in session.exec(select(Endpoint)).all()] == ["x"]
    version = sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0]
    assert version == len(migrations.MIGRATIONS)


def test_a_new_migration_runs_once_and_keeps_rows(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "a.db"
    migrations.migrate(path)
    conn = sqlite3.connect(path)
    conn.execute("INSERT INTO event (endpoint_id, at, kind, message) VALUES ('e', 1, 'k', 'm')")
    conn.commit()
    calls = []

    def add_column(db):  # type: ignore[no-untyped-def]
        calls.append(1)
        db["event"].add_column("severity", str)

    monkeypatch.setattr(migrations, "MIGRATIONS", [*migrations.MIGRATIONS, add_column])
    migrations.migrate(path)
    migrations.migrate(path)
    assert calls == [1]
    assert conn.execute("SELECT kind, severity FROM event").fetchall() == [("k", None)]


def test_stored_lone_surrogates_are_mended_and_the_audit_log_stays_append_only(
    tmp_path: Path, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    """Rows stored before lone surrogates were refused (an endpoint's labels, an audit entry)
    answered 500 on every read: the migration puts U+FFFD in their place, and keeps the rest."""
    path = tmp_path / "a.db"
    before = migrations.MIGRATIONS[: migrations.MIGRATIONS.index(migrations._v6_no_lone_surrogates)]
    monkeypatch.setattr(migrations, "MIGRATIONS", before)
    migrations.migrate(path)
    engine = open_engine(path)
    with session_scope(engine) as session:
        session.add(
            make_endpoint(
                labels={"team": "a\ud800b", "path": "C:\\udata", "emoji": "\U0001f600"},
                extra={"metadata": {"\udfff": [1, "\ud83d"]}},
            )
        )
        session.commit()
    conn = sqlite3.connect(path)
    conn.execute(
        "INSERT INTO audit (at, actor, team, action, target, change) VALUES "
        "(1, 'u', 't', 'endpoint.create', 'end_1', ?)",
        (json.dumps({"labels": {"team": "a\ud800b"}}),),
    )
    conn.commit()
    monkeypatch.undo()
    migrations.migrate(path)
    with session_scope(open_engine(path)) as session:
        endpoint = session.exec(select(Endpoint)).one()
        assert endpoint.labels == {"team": "a\ufffdb", "path": "C:\\udata", "emoji": "\U0001f600"}
        assert endpoint.extra == {"metadata": {"\ufffd": [1, "\ufffd"]}}
        json.dumps(endpoint.labels, ensure_ascii=False).encode()  # a reply can carry it now
    change = conn.execute("SELECT change FROM audit").fetchone()[0]
    assert json.loads(change) == {"labels": {"team": "a\ufffdb"}}
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        conn.execute("UPDATE audit SET actor = 'someone else'")


def test_a_database_a_later_release_wrote_is_refused_in_one_line(tmp_path: Path) -> None:
    """A role started on a database a later release migrated (a downgrade, a data directory
    shared with a newer install) ran on a schema it does not know; it stops, naming both
    versions, and leaves the database as it was."""
    path = tmp_path / "appliance.db"
    migrations.migrate(path)
    later = len(migrations.MIGRATIONS) + 1
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {later}")
    conn.close()
    with pytest.raises(migrations.NewerSchemaError, match=f"schema version {later}"):
        open_engine(path)
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == later
    done = subprocess.run(
        [sys.executable, "-m", "appliance", "worker"],
        env={
            **os.environ,
            "APPLIANCE_DATA_DIR": str(tmp_path),
            "APPLIANCE_REDIS_URL": "redis://127.0.0.1:1/0",
        },
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    said = (
        f"appliance worker: the database in {tmp_path} is at schema version {later}, which a "
        f"later release wrote; this release knows up to {later - 1}: run that release or a "
        "later one on it, or restore a backup this release took"
    )
    # one line; a log line of the worker's own (its Redis being down) may come beside it
    assert said in done.stderr.splitlines(), done.stderr


def test_an_endpoint_keeps_the_events_its_readers_can_read(tmp_path: Path) -> None:
    """Events come from the builder as long as an endpoint lives (scaling to zero and back,
    a crash-loop): each keeps the newest its readers can page (the events route's most, its
    `limit`'s bound), so no endpoint's timeline grows the database without end."""
    from appliance import queries
    from appliance.models import Event

    engine = open_engine(tmp_path / "a.db")
    migrations.migrate(tmp_path / "a.db")
    kept = queries.EVENTS_KEPT_PER_ENDPOINT
    with session_scope(engine) as session:
        queries.add_event("end_other", "created", "other", session=session)
        for i in range(kept + 5):
            queries.add_event("end_busy", "scaled", f"event {i}", session=session)
    with session_scope(engine) as session:
        busy = queries.list_events("end_busy", session=session, limit=kept + 10)
        assert [e.message for e in busy] == [f"event {i}" for i in range(5, kept + 5)]
        assert len(session.exec(select(Event).where(Event.endpoint_id == "end_other")).all()) == 1


def test_a_teams_task_bytes_are_a_running_total_kept_exact_whoever_writes_the_rows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The team's bytes of stored requests, which every submit checks under SQLite's write
    lock, are read from a total kept beside the rows, not summed over every row of the team
    (33 ms for 500,000 of them): exact from a database of the version before, and through
    inserts, deletes (the sweeper's, an endpoint's) and a row moved to another team."""
    path = tmp_path / "a.db"
    with monkeypatch.context() as patch:
        patch.setattr(migrations, "MIGRATIONS", migrations.MIGRATIONS[:8])
        migrations.migrate(path)
    conn = sqlite3.connect(path, isolation_level=None)
    insert = (
        "INSERT INTO task (id, endpoint_id, owner, created_by, status, payload, attempts, "
        "priority, created_at, bytes) VALUES (?, 'end_1', ?, 'u', 'PENDING', '{}', 0, 0, 1, ?)"
    )
    conn.executemany(insert, [("t1", "red", 100), ("t2", "red", 20), ("t3", "blue", 7)])
    migrations.migrate(path)

    def held(team: str) -> int:
        return int(conn.execute(HELD_OF_TEAM, (team,)).fetchone()[0])

    def summed(team: str) -> int:
        query = "SELECT COALESCE(SUM(bytes), 0) FROM task WHERE owner = ?"
        return int(conn.execute(query, (team,)).fetchone()[0])

    assert (held("red"), held("blue"), held("green")) == (120, 7, 0)
    plan = " ".join(row[-1] for row in conn.execute("EXPLAIN QUERY PLAN " + HELD_OF_TEAM, ("r",)))
    assert "task " not in plan + " ", plan  # no read of the team's task rows
    conn.executemany(insert, [("t4", "red", 5), ("t5", "green", 9)])
    conn.execute("DELETE FROM task WHERE id IN ('t1', 't3')")
    conn.execute("UPDATE task SET owner = 'blue', bytes = 30 WHERE id = 't2'")
    conn.execute("BEGIN")
    conn.execute("DELETE FROM task WHERE id = 't5'")
    conn.execute("ROLLBACK")
    for team in ("red", "blue", "green"):
        assert held(team) == summed(team), team
    assert (held("red"), held("blue"), held("green")) == (5, 30, 9)


def test_a_get_reads_without_the_write_lock_and_cannot_write(tmp_path: Path) -> None:
    """One team's GETs held SQLite's write lock for as long as each ran (BEGIN IMMEDIATE), so
    hundreds of them at once made other teams' writes and the builder's wait, then fail with
    "database is locked". A GET's session now reads a snapshot, and a writer commits while it
    is open; a write in a GET fails at once, every time. Other methods still take the lock."""
    from types import SimpleNamespace

    from api.deps import get_session

    path = tmp_path / "a.db"
    engine, reader = open_engine(path), open_reader(path)
    state: Any = SimpleNamespace(engine=engine, reader=reader)
    writer = sqlite3.connect(path, isolation_level=None, timeout=0)  # "locked" at once

    get: Any = SimpleNamespace(method="GET")
    sessions = get_session(get, state)
    session = next(sessions)
    assert session.exec(select(Endpoint)).all() == []  # the GET's transaction is open
    writer.execute("BEGIN IMMEDIATE")
    writer.execute("INSERT INTO event (endpoint_id, at, kind, message) VALUES ('e', 1, 'k', 'm')")
    writer.execute("COMMIT")
    assert session.exec(select(Endpoint)).all() == []  # still its own snapshot
    session.add(make_endpoint())
    with pytest.raises(OperationalError, match="readonly"):
        session.flush()
    sessions.close()

    post: Any = SimpleNamespace(method="POST")
    sessions = get_session(post, state)
    session = next(sessions)
    assert session.exec(select(Endpoint)).all() == []
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        writer.execute("BEGIN IMMEDIATE")
    sessions.close()
    writer.close()
    engine.dispose()
    reader.dispose()


def test_model_files_an_admin_key_uploaded_become_the_boxs_when_migrated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Schema v10 marks an uploaded model file shared (every team's) when the audit log says
    its last upload came from an administrator's key; a team's upload, one an administrator
    uploaded and a team then replaced, and one the log no longer remembers stay their team's."""
    path = tmp_path / "a.db"
    with monkeypatch.context() as patch:
        patch.setattr(migrations, "MIGRATIONS", migrations.MIGRATIONS[:9])
        migrations.migrate(path)
    conn = sqlite3.connect(path, isolation_level=None)
    key = (
        "INSERT INTO api_key (id, prefix, digest, name, owner, user, scopes, is_admin, "
        "created_at) VALUES (?, ?, 'd', 'k', ?, 'u', '[]', ?, 1)"
    )
    conn.executemany(key, [("admin", "p1", "ops", 1), ("red", "p2", "red", 0)])
    upload = (
        "INSERT INTO audit (at, actor, team, actor_key_id, action, target, change) "
        "VALUES (1, 'u', 't', ?, 'model.upload', ?, '{}')"
    )
    conn.executemany(
        upload,
        [
            ("admin", "box.gguf"),
            ("red", "red.gguf"),
            ("admin", "replaced.gguf"),
            ("red", "replaced.gguf"),  # the last upload is the team's
            ("red", "taken.gguf"),
            ("admin", "taken.gguf"),  # an administrator replaced it last
        ],
    )
    files = "INSERT INTO model_file (name, owner, bytes, uploaded_at) VALUES (?, ?, 1, 1)"
    names = ["box.gguf", "red.gguf", "replaced.gguf", "taken.gguf", "forgotten.gguf"]
    conn.executemany(files, [(name, "red") for name in names])
    migrations.migrate(path)
    shared = dict(conn.execute("SELECT name, shared FROM model_file").fetchall())
    assert shared == {
        "box.gguf": 1,
        "red.gguf": 0,
        "replaced.gguf": 0,
        "taken.gguf": 1,
        "forgotten.gguf": 0,
    }
