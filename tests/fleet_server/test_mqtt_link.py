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
