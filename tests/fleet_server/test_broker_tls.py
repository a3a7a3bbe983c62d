"""TLS from the fleet CA on a real Mosquitto: the broker's certificate, devices' client certificates issued at
enrollment (mutual TLS, CN = device id = MQTT username), revocation through the CRL at decommission, and every way
in that must be refused."""

import secrets
import ssl
import subprocess
import threading
import time

import paho.mqtt.client as mqtt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID
from fastapi.testclient import TestClient
from paho.mqtt.enums import CallbackAPIVersion
from sqlmodel import Session

from fleet_server.app import create_app
from fleet_server.auth import issue_token
from fleet_server.broker import mosquitto_conf
from fleet_server.keys import init_keys
from fleet_server.migrate import upgrade
from fleet_server.models import Role
from fleet_server.pki import FleetCA, make_csr, new_key, write_pair
from fleet_server.settings import ServerSettings
from tests.fleet_driver import free_port, mosquitto_binary, wait_port

SERVER_PW = "server-pw"


def pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


class Attempt:
    """One MQTT connection attempt; ``ok`` only after a successful CONNACK."""

    def __init__(self, port: int, *, user: str | None = None, password: str | None = None, ca=None, cert=None,
                 key=None, tls: bool = True):
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"t-{secrets.token_hex(4)}",
                             protocol=mqtt.MQTTv5)
        self.c.reconnect_delay_set(30, 30)  # one attempt: no retry storm against a refusing broker
        if user:
            self.c.username_pw_set(user, password)
        if tls:
            self.c.tls_set(ca_certs=str(ca), certfile=str(cert) if cert else None,
                           keyfile=str(key) if key else None, cert_reqs=ssl.CERT_REQUIRED)
        self.got: list[tuple[str, bytes]] = []
        self.rc = None
        self.error: Exception | None = None
        done = threading.Event()

        def on_connect(client, userdata, flags, rc, props):
            self.rc = rc
            done.set()

        self.c.on_connect = on_connect
        self.c.on_disconnect = lambda *a: done.set()  # closed by the broker before any CONNACK
        self.c.on_message = lambda c, u, m: self.got.append((m.topic, m.payload))
        try:
            self.c.connect("127.0.0.1", port, keepalive=10)
        except (OSError, ssl.SSLError) as e:  # the TLS handshake failed: refused before MQTT
            self.error = e
            return
        self.c.loop_start()
        done.wait(10)  # a refusal answers at once; a loaded machine can take seconds for a handshake

    @property
    def ok(self) -> bool:
        return self.rc is not None and not self.rc.is_failure

    def close(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()


def eventually(want: bool, port: int, deadline_s: float = 15.0, **kw) -> Attempt:
    """Attempts until one's outcome is ``want`` or the deadline passes (the last one is returned): the broker rereads
    its files on SIGHUP in its own time, which on a loaded machine can be later than any fixed sleep."""
    until = time.monotonic() + deadline_s
    while True:
        attempt = Attempt(port, **kw)
        if attempt.ok == want or time.monotonic() > until:
            return attempt
        attempt.close()
        time.sleep(0.3)


@pytest.fixture
def secure_fleet(database_url, tmp_path):
    """The server with a fleet CA and broker files, and Mosquitto started from ``mosquitto_conf``: a password
    listener over TLS and a mutual-TLS listener, no plaintext at all."""
    upgrade(database_url)
    files, pid = tmp_path / "broker-files", tmp_path / "mosquitto.pid"
    settings = ServerSettings(database_url=database_url, data_dir=tmp_path / "data", broker_url="mqtt://127.0.0.1:1",
                              broker_files_dir=files, broker_pid_file=pid, mqtt_username="fleet-server",
                              mqtt_password=SERVER_PW, rollout_engine=False)
    init_keys(settings.data_dir, tmp_path / "root.pem")
    ca = FleetCA.init(settings.pki_folder)
    key, issued = ca.issue_server(["127.0.0.1", "localhost"])
    write_pair(files, "broker", key, issued.cert_pem)
    (files / "ca.crt").write_bytes(ca.cert_pem)
    app = create_app(settings)  # writes passwd, acl and crl.pem
    (files / "persistence").mkdir()  # mosquitto_conf's default persistence location
    with Session(app.state.engine) as s:
        _, admin = issue_token(s, name="admin", role=Role.ADMIN, created_by="test")
    tls_port, mtls_port = free_port(), free_port()
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(mosquitto_conf(files, tls_port=tls_port, mtls_port=mtls_port, pid_file=pid,
                                   log_file=tmp_path / "mosquitto.log") + "user root\n")
    broker = subprocess.Popen([mosquitto_binary(), "-c", str(conf)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    client = TestClient(app)
    client.headers["Authorization"] = f"Bearer {admin}"
    try:
        wait_port(tls_port)
        wait_port(mtls_port)
        yield client, ca, files, tls_port, mtls_port, tmp_path
    finally:
        client.close()
        broker.terminate()
        broker.wait(10)
        app.state.engine.dispose()


def enroll(client, token: str, folder, *, csr: bool = True) -> dict:
    key = new_key()
    body = {"token": token, "signing_public_key": secrets.token_hex(32)}
    if csr:
        body["client_csr"] = make_csr(key, "someone-else").decode()  # the server sets the subject itself
    r = client.post("/v1/enroll", json=body)
    assert r.status_code == 201, r.text
    answer = r.json()
    if csr:
        answer["key"], answer["cert"] = write_pair(folder, answer["device_id"], pem_key(key),
                                                   answer["client_cert"].encode())
    return answer


def test_mutual_tls_confines_devices_and_the_crl_locks_out_decommissioned_ones(secure_fleet):
    client, ca, files, tls_port, mtls_port, tmp = secure_fleet
    token = client.post("/v1/enrollment-tokens", json={"max_uses": 3, "profile": "rpi5"}).json()["token"]
    a, b = enroll(client, token, tmp / "a"), enroll(client, token, tmp / "b")
    c = enroll(client, token, tmp / "c", csr=False)  # a password device
    cert = x509.load_pem_x509_certificate(a["client_cert"].encode())
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == a["device_id"]
    assert a["broker_ca"] == ca.cert_pem.decode() and c["client_cert"] is None and c["broker_ca"]
    fleet_ca = files / "ca.crt"

    srv = eventually(True, tls_port, user="fleet-server", password=SERVER_PW, ca=fleet_ca)
    assert srv.ok, srv.rc or srv.error
    srv.c.subscribe("ef/v1/d/+/evt", qos=1)
    dev_a = eventually(True, mtls_port, ca=fleet_ca, cert=a["cert"], key=a["key"])  # no username: the certificate
    dev_b = eventually(True, mtls_port, ca=fleet_ca, cert=b["cert"], key=b["key"])
    assert dev_a.ok and dev_b.ok
    dev_a.c.subscribe(f"ef/v1/d/{b['device_id']}/cmd", qos=1)  # b's commands: the ACL refuses a
    dev_b.c.subscribe(f"ef/v1/d/{b['device_id']}/cmd", qos=1)
    time.sleep(0.3)
    dev_a.c.publish(f"ef/v1/d/{a['device_id']}/evt", b"mine", qos=1).wait_for_publish(5)
    dev_a.c.publish(f"ef/v1/d/{b['device_id']}/evt", b"forged", qos=1).wait_for_publish(5)
    srv.c.publish(f"ef/v1/d/{b['device_id']}/cmd", b"for-b", qos=1).wait_for_publish(5)
    time.sleep(0.7)
    assert srv.got == [(f"ef/v1/d/{a['device_id']}/evt", b"mine")]  # the forged publish never arrived
    assert dev_b.got == [(f"ef/v1/d/{b['device_id']}/cmd", b"for-b")] and dev_a.got == []

    dev_c = eventually(True, tls_port, user=c["mqtt_username"], password=c["mqtt_password"], ca=fleet_ca)
    assert dev_c.ok  # passwords still work, but only over TLS
    refused = {
        "wrong password": Attempt(tls_port, user=c["mqtt_username"], password="wrong", ca=fleet_ca),
        "no client certificate": Attempt(mtls_port, user=c["mqtt_username"], password=c["mqtt_password"],
                                         ca=fleet_ca),
        "plaintext on the TLS listener": Attempt(tls_port, user=c["mqtt_username"], password=c["mqtt_password"],
                                                 tls=False),
        "plaintext on the mTLS listener": Attempt(mtls_port, user=c["mqtt_username"], password=c["mqtt_password"],
                                                  tls=False),
    }
    rogue = FleetCA.init(tmp / "rogue")  # a certificate for a's identity from a CA the broker does not trust
    rkey = new_key()
    rk, rc_ = write_pair(tmp / "rogue", "a", pem_key(rkey), rogue.sign_client(make_csr(rkey), a["device_id"]).cert_pem)
    refused["untrusted client certificate"] = Attempt(mtls_port, ca=fleet_ca, cert=rc_, key=rk)
    refused["broker not from the trusted CA"] = Attempt(tls_port, user=c["mqtt_username"],
                                                        password=c["mqtt_password"], ca=tmp / "rogue" / "ca.crt")
    assert {why: t.ok for why, t in refused.items()} == dict.fromkeys(refused, False)
    assert isinstance(refused["broker not from the trusted CA"].error, ssl.SSLCertVerificationError)

    assert client.post(f"/v1/devices/{a['device_id']}/decommission").status_code == 200
    crl = x509.load_pem_x509_crl((files / "crl.pem").read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None
    assert crl.is_signature_valid(ca.cert.public_key())
    again = eventually(False, mtls_port, ca=fleet_ca, cert=a["cert"], key=a["key"])  # once SIGHUP reloaded the CRL
    still = Attempt(mtls_port, ca=fleet_ca, cert=b["cert"], key=b["key"])
    assert not again.ok and still.ok
    for t in (srv, dev_a, dev_b, dev_c, still, *refused.values(), again):
        t.close()


def test_enrollment_certificate_requests_are_checked(server, tmp_path):
    token = server.post("/v1/enrollment-tokens", json={"max_uses": 5, "profile": "rpi5"},
                        headers=server.as_("admin")).json()["token"]
    body = {"token": token, "signing_public_key": secrets.token_hex(32), "client_csr": make_csr(new_key()).decode()}
    r = server.post("/v1/enroll", json=body)
    assert r.status_code == 409 and "no fleet CA" in r.json()["detail"]  # and nothing was enrolled
    assert server.get("/v1/devices", headers=server.as_("viewer")).json()["items"] == []
    FleetCA.init(server.app.state.settings.pki_folder)
    bad = server.post("/v1/enroll", json={**body, "client_csr": "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n"})
    assert bad.status_code == 422 and "CSR" in bad.json()["detail"]
    ok = server.post("/v1/enroll", json=body)
    assert ok.status_code == 201 and ok.json()["client_cert"].startswith("-----BEGIN CERTIFICATE-----")


def test_the_crl_is_renewed_before_it_lapses(server, tmp_path):
    """OpenSSL refuses every client certificate once the CRL's next-update has passed: the server rewrites it on a
    timer even when no device comes or goes."""
    from fleet_server.broker import BrokerSync

    pki = server.app.state.settings.pki_folder
    FleetCA.init(pki)
    sync = BrokerSync(tmp_path / "files", pid_file=None, server_user="fleet-server", server_password="pw",
                      pki_dir=pki)
    with Session(server.app.state.engine) as s:
        sync.sync(s)
    first = x509.load_pem_x509_crl((tmp_path / "files" / "crl.pem").read_bytes()).next_update_utc
    time.sleep(1.1)  # CRL times have a resolution of one second
    sync.start_refresh(server.app.state.engine, every_s=0.2)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if x509.load_pem_x509_crl((tmp_path / "files" / "crl.pem").read_bytes()).next_update_utc > first:
                break
            time.sleep(0.1)
        else:
            raise AssertionError("the CRL was not renewed")
    finally:
        sync.stop_refresh()
