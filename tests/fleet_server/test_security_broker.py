"""Attacks at the broker with one device's own credentials (issue 14), on a real Mosquitto started from
``mosquitto_conf()`` and ``write_broker_files()`` with device accounts enrolled through the API, on both databases.

Each test counts exactly: the server's shared subscription must get every one of N messages, a victim must stay
connected and get all that is sent to it, an attacker must get nothing that is not its own.
"""

from __future__ import annotations

import base64
import secrets
import signal
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from cryptography.hazmat.primitives import serialization
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from sqlmodel import Session

from fleet_protocol import messages, topics
from fleet_server.broker import (
    BrokerConfigError,
    mosquitto_conf,
    mosquitto_hash,
    server_account,
    share_group,
    write_broker_files,
)
from fleet_server.models import Device
from fleet_server.pki import FleetCA, make_csr, new_key, write_pair
from tests.fleet_driver import free_port, mosquitto_binary, wait_port

SERVER = "fleet-server"
SERVER_PW = "server-pw"
N = 100


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


class Peer:
    """One MQTT client on the real broker. A client the broker disconnects stays down (no reconnect within a test),
    so a kicked victim shows as ``disconnects``."""

    def __init__(self, port: int, user: str, password: str | None = None, *, client_id: str | None = None,
                 tls: tuple[Path, Path | None, Path | None] | None = None, persistent: bool = False,
                 protocol: int = mqtt.MQTTv5):
        v5 = protocol == mqtt.MQTTv5
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id or f"t-{secrets.token_hex(4)}",
                             protocol=protocol, **({} if v5 else {"clean_session": not persistent}))
        self.c.reconnect_delay_set(60, 60)
        if user:
            self.c.username_pw_set(user, password)
        if tls:
            ca, cert, key = tls
            self.c.tls_set(ca_certs=str(ca), certfile=cert and str(cert), keyfile=key and str(key))
        self.got: list[tuple[str, bytes]] = []
        self.granted: list[int] = []
        self.disconnects = 0
        self.rc = None
        self.error: Exception | None = None
        self.connected = threading.Event()
        self._acks = threading.Event()
        self.c.on_connect = self._on_connect
        self.c.on_disconnect = self._on_disconnect
        self.c.on_message = lambda c, u, m: self.got.append((m.topic, m.payload))
        self.c.on_subscribe = self._on_subscribe
        kwargs = {}
        if v5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = 7 * 86400 if persistent else 0
            kwargs = {"clean_start": not persistent, "properties": props}
        try:
            self.c.connect("127.0.0.1", port, keepalive=30, **kwargs)
        except (OSError, ssl.SSLError) as e:  # refused during the TLS handshake, before MQTT
            self.error = e
            return
        self.c.loop_start()
        wait_for(lambda: self.rc is not None or self.error is not None, 5)

    def _on_connect(self, client, userdata, flags, rc, props) -> None:
        self.rc = rc
        if not rc.is_failure:
            self.connected.set()

    def _on_disconnect(self, client, userdata, flags, rc, props) -> None:
        if self.connected.is_set():
            self.disconnects += 1
        elif self.rc is None:  # closed before any CONNACK (e.g. a revoked client certificate)
            self.error = ConnectionError(str(rc))
        self.connected.clear()

    def _on_subscribe(self, client, userdata, mid, reason_codes, props) -> None:
        self.granted += [rc.value for rc in reason_codes]
        self._acks.set()

    @property
    def ok(self) -> bool:
        return self.connected.is_set() and self.rc is not None and not self.rc.is_failure

    def subscribe(self, filters: list[str]) -> list[int]:
        self.granted.clear()
        self._acks.clear()
        self.c.subscribe([(f, 1) for f in filters])
        assert self._acks.wait(5), "no SUBACK"
        return list(self.granted)

    def publish_n(self, topic: str, n: int) -> None:
        for i in range(n):
            info = self.c.publish(topic, f"{i}".encode(), qos=1)
            info.wait_for_publish(5)
            assert info.is_published(), f"message {i} on {topic} was not acknowledged"

    def on(self, prefix: str) -> list[tuple[str, bytes]]:
        return [(t, p) for t, p in self.got if t.startswith(prefix)]

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


