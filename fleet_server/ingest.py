"""The server's MQTT side: one persistent paho client (MQTT 5, shared subscriptions so replicas split the traffic)
and the ingest worker that validates every device message and writes it in batches.

- ``evt``: update progress and results → the device's rollout row (statuses only move forward);
- ``state``: what the device runs → the device row; ``online``: its last will / birth message → online, last seen;
- ``tm``: telemetry batches, stored once per (device, seq) — a QoS 1 redelivery is not counted twice;
- ``dl/<job>/req``: chunk requests, answered from the artifact store for files the job lists.

A message that does not parse, names an unknown or decommissioned device, or breaks a limit is counted and logged,
never fatal. The worker commits every ``BATCH_S`` or ``BATCH_MAX`` messages, and only then acknowledges them to the
broker (MQTT 5 manual acknowledgement): a server killed mid-batch gets the same messages again from its persistent
session, so nothing a device saw acknowledged is lost. Two kinds of failure are told apart:

- a message the database refuses (bad data that passed parsing) is written alone, dropped and counted: it never holds
  up other devices' messages;
- an operational error (database down, disk full, connection lost) is an outage: the batch is held and retried,
  nothing is acknowledged meanwhile, and ``/ready`` answers 503 until a write succeeds again.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import queue
import ssl
import threading
import time
from collections import Counter
from urllib.parse import urlparse

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from sqlalchemy import bindparam, exc, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from fleet_protocol import messages, topics
from fleet_protocol.chunks import DEFAULT_CHUNK_SIZE as CHUNK_SIZE
from fleet_protocol.errors import ProtocolError
from fleet_server.models import Device, Rollout, RolloutDevice, TelemetryWindow, utcnow
from fleet_server.rollouts.planner import IN_FLIGHT, MemberStatus, RolloutState

log = logging.getLogger(__name__)
BATCH_S = 0.1
BATCH_MAX = 2000
QUEUE_MAX = 100_000
CHUNK_ACK_TIMEOUT_S = 10.0
CHUNK_WINDOW_BYTES = 8 * 1024 * 1024  # chunk bytes published but not yet acknowledged by the broker
ORDER = {"pending": 0, "offered": 1, "downloading": 2, "installed": 3, "failed": 3, "rolled_back": 4}
# Update events a member can produce in each status: a device never offered a job (pending, skipped) has nothing to
# report, and a finished one only the outcome of a rollback order. Anything else is forged or stale: dropped.
EVENT_STATUSES = {MemberStatus.OFFERED.value, MemberStatus.DOWNLOADING.value, MemberStatus.INSTALLED.value}
# MQTT 5 Receive Maximum: QoS 1 messages the broker may have in flight to the server unacknowledged. With manual
# acknowledgement after commit this bounds the in-memory queue, and it must exceed a batch (Mosquitto's default of
# 100 would cap ingest at ~100 messages per commit).
RECEIVE_MAXIMUM = 20_000
JOB_RECHECK_S = 2.0  # a job's chunk permission (member still downloading, rollout not aborted) is re-read this often
CHUNK_RATE_BYTES_S = 4 * 1024 * 1024  # per device: a device asking for chunks in a loop cannot saturate the server
CHUNK_BURST_BYTES = 64 * 1024 * 1024  # a whole artifact of up to this size downloads at full speed
SESSION_TAKEN_OVER = 142  # MQTT 5 DISCONNECT reason: another client connected with our client id
OUTAGE_ERRORS = (exc.OperationalError, exc.InterfaceError, exc.TimeoutError, exc.DisconnectionError, OSError)


class _Outage(Exception):
    """The database cannot take writes now (down, disk full, connection lost): hold the batch, retry later."""


class FleetLink:
    """The server's MQTT client: connects in the background (and keeps reconnecting), subscribes on every connect,
    hands each message to ``on_message(topic, payload)``."""

    def __init__(self, broker_url: str, client_id: str, username: str | None, on_message, *,
                 password: str | None = None, tls: dict[str, str | None] | None = None,
                 share_group: str = topics.SHARE_GROUP):
        """``on_message(topic, payload, ack)``: ``ack()`` acknowledges the message to the broker, to be called once
        it is committed (or deliberately dropped); until then the broker keeps it for redelivery."""
        u = urlparse(broker_url)
        self.host, self.port = u.hostname or "127.0.0.1", u.port or (8883 if u.scheme == "mqtts" else 1883)
        self.client_id, self.share_group = client_id, share_group
        self.connected = threading.Event()
        self.displaced = 0  # times another client took over our session
        self._generation = 0  # connections so far: an acknowledgement is only valid on the connection it came on
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5,
                                  manual_ack=True)
        if username:
            self.client.username_pw_set(username, password)
        if u.scheme == "mqtts":  # the broker's certificate is always verified (CA file, else the system's)
            self.client.tls_set(cert_reqs=ssl.CERT_REQUIRED, tls_version=ssl.PROTOCOL_TLS_CLIENT, **(tls or {}))
        self.client.reconnect_delay_set(0.2, 5)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = lambda c, ud, msg: on_message(msg.topic, msg.payload, self._acker(msg))
        self._started = False

    def _acker(self, msg: mqtt.MQTTMessage):
        if msg.qos == 0:
            return _no_ack
        generation, mid = self._generation, msg.mid

        def ack() -> None:
            # After a reconnect the broker sends every unacknowledged message again (same session): acknowledging
            # the old mid on the new connection could acknowledge another message, so a stale ack is skipped.
            if generation == self._generation:
                self.client.ack(mid, 1)

        return ack

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self.connected.clear()
        if getattr(reason_code, "value", None) == SESSION_TAKEN_OVER:
            self.displaced += 1
            log.error("the broker disconnected the server: another client connected with its client id %r "
                      "(the broker must bind client ids to usernames: use_username_as_clientid)", self.client_id)
        elif reason_code is not None and getattr(reason_code, "is_failure", False):
            log.warning("the server's broker connection closed: %s", reason_code)

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.warning("broker refused the server: %s", reason_code)
            return
        self._generation += 1
        for t in topics.server_subscriptions(self.share_group):
            client.subscribe(t, qos=1)
        self.connected.set()

    def start(self) -> FleetLink:
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600  # the broker keeps our subscriptions and queues while we restart
        props.ReceiveMaximum = RECEIVE_MAXIMUM
        self.client.connect_async(self.host, self.port, keepalive=30, clean_start=False, properties=props)
        self.client.loop_start()
        self._started = True
        return self

    def publish(self, topic: str, payload: bytes, qos: int = 1) -> mqtt.MQTTMessageInfo:
        return self.client.publish(topic, payload, qos=qos)

    def stop(self) -> None:
        if self._started:
            with contextlib.suppress(Exception):
                self.client.disconnect()
            self.client.loop_stop()
            self._started = False


class Ingest:
    """Validates and writes what devices send; answers chunk requests through ``publish``."""

    def __init__(self, engine: Engine, delivery, publish, *, clock=time.monotonic):
        self.engine, self.delivery, self.publish, self._clock = engine, delivery, publish, clock
        self.queue: queue.Queue = queue.Queue(QUEUE_MAX)
        self.chunk_queue: queue.Queue = queue.Queue(QUEUE_MAX)
        self._chunk_thread = threading.Thread(target=self._serve_chunks, name="chunks", daemon=True)
        self.counts: Counter = Counter()
        self.outage_since: float | None = None  # monotonic time the database stopped taking writes
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ingest", daemon=True)
        # job → (device, files, when checked): chunk requests need no query until the permission is re-read
        self._jobs: dict[str, tuple[str, dict, float]] = {}
        self._buckets: dict[str, tuple[float, float]] = {}  # device → (chunk byte tokens, when refilled)

    @property
    def healthy(self) -> bool:
        """False while an outage holds the batch (the server is then not ready)."""
        return self.outage_since is None

    def start(self) -> Ingest:
        self._thread.start()
        self._chunk_thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self._chunk_thread.join(10)

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
            if batch:
                self._write_retrying(batch)

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
                m = messages.parse(payload)
            except (ProtocolError, ValueError) as e:
                self.counts["invalid"] += 1
                log.warning("invalid device message on %s: %s", topic_text[:120], str(e)[:200])
                continue
            expected = {"evt": messages.UpdateEvent, "state": messages.DeviceState, "online": messages.Online,
                        "tm": messages.TelemetryBatch, "dl-req": messages.ChunkRequest}.get(t.kind)
            if expected is None or not isinstance(m, expected):
                self.counts["invalid"] += 1
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
                elif isinstance(m, messages.ChunkRequest):
                    self._chunks(s, t.device, m)
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
        if row.status not in EVENT_STATUSES:
            self.counts["event_refused"] += 1
            log.warning("device %s sent an update event for job %s, which it was never offered (status %s); dropped",
                        device_id, m.job, row.status)
            return
        if row.status == MemberStatus.INSTALLED.value and not (m.result == "ok" and m.state == "rolled_back"):
            return  # after installing, only the outcome of a rollback order can change a member
        if m.result == "ok" and m.state == "committed":
            new = "installed"
        elif m.result == "ok" and m.state == "rolled_back":
            new = "rolled_back"
        elif m.result == "failed":
            new = "failed"
        else:
            new = "downloading"
        if ORDER[new] < ORDER.get(row.status, 0) or (new == row.status and new != "downloading"):
            return  # a redelivered or late event never moves a device backwards
        if new == "failed" and row.status == "installed":
            return  # a failed rollback attempt leaves the device on the new version: keep it visible as installed
        row.status = new
        if new != "downloading":
            row.finished_at = m.ts if new != "rolled_back" else row.finished_at
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
                         "errors": sum(m.errors.values()),
                         "latency_edges": list(m.latency_ms.edges) if m.latency_ms else None,
                         "latency_counts": list(m.latency_ms.counts) if m.latency_ms else None,
                         "cpu_percent": m.cpu_percent, "rss_mb": m.rss_mb,
                         "inputs": [i.model_dump(mode="json") for i in m.inputs]})
        insert = sqlite_insert if self.engine.dialect.name == "sqlite" else pg_insert
        statement = insert(TelemetryWindow.__table__).on_conflict_do_nothing(  # type: ignore[attr-defined]
            index_elements=["device_id", "seq"])
        result = s.execute(statement, rows)  # executemany: one compiled statement, cached
        stored = result.rowcount if result.rowcount >= 0 else len(rows)  # type: ignore[attr-defined]
        self.counts["tm_stored"] += stored
        self.counts["tm_duplicate"] += len(batch) - stored

    def _chunks(self, s: Session, device_id: str, m: messages.ChunkRequest) -> None:
        """Queue a chunk request for serving if the job is the device's own, still in flight, in a rollout that was
        not aborted or finished; the permission is re-read every ``JOB_RECHECK_S``."""
        now = self._clock()
        known = self._jobs.get(m.job)
        if known is None or now - known[2] > JOB_RECHECK_S:
            row = s.exec(select(RolloutDevice.device_id, RolloutDevice.files, RolloutDevice.status, Rollout.state)
                         .join(Rollout, Rollout.id == RolloutDevice.rollout_id)  # type: ignore[arg-type]
                         .where(RolloutDevice.job == m.job)).first()
            if row is None:
                self.counts["chunk_unknown_job"] += 1
                return
            owner, files, member_status, rollout_state = row
            servable = (member_status in {st.value for st in IN_FLIGHT}
                        and rollout_state in (RolloutState.RUNNING.value, RolloutState.PAUSED.value))
            if len(self._jobs) > 100_000:  # bounded: finished jobs are never asked for again
                self._jobs.clear()
            known = self._jobs[m.job] = (owner, dict(files) if servable else {}, now)
        owner, files, _ = known
        if owner != device_id:
            self.counts["chunk_wrong_device"] += 1
            return
        if not files:
            self.counts["chunk_job_closed"] += 1
            return
        cost = len(set(m.indices)) * getattr(self.delivery, "chunk_size", CHUNK_SIZE)
        if not self._take_tokens(device_id, now, cost):
            self.counts["chunk_rate_limited"] += 1  # the device asks again on its stall timer
            return
        try:
            self.chunk_queue.put_nowait((device_id, files, m))
        except queue.Full:
            self.counts["chunk_dropped"] += 1  # the device asks again when its download stalls

    def _take_tokens(self, device_id: str, now: float, cost: int) -> bool:
        """A per-device token bucket over requested chunk bytes, refilled at ``CHUNK_RATE_BYTES_S`` up to
        ``CHUNK_BURST_BYTES``: a request is admitted while the bucket is positive and charged when admitted (on this
        thread, so a burst of requests in one batch cannot all pass before the serving thread catches up)."""
        tokens, then = self._buckets.get(device_id, (float(CHUNK_BURST_BYTES), now))
        tokens = min(float(CHUNK_BURST_BYTES), tokens + (now - then) * CHUNK_RATE_BYTES_S)
        if tokens <= 0:
            self._buckets[device_id] = (tokens, now)
            return False
        self._buckets[device_id] = (tokens - cost, now)
        if len(self._buckets) > 100_000:  # bounded; a forgotten device starts again with a full bucket
            self._buckets.clear()
        return True

    def _serve_chunks(self) -> None:
        """Answers chunk requests on its own thread, so a wave's downloads never delay events and telemetry.

        Backpressure by a window: at most ``CHUNK_WINDOW_BYTES`` of chunks the broker has not acknowledged yet; past
        it, the oldest is waited for (bounded). The server's memory holds that window instead of a whole wave's bytes
        (paho queues every publish in memory), and the broker link stays busy: waiting for each answer's PUBACK
        before the next served one device per round trip (~15 ms under load: 150 s for 10,000 devices)."""
        in_flight: collections.deque = collections.deque()  # (MQTTMessageInfo, bytes)
        window = 0
        while not self._stop.is_set():
            try:
                device_id, files, m = self.chunk_queue.get(timeout=0.2)
            except queue.Empty:
                continue
            while in_flight and in_flight[0][0].is_published():  # acknowledged meanwhile
                window -= in_flight.popleft()[1]
            try:
                for payload in self.delivery.chunks(m.job, files, m):
                    info = self.publish(topics.topic(device_id, "dl", m.job), payload)
                    in_flight.append((info, len(payload)))
                    window += len(payload)
                    self.counts["chunks_sent"] += 1
                    while window > CHUNK_WINDOW_BYTES and in_flight:
                        oldest, size = in_flight.popleft()
                        window -= size
                        with contextlib.suppress(RuntimeError, ValueError):  # not connected: devices ask again
                            oldest.wait_for_publish(CHUNK_ACK_TIMEOUT_S)
            except Exception:  # a missing file or a broker hiccup: the device re-requests on its stall timer
                self.counts["chunk_failed"] += 1
                log.exception("serving chunks for %s failed", m.job)


def _no_ack() -> None:
    """A message that needs no acknowledgement (QoS 0, or submitted by a test or a tool)."""


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
