"""Versioned schema migrations, applied in order at start; the version lives in PRAGMA user_version.

Append a function for each change; never edit one that shipped. sqlite-utils' `transform`
rebuilds a table for changes SQLite's ALTER TABLE cannot make, keeping every row.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import sqlite_utils

logger = logging.getLogger(__name__)

_V1 = """
CREATE TABLE endpoint (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    owner TEXT NOT NULL,
    created_by TEXT NOT NULL,
    framework TEXT NOT NULL,
    model TEXT NOT NULL,
    image TEXT,
    args JSON NOT NULL DEFAULT '{}',
    env JSON NOT NULL DEFAULT '{}',
    command JSON,
    port INTEGER,
    health_route TEXT,
    gpus INTEGER NOT NULL DEFAULT 0,
    gpu_memory_fraction FLOAT,
    cpus FLOAT NOT NULL DEFAULT 1.0,
    memory_bytes INTEGER NOT NULL,
    min_replicas INTEGER NOT NULL DEFAULT 1,
    max_replicas INTEGER NOT NULL DEFAULT 1,
    target_concurrency INTEGER NOT NULL DEFAULT 4,
    endpoint_type TEXT NOT NULL,
    idle_timeout_s INTEGER NOT NULL,
    scale_down_window_s INTEGER NOT NULL DEFAULT 300,
    startup_timeout_s INTEGER NOT NULL,
    priority INTEGER NOT NULL DEFAULT 0,
    public_inference BOOLEAN NOT NULL DEFAULT 0,
    labels JSON NOT NULL DEFAULT '{}',
    extra JSON NOT NULL DEFAULT '{}',
    generation INTEGER NOT NULL DEFAULT 1,
    created_at FLOAT NOT NULL,
    updated_at FLOAT NOT NULL,
    status TEXT NOT NULL,
    status_reason TEXT,
    desired_replicas INTEGER NOT NULL DEFAULT 1,
    last_request_at FLOAT
);
CREATE INDEX ix_endpoint_name ON endpoint (name);
CREATE TABLE replica (
    id TEXT PRIMARY KEY,
    endpoint_id TEXT NOT NULL,
    generation INTEGER NOT NULL,
    container_id TEXT,
    container_name TEXT NOT NULL,
    address TEXT,
    gpus JSON NOT NULL DEFAULT '[]',
    gpu_fraction FLOAT NOT NULL DEFAULT 1.0,
    state TEXT NOT NULL,
    restarts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    log_tail TEXT,
    created_at FLOAT NOT NULL,
    state_since FLOAT NOT NULL,
    ready_at FLOAT
);
CREATE INDEX ix_replica_endpoint_id ON replica (endpoint_id);
CREATE TABLE event (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    endpoint_id TEXT NOT NULL,
    at FLOAT NOT NULL,
    kind TEXT NOT NULL,
    message TEXT NOT NULL
);
CREATE INDEX ix_event_endpoint_id ON event (endpoint_id);
CREATE TABLE api_key (
    id TEXT PRIMARY KEY,
    prefix TEXT NOT NULL UNIQUE,
    digest TEXT NOT NULL,
    name TEXT NOT NULL,
    owner TEXT NOT NULL,
    user TEXT NOT NULL,
    scopes JSON NOT NULL DEFAULT '[]',
    is_admin BOOLEAN NOT NULL DEFAULT 0,
    created_at FLOAT NOT NULL,
    expires_at FLOAT,
    revoked_at FLOAT,
    last_used_at FLOAT,
    requests_per_minute INTEGER,
    max_concurrent_requests INTEGER,
    max_queued_tasks INTEGER,
    max_tokens_per_request INTEGER
);
CREATE INDEX ix_api_key_prefix ON api_key (prefix);
CREATE TABLE task (
    id TEXT PRIMARY KEY,
    endpoint_id TEXT NOT NULL,
    owner TEXT NOT NULL,
    created_by TEXT NOT NULL,
    status TEXT NOT NULL,
    payload JSON NOT NULL DEFAULT '{}',
    result JSON,
    traceback TEXT,
    status_code INTEGER,
    callback_url TEXT,
    callback_auth JSON,
    attempts INTEGER NOT NULL DEFAULT 0,
    priority INTEGER NOT NULL DEFAULT 0,
    batch_id TEXT,
    created_at FLOAT NOT NULL,
    started_at FLOAT,
    finished_at FLOAT,
    expires_at FLOAT,
    enqueued_at FLOAT
);
CREATE INDEX ix_task_endpoint_id ON task (endpoint_id);
CREATE INDEX ix_task_owner ON task (owner);
CREATE INDEX ix_task_status ON task (status);
CREATE INDEX ix_task_batch_id ON task (batch_id);
CREATE TABLE file (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    created_by TEXT NOT NULL,
    purpose TEXT NOT NULL,
    filename TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    path TEXT NOT NULL,
    created_at FLOAT NOT NULL
);
CREATE INDEX ix_file_owner ON file (owner);
CREATE TABLE batch (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    created_by TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    input_file_id TEXT NOT NULL,
    output_file_id TEXT,
    error_file_id TEXT,
    completion_window TEXT NOT NULL,
    status TEXT NOT NULL,
    request_counts JSON NOT NULL DEFAULT '{}',
    metadata JSON NOT NULL DEFAULT '{}',
    errors JSON,
    created_at FLOAT NOT NULL,
    in_progress_at FLOAT,
    finalizing_at FLOAT,
    completed_at FLOAT,
    failed_at FLOAT,
    cancelling_at FLOAT,
    cancelled_at FLOAT
);
CREATE INDEX ix_batch_owner ON batch (owner);
"""


def _v1_initial(db: sqlite_utils.Database) -> None:
    db.executescript(_V1)


_V2 = """
CREATE TABLE usage (
    hour INTEGER NOT NULL,
    team TEXT NOT NULL,
    key_id TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    model TEXT NOT NULL,
    requests INTEGER NOT NULL DEFAULT 0,
    prompt_tokens INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    errors INTEGER NOT NULL DEFAULT 0,
    replica_seconds FLOAT NOT NULL DEFAULT 0,
    gpu_seconds FLOAT NOT NULL DEFAULT 0,
    PRIMARY KEY (hour, team, key_id, endpoint, model)
);
CREATE INDEX ix_usage_team_hour ON usage (team, hour);
CREATE TABLE usage_batch (
    id TEXT PRIMARY KEY,
    at FLOAT NOT NULL
);
CREATE TABLE audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at FLOAT NOT NULL,
    actor TEXT NOT NULL,
    team TEXT NOT NULL,
    actor_key_id TEXT,
    action TEXT NOT NULL,
    target TEXT NOT NULL,
    change JSON NOT NULL DEFAULT '{}',
    address TEXT
);
CREATE INDEX ix_audit_at ON audit (at);
CREATE TRIGGER audit_append_only BEFORE UPDATE ON audit
BEGIN
    SELECT RAISE(ABORT, 'the audit log is append-only');
