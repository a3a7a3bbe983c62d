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
from paho.mqtt.exception import MalformedPacket
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
    """paho's client with the costs of the server's inbound path cut. Measured on loopback, per message, paho spent
    ~37 µs of CPU reading, ~30 µs decoding and dispatching a PUBLISH and ~17 µs acknowledging:

    - it reads a packet's first byte, each length byte and the body with a ``recv`` each: reads here come from a
      64 KiB buffer, and one wake-up reads until the socket is drained (paho reads one packet per ``select()``
      wake-up, which would strand what the buffer already holds);
    - complete packets already in that buffer are framed here, and a QoS 0/1 PUBLISH is decoded here (topic,
      packet id, payload; MQTT 5 properties only where a message has any) and handed to ``on_publish_raw`` with no
      ``MQTTMessage``, ``Properties`` object or callback lock; every other packet goes to paho's own handlers;
    - each acknowledgement is a queued packet, a wake-up and a write: ``send_pubacks`` sends a batch's in one.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._rbuf, self._rpos, self._rbuf_sock = b"", 0, None
        # on_publish_raw(topic, payload, qos, mid, properties): set by FleetLink before the loop starts
        self.on_publish_raw = None

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
            if self._in_packet["command"] == 0 and self._rbuf_sock is self._sock:
                rc = self._handle_buffered()
                if rc > 0:
                    return self._loop_rc_handle(rc)
            rc = self._packet_read()  # one packet through paho's framing (a refill, or one split across reads)
            if rc > 0:
                return self._loop_rc_handle(rc)
            if rc == MQTTErrorCode.MQTT_ERR_AGAIN:
                break
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    def _handle_buffered(self) -> MQTTErrorCode:
        """Every complete packet the read buffer holds: framed here, handled as paho would. A packet split across
        reads is left for paho's ``_packet_read``."""
        buf, pos, end, handled = self._rbuf, self._rpos, len(self._rbuf), 0
        rc = MQTTErrorCode.MQTT_ERR_SUCCESS
        while pos + 2 <= end:
            command, length, shift, i = buf[pos], 0, 0, pos + 1
            while i < end and i - pos <= 4:  # the remaining length: at most 4 bytes (MQTT 5, 1.5.5)
                byte = buf[i]
                length |= (byte & 0x7F) << shift
                shift += 7
                i += 1
                if not byte & 0x80:
                    break
            else:
                break  # the length is cut by the buffer's end (or malformed: paho's framing says so)
            if i + length > end:
                break
            body = buf[i : i + length]
            pos = i + length
            self._rpos = pos
            handled += 1
            if command & 0xF0 == mqtt.PUBLISH:
                rc = self._publish(command, body)
                self._in_packet["command"] = 0  # paho's own path (QoS 2) may have set it
            else:
                self._in_packet["command"], self._in_packet["packet"] = command, bytearray(body)
                try:
                    rc = self._packet_handle()
                except MalformedPacket:
                    rc = MQTTErrorCode.MQTT_ERR_PROTOCOL
                self._in_packet["command"], self._in_packet["packet"] = 0, bytearray()
            if rc > 0:
                break
        if handled:
            with self._msgtime_mutex:
                self._last_bytes_received = time.monotonic()
        return rc

    def _handle_publish(self) -> MQTTErrorCode:
        """A PUBLISH framed by paho (the first of a read, or one split across reads): decoded the fast way too."""
        return self._publish(self._in_packet["command"], bytes(self._in_packet["packet"]))

    def _publish(self, command: int, body: bytes) -> MQTTErrorCode:
        qos = (command & 0x06) >> 1
        if qos == 2 or self.on_publish_raw is None or self._protocol != mqtt.MQTTv5:
            self._in_packet["command"], self._in_packet["packet"] = command, bytearray(body)
            return super()._handle_publish()  # never subscribed at QoS 2: paho's path, as before
        try:
            topic_end = 2 + int.from_bytes(body[0:2], "big")
            pos = topic_end + (2 if qos else 0)
            mid = int.from_bytes(body[topic_end:pos], "big") if qos else 0
            props_start, props_len, shift = pos, 0, 0
            for _ in range(4):
                byte = body[pos]
                props_len |= (byte & 0x7F) << shift
                shift += 7
                pos += 1
                if not byte & 0x80:
                    break
            props_end = pos + props_len
            if topic_end == 2 or props_end > len(body) or len(body) < topic_end:
                raise IndexError  # a topic alias (never enabled: we send no Topic Alias Maximum) or a short packet
        except IndexError:
            log.warning("malformed PUBLISH from the broker (%d bytes); reconnecting", len(body))
            return MQTTErrorCode.MQTT_ERR_PROTOCOL
        topic = body[2:topic_end].decode("utf-8", "replace")  # an invalid name is refused by the router's parse
        self.on_publish_raw(topic, body[props_end:], qos, mid, body[props_start:props_end] if props_len else b"")
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
        if not topic_text.endswith("/req"):  # the hot path: the ingest parses (and refuses) the topic in its batch
            self.ingest.submit(topic_text, payload, ack)
            return
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
                 share_group: str = topics.SHARE_GROUP, adopt: bool = False):
        """``on_message(topic, payload, ack, user_properties)``: ``ack()`` acknowledges the message to the broker,
        to be called once it is committed (or deliberately dropped); until then the broker keeps it for redelivery.
        ``user_properties`` are the MQTT 5 user properties, as (name, value) pairs.

        ``adopt``: take over another (dead) process's persistent session to drain it: on connect the link leaves
        the shared subscriptions instead of joining them, so the broker stops handing the session new messages
        while it delivers what it queued; ``retire`` then ends the session."""
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
        self.client.on_publish_raw = self._deliver
        self._on_message = on_message
        self._started = False
        self.adopt = adopt

    def _deliver(self, topic: str, payload: bytes, qos: int, mid: int, properties: bytes) -> None:
        self._on_message(topic, payload, self._acker(qos, mid), _user_properties(properties))
        if self._acks:  # what the handler acknowledged at once (chunk requests); read unlocked, as a hint only
            self.flush_acks()

    def _acker(self, qos: int, mid: int):
        if qos == 0:
            return _no_ack
        entry = (self._generation, mid)

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
        if self.adopt:
            client.unsubscribe(list(topics.server_subscriptions(self.share_group)))
        else:
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

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> mqtt.MQTTMessageInfo:
        return self.client.publish(topic, payload, qos=qos, retain=retain)

    def stop(self) -> None:
        if self._started:
            self._started = False
            with contextlib.suppress(Exception):
                self.client.disconnect()

    def retire(self) -> None:
        """Disconnect and end the session (MQTT 5: a session expiry of 0 on DISCONNECT): the broker drops it and
        its subscriptions. For an adopted session, once drained."""
        if self._started:
            self._started = False
            props = Properties(PacketTypes.DISCONNECT)
            props.SessionExpiryInterval = 0
            with contextlib.suppress(Exception):
                self.client.disconnect(properties=props)
            with contextlib.suppress(Exception):
                self.client.loop_stop()
            self.client.loop_stop()


def _user_properties(properties: bytes) -> list:
    """A PUBLISH's MQTT 5 user properties as (name, value) pairs, from its encoded properties (length included);
    most messages have none and cost nothing here."""
    if not properties:
        return []
    props = Properties(PacketTypes.PUBLISH)
    props.unpack(properties)
    return list(getattr(props, "UserProperty", None) or [])
