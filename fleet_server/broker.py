"""Mosquitto's password file, ACL and configuration, generated from the database.

Each device's MQTT password is stored only as Mosquitto's own hash (``$7$``: PBKDF2-HMAC-SHA512, base64 salt and
digest), so the password file can be written from the database without ever knowing a password. The ACL confines
every device (username = device id) to its own topics; the server's accounts have the fleet-wide rights its ingest
and publisher need. Decommissioned devices are left out, so a reload locks them out.

What Mosquitto 2.0.11 does with these (read in its source, ``src/security_default.c``, and measured on the broker):

- The ``acl_file`` is never consulted for a SUBSCRIBE (``mosquitto_acl_check_default`` returns success for it, a
  "FIXME" upstream); its ``read`` rights are checked only when a message is delivered. A device may therefore
  subscribe to anything, ``#`` and ``$SYS/#`` included, and receive only its own ``cmd`` and ``dl/+``. But a device
  that joins the server's shared-subscription group takes its round-robin turn and the broker drops the message it
  may not read: the server lost half the fleet's telemetry to one device session. No ACL line prevents that; the
  server's group name does (:func:`share_group`: derived from the server's password, so no device can name it).
- Client ids are bound to usernames (``use_username_as_clientid``, a per-listener option: given once at the top it
  silently opens an extra plaintext listener on port 1883 of every interface), so no device can take over the
  server's or another device's session. Each server replica therefore needs its own username:
  :func:`server_account`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import os
import signal
import threading
from datetime import datetime
from pathlib import Path

from sqlmodel import Session, or_, select

from fleet_protocol.messages import MAX_MESSAGE_BYTES
from fleet_protocol.topics import ROOT, SHARE_GROUP
from fleet_server.models import Device
from fleet_server.pki import FleetCA

log = logging.getLogger(__name__)
ITERATIONS = 101  # Mosquitto's default; passwords are 192-bit random, so the KDF's cost buys nothing here
SERVER_INSTANCES = 16  # server accounts {user}, {user}-1 … {user}-15: one per replica (client id = username)
# Both sides refuse a message over MAX_MESSAGE_BYTES (fleet_protocol.messages.parse); the largest one we send is a
# chunk, 256 KiB as base64 JSON (~350 KB). The margin covers the topic and MQTT 5 properties of the packet.
MAX_PACKET_BYTES = MAX_MESSAGE_BYTES + 4096
SESSION_EXPIRY = "7d"  # an offline session (an abandoned device, a decommissioned one) is dropped after this
MAX_QUEUED_MESSAGES = 1_000_000  # per client; sized for the server's session through a server outage
MAX_QUEUED_BYTES = 512 * 1024 * 1024
# TLS 1.2: forward-secret AEAD suites only (no CBC, no SHA-1 MAC, no static RSA key exchange); ECDSA for the fleet
# CA's EC broker key, RSA for an operator's own certificate. TLS 1.3 suites are all AEAD; listed to pin them.
TLS12_CIPHERS = ":".join(["ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-ECDSA-AES128-GCM-SHA256",
                          "ECDHE-ECDSA-CHACHA20-POLY1305", "ECDHE-RSA-AES256-GCM-SHA384",
                          "ECDHE-RSA-AES128-GCM-SHA256", "ECDHE-RSA-CHACHA20-POLY1305"])
TLS13_CIPHERS = "TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256:TLS_AES_128_GCM_SHA256"


class BrokerConfigError(ValueError):
    """A broker configuration that cannot be generated (no listener, no account for a server instance)."""


def mosquitto_hash(password: str, *, salt: bytes | None = None, iterations: int = ITERATIONS) -> str:
    salt = salt or os.urandom(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations, 64)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def mosquitto_verify(password: str, stored: str) -> bool:
    try:
        _, alg, iterations, salt, digest = stored.split("$")
    except ValueError:
        return False
    if alg != "7":
        return False
    calc = hashlib.pbkdf2_hmac("sha512", password.encode(), base64.b64decode(salt), int(iterations), 64)
    return hmac.compare_digest(base64.b64encode(calc).decode(), digest)


def server_account(server_user: str, instance: int) -> str:
    """The MQTT username (and so, with ``use_username_as_clientid``, the client id and persistent session) of server
    replica ``instance``: ``server_user`` itself for instance 0, ``server_user-N`` for the others. Instances must be
    unique across the deployment, not per host: two replicas on one account take each other's session."""
    if not 0 <= instance < SERVER_INSTANCES:
        raise BrokerConfigError(f"server instance {instance} has no broker account: instances are 0 to "
                                f"{SERVER_INSTANCES - 1}")
    return server_user if instance == 0 else f"{server_user}-{instance}"


