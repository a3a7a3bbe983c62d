"""Rollouts end to end: a real Mosquitto, `fleet-server serve`, and real `fleet-agent run` processes."""

import threading
import time

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from fleet_protocol import messages, topics
from tests import zoo
from tests.fleet_driver import Broker
from tests.fleet_server.live_fleet import LiveFleet

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    return {v: zoo.mlp_opset(d / f"{v}.onnx", opset=13, seed=seed) for v, seed in (("1.0.0", 0), ("1.1.0", 1),
                                                                                     ("1.2.0", 2))}


@pytest.fixture
def live(tmp_path):
    broker = Broker(tmp_path / "broker").start()
    fleet = LiveFleet(tmp_path, broker.url)
    yield fleet
    fleet.close()
    broker.stop()


def test_canary_then_waves_completes_then_a_delta_update(live, models):
    live.register("classifier", "1.0.0", models["1.0.0"])
    live.register("classifier", "1.1.0", models["1.1.0"])
    agents = live.enroll(3)
    for a in agents:
        a.start()
    live.wait_online(agents)
    ids = sorted(live.device_id(a) for a in agents)

    first = live.rollout(name="first install", model="classifier", version="1.0.0",
                         strategy={"canary_percent": 30, "waves_percent": [100]})
    done = live.wait_state(first["id"], {"completed", "paused", "aborted"})
    assert done["state"] == "completed", done
    members = live.members(first["id"])
    assert sorted(members) == ids and {m["status"] for m in members.values()} == {"installed"}
    canary = min(members.values(), key=lambda m: m["offered_at"])
    assert all(m["offered_at"] >= canary["finished_at"] for m in members.values() if m is not canary), \
        "the wave was offered before the canary finished"
    assert {m["delivery"] for m in members.values()} == {"full"}
    assert {a.model()["version"] for a in agents} == {"1.0.0"}

    live.wait(lambda: all(d["active_sha256"] for d in live.http.get("/v1/devices").json()["items"]), 20,
              "devices reporting what they run")
    second = live.rollout(model="classifier", version="1.1.0", strategy={"canary_percent": 30, "waves_percent": []})
    done = live.wait_state(second["id"], {"completed", "paused", "aborted"})
    assert done["state"] == "completed", done
    members = live.members(second["id"])
    assert {m["delivery"] for m in members.values()} == {"delta"}
    full = models["1.1.0"].stat().st_size
    assert all(m["bytes_offered"] < full for m in members.values())
    assert {a.model()["version"] for a in agents} == {"1.1.0"}
    assert done["counts"] == {"installed": 3} and done["evaluation"]["verdict"] == "pass"


def test_a_failing_probe_pauses_at_the_canary_and_devices_keep_their_model(live, models):
    live.register("classifier", "1.0.0", models["1.0.0"])
    live.register("classifier", "1.2.0", models["1.2.0"], probe_from=models["1.1.0"])  # expected outputs are wrong
    agents = live.enroll(3)
    for a in agents:
        a.start()
    live.wait_online(agents)
    base = live.rollout(model="classifier", version="1.0.0", strategy={"canary_percent": 100, "waves_percent": []})
    assert live.wait_state(base["id"], {"completed", "paused"})["state"] == "completed"

    bad = live.rollout(model="classifier", version="1.2.0", strategy={"canary_percent": 30, "waves_percent": []},
                       gates={"max_failure_share": 0.0, "min_finished": 1}, on_gate_failure="pause")
    paused = live.wait_state(bad["id"], {"paused", "completed", "aborted"})
    assert paused["state"] == "paused" and "update failures 1/1" in " ".join(paused["evaluation"]["reasons"])
    members = live.members(bad["id"])
    failed = [m for m in members.values() if m["status"] == "failed"]
    assert len(failed) == 1 and failed[0]["reason"] == "probe_failed"
    assert sum(m["status"] == "pending" for m in members.values()) == 2  # the waves were never offered
    assert {a.model()["version"] for a in agents} == {"1.0.0"}
    assert live.http.post(f"/v1/rollouts/{bad['id']}/pause").status_code == 409


def test_a_server_restart_mid_rollout_resumes_without_offering_twice(live, models):
    live.register("classifier", "1.0.0", models["1.0.0"])
    agents = live.enroll(3)
    for a in agents:
        a.start()
    live.wait_online(agents)
    spy = CommandSpy(live.broker_url)
    r = live.rollout(model="classifier", version="1.0.0",
                     strategy={"canary_percent": 30, "waves_percent": [], "soak_s": 3})
    live.wait(lambda: live.get(r["id"])["counts"].get("installed", 0) >= 1, 60, "the canary installed")
    live.stop_server()
    live.start_server()
    done = live.wait_state(r["id"], {"completed", "paused", "aborted"})
    spy.close()
    assert done["state"] == "completed" and done["counts"] == {"installed": 3}
    assert {a.model()["version"] for a in agents} == {"1.0.0"}
    jobs = spy.offers()
    assert sorted(jobs) == sorted(live.device_id(a) for a in agents)
    assert all(len(set(j)) == 1 and len(j) == 1 for j in jobs.values()), jobs  # one offer per device, ever
    assert "Traceback" not in (live.dir / "server.log").read_text()


class CommandSpy:
    """Sees every command the server publishes to devices (the test broker admits anonymous clients)."""

    def __init__(self, broker_url: str):
        self.seen: list[tuple[str, bytes]] = []
        host, port = broker_url.removeprefix("mqtt://").split(":")
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="spy", protocol=mqtt.MQTTv5)
        ready = threading.Event()
        self.client.on_connect = lambda c, *a: (c.subscribe("ef/v1/d/+/cmd", qos=1), ready.set())
        self.client.on_message = lambda c, u, msg: self.seen.append((msg.topic, msg.payload))
        self.client.connect(host, int(port))
        self.client.loop_start()
        assert ready.wait(10)
        time.sleep(0.3)  # the subscription is in place before the rollout starts

    def offers(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for topic, payload in self.seen:
            m = messages.parse(payload)
            if isinstance(m, messages.UpdateOffer):
                out.setdefault(topics.parse(topic).device, []).append(m.job)
        return out

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()
