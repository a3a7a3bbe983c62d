"""Mosquitto's password file and ACL generated from the database, checked against a real Mosquitto."""

import secrets
import threading
import time

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from sqlmodel import Session

from fleet_server.broker import mosquitto_hash, mosquitto_verify, write_broker_files
from tests.fleet_driver import Broker


def connect(port, user, password):
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"{user}-{secrets.token_hex(3)}", protocol=mqtt.MQTTv5)
    c.username_pw_set(user, password)
    result = {}
    done = threading.Event()

    def on_connect(client, userdata, flags, rc, props):
        result["rc"] = rc
        done.set()

    c.on_connect = on_connect
    c.connect("127.0.0.1", port)
    c.loop_start()
    done.wait(5)
    return c, result.get("rc")


def test_hash_matches_mosquittos_format():
    h = mosquitto_hash("secret", salt=b"0123456789ab")
    assert h.startswith("$7$101$") and mosquitto_verify("secret", h) and not mosquitto_verify("Secret", h)


def test_generated_files_confine_devices_and_lock_out_decommissioned_ones(server, tmp_path):
    token = server.post("/v1/enrollment-tokens", json={"max_uses": 2, "profile": "rpi5"},
                        headers=server.as_("admin")).json()["token"]
    a = server.post("/v1/enroll", json={"token": token, "signing_public_key": secrets.token_hex(32)}).json()
    b = server.post("/v1/enroll", json={"token": token, "signing_public_key": secrets.token_hex(32)}).json()
    files = tmp_path / "broker-files"
    with Session(server.app.state.engine) as s:
        passwd, acl, n = write_broker_files(s, files, server_user="fleet-server",
                                            server_password_hash=mosquitto_hash("server-pw"))
    assert n == 2
    broker = Broker(tmp_path / "mq", extra=f"allow_anonymous false\npassword_file {passwd}\nacl_file {acl}\n")
    broker.conf.write_text(broker.conf.read_text().replace("allow_anonymous true\n", ""))
    broker.start()
    try:
        srv, rc = connect(broker.port, "fleet-server", "server-pw")
        assert not rc.is_failure
        got = []
        srv.on_message = lambda c, u, m: got.append(m.topic)
        srv.subscribe("ef/v1/#", qos=1)
        time.sleep(0.3)
        dev_a, rc = connect(broker.port, a["mqtt_username"], a["mqtt_password"])
        assert not rc.is_failure
        dev_a.publish(f"ef/v1/d/{a['device_id']}/evt", b"{}", qos=1).wait_for_publish(5)
        dev_a.publish(f"ef/v1/d/{b['device_id']}/evt", b"{}", qos=1).wait_for_publish(5)  # not its own topic
        time.sleep(0.5)
        assert got == [f"ef/v1/d/{a['device_id']}/evt"]  # the foreign publish never arrived
        _, rc = connect(broker.port, a["mqtt_username"], "wrong")
        assert rc is not None and rc.is_failure
        server.post(f"/v1/devices/{b['device_id']}/decommission", headers=server.as_("admin"))
        with Session(server.app.state.engine) as s:
            write_broker_files(s, files, server_user="fleet-server", server_password_hash=mosquitto_hash("server-pw"))
        broker.proc.send_signal(1)  # SIGHUP: reload the password file and ACL
        time.sleep(0.5)
        _, rc = connect(broker.port, b["mqtt_username"], b["mqtt_password"])
        assert rc is not None and rc.is_failure
        for c in (srv, dev_a):
            c.loop_stop()
            c.disconnect()
    finally:
        broker.stop()