def server_accounts(server_user: str) -> list[str]:
    return [server_account(server_user, i) for i in range(SERVER_INSTANCES)]


def share_group(server_password: str | None) -> str:
    """The server's shared-subscription group. Mosquitto 2.0.11 lets any client join any group (its ACL file is not
    consulted on SUBSCRIBE) and then drops, at delivery, the messages that client may not read: a device in the
    server's group diverted every second message. A group named after a secret only the server's replicas hold is
    one no device can join. Without a password (an anonymous development broker) there is nothing to hide behind."""
    if not server_password:
        return SHARE_GROUP
    tag = hmac.new(server_password.encode(), b"edgefleet mqtt share group v1", hashlib.sha256).hexdigest()
    return f"{SHARE_GROUP}-{tag[:32]}"


def acl(server_user: str) -> str:
    d = f"{ROOT}/d/%u"
    servers = [line for user in server_accounts(server_user) for line in (f"user {user}", f"topic readwrite {ROOT}/#")]
    return "\n".join([
        "# generated by fleet-server: devices reach only their own topics",
        "# Mosquitto 2.0.11 checks these on publish and on delivery, never on subscribe (see fleet_server/broker.py)",
        *servers,
        "",
        f"pattern read {d}/cmd",
        f"pattern read {d}/cfg",
        f"pattern read {d}/dl/+",
        *(f"pattern write {d}/{kind}" for kind in ("evt", "tm", "state", "online")),
        f"pattern write {d}/dl/+/req",
        "",
    ])


def _device_accounts(session: Session, reserved: set[str]) -> list[tuple[str, str]]:
    """Live devices' (id, hash), without any whose id is a server account name: such a device would be the server
    at the broker (its rights, its session). Device ids are ``dev-<hex>``, so this only guards against a bad row."""
    rows = session.exec(select(Device.id, Device.mqtt_password_hash)  # columns: no ORM rows for 10,000s
                        .where(Device.decommissioned_at.is_(None))  # type: ignore[union-attr]
                        .order_by(Device.id)).all()
    for device_id, _ in rows:
        if device_id in reserved:
            log.error("device %s left out of the broker files: its id is a server account's", device_id)
    return [(device_id, h) for device_id, h in rows if device_id not in reserved]


def _revoked(session: Session, reserved: list[str]) -> list[tuple[int, datetime]]:
    """Client certificates the broker must refuse: decommissioned devices', and any issued to a device row named
    like a server account (on the mutual-TLS listener the certificate's CN is the username, password file or not)."""
    rows = session.exec(select(Device.client_cert_serial, Device.decommissioned_at, Device.enrolled_at)
                        .where(or_(Device.decommissioned_at.is_not(None),  # type: ignore[union-attr]
                                   Device.id.in_(reserved)),  # type: ignore[attr-defined]
                               Device.client_cert_serial.is_not(None))).all()  # type: ignore[union-attr]
    return [(int(serial, 16), gone or enrolled) for serial, gone, enrolled in rows if serial]


