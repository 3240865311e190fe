"""The SQLite engine (one per process): WAL, synchronous=FULL, busy timeout, BEGIN IMMEDIATE;
and a read-only engine for reads that must never wait for a writer nor make one wait (key
lookups, the api's GET requests: `api/deps.get_session`)."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlmodel import Session, create_engine

from appliance.migrations import migrate

BUSY_TIMEOUT_MS = 30_000
READER_BUSY_TIMEOUT_MS = 100  # WAL readers do not wait for writers; this bounds the rare case
# The api's threadpool runs 40 requests at once (anyio's default), each with one session at most:
# a read never waits for a connection of the reader's pool.
READER_CONNECTIONS = 40


def _on_connect(dbapi_conn: sqlite3.Connection, _record: Any) -> None:
    dbapi_conn.isolation_level = None  # we issue BEGIN ourselves, below
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=FULL")
    cur.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def _on_begin(conn: Any) -> None:
    # IMMEDIATE takes the write lock up front, so a read-modify-write never fails on upgrade.
    conn.exec_driver_sql("BEGIN IMMEDIATE")


def open_engine(database_path: Path) -> Engine:
    """Migrate the database to the newest schema and return the process's engine."""
    database_path.parent.mkdir(parents=True, exist_ok=True)
    migrate(database_path)
    engine = create_engine(
        f"sqlite:///{database_path}",
        connect_args={"check_same_thread": False, "timeout": BUSY_TIMEOUT_MS / 1000},
    )
    event.listen(engine, "connect", _on_connect)
    event.listen(engine, "begin", _on_begin)
    return engine


def open_reader(database_path: Path) -> Engine:
    """A read-only engine over a database `open_engine` made: no write lock is ever taken (a
    session reads one snapshot in a deferred transaction, and in WAL mode a reader neither
    waits for a writer nor makes one wait), so a lookup through it is short enough to make on
    an event loop. A write through it fails at once, every time ("attempt to write a readonly
    database"), never only when another writer happens to hold the lock."""
    engine = create_engine(
        f"sqlite:///file:{database_path}?mode=ro&uri=true",
        connect_args={"check_same_thread": False, "timeout": READER_BUSY_TIMEOUT_MS / 1000},
        pool_size=READER_CONNECTIONS // 4,
        max_overflow=READER_CONNECTIONS - READER_CONNECTIONS // 4,
    )

    def on_connect(dbapi_conn: sqlite3.Connection, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # BEGIN (deferred) below: one snapshot per session
        dbapi_conn.execute(f"PRAGMA busy_timeout={READER_BUSY_TIMEOUT_MS}")

    event.listen(engine, "connect", on_connect)
    event.listen(engine, "begin", lambda conn: conn.exec_driver_sql("BEGIN DEFERRED"))
    return engine


@contextmanager
def session_scope(engine: Engine) -> Iterator[Session]:
    """A session whose transaction commits on success and rolls back on error."""
    with Session(engine, expire_on_commit=False) as session, session.begin():
        yield session