@dataclass
class SecureBroker:
    """Mosquitto from the generated files and configuration, and the server app that enrolls devices into them."""

    api: object
    files: Path
    pki: Path
    plain: int
    tls: int
    mtls: int
    proc: subprocess.Popen
    devices: dict[str, dict]
    peers: list[Peer]

    def write_files(self) -> None:
        with Session(self.api.app.state.engine) as s:
            write_broker_files(s, self.files, server_user=SERVER, server_password_hash=mosquitto_hash(SERVER_PW),
                               pki_dir=self.pki)

    def reload(self) -> None:
        self.write_files()
        self.proc.send_signal(signal.SIGHUP)

    def peer(self, *args, **kwargs) -> Peer:
        p = Peer(*args, **kwargs)
        self.peers.append(p)
        return p

    def device(self, name: str, **kwargs) -> Peer:
        d = self.devices[name]
        return self.peer(self.plain, d["mqtt_username"], d["mqtt_password"], client_id=d["device_id"], **kwargs)

    def server(self, user: str = SERVER, **kwargs) -> Peer:
        srv = self.peer(self.plain, user, SERVER_PW, **kwargs)
        assert srv.ok, srv.rc
        srv.subscribe(topics.server_subscriptions(share_group(SERVER_PW)))
        return srv

    def tm(self, name: str) -> str:
        return topics.topic(self.devices[name]["device_id"], "tm")


def _pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


