"""The server's MQTT side: one persistent paho client (MQTT 5, shared subscriptions so replicas split the traffic)
and the ingest worker that validates every device message and writes it in batches.

- ``evt``: update progress and results → the device's rollout row (statuses only move forward);
- ``state``: what the device runs → the device row; ``online``: its last will / birth message → online, last seen;
- ``tm``: telemetry batches, stored once per (device, seq) — a QoS 1 redelivery is not counted twice;
- ``dl/<job>/req``: chunk requests, answered from the artifact store for files the job lists.

A message that does not parse, names an unknown or decommissioned device, or breaks a limit is counted and logged,
never fatal. The worker commits every ``BATCH_S`` or ``BATCH_MAX`` messages.
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
from sqlalchemy import bindparam, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from fleet_protocol import messages, topics
from fleet_protocol.errors import ProtocolError
from fleet_server.models import Device, RolloutDevice, TelemetryWindow, utcnow

log = logging.getLogger(__name__)
BATCH_S = 0.1
BATCH_MAX = 2000
QUEUE_MAX = 100_000
CHUNK_ACK_TIMEOUT_S = 10.0
CHUNK_WINDOW_BYTES = 8 * 1024 * 1024  # chunk bytes published but not yet acknowledged by the broker
ORDER = {"pending": 0, "offered": 1, "downloading": 2, "installed": 3, "failed": 3, "rolled_back": 4}


class FleetLink:
    """The server's MQTT client: connects in the background (and keeps reconnecting), subscribes on every connect,
    hands each message to ``on_message(topic, payload)``."""

    def __init__(self, broker_url: str, client_id: str, on_message, *, username: str | None = None,
                 password: str | None = None, tls: dict[str, str | None] | None = None):
        u = urlparse(broker_url)
        self.host, self.port = u.hostname or "127.0.0.1", u.port or (8883 if u.scheme == "mqtts" else 1883)
        self.connected = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        if username:
            self.client.username_pw_set(username, password)
        if u.scheme == "mqtts":  # the broker's certificate is always verified (CA file, else the system's)
            self.client.tls_set(cert_reqs=ssl.CERT_REQUIRED, tls_version=ssl.PROTOCOL_TLS_CLIENT, **(tls or {}))
        self.client.reconnect_delay_set(0.2, 5)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = lambda *a: self.connected.clear()
        self.client.on_message = lambda c, ud, msg: on_message(msg.topic, msg.payload)
        self._started = False

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.warning("broker refused the server: %s", reason_code)
            return
        for t in topics.server_subscriptions():
            client.subscribe(t, qos=1)
        self.connected.set()

    def start(self) -> FleetLink:
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600  # the broker keeps our subscriptions and queues while we restart
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

    def __init__(self, engine: Engine, delivery, publish):
        self.engine, self.delivery, self.publish = engine, delivery, publish
        self.queue: queue.Queue = queue.Queue(QUEUE_MAX)
        self.chunk_queue: queue.Queue = queue.Queue(QUEUE_MAX)
        self._chunk_thread = threading.Thread(target=self._serve_chunks, name="chunks", daemon=True)
        self.counts: Counter = Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ingest", daemon=True)
        self._jobs: dict[str, tuple[str, dict]] = {}  # job → (device, files): chunk requests need no query

    def start(self) -> Ingest:
        self._thread.start()
        self._chunk_thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self._chunk_thread.join(10)

    def submit(self, topic: str, payload: bytes) -> None:
        """From paho's thread: never blocks it for long (a full queue drops and counts)."""
        try:
            self.queue.put_nowait((topic, payload))
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

    def _write_retrying(self, batch: list[tuple[str, bytes]]) -> None:
        """A database outage holds the batch and retries with backoff (messages queue up behind it, bounded by
        QUEUE_MAX) instead of dropping it; only a shutdown during the outage gives it up, counted. When the
        database answers but the batch keeps failing, a message in it is the cause: the batch is written one message
        at a time and only the ones that fail are dropped (counted, logged)."""
        delay, failures = 0.5, 0
        while True:
            try:
                self._write(batch)
                return
            except Exception:
                failures += 1
                if failures >= 3 and len(batch) > 1 and self._database_ok():
                    for one in batch:
                        try:
                            self._write([one])
                        except Exception:
                            self.counts["poison"] += 1
                            log.exception("a message on %s cannot be written; dropped", one[0][:120])
                    return
                if self._stop.is_set():
                    self.counts["lost_at_shutdown"] += len(batch)
                    log.exception("ingest batch of %d given up at shutdown", len(batch))
                    return
                self.counts["batch_retries"] += 1
                log.warning("ingest batch of %d failed; retrying in %.1f s", len(batch), delay, exc_info=True)
                self._stop.wait(delay)
                delay = min(delay * 2, 5.0)

    def _database_ok(self) -> bool:
        try:
            with self.engine.connect() as conn:
                conn.exec_driver_sql("SELECT 1")
            return True
        except Exception:
            return False

    def _write(self, batch: list[tuple[str, bytes]]) -> None:
        parsed = []
        for topic_text, payload in batch:
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
        known = self._jobs.get(m.job)
        if known is None:
            row = s.exec(select(RolloutDevice).where(RolloutDevice.job == m.job)).first()
            if row is None:
                self.counts["chunk_unknown_job"] += 1
                return
            known = self._jobs[m.job] = (row.device_id, dict(row.files))
        owner, files = known
        if owner != device_id:
            self.counts["chunk_wrong_device"] += 1
            return
        try:
            self.chunk_queue.put_nowait((device_id, files, m))
        except queue.Full:
            self.counts["chunk_dropped"] += 1  # the device asks again when its download stalls

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
