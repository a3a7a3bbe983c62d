"""The server's MQTT link on a real Mosquitto: acknowledgements sent in batches after the handler's word, reads from a
buffer, and a message never acknowledged comes back after a reconnect (the ingest's crash safety rests on it)."""

from __future__ import annotations

import time

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from fleet_protocol import topics
from fleet_server.mqtt import FleetLink
from tests.fleet_driver import Broker

N = 300


def wait_for(predicate, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise TimeoutError


def publish(port: int, payloads: list[bytes]) -> None:
    pub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="device-pub", protocol=mqtt.MQTTv5)
    pub.connect("127.0.0.1", port)
    pub.loop_start()
    infos = [pub.publish(topics.topic("d1", "tm"), p, qos=1) for p in payloads]
    for info in infos:
        info.wait_for_publish(10)
    pub.disconnect()
    pub.loop_stop()


def test_unacknowledged_messages_come_back_and_acknowledged_ones_do_not(tmp_path):
    broker = Broker(tmp_path / "mq").start()
    received: list[tuple[bytes, object]] = []
    link = FleetLink(broker.url, "fleet-server-t", None, lambda t, p, ack, props: received.append((p, ack))).start()
    try:
        assert link.connected.wait(10)
        payloads = [f"m{i:04d}".encode() + b"x" * (i % 700) for i in range(N)]  # sizes vary across buffer reads
        publish(broker.port, payloads)
        wait_for(lambda: len(received) >= N, 20)
        assert [p for p, _ in received] == payloads  # in order, intact, through the read buffer
        for _, ack in received[: N // 2]:  # the first half committed: acknowledged in one write
            ack()
        link.flush_acks()
        time.sleep(0.5)
        link.stop()
        received.clear()
        link = FleetLink(broker.url, "fleet-server-t", None, lambda t, p, ack, props: received.append((p, ack))).start()
        wait_for(lambda: len(received) >= N - N // 2, 20)
        time.sleep(0.5)
        assert sorted(p for p, _ in received) == sorted(payloads[N // 2:])  # only the unacknowledged ones again
        for _, ack in received:
            ack()
        link.flush_acks()
        time.sleep(0.5)
    finally:
        link.stop()
        broker.stop()


def test_inbound_packets_framed_from_the_buffer_keep_topics_qos_properties_and_the_links_own_acks(tmp_path):
    """The link frames and decodes inbound PUBLISH packets itself (fleet_server/mqtt.py): what a device sends arrives
    intact whatever its size (a packet split across 64 KiB reads goes through paho's framing), QoS 0 needs no
    acknowledgement, MQTT 5 user properties reach the router, and the broker's PUBACKs for the server's own
    publishes (other packet types, framed from the same buffer) still complete them."""
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    broker = Broker(tmp_path / "mq").start()
    received: list[tuple[str, bytes, object, list]] = []
    link = FleetLink(broker.url, "fleet-server-t2", None,
                     lambda t, p, ack, props: received.append((t, p, ack, props))).start()
    pub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="d2", protocol=mqtt.MQTTv5)
    try:
        assert link.connected.wait(10)
        pub.connect("127.0.0.1", broker.port)
        pub.loop_start()
        sizes = [0, 1, 700, 65_000, 70_000, 200_000, 5, 131_072]
        sent = []
        for i, size in enumerate(sizes):
            payload = bytes([i]) * size
            qos = i % 2
            sent.append((topics.topic("d2", "tm"), payload, qos))
            pub.publish(topics.topic("d2", "tm"), payload, qos=qos).wait_for_publish(10)
        props = Properties(PacketTypes.PUBLISH)
        props.UserProperty = ("ef-chunks", "bin1")
        req = topics.topic("d2", "dl-req", "job-1")
        pub.publish(req, b'{"x":1}', qos=1, properties=props).wait_for_publish(10)
        wait_for(lambda: len(received) >= len(sizes) + 1, 20)
        assert [(t, p) for t, p, _, _ in received[: len(sizes)]] == [(t, p) for t, p, _ in sent]
        assert all(props == [] for _, _, _, props in received[: len(sizes)])
        assert received[-1][0] == req and received[-1][1] == b'{"x":1}'
        assert ("ef-chunks", "bin1") in received[-1][3]
        own = [link.publish(topics.topic("d2", "cmd"), b"offer %d" % i, qos=1) for i in range(50)]
        for info in own:  # completed by the broker's PUBACKs, read through the link's buffer
            info.wait_for_publish(10)
            assert info.is_published()
        assert link.client.is_connected()
    finally:
        pub.disconnect()
        pub.loop_stop()
        link.stop()
        broker.stop()
