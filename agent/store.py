"""The agent's small database (SQLite under the state directory): the update journal, trust state and the outbox.

SQLite with ``synchronous=FULL`` commits durably: a journal write that returned survives a power cut, which is what
"persist before every side effect" needs. One connection, guarded by a lock (the updater, the link's callbacks and
the telemetry thread share it).
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import asdict
from pathlib import Path

from agent.machine import Snapshot, State

SCHEMA = """
CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    created REAL NOT NULL
);
"""


JOURNAL_PREFIX = "journal:"
LEGACY_JOURNAL = "journal"  # the single model's journal before several models per device (agent.models migrates)
LEGACY_VERSION = "update_version"  # its highest admitted version: kept, the floor for every model's first offer


def journal_key(model: str) -> str:
    return f"{JOURNAL_PREFIX}{model}"


class Store:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ------------------------------------------------------------------ key/value

    def get(self, key: str) -> bytes | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()
        return None if row is None else bytes(row[0])

    def put(self, **values: bytes) -> None:
        """Write several keys in one transaction (all or none)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany("INSERT INTO kv(key, value) VALUES(?, ?) ON CONFLICT(key) DO UPDATE SET "
                                     "value = excluded.value", list(values.items()))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def rename(self, moves: dict[str, str]) -> None:
        """Move values to new keys in one transaction (an existing target is overwritten; a missing source is
        skipped)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for old, new in moves.items():
                    row = self._db.execute("SELECT value FROM kv WHERE key = ?", (old,)).fetchone()
                    if row is None:
                        continue
                    self._db.execute("INSERT INTO kv(key, value) VALUES(?, ?) ON CONFLICT(key) DO UPDATE SET "
                                     "value = excluded.value", (new, row[0]))
                    self._db.execute("DELETE FROM kv WHERE key = ?", (old,))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def keys(self, prefix: str) -> list[str]:
        with self._lock:
            rows = self._db.execute("SELECT key FROM kv WHERE substr(key, 1, ?) = ? ORDER BY key",
                                    (len(prefix), prefix)).fetchall()
        return [k for (k,) in rows]

    # ------------------------------------------------------------------ journal (one per model)

    def load_journal(self, model: str) -> tuple[Snapshot, dict]:
        return self.read_journal(journal_key(model))

    def read_journal(self, key: str) -> tuple[Snapshot, dict]:
        """The journal under ``key`` (``LEGACY_JOURNAL``: a single-model agent's, not migrated yet)."""
        raw = self.get(key)
        if raw is None:
            return Snapshot(), {}
        data = json.loads(raw)
        snap = data["snapshot"]
        snap["state"] = State(snap["state"])
        return Snapshot(**snap), data["job"]

    def save_journal(self, model: str, snap: Snapshot, job: dict, **extra: bytes) -> None:
        """Persist the model's snapshot and job data (and any trust state that changed with it) atomically."""
        record = {"snapshot": {**asdict(snap), "state": snap.state.value}, "job": job, "saved": time.time()}
        self.put(**{journal_key(model): json.dumps(record).encode()}, **extra)

    # ------------------------------------------------------------------ outbox

    def enqueue(self, topic: str, payload: bytes, *, max_rows: int) -> int:
        """Append a message; beyond ``max_rows`` drop the oldest. Returns how many were dropped now."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute("INSERT INTO outbox(topic, payload, created) VALUES(?, ?, ?)",
                                 (topic, payload, time.time()))
                (count,) = self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()
                dropped = max(0, count - max_rows)
                if dropped:
                    self._db.execute("DELETE FROM outbox WHERE seq IN (SELECT seq FROM outbox ORDER BY seq LIMIT ?)",
                                     (dropped,))
                    (total,) = self._db.execute("SELECT COALESCE((SELECT CAST(value AS INTEGER) FROM kv WHERE "
                                                "key = 'dropped'), 0)").fetchone()
                    self._db.execute("INSERT INTO kv(key, value) VALUES('dropped', ?) ON CONFLICT(key) DO UPDATE "
                                     "SET value = excluded.value", (str(total + dropped).encode(),))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return dropped

    def take_dropped(self) -> int:
        """How many messages the size bound dropped since the last call (then reset to zero)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            row = self._db.execute("SELECT value FROM kv WHERE key = 'dropped'").fetchone()
            self._db.execute("DELETE FROM kv WHERE key = 'dropped'")
            self._db.execute("COMMIT")
        return int(bytes(row[0])) if row else 0

    def pending(self, limit: int = 100) -> list[tuple[int, str, bytes]]:
        with self._lock:
            rows = self._db.execute("SELECT seq, topic, payload FROM outbox ORDER BY seq LIMIT ?",
                                    (limit,)).fetchall()
        return [(seq, topic, bytes(payload)) for seq, topic, payload in rows]

    def acknowledge(self, seq: int) -> None:
        with self._lock:
            self._db.execute("DELETE FROM outbox WHERE seq = ?", (seq,))

    def outbox_size(self) -> int:
        with self._lock:
            (n,) = self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()
        return n
