"""The ingest on a real database: an outage holds messages and retries; nothing received is lost."""

import hashlib
import time

from sqlalchemy import func
from sqlmodel import Session, select

from fleet_protocol import messages, topics
from fleet_server.db import make_engine
from fleet_server.ingest import Ingest
from fleet_server.migrate import upgrade
from fleet_server.models import Device, TelemetryWindow
from tests.postgres import Postgres


def stored(engine) -> int:
    with Session(engine) as s:
        return s.exec(select(func.count()).select_from(TelemetryWindow)).one()


def wait_for(predicate, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise TimeoutError


def batch(seq: int) -> bytes:
    return messages.TelemetryBatch(seq=seq, window_start=time.time() - 1, window_end=time.time(),
                                   requests=5).to_bytes()


def test_a_database_outage_loses_no_telemetry():
    pg = Postgres().start()
    try:
        url = pg.create_database("ingest")
        upgrade(url)
        engine = make_engine(url)
        with Session(engine) as s:
            s.add(Device(id="d1", profile="rpi5", signing_public_key=hashlib.sha256(b"d1").hexdigest(),
                         mqtt_password_hash="x"))
            s.commit()
        ingest = Ingest(engine).start()
        try:
            for seq in range(5):
                ingest.submit(topics.topic("d1", "tm"), batch(seq))
            wait_for(lambda: stored(engine) == 5, 20)
            pg.pause()
            for seq in range(5, 10):
                ingest.submit(topics.topic("d1", "tm"), batch(seq))
            wait_for(lambda: ingest.counts["batch_retries"] >= 1, 20)
            pg.resume()
            wait_for(lambda: stored(engine) == 10, 60)
        finally:
            ingest.stop()
            engine.dispose()
        assert ingest.counts["tm_stored"] == 10 and not ingest.counts["held_at_shutdown"]
    finally:
        pg.stop()
