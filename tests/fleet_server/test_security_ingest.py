"""Hostile device messages and database faults against the ingest on real SQLite and PostgreSQL (issue 14, items 2, 5,
7 and the chunk part of 11). Each test failed before its fix:

- one telemetry message with ``window_end: NaN``, ``seq: 2**63`` or a NUL byte failed its batch forever, and no
  other device's telemetry was stored;
- a device could report a job it was never offered as installed, or failed (aborting the rollout);
- a full disk made every message "poison": dropped;
- chunks were served for aborted rollouts, and without any rate limit.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from sqlalchemy import func, text
from sqlmodel import Session, select

from fleet_protocol import messages, topics
from fleet_server.artifacts import LocalArtifactStore
from fleet_server.db import make_engine
from fleet_server.ingest import Ingest
from fleet_server.migrate import upgrade
from fleet_server.models import Device, ModelVersion, Rollout, RolloutDevice, TelemetryWindow
from fleet_server.rollouts.delivery import Delivery
from fleet_server.rollouts.downloads import CHUNK_BURST_BYTES, JOB_RECHECK_S, REQUEST_BURST, Downloads
from fleet_server.rollouts.engine import new_job_id
from tests.postgres import Postgres


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise TimeoutError(f"timed out waiting for {what}")


def add_devices(engine, *ids: str) -> None:
    with Session(engine) as s:
        for d in ids:
            s.add(Device(id=d, profile="rpi5", signing_public_key=hashlib.sha256(d.encode()).hexdigest(),
                         mqtt_password_hash="x"))
        s.commit()


def stored(engine, device: str | None = None) -> int:
    with Session(engine) as s:
        q = select(func.count()).select_from(TelemetryWindow)
        if device:
            q = q.where(TelemetryWindow.device_id == device)
        return s.exec(q).one()


def window(seq: int, **extra) -> dict:
    now = time.time()
    return {"v": 1, "type": "telemetry", "seq": seq, "window_start": now - 1, "window_end": now, "requests": 3,
            **extra}


class Acks:
    """Records which submitted messages the ingest acknowledged (what it hands paho's ``ack``)."""

    def __init__(self) -> None:
        self.done: list[str] = []

    def __call__(self, name: str):
        return lambda: self.done.append(name)


@pytest.fixture
def ingest_db(database_url):
    upgrade(database_url)
    engine = make_engine(database_url)
    add_devices(engine, "good", "evil")
    yield engine
    engine.dispose()


def test_security_hostile_telemetry_is_dropped_alone_and_the_fleet_keeps_reporting(ingest_db):
    engine, acks = ingest_db, Acks()
    hostile = {
        "nan": b'{"v":1,"type":"telemetry","seq":1,"window_start":1,"window_end":NaN,"requests":1}',
        "seq": json.dumps(window(2**63)).encode(),
        "nul": json.dumps(window(3, model_version="m\x00")).encode(),
        "nul-key": json.dumps(window(4, errors={"e\x00": 1})).encode(),
        "int32": json.dumps(window(5, requests=2**31)).encode(),
        "inf-input": json.dumps(window(6, cpu_percent=1e400)).encode().replace(b"Infinity", b"1e999"),
    }
    ingest = Ingest(engine).start()
    try:
        for i, (name, payload) in enumerate(hostile.items()):  # each alone in its batch: the case that stuck forever
            ingest.submit(topics.topic("evil", "tm"), payload, acks(name))
            ingest.submit(topics.topic("good", "tm"), messages.TelemetryBatch(**window(i)).to_bytes(), acks(f"g{i}"))
            time.sleep(0.15)
        wait_for(lambda: stored(engine, "good") == len(hostile), 20, "the good device's telemetry")
        wait_for(lambda: len(acks.done) == 2 * len(hostile), 5, "every message acknowledged")
    finally:
        ingest.stop()
    assert stored(engine, "evil") == 0
    assert ingest.counts["invalid"] == len(hostile) and not ingest.counts["batch_retries"]
    assert ingest.healthy


def _refuse_seq(engine, seq: int) -> None:
    """A trigger that makes the database itself refuse one telemetry row: bad data that passed parsing."""
    with engine.begin() as conn:
        if engine.dialect.name == "sqlite":
            conn.execute(text(f"CREATE TRIGGER refuse BEFORE INSERT ON telemetry_window WHEN NEW.seq = {seq} "
                              "BEGIN SELECT RAISE(ABORT, 'refused by trigger'); END"))
        else:
            conn.execute(text(f"CREATE FUNCTION refuse() RETURNS trigger AS $$ BEGIN IF NEW.seq = {seq} THEN "
                              "RAISE EXCEPTION 'refused by trigger'; END IF; RETURN NEW; END $$ LANGUAGE plpgsql"))
            conn.execute(text("CREATE TRIGGER refuse BEFORE INSERT ON telemetry_window FOR EACH ROW "
                              "EXECUTE FUNCTION refuse()"))


def test_security_a_message_the_database_refuses_is_dropped_alone(ingest_db):
    engine, acks = ingest_db, Acks()
    _refuse_seq(engine, 13)
    ingest = Ingest(engine).start()
    try:
        ingest.submit(topics.topic("evil", "tm"), messages.TelemetryBatch(**window(13)).to_bytes(), acks("alone"))
        wait_for(lambda: ingest.counts["poison"] == 1, 10, "the lone refused message dropped")
        for seq in range(20):  # one batch holding the refused message among good ones
            ingest.submit(topics.topic("good", "tm"), messages.TelemetryBatch(**window(seq)).to_bytes(), acks(str(seq)))
        wait_for(lambda: stored(engine, "good") == 19, 10, "the other 19 stored")
        wait_for(lambda: len(acks.done) == 21, 5, "every message acknowledged")
    finally:
        ingest.stop()
    assert ingest.counts["poison"] == 2 and ingest.healthy and not ingest.counts["batch_retries"]


def test_security_forged_update_events_cannot_move_members(ingest_db):
    """A device reports results only for its own job and only once it was offered it; job ids cannot be guessed."""
    engine = ingest_db
    with Session(engine) as s:
        mv = ModelVersion(name="m", version="1", source_sha256="a" * 64, source_format="onnx",
                          calibration_sha256="b" * 64)
        s.add(mv)
        s.commit()
        r = Rollout(model_version_id=mv.id, state="running")
        s.add(r)
        s.commit()
        never_offered = RolloutDevice(rollout_id=r.id, device_id="evil", job=new_job_id(r.id))
        offered = RolloutDevice(rollout_id=r.id, device_id="good", job=new_job_id(r.id), status="offered",
                                offered_at=time.time())
        s.add(never_offered)
        s.add(offered)
        s.commit()
        jobs = {"evil": never_offered.job, "good": offered.job}
    assert "evil" not in jobs["evil"] and jobs["evil"] != jobs["good"] and len(jobs["evil"]) >= 20

    def event(job: str, result: str, state: str) -> bytes:
        return messages.UpdateEvent(job=job, state=state, result=result, ts=time.time(),
                                    reason="ok" if result == "ok" else "probe_failed").to_bytes()

    ingest = Ingest(engine).start()
    try:
        ingest.submit(topics.topic("evil", "evt"), event(jobs["evil"], "ok", "committed"))  # never offered
        ingest.submit(topics.topic("evil", "evt"), event(jobs["evil"], "failed", "failed"))
        ingest.submit(topics.topic("evil", "evt"), event(jobs["good"], "failed", "failed"))  # another's job
        ingest.submit(topics.topic("good", "evt"), event(jobs["good"], "ok", "committed"))
        wait_for(lambda: ingest.counts["evt"] == 4, 10, "the events processed")
    finally:
        ingest.stop()
    with Session(engine) as s:
        status = {m.device_id: m.status for m in s.exec(select(RolloutDevice))}
    assert status == {"evil": "pending", "good": "installed"}
    assert ingest.counts["event_refused"] == 2 and ingest.counts["event_unknown_job"] == 1


class _Published:
    """What paho's publish returns, for a broker that acknowledges at once."""

    def is_published(self) -> bool:
        return True

    def wait_for_publish(self, timeout: float) -> None:
        return None


def test_security_chunks_stop_for_aborted_rollouts_are_rate_limited_and_not_sent_twice(ingest_db, tmp_path):
    engine = ingest_db
    store = LocalArtifactStore(tmp_path / "artifacts")
    chunks = CHUNK_BURST_BYTES // (256 * 1024) + 32  # more than a burst: 256 KiB chunks
    sha = store.put_bytes(os.urandom(chunks * 256 * 1024))
    with Session(engine) as s:
        mv = ModelVersion(name="m", version="1", source_sha256=sha, source_format="onnx", calibration_sha256="b" * 64)
        s.add(mv)
        s.commit()
        r = Rollout(model_version_id=mv.id, state="running")
        s.add(r)
        s.commit()
        rollout_id = r.id
        members = {d: RolloutDevice(rollout_id=r.id, device_id=d, job=new_job_id(r.id), status="downloading",
                                    files={f"blobs/{sha}": sha}) for d in ("good", "evil")}
        for m in members.values():
            s.add(m)
        s.commit()
        jobs = {d: m.job for d, m in members.items()}
    now = [1000.0]
    sent: list[str] = []
    downloads = Downloads(engine, Delivery(tmp_path / "data", store), lambda t, p: sent.append(t) or _Published(),
                          clock=lambda: now[0]).start()

    def ask(device: str, first: int = 0, count: int = 4, job: str | None = None) -> None:
        req = messages.ChunkRequest(job=job or jobs[device], path=f"blobs/{sha}",
                                    indices=tuple(range(first, first + count)))
        downloads.submit(device, req.to_bytes())

    try:
        # bytes: a device gets its burst, then nothing until the bucket refills (clock frozen)
        rounds = chunks // 32
        for k in range(rounds):
            ask("evil", 32 * k, count=32)
        wait_for(lambda: downloads.counts["chunk_rate_limited"] + downloads.counts["chunks_sent"] // 32 == rounds, 30,
                 "every request served or limited")
        evil_sent = sum(t.startswith("ef/v1/d/evil/") for t in sent)
        assert downloads.counts["chunk_rate_limited"] >= 1 and evil_sent <= CHUNK_BURST_BYTES // (256 * 1024)
        # requests: made-up jobs, asked in a loop, are paced before any database read
        for k in range(REQUEST_BURST + 10):
            ask("evil", job=f"r1-{k:020x}")
        wait_for(lambda: downloads.counts["chunk_requests_paced"] >= 10, 10, "the requests paced")
        ask("good")  # another device is not limited by it
        ask("good")  # asked again at once (a stall timer while the answer waits in a queue): not sent twice
        wait_for(lambda: downloads.counts["chunks_not_resent"] == 4, 10, "the repeated request skipped")
        wait_for(lambda: sum(t.startswith("ef/v1/d/good/") for t in sent) == 4, 10, "the good device's chunks")
        with Session(engine) as s:
            s.exec(text(f"UPDATE rollout SET state = 'aborted' WHERE id = {rollout_id}"))  # type: ignore[call-overload]
            s.commit()
        now[0] += JOB_RECHECK_S + 0.1
        ask("good", 8)
        wait_for(lambda: downloads.counts["chunk_job_closed"] == 1, 10, "the request for an aborted rollout refused")
    finally:
        downloads.stop()
    assert sum(t.startswith("ef/v1/d/good/") for t in sent) == 4


# ----------------------------------------------------------------------------- a full disk is an outage


@contextlib.contextmanager
def small_disk(path: Path, size: str = "16m", owner: str | None = None):
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.strip()}")
    try:
        if owner:
            shutil.chown(path, owner, owner)
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(folder: Path) -> Path:
    """Fill the file system under ``folder`` to the last byte (unbuffered: nothing left to flush at close)."""
    filler = folder / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for size in (1 << 20, 1 << 12, 1):
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, b"\0" * size)
    finally:
        os.close(fd)
    return filler


