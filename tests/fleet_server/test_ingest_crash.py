"""Nothing a device saw acknowledged is lost (issue 14, item 6): a real `fleet-server serve` behind Mosquitto run from
the generated configuration (passwords, ACL, persistence), devices streaming telemetry at QoS 1 with their own
credentials, and the server killed with SIGKILL mid-stream, or stopped through a long outage.

Before the fix, paho acknowledged each message to the broker as it arrived, before the database commit: kill -9 lost
23 and 41 of ~12,000 acknowledged windows, and a 37 s outage lost 2,782 of 13,498 to the broker's 10,000-message
queue cap. The server now acknowledges after commit (MQTT 5 manual acknowledgement) and the generated broker
configuration persists sessions and queues enough for an outage.
"""

from __future__ import annotations

import secrets
import subprocess
import time

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from sqlmodel import Session, select

from fleet_protocol import messages, topics
from fleet_server.broker import mosquitto_conf
from fleet_server.models import TelemetryWindow
from tests.fleet_driver import free_port, mosquitto_binary, wait_path, wait_port
from tests.fleet_server.live_fleet import LiveFleet

DEVICES = 8


class Device:
    """One device's MQTT client: publishes telemetry windows at QoS 1 and tells which the broker acknowledged."""

    def __init__(self, device_id: str, password: str, port: int):
        self.id, self.seq = device_id, 0
        self._sent: list[tuple[int, mqtt.MQTTMessageInfo]] = []
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=device_id, protocol=mqtt.MQTTv5)
        self.client.username_pw_set(device_id, password)
        self.client.max_queued_messages_set(0)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    @property
    def acked(self) -> set[int]:
        """The windows whose PUBACK arrived: what a device may forget (the broker took responsibility)."""
        return {seq for seq, info in self._sent if info.is_published()}

    def send(self) -> None:
        now = time.time()
        payload = messages.TelemetryBatch(seq=self.seq, window_start=now - 1, window_end=now, requests=1).to_bytes()
        self._sent.append((self.seq, self.client.publish(topics.topic(self.id, "tm"), payload, qos=1)))
        self.seq += 1

    def forget(self) -> None:
        self._sent.clear()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def fleet(tmp_path):
    files, pid, port = tmp_path / "broker-files", tmp_path / "mosquitto.pid", free_port()
    live = LiveFleet(tmp_path, f"mqtt://127.0.0.1:{port}", env={
        "EF_SERVER_BROKER_FILES_DIR": str(files), "EF_SERVER_BROKER_PID_FILE": str(pid),
        "EF_SERVER_MQTT_USERNAME": "fleet-server", "EF_SERVER_MQTT_PASSWORD": secrets.token_hex(16)})
    wait_path(files / "passwd", 30)
    conf = tmp_path / "mosquitto.conf"
    (tmp_path / "persistence").mkdir()
    conf.write_text(mosquitto_conf(files, plain_port=port, pid_file=pid, persistence_dir=tmp_path / "persistence",
                                   log_file=tmp_path / "mosquitto.log") + "user root\n")
    broker = subprocess.Popen([mosquitto_binary(), "-c", str(conf)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    devices: list[Device] = []
    try:
        wait_port(port)
        token = live.http.post("/v1/enrollment-tokens", json={"max_uses": DEVICES, "profile": "rpi5"}).json()["token"]
        for _ in range(DEVICES):
            r = live.http.post("/v1/enroll", json={"token": token, "signing_public_key": secrets.token_hex(32)})
            assert r.status_code == 201, r.text
            devices.append(Device(r.json()["device_id"], r.json()["mqtt_password"], port))
        yield live, devices
    finally:
        for d in devices:
            d.close()
        live.close()
        broker.terminate()
        broker.wait(10)


def stored(live: LiveFleet) -> set[tuple[str, int]]:
    with Session(live.db) as s:
        return set(s.exec(select(TelemetryWindow.device_id, TelemetryWindow.seq)).all())


def acknowledged(devices: list[Device]) -> set[tuple[str, int]]:
    return {(d.id, seq) for d in devices for seq in d.acked}


def stream(devices: list[Device], *, seconds: float, rate: float, during=None, count: int | None = None) -> None:
    """Publish ``rate`` windows a second across the devices for ``seconds`` (or until ``count`` are sent, within
    ``seconds``); ``during(elapsed)`` runs between rounds (to kill or restart the server at a given time)."""
    t0, sent = time.monotonic(), 0
    while (elapsed := time.monotonic() - t0) < seconds and (count is None or sent < count):
        for d in devices:
            d.send()
            sent += 1
        if during:
            during(elapsed)
        time.sleep(max(0.0, t0 + sent / rate - time.monotonic()))


def settle(live: LiveFleet, devices: list[Device], timeout: float = 90) -> tuple[set, set]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        acked, have = acknowledged(devices), stored(live)
        if acked and acked <= have:
            break
        time.sleep(0.5)
    return acknowledged(devices), stored(live)


def warm_up(live: LiveFleet, devices: list[Device]) -> None:
    """The server's session and subscriptions exist before the measured stream starts (a window published before
    then is acknowledged by the broker with "no matching subscribers": not the server's to lose)."""
    live.wait(lambda: bool(stored(live)) or devices[0].send() or False, 30, "the server storing telemetry")
    for d in devices:
        d.forget()


@pytest.mark.slow
def test_ingest_crash_kill9_mid_stream_loses_no_acknowledged_window(fleet):
    live, devices = fleet
    warm_up(live, devices)
    events: list[str] = []
    marks: dict[str, dict[str, int]] = {}  # each device's next seq when the server was killed and restarted

    def chaos(elapsed: float) -> None:
        if elapsed > 2 and not events:
            live.server.kill()  # SIGKILL: whatever it held in memory, unacknowledged, stays with the broker
            live.server.wait()
            events.append("killed")
            marks["killed"] = {d.id: d.seq for d in devices}
        elif elapsed > 3.5 and events == ["killed"]:
            live.start_server()
            events.append("restarted")
            marks["restarted"] = {d.id: d.seq for d in devices}

    stream(devices, seconds=8, rate=400, during=chaos)
    acked, have = settle(live, devices)
    missing = acked - have
    print(f"kill -9 mid-stream: {len(acked)} windows acknowledged to devices, {len(missing)} missing")
    assert events == ["killed", "restarted"]
    # The stream covered every phase (how many windows a loaded host gets through in 8 s varies: the phases do not).
    before = {w for w in acked if w[1] < marks["killed"][w[0]]}
    down = {w for w in acked if marks["killed"][w[0]] <= w[1] < marks["restarted"][w[0]]}
    after = acked - before - down
    assert len(before) > 100 and len(down) > 50 and len(after) > 100, (len(before), len(down), len(after))
    assert not missing, sorted(missing)[:10]


@pytest.mark.slow
def test_ingest_crash_outage_longer_than_the_old_queue_cap_loses_nothing(fleet):
    live, devices = fleet
    warm_up(live, devices)
    live.stop_server()  # SIGTERM: a graceful outage; the broker queues for the server's persistent session
    stream(devices, seconds=40, rate=800, count=10_400)  # ~13 s at full rate; a loaded host gets the time it needs
    live.start_server()
    acked, have = settle(live, devices, timeout=120)
    missing = acked - have
    print(f"outage: {len(acked)} windows acknowledged to devices, {len(missing)} missing")
    assert len(acked) > 10_000  # more than the 10,000 messages the old configuration queued per client
    assert not missing, sorted(missing)[:10]
