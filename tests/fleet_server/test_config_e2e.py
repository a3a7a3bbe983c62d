"""Remote configuration end to end (issue 17, part 7): a real `fleet-server serve`, Mosquitto and `fleet-agent run`.
Settings set per device and per tag are signed, published retained, applied live by the agent (telemetry really
slows down) and reported back; what the agent refuses is reported with the reason; a device that was offline gets
the last desired document when it returns, and a restart keeps what it applied; a document whose publish was lost is
sent again."""

from __future__ import annotations

import json
import re
import time
from datetime import UTC, datetime, timedelta

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from sqlmodel import Session, func, select

from fleet_protocol import messages, topics
from fleet_protocol.metadata import ConfigSpec, build_config
from fleet_server import keys
from fleet_server.models import DesiredConfig, DeviceConfig, TelemetryWindow
from tests.fleet_driver import Broker
from tests.fleet_server.live_fleet import LiveFleet

pytestmark = pytest.mark.slow


def config_of(live, device: str) -> dict:
    return live.http.get(f"/v1/devices/{device}/config").json()


def wait_in_sync(live, device: str, timeout: float = 30) -> dict:
    live.wait(lambda: config_of(live, device)["in_sync"], timeout, "the device reporting its settings",
              lambda: config_of(live, device))
    return config_of(live, device)


def windows_in(live, device: str, seconds: float) -> int:
    def count() -> int:
        with Session(live.db) as s:
            return s.exec(select(func.count()).select_from(TelemetryWindow)
                          .where(TelemetryWindow.device_id == device)).one()
    before = count()
    time.sleep(seconds)
    return count() - before


def test_config_applied_live_reported_and_refusals_carry_their_reason(live):
    (agent,) = live.enroll(1)
    agent.start()
    live.wait_online([agent])
    device = live.device_id(agent)
    bad = live.http.put(f"/v1/devices/{device}/config", json={"settings": {"telemetry_interval_s": 0.01,
                                                                           "colour": "blue"}})
    assert bad.status_code == 422 and "colour: unknown setting" in bad.text and "between 1 and 86400" in bad.text
    assert windows_in(live, device, 3) >= 4  # the config file's 0.5 s

    r = live.http.put(f"/v1/devices/{device}/config", json={"settings": {"telemetry_interval_s": 3,
                                                                         "log_level": "debug"}})
    assert r.status_code == 200, r.text
    got = wait_in_sync(live, device)
    assert got["applied"] == {"telemetry_interval_s": 3, "log_level": "DEBUG"} and got["refused"] == {}
    assert agent.model()["config"] == {"version": got["desired_version"], "applied": got["applied"]}
    time.sleep(3.5)  # the window that was running when it changed
    assert windows_in(live, device, 6.5) <= 3  # applied live: a window every 3 s now

    # A newer server may send what this agent does not know: it applies the rest and says why not that one.
    spec = ConfigSpec(device=device, settings_json=json.dumps({"threads": 1, "colour": "blue"}))
    doc = build_config(spec, [keys.online_signer(live.data)], version=got["desired_version"] + 1,
                       expires=datetime.now(UTC) + timedelta(days=1))
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.connect("127.0.0.1", int(live.broker_url.rsplit(":", 1)[1]))
    client.loop_start()
    try:
        client.publish(topics.topic(device, "cfg"), messages.ConfigOffer(metadata=doc).to_bytes(), qos=1,
                       retain=True).wait_for_publish(10)
    finally:
        client.loop_stop()
        client.disconnect()
    live.wait(lambda: config_of(live, device)["reported_version"] == got["desired_version"] + 1, 30,
              "the report of the newer document", lambda: config_of(live, device))
    now = config_of(live, device)
    assert now["applied"] == {"threads": 1} and now["refused"]["colour"].startswith("unknown setting")
    assert not now["in_sync"]  # the server did not send that one: desired and reported differ, visibly


def test_config_an_offline_device_gets_the_last_document_and_a_restart_keeps_it(live):
    (agent,) = live.enroll(1, tags=("site:b",))
    agent.start()
    live.wait_online([agent])
    device = live.device_id(agent)
    agent.stop()
    assert live.http.put("/v1/tags/site:b/config", json={"settings": {"telemetry_interval_s": 5}}).json()[
        "devices_sent"] == 1
    live.http.put(f"/v1/devices/{device}/config", json={"settings": {"log_level": "WARNING"}})
    live.http.put("/v1/tags/site:b/config", json={"settings": {"telemetry_interval_s": 2, "chunk_window": 16}})
    agent.start()
    got = wait_in_sync(live, device)
    assert got["applied"] == {"telemetry_interval_s": 2, "chunk_window": 16, "log_level": "WARNING"}
    assert got["desired"] == got["applied"]
    version = got["reported_version"]
    applied_lines = len(re.findall(r"config version \d+: applied", agent.output()))

    agent.stop()  # the broker hands over the same retained document again: recognised, not re-applied
    agent.start()
    live.wait_online([agent])
    time.sleep(2)
    assert config_of(live, device)["reported_version"] == version
    assert len(re.findall(r"config version \d+: applied", agent.output())) == applied_lines  # none since
    assert "kept settings of config version" in agent.output()  # applied again at start, before the broker

    # Removed settings go back to the config file's values (0.5 s telemetry in these tests' agents).
    live.http.put("/v1/tags/site:b/config", json={"settings": {}})
    live.http.put(f"/v1/devices/{device}/config", json={"settings": {}})
    got = wait_in_sync(live, device)
    assert got["applied"] == {} and got["desired"] == {}
    time.sleep(2.5)  # the window that was running
    assert windows_in(live, device, 3) >= 4
    audit = live.http.get("/v1/audit", params={"action": "tag.config"}).json()
    assert len([e for e in audit if e["target"] == "tag:site:b"]) == 3


def test_config_a_document_whose_publish_was_lost_is_sent_again(tmp_path):
    broker = Broker(tmp_path / "broker").start()
    live = LiveFleet(tmp_path, broker.url, env={"EF_SERVER_CONFIG_RESEND_S": "1"})
    try:
        (agent,) = live.enroll(1)
        agent.start()
        live.wait_online([agent])
        device = live.device_id(agent)
        live.http.put(f"/v1/devices/{device}/config", json={"settings": {"telemetry_interval_s": 3}})
        first = wait_in_sync(live, device)
        # What a crash between the commit and the publish leaves: the new settings stored, never sent.
        with Session(live.db) as s:
            s.get(DesiredConfig, f"device:{device}").settings = {"telemetry_interval_s": 4}
            row = s.get(DeviceConfig, device)
            row.desired, row.desired_version = {"telemetry_interval_s": 4}, first["desired_version"] + 1
            row.sent_at = time.time() - 3600
            s.add_all([s.get(DesiredConfig, f"device:{device}"), row])
            s.commit()
        got = wait_in_sync(live, device, timeout=30)
        assert got["applied"] == {"telemetry_interval_s": 4} and got["reported_version"] == first["desired_version"] + 1
    finally:
        live.close()
        broker.stop()