def _outage_then_recovery(engine, filler_dir: Path) -> Ingest:
    acks = Acks()
    ingest = Ingest(engine).start()
    try:
        ingest.submit(topics.topic("good", "tm"), messages.TelemetryBatch(**window(0)).to_bytes(), acks("first"))
        wait_for(lambda: stored(engine) == 1, 10, "a first window stored")
        filler = fill(filler_dir)
        big = {"inputs": [{"name": f"in{i}", "count": 1, "mean": 0, "std": 0, "min": 0, "max": 0,
                           "histogram": {"edges": [float(e) for e in range(65)], "counts": [1] * 64}}
                          for i in range(60)]}  # ~0.1 MB a window: the disk is full before the first write
        for seq in range(1, 41):
            ingest.submit(topics.topic("good", "tm"), messages.TelemetryBatch(**window(seq, **big)).to_bytes(),
                          acks(str(seq)))
        wait_for(lambda: ingest.counts["batch_retries"] >= 2, 30, "the full disk seen as an outage")
        assert not ingest.healthy and ingest.counts["poison"] == 0 and acks.done == ["first"]
        filler.unlink()
        wait_for(lambda: stored(engine) == 41, 60, "every held window stored once the disk has room")
        wait_for(lambda: len(acks.done) == 41, 5, "every window acknowledged after its commit")
        assert ingest.healthy and ingest.counts["poison"] == 0
    finally:
        ingest.stop()
    return ingest


