"""The server's MQTT side: one persistent paho client per server process (MQTT 5, a shared subscription so
replicas split the traffic, acknowledgement after commit) and the router that sends each device message where it
belongs, by what flows:

- ``dl/<job>/req`` chunk requests → the downloads service (fleet_server/rollouts/downloads.py), acknowledged at once:
  a request writes nothing, and the device asks again if its answer is lost;
- ``evt``, ``state``, ``online``, ``tm`` → the ingest writer (fleet_server/ingest.py), acknowledged once committed.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import ssl
import struct
import threading
import time
from collections import Counter
from urllib.parse import urlparse

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from fleet_protocol import messages, topics
from fleet_protocol.errors import TopicError

log = logging.getLogger(__name__)
# MQTT 5 Receive Maximum: QoS 1 messages the broker may have in flight to the server unacknowledged. With manual
# acknowledgement after commit this bounds the ingest's queue, and it must exceed a batch (Mosquitto's default of
# 100 would cap ingest at ~100 messages per commit).
RECEIVE_MAXIMUM = 20_000
SESSION_TAKEN_OVER = 142  # MQTT 5 DISCONNECT reason: another client connected with our client id
# Mosquitto 2.0.11 does not send that reason: it closes the old connection. Both clients then reconnect in turn, so
# a link that drops this often is being fought over (or its network is failing): said loudly, once per window.
FLAP_DROPS, FLAP_WINDOW_S = 3, 30.0
READ_BYTES = 65536
MAX_PACKETS_PER_READ = 1_000_000  # a bound only: the broker's flow control (Receive Maximum) stops far earlier
PUBACK = struct.Struct("!BBH")  # MQTT 5 PUBACK, reason "success" and no properties: 4 bytes (MQTT 5, 3.4.2.1)


def _no_ack() -> None:
    """A message that needs no acknowledgement (QoS 0)."""


class _FleetClient(mqtt.Client):
    """paho's client with the two costs of the server's inbound path cut. Measured on loopback, per message, paho
    spent ~37 µs of CPU reading and ~17 µs acknowledging:

    - it reads a packet's first byte, each length byte and the body with a ``recv`` each: reads here come from a
      64 KiB buffer, and one wake-up reads until the socket is drained (paho reads one packet per ``select()``
      wake-up, which would strand what the buffer already holds);
    - each acknowledgement is a queued packet, a wake-up and a write: ``send_pubacks`` sends a batch's in one.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._rbuf, self._rpos, self._rbuf_sock = b"", 0, None

    def _sock_recv(self, bufsize: int) -> bytes:
        if self._rbuf_sock is not self._sock:  # a new connection: nothing buffered belongs to it
            self._rbuf, self._rpos, self._rbuf_sock = b"", 0, self._sock
        if self._rpos >= len(self._rbuf):
            data = super()._sock_recv(READ_BYTES)  # raises as paho expects when there is nothing to read
            if len(data) <= bufsize:
                return data
            self._rbuf, self._rpos = data, 0
        out = self._rbuf[self._rpos : self._rpos + bufsize]
        self._rpos += len(out)
        return out

    def loop_read(self, max_packets: int = 1) -> MQTTErrorCode:
        for _ in range(MAX_PACKETS_PER_READ):
            if self._sock is None:
                return MQTTErrorCode.MQTT_ERR_NO_CONN
            rc = self._packet_read()
            if rc > 0:
                return self._loop_rc_handle(rc)
            if rc == MQTTErrorCode.MQTT_ERR_AGAIN:
                break
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    def send_pubacks(self, mids: list[int]) -> None:
        if mids:
            self._packet_queue(mqtt.PUBACK, b"".join(PUBACK.pack(mqtt.PUBACK, 2, mid) for mid in mids), 0, 0)


class FleetRouter:
    """``FleetLink``'s message handler: routes by topic kind (see the module's docstring)."""

    def __init__(self, ingest, downloads):
        self.ingest, self.downloads = ingest, downloads
        self.counts: Counter = Counter()

    def __call__(self, topic_text: str, payload: bytes, ack, user_properties: list) -> None:
        try:
            topic = topics.parse(topic_text)
        except TopicError:
            self.counts["invalid_topic"] += 1
            ack()
            return
        if topic.kind == "dl-req":
            binary = (messages.CHUNK_ENCODINGS_PROPERTY, messages.BINARY_CHUNKS) in user_properties
            self.downloads.submit(topic.device, payload, binary=binary)
            ack()
        else:
            self.ingest.submit(topic_text, payload, ack)


