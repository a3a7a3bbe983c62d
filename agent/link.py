"""The agent's MQTT link: the only module that imports paho.

MQTT 5 with a persistent session (``clean_start=False`` + session expiry), so QoS 1 offers published while the
device is offline wait at the broker; a retained last will ``online=false`` and a retained ``online=true`` on every
connect; subscriptions to the device's own topics only; reconnects with exponential backoff and full jitter. The
network loop runs in one thread (``Client.loop``), so callbacks arrive in order on that thread.
"""

from __future__ import annotations

import contextlib
import logging
import random
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from urllib.parse import urlparse

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from fleet_protocol import topics
from fleet_protocol.messages import Online

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BrokerConfig:
    url: str  # mqtt://host:1883 or mqtts://host:8883
    username: str | None = None
    password: str | None = None
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    keepalive: int = 30
    session_expiry_s: int = 7 * 24 * 3600
    backoff_min_s: float = 0.5
    backoff_max_s: float = 30.0


class Link:
    """Connects, stays connected, and hands every message on the device's topics to ``on_message``."""

    def __init__(self, device_id: str, config: BrokerConfig, *,
                 on_message: Callable[[str, bytes], None],
                 on_connected: Callable[[], None] = lambda: None,
                 on_published: Callable[[int], None] = lambda mid: None,
                 on_disconnected: Callable[[], None] = lambda: None,
                 rng: random.Random | None = None):
        self.device_id, self.config = device_id, config
        self._on_message, self._on_connected = on_message, on_connected
        self._on_published, self._on_disconnected = on_published, on_disconnected
        self._rng = rng or random.Random()
        url = urlparse(config.url)
        if url.scheme not in ("mqtt", "mqtts") or not url.hostname:
            raise ValueError(f"broker URL {config.url!r}: expected mqtt://host:port or mqtts://host:port")
        self._host, self._port = url.hostname, url.port or (8883 if url.scheme == "mqtts" else 1883)
        self._tls = url.scheme == "mqtts"
        self._client = self._make_client()
        self._connected = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.connects = 0

    def _make_client(self) -> mqtt.Client:
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.device_id, protocol=mqtt.MQTTv5)
        c.max_inflight_messages_set(20)
        c.max_queued_messages_set(0)
        if self.config.username:
            c.username_pw_set(self.config.username, self.config.password)
        if self._tls:
            c.tls_set(ca_certs=self.config.ca_file, certfile=self.config.cert_file, keyfile=self.config.key_file,
                      cert_reqs=ssl.CERT_REQUIRED, tls_version=ssl.PROTOCOL_TLS_CLIENT)
        c.will_set(topics.topic(self.device_id, "online"), Online(online=False).to_bytes(), qos=1, retain=True)
        c.on_connect = self._handle_connect
        c.on_disconnect = self._handle_disconnect
        c.on_message = self._handle_message
        c.on_publish = self._handle_publish
        return c

    # ------------------------------------------------------------------ lifecycle

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="mqtt-link", daemon=True)
        self._thread.start()

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    def stop(self, timeout: float = 5.0) -> None:
        """Say offline (retained) and disconnect cleanly; the broker keeps the session for the next start."""
        self._stop.set()
        if self._connected.is_set():
            info = self._client.publish(topics.topic(self.device_id, "online"),
                                        Online(online=False, ts=time.time()).to_bytes(), qos=1, retain=True)
            deadline = time.monotonic() + min(timeout, 2.0)
            while not info.is_published() and time.monotonic() < deadline:
                time.sleep(0.02)
            props = Properties(PacketTypes.DISCONNECT)
            props.SessionExpiryInterval = self.config.session_expiry_s
            self._client.disconnect(properties=props)
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        attempt = 0
        while not self._stop.is_set():
            try:
                props = Properties(PacketTypes.CONNECT)
                props.SessionExpiryInterval = self.config.session_expiry_s
                self._client.connect(self._host, self._port, keepalive=self.config.keepalive, clean_start=False,
                                     properties=props)
            except (OSError, ssl.SSLError) as e:
                attempt += 1
                self._sleep_backoff(attempt, f"connect failed: {e}")
                continue
            while not self._stop.is_set():
                rc = self._client.loop(timeout=0.2)
                if rc != mqtt.MQTT_ERR_SUCCESS:
                    break
            if self._connected.is_set():
                attempt = 0
            self._lost()
            if not self._stop.is_set():
                attempt += 1
                self._sleep_backoff(attempt, "connection lost")
        with contextlib.suppress(Exception):  # best effort: deliver the DISCONNECT queued by stop()
            for _ in range(10):
                if self._client.loop(timeout=0.05) != mqtt.MQTT_ERR_SUCCESS:
                    break

    def _sleep_backoff(self, attempt: int, why: str) -> None:
        """Exponential backoff with full jitter, so a fleet does not reconnect in lockstep after an outage."""
        cap = min(self.config.backoff_max_s, self.config.backoff_min_s * 2 ** min(attempt, 16))
        delay = self._rng.uniform(self.config.backoff_min_s / 2, cap)
        log.info("mqtt %s; retrying in %.1f s", why, delay)
        self._stop.wait(delay)

    def _lost(self) -> None:
        if self._connected.is_set():
            self._connected.clear()
            self._on_disconnected()

    # ------------------------------------------------------------------ paho callbacks (link thread)

    def _handle_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.warning("mqtt connect refused: %s", reason_code)
            client.disconnect()
            return
        for t in topics.device_subscriptions(self.device_id):
            client.subscribe(t, qos=1)
        client.publish(topics.topic(self.device_id, "online"), Online(online=True, ts=time.time()).to_bytes(),
                       qos=1, retain=True)
        self.connects += 1
        self._connected.set()
        self._on_connected()

    def _handle_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self._lost()

    def _handle_message(self, client, userdata, msg) -> None:
        try:
            self._on_message(msg.topic, msg.payload)
        except Exception:  # a handler bug must not kill the network loop
            log.exception("handling a message on %s failed", msg.topic)

    def _handle_publish(self, client, userdata, mid, reason_code, properties) -> None:
        self._on_published(mid)

    # ------------------------------------------------------------------ sending

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False,
                user_properties: Sequence[tuple[str, str]] = ()) -> int | None:
        """Queue a message, with MQTT 5 user properties if any (as (name, value) pairs); returns its message id, or
        None while disconnected (the caller keeps it)."""
        if not self._connected.is_set():
            return None
        props = None
        if user_properties:
            props = Properties(PacketTypes.PUBLISH)
            props.UserProperty = list(user_properties)
        info = self._client.publish(topic, payload, qos=qos, retain=retain, properties=props)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            return None
        return info.mid