def test_security_disk_full_is_an_outage_not_poison_sqlite(tmp_path):
    with small_disk(tmp_path / "disk") as disk:
        url = f"sqlite:///{disk / 'fleet.db'}"
        upgrade(url)
        engine = make_engine(url)
        add_devices(engine, "good")
        try:
            _outage_then_recovery(engine, disk)
        finally:
            engine.dispose()


def test_security_disk_full_is_an_outage_not_poison_postgresql(tmp_path):
    pg = Postgres().start()
    try:
        url = pg.create_database("diskfull")
        upgrade(url)
        engine = make_engine(url)
        add_devices(engine, "good")
        with small_disk(pg.dir / "disk", size="24m", owner="postgres") as disk:  # postgres must reach it
            (disk / "ts").mkdir()
            shutil.chown(disk / "ts", "postgres", "postgres")
            with engine.connect() as conn:
                conn.execution_options(isolation_level="AUTOCOMMIT")
                conn.execute(text(f"CREATE TABLESPACE small LOCATION '{disk / 'ts'}'"))
                conn.execute(text("ALTER TABLE telemetry_window SET TABLESPACE small"))
                conn.execute(text("ALTER INDEX ALL IN TABLESPACE pg_default SET TABLESPACE small"))
            try:
                _outage_then_recovery(engine, disk)
            finally:
                engine.dispose()
    finally:
        pg.stop()


# ----------------------------------------------------------------------------- the server notices being displaced


def test_security_the_server_logs_being_displaced_from_its_session(tmp_path, caplog):
    """On a broker that does not bind client ids to usernames (not ours), a client that takes the server's client id
    disconnects it: the server must say so, loudly, instead of reconnecting in silence."""
    import logging

    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    from fleet_server.mqtt import FleetLink
    from tests.fleet_driver import Broker

    broker = Broker(tmp_path / "mq").start()
    link = FleetLink(broker.url, "fleet-server-test", None, lambda *a: None)
    thief = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="fleet-server-test", protocol=mqtt.MQTTv5)
    try:
        with caplog.at_level(logging.ERROR, logger="fleet_server.ingest"):
            link.start()
            assert link.connected.wait(10)
            thief.connect("127.0.0.1", broker.port)
            thief.loop_start()
            wait_for(lambda: link.displaced >= 1, 10, "the server displaced")
        assert any("another client may be using its client id 'fleet-server-test'" in r.getMessage()
                   for r in caplog.records)
    finally:
        thief.loop_stop()
        link.stop()
        broker.stop()