class FleetLink:
    """The server's MQTT client: connects in the background (and keeps reconnecting), subscribes on every connect,
    hands each message to ``on_message(topic, payload)``."""

    def __init__(self, broker_url: str, client_id: str, username: str | None, on_message, *,
                 password: str | None = None, tls: dict[str, str | None] | None = None,
                 share_group: str = topics.SHARE_GROUP):
        """``on_message(topic, payload, ack, user_properties)``: ``ack()`` acknowledges the message to the broker,
        to be called once it is committed (or deliberately dropped); until then the broker keeps it for redelivery.
        ``user_properties`` are the MQTT 5 user properties, as (name, value) pairs."""
        u = urlparse(broker_url)
        self.host, self.port = u.hostname or "127.0.0.1", u.port or (8883 if u.scheme == "mqtts" else 1883)
        self.client_id, self.share_group = client_id, share_group
        self.connected = threading.Event()
        self.displaced = 0  # times another client took over our session (or the link flapped as if it had)
        self._drops: collections.deque = collections.deque()  # monotonic times of connections lost
        self._flap_logged = -FLAP_WINDOW_S
        self._generation = 0  # connections so far: an acknowledgement is only valid on the connection it came on
        self._acks: list[tuple[int, int]] = []  # (generation, mid) acknowledged, not yet sent: see flush_acks
        self._acks_lock = threading.Lock()
        self.client = _FleetClient(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5,
                                   manual_ack=True)
        if username:
            self.client.username_pw_set(username, password)
        if u.scheme == "mqtts":  # the broker's certificate is always verified (CA file, else the system's)
            self.client.tls_set(cert_reqs=ssl.CERT_REQUIRED, tls_version=ssl.PROTOCOL_TLS_CLIENT, **(tls or {}))
        self.client.reconnect_delay_set(0.2, 5)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._deliver
        self._on_message = on_message
        self._started = False

    def _deliver(self, client, userdata, msg: mqtt.MQTTMessage) -> None:
        self._on_message(msg.topic, msg.payload, self._acker(msg), _user_properties(msg))
        self.flush_acks()  # what the handler acknowledged at once (chunk requests)

    def _acker(self, msg: mqtt.MQTTMessage):
        if msg.qos == 0:
            return _no_ack
        entry = (self._generation, msg.mid)

        def ack() -> None:
            with self._acks_lock:
                self._acks.append(entry)

        return ack

    def flush_acks(self) -> None:
        """Send the acknowledgements made since the last flush, in one write. After a reconnect the broker sends
        every unacknowledged message again (same session): acknowledging an old mid on the new connection could
        acknowledge another message, so acknowledgements from an earlier connection are dropped."""
        with self._acks_lock:
            if not self._acks:
                return
            acks, self._acks = self._acks, []
        self.client.send_pubacks([mid for generation, mid in acks if generation == self._generation])

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self.connected.clear()
        if not self._started:
            return  # our own disconnect
        now = time.monotonic()
        self._drops.append(now)
        while self._drops and now - self._drops[0] > FLAP_WINDOW_S:
            self._drops.popleft()
        if getattr(reason_code, "value", None) == SESSION_TAKEN_OVER:
            self.displaced += 1
            log.error("the broker disconnected the server: another client connected with its client id %r "
                      "(the broker must bind client ids to usernames: use_username_as_clientid)", self.client_id)
        elif len(self._drops) >= FLAP_DROPS and now - self._flap_logged > FLAP_WINDOW_S:
            self.displaced += 1
            self._flap_logged = now
            log.error("the server's broker connection dropped %d times in %.0f s: another client may be using its "
                      "client id %r (the broker must bind client ids to usernames: use_username_as_clientid), or "
                      "the network is failing", len(self._drops), FLAP_WINDOW_S, self.client_id)
        else:
            log.warning("the server's broker connection closed: %s", reason_code)

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.warning("broker refused the server: %s", reason_code)
            return
        self._generation += 1
        for t in topics.server_subscriptions(self.share_group):
            client.subscribe(t, qos=1)
        self.connected.set()

    def start(self) -> FleetLink:
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600  # the broker keeps our subscriptions and queues while we restart
        props.ReceiveMaximum = RECEIVE_MAXIMUM
        self.client.connect_async(self.host, self.port, keepalive=30, clean_start=False, properties=props)
        self.client.loop_start()
        self._started = True
        return self

    def publish(self, topic: str, payload: bytes, qos: int = 1) -> mqtt.MQTTMessageInfo:
        return self.client.publish(topic, payload, qos=qos)

    def stop(self) -> None:
        if self._started:
            self._started = False
            with contextlib.suppress(Exception):
                self.client.disconnect()
            self.client.loop_stop()


def _user_properties(msg: mqtt.MQTTMessage) -> list:
    props = getattr(msg, "properties", None)
    return list(getattr(props, "UserProperty", None) or [])