END;
ALTER TABLE task ADD COLUMN key_id TEXT;
ALTER TABLE batch ADD COLUMN key_id TEXT;
ALTER TABLE replica ADD COLUMN accounted_at FLOAT;
"""


def _v2_usage_and_audit(db: sqlite_utils.Database) -> None:
    """Usage per hour (requests, tokens, replica time), the audit log, and the key a task was
    sent with."""
    db.executescript(_V2)


def _v3_shared_limits(db: sqlite_utils.Database) -> None:
    """The key whose limits and counters a key made by a non-admin shares (its maker's)."""
    db.execute("ALTER TABLE api_key ADD COLUMN limits_from TEXT")


def _v4_key_makers(db: sqlite_utils.Database) -> None:
    """The key a non-admin key was made with (`made_by`), so revoking a key revokes the keys
    made with it. A key made before this version is linked to the key whose limits it shares
    (v3's `limits_from`: its maker, or the first key of its maker's line)."""
    db.execute("ALTER TABLE api_key ADD COLUMN made_by TEXT")
    db.execute("UPDATE api_key SET made_by = limits_from WHERE limits_from IS NOT NULL")
    db.execute("CREATE INDEX ix_api_key_made_by ON api_key (made_by)")


def _v5_rolled_at(db: sqlite_utils.Database) -> None:
    """When an endpoint last rolled to a new generation, apart from `updated_at`: an edit that
    leaves its container as it is (labels, limits, public) no longer wakes it from zero. An
    endpoint rolled before this version keeps its last update's time."""
    db.execute("ALTER TABLE endpoint ADD COLUMN rolled_at FLOAT")
    db.execute("UPDATE endpoint SET rolled_at = updated_at WHERE generation > 1")


def _v6_no_lone_surrogates(db: sqlite_utils.Database) -> None:
    """Every JSON value stored with a lone surrogate (JSON's `"\\ud800"`, taken before such text
    was refused) holds U+FFFD in its place: no reply can carry the surrogate, so every read of
    the row (an endpoint's GET and lists, a task, the audit log) answered 500. The audit log is
    append-only; its trigger is lifted for this one mend and put back."""
    for table in db.tables:
        for column in (c.name for c in table.columns if c.type.upper() == "JSON"):
            # the names are the schema's own; LIKE is case-blind: \uD800 and \ud800 alike
            rows = db.execute(
                f'SELECT rowid, "{column}" FROM "{table.name}" WHERE "{column}" LIKE ?',  # noqa: S608
                ("%\\ud%",),
            ).fetchall()
            for rowid, text in rows:
                try:
                    value = json.loads(text)
                except ValueError:
                    continue
                mended = _mended(value)
                if mended == value:
                    continue
                if table.name == "audit":
                    db.execute("DROP TRIGGER audit_append_only")
                db.execute(
                    f'UPDATE "{table.name}" SET "{column}" = ? WHERE rowid = ?',  # noqa: S608
                    (json.dumps(mended), rowid),
                )
                if table.name == "audit":
                    db.execute(_AUDIT_TRIGGER)


def _v7_model_file_owners(db: sqlite_utils.Database) -> None:
    """The team whose upload each model file was, for its quota; files uploaded before this
    version count for no team."""
    db.executescript(
        "CREATE TABLE model_file (name VARCHAR NOT NULL PRIMARY KEY, owner VARCHAR NOT NULL, "
        "bytes INTEGER NOT NULL, uploaded_at FLOAT NOT NULL);"
        "CREATE INDEX ix_model_file_owner ON model_file (owner);"
    )


def _v8_task_bytes(db: sqlite_utils.Database) -> None:
    """The bytes of each task's stored request, for its team's quota; an index of team and
    bytes alone sums a team's without reading the requests (33 ms for 500,000 of its tasks),
    and one of team and status counts its waiting tasks without reading its finished ones
    (0.1 ms, where the team's index alone read every row: 217 ms). Tasks stored before this
    version count none."""
    db.executescript(
        "ALTER TABLE task ADD COLUMN bytes INTEGER NOT NULL DEFAULT 0;"
        "CREATE INDEX ix_task_owner_bytes ON task (owner, bytes);"
        "CREATE INDEX ix_task_owner_status ON task (owner, status);"
    )


def _v9_team_task_bytes(db: sqlite_utils.Database) -> None:
    """Each team's bytes of stored requests as a running total, kept by triggers in the
    transaction of every write of a task row, whichever path writes it (a submit, the
    sweeper's expiry, a cancel): a submit reads one row under SQLite's write lock where it
    summed every row of the team (33 ms for 500,000). The index that sum read goes."""
    db.executescript(_TEAM_TASK_BYTES)


_TEAM_TASK_BYTES = """
CREATE TABLE task_bytes (owner TEXT PRIMARY KEY, bytes INTEGER NOT NULL) WITHOUT ROWID;
INSERT INTO task_bytes SELECT owner, SUM(bytes) FROM task GROUP BY owner;
DROP INDEX ix_task_owner_bytes;
CREATE TRIGGER task_bytes_insert AFTER INSERT ON task BEGIN
    INSERT INTO task_bytes (owner, bytes) VALUES (NEW.owner, NEW.bytes)
    ON CONFLICT (owner) DO UPDATE SET bytes = bytes + excluded.bytes;
END;
CREATE TRIGGER task_bytes_delete AFTER DELETE ON task BEGIN
    UPDATE task_bytes SET bytes = bytes - OLD.bytes WHERE owner = OLD.owner;
END;
CREATE TRIGGER task_bytes_update AFTER UPDATE OF owner, bytes ON task BEGIN
    UPDATE task_bytes SET bytes = bytes - OLD.bytes WHERE owner = OLD.owner;
    INSERT INTO task_bytes (owner, bytes) VALUES (NEW.owner, NEW.bytes)
    ON CONFLICT (owner) DO UPDATE SET bytes = bytes + excluded.bytes;
END;
"""


def _v10_shared_model_files(db: sqlite_utils.Database) -> None:
    """Whether an uploaded model file is the box's (an administrator uploaded it) or its team's
    alone. A file's last upload, as the audit log remembers it, says whose key sent it; one it
    no longer remembers stays its team's."""
    db.executescript(
        "ALTER TABLE model_file ADD COLUMN shared BOOLEAN NOT NULL DEFAULT 0;"
        "UPDATE model_file SET shared = 1 WHERE (SELECT k.is_admin FROM audit AS a "
        "JOIN api_key AS k ON k.id = a.actor_key_id WHERE a.action = 'model.upload' "
        "AND a.target = model_file.name ORDER BY a.id DESC LIMIT 1) = 1;"
    )


_AUDIT_TRIGGER = """CREATE TRIGGER audit_append_only BEFORE UPDATE ON audit
BEGIN
    SELECT RAISE(ABORT, 'the audit log is append-only');
END"""


def _mended(value: Any) -> Any:
    if isinstance(value, str):
        return value.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    if isinstance(value, list):
        return [_mended(item) for item in value]
    if isinstance(value, dict):
        return {_mended(k): _mended(v) for k, v in value.items()}
    return value


MIGRATIONS: list[Callable[[sqlite_utils.Database], None]] = [
    _v1_initial,
    _v2_usage_and_audit,
    _v3_shared_limits,
    _v4_key_makers,
    _v5_rolled_at,
    _v6_no_lone_surrogates,
    _v7_model_file_owners,
    _v8_task_bytes,
    _v9_team_task_bytes,
    _v10_shared_model_files,
]


WAL_SWITCH_TIMEOUT_S = 30.0


class NewerSchemaError(Exception):
    """A database a later release migrated past the versions this one knows: a downgrade, or
    a backup a later release took. Running on it would read and write tables as they no longer
    are, so nothing starts on it and no restore writes it."""


def check_known(version: int, where: str) -> None:
    """Refuse a schema version this release does not know; `where` names the database."""
    if version > len(MIGRATIONS):
        raise NewerSchemaError(
            f"{where} is at schema version {version}, which a later release wrote; this "
            f"release knows up to {len(MIGRATIONS)}: run that release or a later one on it, or "
            "restore a backup this release took"
        )


def _use_wal(conn: sqlite3.Connection) -> None:
    """Switch to WAL. On a new file, processes starting together race for the switch, and
    SQLite answers the losers "database is locked" at once, without its busy handler: retry."""
    deadline = time.monotonic() + WAL_SWITCH_TIMEOUT_S
    while True:
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def migrate(path: Path) -> int:
    """Bring the database at `path` to the newest schema; returns the version it ends at."""
    conn = sqlite3.connect(path, timeout=30, isolation_level=None)
    try:
        _use_wal(conn)
        conn.execute("BEGIN EXCLUSIVE")  # one process migrates; the others wait, then see it done
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        check_known(version, f"the database in {path.parent}")
        db = sqlite_utils.Database(conn)
        for number, step in enumerate(MIGRATIONS[version:], start=version + 1):
            logger.info("applying schema migration %d (%s)", number, step.__name__)
            step(db)
            conn.execute(f"PRAGMA user_version = {number}")
        conn.execute("COMMIT")
        return len(MIGRATIONS)
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    finally:
        conn.close()