@pytest.fixture
def broker(server, tmp_path):
    """Devices a, b (passwords) and m (client certificate) enrolled through the API; Mosquitto with a plain, a TLS
    and a mutual-TLS listener, all from the generated configuration."""
    pki = server.app.state.settings.pki_folder
    files = tmp_path / "broker-files"
    ca = FleetCA.init(pki)
    key, issued = ca.issue_server(["127.0.0.1", "localhost"])
    write_pair(files, "broker", key, issued.cert_pem)
    (files / "ca.crt").write_bytes(ca.cert_pem)
    token = server.post("/v1/enrollment-tokens", json={"max_uses": 3, "profile": "rpi5"},
                        headers=server.as_("admin")).json()["token"]
    devices = {}
    for name in ("a", "b", "m"):
        body = {"token": token, "signing_public_key": secrets.token_hex(32)}
        if name == "m":
            tls_key = new_key()
            body["client_csr"] = make_csr(tls_key).decode()
        r = server.post("/v1/enroll", json=body)
        assert r.status_code == 201, r.text
        devices[name] = r.json()
        if name == "m":
            devices[name]["key"], devices[name]["cert"] = write_pair(
                tmp_path / "m", devices[name]["device_id"], _pem_key(tls_key), devices[name]["client_cert"].encode())
    (files / "persistence").mkdir()
    plain, tls, mtls = free_port(), free_port(), free_port()
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(mosquitto_conf(files, plain_port=plain, tls_port=tls, mtls_port=mtls,
                                   pid_file=tmp_path / "mosquitto.pid", log_file=tmp_path / "mosquitto.log")
                    + "user root\n")
    fleet = SecureBroker(server, files, pki, plain, tls, mtls, None, devices, [])  # type: ignore[arg-type]
    fleet.write_files()
    fleet.proc = subprocess.Popen([mosquitto_binary(), "-c", str(conf)], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
    try:
        for port in (plain, tls, mtls):
            wait_port(port)
        yield fleet
    finally:
        for p in fleet.peers:
            p.close()
        fleet.proc.terminate()
        fleet.proc.wait(10)


# ----------------------------------------------------------------------------- subscriptions

SPY_FILTERS = [f"$share/{topics.SHARE_GROUP}/{topics.ROOT}/d/+/tm", f"$share/{topics.SHARE_GROUP}/{topics.ROOT}/#",
               f"{topics.ROOT}/d/+/tm", "#", "$SYS/#"]


def test_security_a_device_subscription_neither_diverts_nor_reads_fleet_traffic(broker):
    srv = broker.server()
    spy = broker.device("b")
    spy.subscribe(SPY_FILTERS)  # granted: Mosquitto 2.0.11 never checks its ACL file on SUBSCRIBE
    victim = broker.device("a")
    victim.publish_n(broker.tm("a"), N)
    wait_for(lambda: len(srv.on(broker.tm("a"))) >= N)
    time.sleep(0.3)  # anything late or duplicated
    assert len(srv.on(broker.tm("a"))) == N  # not one diverted to the device's session in the server's group
    assert spy.got == []  # nor read: a's telemetry, $SYS


def test_security_an_offline_or_decommissioned_session_diverts_nothing(broker):
    srv = broker.server()
    spy = broker.device("b", persistent=True)
    spy.subscribe(SPY_FILTERS)
    spy.close()  # its session stays, subscriptions and all, while it is away
    victim = broker.device("a")
    victim.publish_n(broker.tm("a"), N)
    wait_for(lambda: len(srv.on(broker.tm("a"))) >= N)
    time.sleep(0.3)
    assert len(srv.on(broker.tm("a"))) == N

    b = broker.devices["b"]["device_id"]
    assert broker.api.post(f"/v1/devices/{b}/decommission", headers=broker.api.as_("admin")).status_code == 200
    broker.reload()
    # locked out (a probe that got in would resume the session, not discard it: the spy stays subscribed)
    assert wait_for(lambda: not broker.device("b", persistent=True).ok, 5)
    victim.publish_n(broker.tm("a"), N)
    wait_for(lambda: len(srv.on(broker.tm("a"))) >= 2 * N)
    time.sleep(0.3)
    assert len(srv.on(broker.tm("a"))) == 2 * N


# ----------------------------------------------------------------------------- client ids

def test_security_a_device_cannot_take_the_servers_or_another_devices_client_id(broker):
    srv = broker.server(client_id=f"{SERVER}-{socket.gethostname()}-0")  # the id the server uses today
    victim = broker.device("a")
    victim.subscribe([topics.topic(broker.devices["a"]["device_id"], "cmd")])
    m = broker.devices["m"]
    stolen = [srv.c._client_id.decode(), SERVER, f"{SERVER}-1", broker.devices["a"]["device_id"]]
    for client_id in stolen:
        assert broker.peer(broker.plain, broker.devices["b"]["mqtt_username"], broker.devices["b"]["mqtt_password"],
                           client_id=client_id).ok
        assert broker.peer(broker.mtls, "", client_id=client_id, tls=(broker.files / "ca.crt", m["cert"],
                                                                       m["key"])).ok
    time.sleep(0.5)
    assert (srv.disconnects, victim.disconnects) == (0, 0) and srv.ok and victim.ok
    cmd = topics.topic(broker.devices["a"]["device_id"], "cmd")
    srv.publish_n(cmd, N)
    victim.publish_n(broker.tm("a"), N)
    wait_for(lambda: len(victim.on(cmd)) >= N and len(srv.on(broker.tm("a"))) >= N)
    time.sleep(0.3)
    assert (len(victim.on(cmd)), len(srv.on(broker.tm("a")))) == (N, N)
    assert (srv.disconnects, victim.disconnects) == (0, 0)


def test_security_server_replicas_have_accounts_of_their_own(broker):
    assert [server_account(SERVER, i) for i in (0, 1, 15)] == [SERVER, f"{SERVER}-1", f"{SERVER}-15"]
    for bad in (-1, 16):
        with pytest.raises(BrokerConfigError):
            server_account(SERVER, bad)
    first, second = broker.server(), broker.server(server_account(SERVER, 3))
    broker.device("a").publish_n(broker.tm("a"), N)
    wait_for(lambda: len(first.on(broker.tm("a"))) + len(second.on(broker.tm("a"))) >= N)
    time.sleep(0.3)
    split = (len(first.on(broker.tm("a"))), len(second.on(broker.tm("a"))))
    assert sum(split) == N and min(split) > 0  # the group spreads over both, nothing lost
    assert (first.disconnects, second.disconnects) == (0, 0)


def test_security_a_device_row_named_like_a_server_account_gets_no_account(broker, tmp_path):
    impostor = server_account(SERVER, 2)
    key = new_key()
    cert = FleetCA.load(broker.pki).sign_client(make_csr(key), impostor)  # as if enrolled under that id
    key_file, cert_file = write_pair(tmp_path / "impostor", impostor, _pem_key(key), cert.cert_pem)
    with Session(broker.api.app.state.engine) as s:
        s.add(Device(id=impostor, profile="rpi5", signing_public_key=secrets.token_hex(32),
                     mqtt_password_hash=mosquitto_hash("impostor-pw"), client_cert_serial=f"{cert.serial:x}"))
        s.commit()
    broker.reload()
    users = [line.split(":", 1)[0] for line in (broker.files / "passwd").read_text().splitlines()]
    assert users.count(impostor) == 1
    assert wait_for(lambda: not broker.peer(broker.plain, impostor, "impostor-pw").ok, 5)
    assert not broker.peer(broker.mtls, "", tls=(broker.files / "ca.crt", cert_file, key_file)).ok  # on the CRL
    assert broker.peer(broker.plain, impostor, SERVER_PW).ok  # the account stays the server's


# ----------------------------------------------------------------------------- limits and TLS

def test_security_a_publish_over_the_size_limit_is_refused_and_not_retained(broker):
    srv = broker.server()
    state = topics.topic(broker.devices["a"]["device_id"], "state")
    srv.subscribe([f"{topics.ROOT}/d/+/state"])
    # MQTT 3.1.1: the client is not told the broker's limit, so the broker itself must refuse
    big = broker.device("a", protocol=mqtt.MQTTv311)
    big.c.publish(state, b"x" * (4 * messages.MAX_MESSAGE_BYTES), qos=1, retain=True)
    assert wait_for(lambda: big.disconnects == 1, 5)  # disconnected before the broker buffered the packet
    time.sleep(0.3)
    late = broker.server(server_account(SERVER, 1))
    late.subscribe([f"{topics.ROOT}/d/+/state"])
    time.sleep(0.3)
    assert srv.on(state) == [] and late.on(state) == []  # neither delivered nor retained

    device = broker.device("a")
    dl = topics.topic(broker.devices["a"]["device_id"], "dl", "job-1")
    device.subscribe([dl])
    chunk = messages.chunk_bytes("job-1", 0, base64.b64encode(secrets.token_bytes(256 * 1024)).decode())
    largest = b"{" + b" " * (messages.MAX_MESSAGE_BYTES - 2) + b"}"
    for payload in (chunk, largest):
        srv.c.publish(dl, payload, qos=1).wait_for_publish(5)
    assert wait_for(lambda: len(device.on(dl)) == 2, 5)
    assert [p for _, p in device.on(dl)] == [chunk, largest]


def _handshake(port: int, ca: Path, ciphers: str, cert: tuple[Path, Path] | None = None) -> str:
    """A TLS 1.2 handshake offering only ``ciphers`` (and ``cert``, the client's); the cipher agreed, or the error."""
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(ciphers)
    if cert:
        ctx.load_cert_chain(*map(str, cert))
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
                ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            return tls.cipher()[0]
    except ssl.SSLError as e:
        return f"refused: {e.reason}"


def test_security_old_tls_suites_are_refused(broker):
    ca, m = broker.files / "ca.crt", broker.devices["m"]
    for port, cert in ((broker.tls, None), (broker.mtls, (m["cert"], m["key"]))):
        for old in ("ECDHE-ECDSA-AES128-SHA", "ECDHE-ECDSA-AES256-SHA384", "AES128-SHA"):  # CBC, SHA-1/SHA-2 MAC
            assert _handshake(port, ca, old, cert).startswith("refused"), old
        assert _handshake(port, ca, "ECDHE-ECDSA-AES128-GCM-SHA256", cert) == "ECDHE-ECDSA-AES128-GCM-SHA256"
    c = broker.devices["b"]
    modern = broker.peer(broker.tls, c["mqtt_username"], c["mqtt_password"], tls=(ca, None, None))  # default context
    assert modern.ok
    assert modern.c.socket().version() == "TLSv1.3"
