"""A telemetry window's temperature, as an agent reports it, is stored by the ingest and reaches the device's chart
series (SQLite and PostgreSQL)."""

import hashlib
import time

from sqlmodel import Session, select

from fleet_protocol import messages, topics
from fleet_server.ingest import Ingest
from fleet_server.models import Device, TelemetryWindow


def _window(seq: int, temperature_c: float | None) -> bytes:
    now = time.time() - 60 + seq
    return messages.TelemetryBatch(seq=seq, window_start=now - 1, window_end=now, requests=10, cpu_percent=12.5,
                                   rss_mb=48.0, temperature_c=temperature_c).to_bytes()


def test_a_windows_temperature_reaches_the_device_series(server):
    engine = server.app.state.engine
    with Session(engine) as s:
        s.add(Device(id="d1", profile="rpi5", signing_public_key=hashlib.sha256(b"d1").hexdigest(),
                     mqtt_password_hash="x"))
        s.commit()
    ingest = Ingest(engine).start()
    try:
        for seq, temperature in enumerate((51.5, 52.5, None)):  # a window without a thermal zone stays None
            ingest.submit(topics.topic("d1", "tm"), _window(seq, temperature))
        deadline = time.monotonic() + 20
        while ingest.counts["tm_stored"] < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        ingest.stop()
    with Session(engine) as s:
        stored = [w.temperature_c for w in s.exec(select(TelemetryWindow).order_by(TelemetryWindow.seq)).all()]
    assert stored == [51.5, 52.5, None]
    answer = server.get("/v1/console/devices/d1/series", params={"points": 10}, headers=server.as_("viewer"))
    assert answer.status_code == 200
    series = answer.json()["series"]
    assert answer.json()["windows"] == 3
    charted = [b["temperature_c"] for b in series if b["temperature_c"] is not None]
    assert charted and min(charted) >= 51.5 and max(charted) <= 52.5
    assert all(b["cpu_percent"] == 12.5 and b["rss_mb"] == 48.0 for b in series)
