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


def test_enrollment_and_decommission_rewrite_and_reload_the_broker(database_url, tmp_path):
    """The server keeps a real Mosquitto's accounts in step: a device enrolled through the API connects at once
    with its own credentials, reaches only its own topics, and is locked out by its decommission."""
    from fastapi.testclient import TestClient

    from fleet_server.app import create_app
    from fleet_server.auth import issue_token
    from fleet_server.keys import init_keys
    from fleet_server.migrate import upgrade
    from fleet_server.models import Role
    from fleet_server.settings import ServerSettings

    upgrade(database_url)
    files, pid = tmp_path / "broker-files", tmp_path / "mosquitto.pid"
    settings = ServerSettings(database_url=database_url, data_dir=tmp_path / "data", broker_url="mqtt://127.0.0.1:1",
                              broker_files_dir=files, broker_pid_file=pid, mqtt_username="fleet-server",
                              mqtt_password="server-pw", rollout_engine=False)
    init_keys(settings.data_dir, tmp_path / "root.pem")
    app = create_app(settings)  # writes the files the broker starts from
    with Session(app.state.engine) as s:
        _, admin = issue_token(s, name="admin", role=Role.ADMIN, created_by="test")
    headers = {"Authorization": f"Bearer {admin}"}
    broker = Broker(tmp_path / "mq", extra=f"password_file {files / 'passwd'}\nacl_file {files / 'acl'}\n"
                                           f"pid_file {pid}\n")
    broker.conf.write_text(broker.conf.read_text().replace("allow_anonymous true\n", "allow_anonymous false\n"))
    broker.start()
    client = TestClient(app)
    try:
        token = client.post("/v1/enrollment-tokens", json={"max_uses": 2, "profile": "rpi5"},
                            headers=headers).json()["token"]
        a = client.post("/v1/enroll", json={"token": token, "signing_public_key": secrets.token_hex(32)}).json()
        b = client.post("/v1/enroll", json={"token": token, "signing_public_key": secrets.token_hex(32)}).json()
        time.sleep(0.5)  # the reload after b's enrollment
        dev_b, rc = connect(broker.port, b["mqtt_username"], b["mqtt_password"])
        assert rc is not None and not rc.is_failure  # enrolled a moment ago, no operator step
        got_b = []
        dev_b.on_message = lambda c, u, m: got_b.append(m.topic)
        dev_b.subscribe(f"ef/v1/d/{a['device_id']}/cmd", qos=1)  # another device's commands: refused by the ACL
        dev_b.subscribe(f"ef/v1/d/{b['device_id']}/cmd", qos=1)
        srv, rc = connect(broker.port, "fleet-server", "server-pw")
        assert not rc.is_failure
        time.sleep(0.3)
        srv.publish(f"ef/v1/d/{a['device_id']}/cmd", b"{}", qos=1).wait_for_publish(5)
        srv.publish(f"ef/v1/d/{b['device_id']}/cmd", b"{}", qos=1).wait_for_publish(5)
        time.sleep(0.5)
        assert got_b == [f"ef/v1/d/{b['device_id']}/cmd"]  # a's command never reached b
        assert client.post(f"/v1/devices/{a['device_id']}/decommission", headers=headers).status_code == 200
        time.sleep(0.5)
        _, rc = connect(broker.port, a["mqtt_username"], a["mqtt_password"])
        assert rc is not None and rc.is_failure  # locked out by the reload that followed
        for c in (srv, dev_b):
            c.loop_stop()
            c.disconnect()
    finally:
        client.close()
        broker.stop()
        app.state.engine.dispose()


def test_a_burst_of_enrollments_shares_rewrites_and_misses_none(server, tmp_path):
    """40 concurrent enrollments: every account is in the password file when its enrollment answers, and the
    rewrites are shared (a rewrite per enrollment is quadratic in the fleet's size)."""
    from concurrent.futures import ThreadPoolExecutor

    from fleet_server.broker import SERVER_INSTANCES, BrokerSync

    sync = BrokerSync(tmp_path / "files", pid_file=None, server_user="fleet-server", server_password="pw")
    rewrites = []
    sync.reload = lambda: rewrites.append(time.monotonic()) or False
    server.app.state.broker_sync = sync
    token = server.post("/v1/enrollment-tokens", json={"max_uses": 40, "profile": "rpi5"},
                        headers=server.as_("admin")).json()["token"]

    def enroll(_):
        r = server.post("/v1/enroll", json={"token": token, "signing_public_key": secrets.token_hex(32)})
        assert r.status_code == 201, r.text
        listed = (tmp_path / "files" / "passwd").read_text()
        return r.json()["device_id"] in listed  # already there when the answer arrives

    with ThreadPoolExecutor(8) as pool:
        assert all(pool.map(enroll, range(40)))
    assert len((tmp_path / "files" / "passwd").read_text().splitlines()) == 40 + SERVER_INSTANCES  # + the server's
    assert len(rewrites) < 40
