"""The ingest writer: validates what devices report and writes it in batches.

- ``evt``: update progress and results → the device's rollout member (fleet_server/rollouts/members.py);
- ``state``: what the device runs → the device row; ``online``: its last will / birth message → online, last seen;
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

import logging
import queue
import threading
import time
from collections import Counter

from sqlalchemy import bindparam, exc, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from fleet_protocol import messages, topics
from fleet_protocol.errors import ProtocolError
from fleet_server.models import Device, RolloutDevice, TelemetryWindow, utcnow
from fleet_server.pacing import TokenBuckets
from fleet_server.rollouts.members import may_report, next_status
from fleet_server.rollouts.planner import MemberStatus

log = logging.getLogger(__name__)
BATCH_S = 0.1
BATCH_MAX = 2000
QUEUE_MAX = 100_000  # above the link's Receive Maximum: the queue never fills from the broker
WRITTEN_KINDS = ("evt", "state", "online", "tm")
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
        self.queue: queue.Queue = queue.Queue(QUEUE_MAX)
        self.counts: Counter = Counter()
        self.outage_since: float | None = None  # monotonic time the database stopped taking writes
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ingest", daemon=True)

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
        try:
            self.queue.put_nowait((topic, payload, ack or _no_ack))
        except queue.Full:
            self.counts["dropped_queue_full"] += 1

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
                m = messages.parse_for(t.kind, payload)
            except ProtocolError as e:
                self.counts["invalid"] += 1
                log.warning("invalid device message on %s: %s", topic_text[:120], str(e)[:200])
                continue
            parsed.append((t, m))
        if not parsed:
            return
        with Session(self.engine) as s:
            ids = {t.device for t, _ in parsed}
            live = set(s.exec(select(Device.id).where(Device.id.in_(ids),  # type: ignore[attr-defined]
                                                      Device.decommissioned_at.is_(None))))  # type: ignore[union-attr]
            telemetry: list[tuple[str, messages.TelemetryBatch]] = []
            presence: dict[str, dict] = {}  # device → its newest online/state values in this batch
            states: dict[str, messages.DeviceState] = {}
            now = utcnow()
            for t, m in parsed:
                if t.device not in live:
                    self.counts["refused_unknown_device"] += 1
                    continue
                self.counts[t.kind] += 1
                if isinstance(m, messages.TelemetryBatch):
                    telemetry.append((t.device, m))
                elif isinstance(m, messages.UpdateEvent):
                    self._event(s, t.device, m)
                elif isinstance(m, messages.DeviceState):
                    presence.setdefault(t.device, {}).update(online=True, active_version=m.active_version,
                                                             active_sha256=m.active_sha256)
                    states[t.device] = m
                elif isinstance(m, messages.Online):
                    presence.setdefault(t.device, {})["online"] = m.online
            if presence:
                self._presence(s, presence, now)
            if states:
                self._reconcile(s, states)
            if telemetry:
                self._telemetry(s, telemetry)
            s.commit()

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
            return
        row.status = new.value
        row.finished_at = m.ts if new is not MemberStatus.ROLLED_BACK else row.finished_at
        row.reason, row.detail = m.reason.value, m.detail[:1000]
        row.timings = {**row.timings, **m.timings_ms}
        s.add(row)

    def _reconcile(self, s: Session, states: dict[str, messages.DeviceState]) -> None:
        """A device that runs a rollout's artifact has installed it, even if its result event was lost."""
        running = {d: m for d, m in states.items() if m.active_sha256}
        if not running:
            return
        for row in s.exec(select(RolloutDevice).where(RolloutDevice.device_id.in_(running),  # type: ignore[attr-defined]
                                                      RolloutDevice.status.in_(("offered", "downloading")))):  # type: ignore[attr-defined]
            m = running[row.device_id]
            if row.artifact_sha256 == m.active_sha256:
                row.status, row.finished_at, row.reason = "installed", m.ts, "ok"
                row.detail = "reconciled from the device's state report"
                s.add(row)
                self.counts["reconciled"] += 1

    def _telemetry(self, s: Session, batch: list[tuple[str, messages.TelemetryBatch]]) -> None:
        """INSERT … ON CONFLICT (device_id, seq) DO NOTHING over the whole batch (executemany): a redelivered batch is
        stored once, and no ORM object is built per message (the ingest's hottest path)."""
        rows, seen = [], set()
        for device_id, m in batch:
            if (device_id, m.seq) in seen:
                continue
            seen.add((device_id, m.seq))
            rows.append({"device_id": device_id, "seq": m.seq, "window_start": m.window_start,
                         "window_end": m.window_end, "model_version": m.model_version, "requests": m.requests,
                         "errors": min(sum(m.errors.values()), messages.INT32_MAX),  # one integer column
                         # a tuple: the edges repeat across windows, so db.json_dumps encodes them once
                         "latency_edges": m.latency_ms.edges if m.latency_ms else None,
                         "latency_counts": list(m.latency_ms.counts) if m.latency_ms else None,
                         "cpu_percent": m.cpu_percent, "rss_mb": m.rss_mb, "temperature_c": m.temperature_c,
                         "inputs": [i.model_dump(mode="json") for i in m.inputs]})
        insert = sqlite_insert if self.engine.dialect.name == "sqlite" else pg_insert
        statement = insert(TelemetryWindow.__table__).on_conflict_do_nothing(  # type: ignore[attr-defined]
            index_elements=["device_id", "seq"])
        result = s.execute(statement, rows)  # executemany: one compiled statement, cached
        stored = result.rowcount if result.rowcount >= 0 else len(rows)  # type: ignore[attr-defined]
        self.counts["tm_stored"] += stored
        self.counts["tm_duplicate"] += len(batch) - stored


def _no_ack() -> None:
    """A message submitted without an acknowledgement to give (by a test or a tool)."""


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
