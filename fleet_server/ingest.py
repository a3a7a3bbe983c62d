"""The ingest writer: validates what devices report and writes it in batches.

- ``evt``: update progress and results → the device's rollout member (fleet_server/rollouts/members.py);
- ``state``: what the device runs → the device row (its first model) and its rows of ``device_model`` (every named
  model, replaced as a whole); ``online``: its last will / birth message → online, last seen;
- ``tm``: telemetry batches, stored once per (device, seq) — a QoS 1 redelivery is not counted twice.

Chunk requests never come here (fleet_server/mqtt.py routes them to the downloads service). A message that does not
parse, names an unknown or decommissioned device, or breaks a limit is counted and logged, never fatal. The writer
commits every ``BATCH_S`` or ``BATCH_MAX`` messages, and only then acknowledges them to the broker (MQTT 5 manual
acknowledgement): a server killed mid-batch gets the same messages again from its persistent session, so nothing a
device saw acknowledged is lost. Two kinds of failure are told apart:

- a message the database refuses (bad data that passed parsing) is written alone, dropped and counted: it never holds
  up other devices' messages;
- an operational error (database down, disk full, connection lost) is an outage: the batch is held and retried,
  nothing is acknowledged meanwhile, and ``/ready`` answers 503 until a write succeeds again.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections import Counter

import msgspec
from sqlalchemy import bindparam, exc, update
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from fleet_protocol import messages, topics
from fleet_protocol.errors import ProtocolError
from fleet_protocol.vocabulary import WAITING_REASONS, UpdateResult
from fleet_server import device_models, fastdecode, remote_config
from fleet_server.db import json_dumps
from fleet_server.models import Device, RolloutDevice, TelemetryWindow, utcnow
from fleet_server.pacing import TokenBuckets
from fleet_server.rollouts.members import may_report, next_status
from fleet_server.rollouts.planner import IN_FLIGHT, MemberStatus

log = logging.getLogger(__name__)
BATCH_S = 0.1
BATCH_MAX = 2000
QUEUE_MAX = 100_000  # above the link's Receive Maximum: the queue never fills from the broker
WRITTEN_KINDS = ("evt", "state", "online", "tm")
TELEMETRY_TYPES = (fastdecode.TelemetryBatch, messages.TelemetryBatch)
# What one device may send, sustained and in a burst. An agent sends a few KB every telemetry interval (10 s by
# default) plus a few events per update; after an offline period its outbox (at most 10,000 messages) drains at once.
MESSAGES_PER_S, MESSAGE_BURST = 5.0, 12_000
BYTES_PER_S, BYTE_BURST = 8 * 1024, 32 * 1024 * 1024
OUTAGE_ERRORS = (exc.OperationalError, exc.InterfaceError, exc.TimeoutError, exc.DisconnectionError, OSError)


class _Outage(Exception):
    """The database cannot take writes now (down, disk full, connection lost): hold the batch, retry later."""


class Ingest:
    """Validates and writes what devices send; answers chunk requests through ``publish``."""

    def __init__(self, engine: Engine, *, clock=time.monotonic, flush_acks=lambda: None):
        """``flush_acks()`` sends the acknowledgements made for a batch (the link sends them in one write)."""
        self.engine, self._clock, self._flush_acks = engine, clock, flush_acks
        self._messages = TokenBuckets(rate=MESSAGES_PER_S, burst=MESSAGE_BURST)
        self._bytes = TokenBuckets(rate=BYTES_PER_S, burst=BYTE_BURST)
        self.queue: queue.SimpleQueue = queue.SimpleQueue()  # C-fast; bounded in submit
        self.counts: Counter = Counter()
        self.outage_since: float | None = None  # monotonic time the database stopped taking writes
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ingest", daemon=True)
        self._last_edges: tuple[tuple[float, ...] | None, str] = (None, "")

    @property
    def healthy(self) -> bool:
        """False while an outage holds the batch (the server is then not ready)."""
        return self.outage_since is None

    def start(self) -> Ingest:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def submit(self, topic: str, payload: bytes, ack=None) -> None:
        """From paho's thread: never blocks it. ``ack`` is called once the message is committed or dropped for
        cause. A full queue (bounded by the link's Receive Maximum, so only without one) leaves it unacknowledged:
        the broker redelivers it after a reconnect."""
        if self.queue.qsize() >= QUEUE_MAX:
            self.counts["dropped_queue_full"] += 1
            return
        self.queue.put_nowait((topic, payload, ack or _no_ack))

    def _run(self) -> None:
        """Until stopped and drained (the link stops first, so what was received is written before exit)."""
        while not (self._stop.is_set() and self.queue.empty()):
            batch = []
            deadline = time.monotonic() + BATCH_S
            while len(batch) < BATCH_MAX:
                try:
                    batch.append(self.queue.get(timeout=max(0.0, deadline - time.monotonic())))
                except queue.Empty:
                    break
            batch = self._paced(batch)
            if batch:
                self._write_retrying(batch)
            self._flush_acks()

    def _paced(self, batch: list[tuple[str, bytes, object]]) -> list[tuple[str, bytes, object]]:
        """What each device may still send now (messages and bytes, per device, once per message: a batch retried
        through an outage is not charged again). What is over is dropped, counted and acknowledged: one device
        stored 38 MiB of telemetry for one second in two seconds (red team), and a full disk stops ingest for all."""
        now, kept = self._clock(), []
        for message in batch:
            topic_text, payload, ack = message
            device = topic_text.split("/", 4)[3] if topic_text.count("/") >= 4 else ""
            if self._messages.take(device, 1, now) and self._bytes.take(device, len(payload), now):
                kept.append(message)
            else:
                self.counts["paced"] += 1
                ack()
        if len(kept) < len(batch):
            log.warning("%d message(s) over their device's allowance dropped", len(batch) - len(kept))
        return kept

    def _write_retrying(self, batch: list[tuple[str, bytes, object]]) -> None:
        """An outage holds the batch and retries with backoff (unacknowledged, so the broker keeps everything behind
        it); a shutdown during the outage leaves it unacknowledged for the next start (counted as held, not lost).
        A message the database refuses is isolated and dropped alone (see ``_write_isolating``)."""
        pending, delay = list(batch), 0.5
        while pending:
            try:
                self._write_isolating(pending)
            except _Outage as e:
                if self.outage_since is None:
                    self.outage_since = self._clock()
                if self._stop.is_set():
                    self.counts["held_at_shutdown"] += len(pending)
                    log.warning("stopping during a database outage: %d message(s) left unacknowledged for the "
                                "broker to redeliver", len(pending))
                    return
                self.counts["batch_retries"] += 1
                log.warning("database outage (%s); holding %d message(s), retrying in %.1f s",
                            _first_line(e.__cause__ or e), len(pending), delay)
                self._stop.wait(delay)
                delay = min(delay * 2, 5.0)
        if self.outage_since is not None:
            log.info("database writes resumed after %.1f s", self._clock() - self.outage_since)
            self.outage_since = None

    def _write_isolating(self, pending: list[tuple[str, bytes, object]]) -> None:
        """Write ``pending`` and empty it, acknowledging what is written. When the database refuses the batch for
        its data, the messages are written one at a time and one that fails alone is dropped (counted, logged,
        acknowledged: a redelivery would fail the same way). Raises ``_Outage`` with what is left in ``pending``."""
        try:
            self._write_or_outage(pending)
        except _Outage:
            raise
        except Exception:
            if len(pending) == 1:
                self._drop(pending.pop())
                return
            log.warning("ingest batch of %d refused by the database; writing it one message at a time",
                        len(pending), exc_info=True)
            while pending:
                try:
                    self._write_or_outage(pending[:1])
                except _Outage:
                    raise
                except Exception:
                    self._drop(pending[0])
                else:
                    pending[0][2]()
                pending.pop(0)
            return
        for _, _, ack in pending:
            ack()
        pending.clear()

    def _write_or_outage(self, batch: list[tuple[str, bytes, object]]) -> None:
        try:
            self._write(batch)
        except OUTAGE_ERRORS as e:
            raise _Outage(str(e)) from e
        except Exception as e:
            if not self._database_ok():  # the database went away in mid-write: still an outage, not bad data
                raise _Outage(str(e)) from e
            raise

    def _drop(self, message: tuple[str, bytes, object]) -> None:
        topic_text, _, ack = message
        self.counts["poison"] += 1
        log.error("a message on %s cannot be written; dropped", topic_text[:120], exc_info=True)
        ack()

    def _database_ok(self) -> bool:
        try:
            with self.engine.connect() as conn:
                conn.exec_driver_sql("SELECT 1")
            return True
        except Exception:
            return False

    def _write(self, batch: list[tuple[str, bytes, object]]) -> None:
        parsed = []
        for topic_text, payload, _ in batch:
            try:
                t = topics.parse(topic_text)
                if t.kind not in WRITTEN_KINDS:
                    raise ProtocolError(f"nothing is written for a {t.kind!r} topic")
                # telemetry, nearly all of the traffic, through the stricter fast mirror; anything it cannot vouch
                # for (and every other kind) through the protocol's own parser, which decides and says why
                m = (t.kind == "tm" and fastdecode.telemetry(payload)) or messages.parse_for(t.kind, payload)
            except ProtocolError as e:
                self.counts["invalid"] += 1
                log.warning("invalid device message on %s: %s", topic_text[:120], str(e)[:200])
                continue
            parsed.append((t, m))
        if not parsed:
            return
        with Session(self.engine) as s:
            live = self._live(s, {t.device for t, _ in parsed})
            telemetry: list[tuple[str, messages.TelemetryBatch | fastdecode.TelemetryBatch]] = []
            presence: dict[str, dict] = {}  # device → its newest online/state values in this batch
            states: dict[str, messages.DeviceState] = {}
            now = utcnow()
            for t, m in parsed:
                if t.device not in live:
                    self.counts["refused_unknown_device"] += 1
                    continue
                self.counts[t.kind] += 1
                if isinstance(m, TELEMETRY_TYPES):
                    telemetry.append((t.device, m))
                elif isinstance(m, messages.UpdateEvent):
                    self._event(s, t.device, m)
                elif isinstance(m, messages.ConfigReport):
                    if not remote_config.record_report(s, t.device, m):
                        self.counts["config_report_ignored"] += 1
                elif isinstance(m, messages.DeviceState):
                    presence.setdefault(t.device, {}).update(online=True, active_version=m.active_version,
                                                             active_sha256=m.active_sha256)
                    states[t.device] = m
                elif isinstance(m, messages.Online):
                    presence.setdefault(t.device, {})["online"] = m.online
            if presence:
                self._presence(s, presence, now)
            if states:
                device_models.replace(s, states, now=now)
                self._reconcile(s, states)
            if telemetry:
                self._telemetry(s, telemetry)
            s.commit()

    def _live(self, s: Session, ids: set[str]) -> set[str]:
        """Which of ``ids`` are enrolled and not decommissioned: one statement with one parameter (an expanding
        ``IN`` of a batch's thousand ids cost SQLAlchemy ~3 µs per id to render)."""
        if self.engine.dialect.name == "sqlite":
            sql = ("SELECT id FROM device WHERE decommissioned_at IS NULL "
                   "AND id IN (SELECT value FROM json_each(?))")
            param: object = json.dumps(sorted(ids))
        else:
            sql, param = "SELECT id FROM device WHERE decommissioned_at IS NULL AND id = ANY(%s)", sorted(ids)
        return {row[0] for row in s.connection().exec_driver_sql(sql, (param,))}

    def _presence(self, s: Session, presence: dict[str, dict], now) -> None:
        """Online flags and running versions, one executemany per shape of update (a fleet reconnecting after a
        broker restart sends two such messages per device; a statement each took ~0.5 ms)."""
        shapes: dict[tuple[str, ...], list[dict]] = {}
        for device, values in presence.items():
            shapes.setdefault(tuple(sorted(values)), []).append({"b_id": device, "b_last_seen": now,
                                                                 **{f"b_{k}": v for k, v in values.items()}})
        for keys, rows in shapes.items():
            stmt = (update(Device).where(Device.id == bindparam("b_id"))  # type: ignore[arg-type]
                    .values(last_seen=bindparam("b_last_seen"), **{k: bindparam(f"b_{k}") for k in keys}))
            s.connection().execute(stmt, rows)

    def _event(self, s: Session, device_id: str, m: messages.UpdateEvent) -> None:
        row = s.exec(select(RolloutDevice).where(RolloutDevice.job == m.job)).first()
        if row is None or row.device_id != device_id:
            self.counts["event_unknown_job"] += 1
            return
        status = MemberStatus(row.status)
        if not may_report(status) and status is not MemberStatus.FAILED and status is not MemberStatus.ROLLED_BACK:
            self.counts["event_refused"] += 1
            log.warning("device %s sent an update event for job %s, which it was never offered (member %s); "
                        "dropped", device_id, m.job, status.value)
            return
        new = next_status(status, m.state, m.result)
        if new is None or new is MemberStatus.DOWNLOADING:
            if new is not None:
                row.status = new.value
                s.add(row)
            if m.result is UpdateResult.PENDING and MemberStatus(row.status) in IN_FLIGHT:
                self._waiting(s, row, m)
            return
        row.status = new.value
        row.finished_at = m.ts if new is not MemberStatus.ROLLED_BACK else row.finished_at
        row.reason, row.detail = m.reason.value, m.detail[:1000]
        row.timings = {**row.timings, **m.timings_ms}
        s.add(row)

    @staticmethod
    def _waiting(s: Session, row: RolloutDevice, m: messages.UpdateEvent) -> None:
        """A download that holds on the device's link policy shows as ``waiting: metered`` (or ``data budget``) with
        the bytes outstanding, until a progress event says it resumed."""
        if m.reason in WAITING_REASONS:
            row.reason, row.detail = m.reason.value, m.detail[:1000]
        elif row.reason in WAITING_REASONS:
            row.reason, row.detail = "", m.detail[:1000]
        else:
            return
        s.add(row)

    def _reconcile(self, s: Session, states: dict[str, messages.DeviceState]) -> None:
        """A device that runs a rollout's artifact in any of its models has installed it, even if its result event was
        lost."""
        running = {d: shas for d, m in states.items() if (shas := device_models.running_sha256s(m))}
        if not running:
            return
        for row in s.exec(select(RolloutDevice).where(RolloutDevice.device_id.in_(running),  # type: ignore[attr-defined]
                                                      RolloutDevice.status.in_(("offered", "downloading")))):  # type: ignore[attr-defined]
            if row.artifact_sha256 in running[row.device_id]:
                row.status, row.finished_at, row.reason = "installed", states[row.device_id].ts, "ok"
                row.detail = "reconciled from the device's state report"
                s.add(row)
                self.counts["reconciled"] += 1

    def _latency_json(self, m: messages.TelemetryBatch | fastdecode.TelemetryBatch) -> tuple[str | None, str | None]:
        if isinstance(m, fastdecode.TelemetryBatch):
            return fastdecode.latency_json(m)
        if m.latency_ms is None:
            return None, None
        # the edges are the same for the whole fleet: the last encoding is reused while they compare equal
        if m.latency_ms.edges != self._last_edges[0]:
            self._last_edges = (m.latency_ms.edges, json_dumps(m.latency_ms.edges))
        return self._last_edges[1], msgspec.json.encode(m.latency_ms.counts).decode()

    def _telemetry(self, s: Session, batch: list[tuple[str, messages.TelemetryBatch | fastdecode.TelemetryBatch]],
                   ) -> None:
        """INSERT … ON CONFLICT (device_id, seq) DO NOTHING over the whole batch, straight to the driver (SQLite: one
        executemany; PostgreSQL: COPY, see ``_copy_telemetry``): a redelivered window is stored once, and no ORM
        object, bound-parameter processing or JSON serializer call is made per row (the ingest's hottest path;
        SQLAlchemy's processing of 13 parameters cost ~15 µs a row). JSON columns get the text SQLAlchemy's JSON
        type reads back."""
        rows, seen = [], set()
        for device_id, m in batch:
            if (device_id, m.seq) in seen:
                continue
            seen.add((device_id, m.seq))
            edges, counts = self._latency_json(m)
            rows.append((device_id, m.seq, m.window_start, m.window_end, m.model_version, m.requests,
                         min(sum(m.errors.values()), messages.INT32_MAX),  # one integer column
                         edges, counts, m.cpu_percent, m.rss_mb, m.temperature_c, _inputs_json(m)))
        if self.engine.dialect.name == "postgresql":
            stored = _copy_telemetry(s, rows)
        else:  # sqlite3's executemany loops in C
            result = s.connection().exec_driver_sql(SQLITE_TELEMETRY_INSERT, rows)
            stored = result.rowcount if result.rowcount >= 0 else len(rows)  # type: ignore[attr-defined]
        self.counts["tm_stored"] += stored
        self.counts["tm_duplicate"] += len(batch) - stored


TELEMETRY_COLUMNS = ("device_id", "seq", "window_start", "window_end", "model_version", "requests", "errors",
                     "latency_edges", "latency_counts", "cpu_percent", "rss_mb", "temperature_c", "inputs")


# Straight to the driver: JSON columns get the text SQLAlchemy's JSON type reads back.
_TABLE = TelemetryWindow.__tablename__
SQLITE_TELEMETRY_INSERT = (f"INSERT INTO {_TABLE} ({', '.join(TELEMETRY_COLUMNS)}) VALUES "
                           f"({', '.join('?' * len(TELEMETRY_COLUMNS))}) ON CONFLICT (device_id, seq) DO NOTHING")
_PG_TYPES = ("text", "bigint", "float8", "float8", "text", "integer", "integer", "json", "json", "float8", "float8",
             "float8", "json")
_PG_STAGING = "ef_telemetry_in"  # per connection, emptied at every commit


def _copy_telemetry(s: Session, rows: list[tuple]) -> int:
    """PostgreSQL: COPY the batch into a temporary table, then one INSERT … SELECT … ON CONFLICT DO NOTHING. psycopg's
    executemany spent ~25 µs of Python per row in its pipeline, and array parameters quote every element with a
    regular expression; COPY formats rows in C. Returns the rows stored (duplicates skipped)."""
    connection = s.connection()
    dbapi = connection.dialect.loaded_dbapi
    cursor = connection.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
    columns = ", ".join(TELEMETRY_COLUMNS)
    typed = ", ".join(f"{c} {t}" for c, t in zip(TELEMETRY_COLUMNS, _PG_TYPES, strict=True))
    try:
        cursor.execute(f"CREATE TEMPORARY TABLE IF NOT EXISTS {_PG_STAGING} ({typed}) ON COMMIT DELETE ROWS")
        with cursor.copy(f"COPY {_PG_STAGING} ({columns}) FROM STDIN") as copy:
            for row in rows:
                copy.write_row(row)
        cursor.execute(f"INSERT INTO {_TABLE} ({columns}) SELECT {columns} FROM {_PG_STAGING} "
                       "ON CONFLICT (device_id, seq) DO NOTHING")
        return cursor.rowcount
    except dbapi.Error as e:  # as SQLAlchemy would raise it: a full disk or a lost connection is an outage
        raise exc.DBAPIError.instance(f"COPY {_PG_STAGING}", None, e, dbapi.Error,
                                      dialect=connection.dialect) from e
    finally:
        cursor.close()


def _inputs_json(m: messages.TelemetryBatch | fastdecode.TelemetryBatch) -> str:
    if isinstance(m, fastdecode.TelemetryBatch):
        return fastdecode.inputs_json(m)
    return json.dumps([i.model_dump(mode="json") for i in m.inputs]) if m.inputs else "[]"


def _no_ack() -> None:
    """A message submitted without an acknowledgement to give (by a test or a tool)."""


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
