"""Database engine and sessions. SQLite gets WAL and foreign keys on every connection; PostgreSQL is used as is.

Statement parameters are hidden from SQLAlchemy's error messages: a failed INSERT would otherwise put what it
carried (password hashes, token hashes) into an exception text that ends up in a log."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path

from sqlalchemy import event
from sqlalchemy.engine import Engine, make_url
from sqlmodel import Session, create_engine

log = logging.getLogger(__name__)


def sqlite_path(url: str) -> Path | None:
    """The file behind a SQLite URL; None for another database or an in-memory one."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database or parsed.database == ":memory:" \
            or parsed.database.startswith("file:"):
        return None
    return Path(parsed.database)


def secure_sqlite_file(url: str) -> None:
    """Create a SQLite database file (and its folder, when missing) readable by this user only, before SQLite makes it
    0644; tighten one left group- or world-readable. SQLite gives the -wal and -shm files the main file's mode."""
    path = sqlite_path(url)
    if path is None:
        return
    if not path.parent.exists():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):  # an empty file is an empty database
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    for file in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        _owner_only(file)


def _owner_only(path: Path) -> None:
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        return
    if mode & 0o077:
        path.chmod(mode & 0o700)
        log.info("database file made private", extra={"ctx": {"path": str(path), "was": oct(mode)}})


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        secure_sqlite_file(url)
        # A pool as large as the server's thread pool: a fresh SQLite connection per request would cost a file
        # open and, worse, contend for locks.
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30}, pool_size=40,
                               max_overflow=10, hide_parameters=True, json_serializer=json_dumps)

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_connection, _record) -> None:
            cur = dbapi_connection.cursor()
            cur.execute("PRAGMA foreign_keys=ON")  # per connection; WAL below is a property of the file
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

        if ":memory:" not in url and url != "sqlite://":
            with engine.connect() as conn:
                conn.exec_driver_sql("PRAGMA journal_mode=WAL")
        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20, hide_parameters=True,
                         json_serializer=json_dumps)


@functools.lru_cache(maxsize=256)
def _tuple_json(value: tuple) -> str:
    return json.dumps(value)


def json_dumps(value: object) -> str:
    """JSON columns' serializer. A tuple is taken to be a value that repeats across rows (a fleet's telemetry
    windows share their latency bin edges): it is encoded once and remembered. Lists are encoded each time."""
    if type(value) is tuple:
        return _tuple_json(value)
    return json.dumps(value)


def sessions(engine: Engine) -> Iterator[Session]:
    with Session(engine) as session:
        yield session
