"""Database engine and sessions. SQLite gets WAL and foreign keys on every connection; PostgreSQL is used as is."""

from __future__ import annotations

from collections.abc import Iterator

from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlmodel import Session, create_engine


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        # A pool as large as the server's thread pool: a fresh SQLite connection per request would cost a file
        # open and, worse, contend for locks.
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30}, pool_size=40,
                               max_overflow=10)

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
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)


def sessions(engine: Engine) -> Iterator[Session]:
    with Session(engine) as session:
        yield session