def _atomic(path: Path, text: str, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_broker_files(session: Session, out: Path, *, server_user: str, server_password_hash: str,
                       mode: int = 0o640, pki_dir: Path | None = None) -> tuple[Path, Path, int]:
    """Write ``passwd`` and ``acl`` into ``out`` (and ``crl.pem`` when ``pki_dir`` holds the fleet CA); returns the
    first two paths and the number of device accounts."""
    out.mkdir(parents=True, exist_ok=True)
    servers = server_accounts(server_user)
    devices = _device_accounts(session, set(servers))
    lines = [f"{user}:{server_password_hash}" for user in servers] + [f"{i}:{h}" for i, h in devices]
    if pki_dir is not None and FleetCA.exists(pki_dir):  # first, so a reload never sees a CRL older than passwd
        _atomic(out / "crl.pem", FleetCA.load(pki_dir).crl(_revoked(session, servers)).decode(), mode)
    _atomic(out / "passwd", "\n".join(lines) + "\n", mode)
    _atomic(out / "acl", acl(server_user), mode)
    return out / "passwd", out / "acl", len(devices)


def mosquitto_conf(files: Path, *, bind: str = "127.0.0.1", plain_port: int | None = None,
                   tls_port: int | None = None, mtls_port: int | None = None, pid_file: Path | None = None,
                   persistence_dir: Path | None = None, log_file: Path | None = None) -> str:
    """A complete ``mosquitto.conf`` around the generated files in ``files``:

    - ``plain_port``: passwords without TLS (for the server on the broker's own host, or development);
    - ``tls_port``: passwords over TLS; the broker shows its certificate from the fleet CA (``broker.crt``);
    - ``mtls_port``: mutual TLS; a device proves itself with its client certificate, whose CN becomes its
      username (``use_identity_as_username``), and the CRL locks out decommissioned devices.

    Anonymous clients are refused everywhere, every listener shares the one ACL, and on every listener the client id
    is the username. Sessions and queued messages persist in ``persistence_dir`` (default ``files/persistence``,
    which must exist and be writable by the broker's user).
    """
    if not (plain_port or tls_port or mtls_port):
        raise BrokerConfigError("the broker needs at least one listener")
    persistence_dir = persistence_dir or files / "persistence"
    lines = ["# generated by fleet-server broker-config (docs/operations.md, \"Broker settings\")",
             "per_listener_settings false", "allow_anonymous false",
             f"password_file {files / 'passwd'}", f"acl_file {files / 'acl'}",
             *_limits(), "", "persistence true", f"persistence_location {persistence_dir}/", "autosave_interval 30"]
    if pid_file:
        lines.append(f"pid_file {pid_file}")
    if log_file:
        lines += [f"log_dest file {log_file}", "log_type error", "log_type warning", "log_type notice"]
    if plain_port:
        lines += ["", *_listener(plain_port, bind)]
    tls = [f"cafile {files / 'ca.crt'}", f"certfile {files / 'broker.crt'}", f"keyfile {files / 'broker.key'}",
           "tls_version tlsv1.2", f"ciphers {TLS12_CIPHERS}", f"ciphers_tls1.3 {TLS13_CIPHERS}"]
    if tls_port:
        lines += ["", *_listener(tls_port, bind), *tls]
    if mtls_port:
        lines += ["", *_listener(mtls_port, bind), *tls, "require_certificate true",
                  "use_identity_as_username true", f"crlfile {files / 'crl.pem'}"]
    return "\n".join(lines) + "\n"


def _limits() -> list[str]:
    return [
        "# Queues are per client, but these options are global in Mosquitto 2.0.11: sized for the server's session,",
        "# which must hold the fleet's messages through a server outage (messages past them are dropped silently).",
        "# A device's queue stays small anyway: the ACL lets it read only its own cmd and dl/+, which only the",
        "# server publishes (commands, and the chunks of the device's own download, paced per device).",
        f"max_queued_messages {MAX_QUEUED_MESSAGES}",
        f"max_queued_bytes {MAX_QUEUED_BYTES}",
        "max_inflight_messages 100",
        "# Larger packets are refused and their sender disconnected before the broker buffers them: no message",
        "# over fleet_protocol's MAX_MESSAGE_BYTES is legitimate (both sides refuse one).",
        f"max_packet_size {MAX_PACKET_BYTES}",
        "# Offline persistent sessions (an abandoned or decommissioned device's) are removed after this.",
        f"persistent_client_expiration {SESSION_EXPIRY}",
    ]


def _listener(port: int, bind: str) -> list[str]:
    # Per listener: at the top of the file this option would configure (and open) a default listener on port 1883.
    return [f"listener {port} {bind}", "use_username_as_clientid true"]


class BrokerSync:
    """Keeps Mosquitto's files in step with the database: rewritten and the broker reloaded (SIGHUP through its pid
    file) on every enrollment and decommission, so a new device can connect at once and a decommissioned one is
    locked out at once. Without a files folder it does nothing (the operator runs ``fleet-server broker-config``)."""

    def __init__(self, out: Path | None, *, pid_file: Path | None, server_user: str, server_password: str | None,
                 pki_dir: Path | None = None):
        self.out, self.pid_file, self.server_user, self.pki_dir = out, pid_file, server_user, pki_dir
        self.server_password = server_password or ""
        self._server_hash = mosquitto_hash(self.server_password)  # once: PBKDF2 per rewrite is waste
        self._cond = threading.Condition()
        self._requested = self._done = 0  # rewrite requests, and the newest one a finished rewrite covered
        self._busy = False
        self._count: int | None = None
        self._refresher: threading.Thread | None = None
        self._stop_refresh = threading.Event()

    def sync(self, session: Session) -> int | None:
        """Rewrite the files and reload the broker; the number of device accounts (None when not configured).

        Concurrent callers share rewrites: each waits for one that started after its own commit (a rewrite reads
        the database when it starts), so a burst of enrollments costs a few rewrites, not one per device."""
        if self.out is None:
            return None
        with self._cond:
            self._requested += 1
            mine = self._requested
            while self._done < mine:
                if not self._busy:
                    self._busy = True
                    upto = self._requested
                    break
                self._cond.wait()
            else:
                return self._count
        ok = False
        try:
            _, _, n = write_broker_files(session, self.out, server_user=self.server_user,
                                         server_password_hash=self._server_hash, pki_dir=self.pki_dir)
            self.reload()
            ok = True
            return n
        finally:
            with self._cond:
                self._busy = False
                if ok:
                    self._done, self._count = upto, n
                self._cond.notify_all()

    def start_refresh(self, engine, every_s: float = 86_400.0) -> None:
        """Rewrite the files once a day even when nothing changes: the CRL carries a next-update time, and a broker
        holding a lapsed CRL refuses every client certificate."""
        if self.out is None or self._refresher is not None:
            return
        self._stop_refresh.clear()

        def loop() -> None:
            while not self._stop_refresh.wait(every_s):
                try:
                    with Session(engine) as session:
                        self.sync(session)
                except Exception:  # the database is away: the CRL is still valid for weeks; try again tomorrow
                    log.warning("daily broker files refresh failed", exc_info=True)

        self._refresher = threading.Thread(target=loop, name="broker-files-refresh", daemon=True)
        self._refresher.start()

    def stop_refresh(self) -> None:
        self._stop_refresh.set()
        if self._refresher is not None:
            self._refresher.join(5)
            self._refresher = None

    def reload(self) -> bool:
        if self.pid_file is None:
            return False
        try:
            os.kill(int(self.pid_file.read_text().strip()), signal.SIGHUP)
            return True
        except (OSError, ValueError) as e:
            log.warning("could not reload the broker through %s: %s", self.pid_file, e)
            return False
