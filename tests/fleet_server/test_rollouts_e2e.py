"""Rollouts end to end: a real Mosquitto, `fleet-server serve`, and real `fleet-agent run` processes."""

import http.client
import io
import threading
import time

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from fleet_protocol import messages, topics
from tests import zoo

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    return {v: zoo.mlp_opset(d / f"{v}.onnx", opset=13, seed=seed) for v, seed in (("1.0.0", 0), ("1.1.0", 1),
                                                                                     ("1.2.0", 2))}


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


class Traffic:
    """Inference requests to every agent's local API, ~30/s each, bounded in time, so devices report latency."""

    def __init__(self, agents, seconds: float = 120.0, shift: float = 0.0):
        buf = io.BytesIO()
        np.save(buf, np.random.default_rng(3).standard_normal((1, 3, 16, 16)).astype(np.float32) + shift)
        self.body, self.agents, self.deadline = buf.getvalue(), agents, time.monotonic() + seconds
        self.sent = 0
        self.rounds = 0  # rounds in which every agent was sent a request
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        conns = {a.port: http.client.HTTPConnection("127.0.0.1", a.port, timeout=5) for a in self.agents}
        while not self._stop.is_set() and time.monotonic() < self.deadline:
            for conn in conns.values():
                try:
                    conn.request("POST", "/v1/predict", body=self.body, headers={"Content-Type": "application/x-npy"})
                    conn.getresponse().read()
                    self.sent += 1
                except (OSError, http.client.HTTPException):
                    conn.close()  # reconnects on the next request
            self.rounds += 1
            time.sleep(0.03)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


def test_a_latency_regression_trips_the_gate_aborts_and_rolls_back(live, models, tmp_path):
    live.register("classifier", "1.0.0", models["1.0.0"])
    live.register("classifier", "2.0.0", zoo.slow_mlp(tmp_path / "slow.onnx", layers=200))  # ~10 ms vs ~0.05 ms
    agents = live.enroll(3)
    for a in agents:
        a.start()
    live.wait_online(agents)
    base = live.rollout(model="classifier", version="1.0.0", strategy={"canary_percent": 100, "waves_percent": []})
    assert live.wait_state(base["id"], {"completed", "paused"})["state"] == "completed"
    traffic = Traffic(agents, seconds=240)
    try:
        # A baseline on the old model: the gate judges p99 on ≥ 60 requests per device before the update and after
        # it, so wait for them (a loaded host serves fewer a second) and for the telemetry that reports them.
        live.wait(lambda: traffic.rounds >= 80, 60, "a baseline of requests on the old model", lambda: traffic.rounds)
        time.sleep(1.5)
        slow = live.rollout(model="classifier", version="2.0.0",
                            strategy={"canary_percent": 30, "waves_percent": [], "soak_s": 3},
                            gates={"max_p99_ratio": 3.0, "min_requests": 60}, on_gate_failure="abort")
        aborted = live.wait_state(slow["id"], {"aborted", "completed", "paused"})
        assert aborted["state"] == "aborted", (aborted["evaluation"], aborted["notes"])
        assert "p99 latency" in " ".join(aborted["evaluation"]["reasons"])
        assert aborted["evaluation"]["figures"]["p99_ratio"] > 3
        live.wait(lambda: "installed" not in live.get(slow["id"])["counts"], 30, "the updated devices rolled back",
                  lambda: live.members(slow["id"]))
    finally:
        traffic.stop()
    statuses = sorted(m["status"] for m in live.members(slow["id"]).values())
    # the canary soaks 3 s so the gate normally trips before the wave; on a loaded host the baseline p99 can be
    # noisy enough to pass the canary, and then the wave trips it: either way every updated device rolled back
    assert "rolled_back" in statuses and set(statuses) <= {"pending", "rolled_back"}, statuses
    assert {a.model()["version"] for a in agents} == {"1.0.0"}  # every device back on the old version
    assert traffic.sent > 100


def test_a_device_offline_in_its_wave_gets_the_update_when_it_reconnects(live, models):
    live.register("classifier", "1.0.0", models["1.0.0"])
    agents = live.enroll(3)
    for a in agents:
        a.start()
    live.wait_online(agents)
    offline = agents[2]
    offline.stop()
    gone = live.device_id(offline)
    live.wait(lambda: not live.http.get(f"/v1/devices/{gone}").json()["online"], 20, "the device offline")
    r = live.rollout(model="classifier", version="1.0.0", strategy={"canary_percent": 30, "waves_percent": []})
    # members join on the engine's next tick: until then the device is not listed at all
    live.wait(lambda: live.members(r["id"]).get(gone, {}).get("status") == "offered", 60, "the wave offered to it",
              lambda: live.members(r["id"]))
    time.sleep(1)
    assert live.get(r["id"])["state"] == "running" and live.get(r["id"])["counts"].get("installed") == 2
    offline.start()
    done = live.wait_state(r["id"], {"completed", "paused", "aborted"})
    assert done["state"] == "completed" and done["counts"] == {"installed": 3}
    assert offline.model()["version"] == "1.0.0"


def test_duplicate_qos1_telemetry_is_counted_once(live, models):
    agents = live.enroll(1)
    device = live.device_id(agents[0])
    batch = messages.TelemetryBatch(seq=7, window_start=time.time() - 1, window_end=time.time(),
                                    model_version="classifier 1.0.0", requests=10, errors={"bad_input": 1})
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="replayer", protocol=mqtt.MQTTv5)
    host, port = live.broker_url.removeprefix("mqtt://").split(":")
    client.connect(host, int(port))
    client.loop_start()
    try:
        for _ in range(3):  # what a QoS 1 redelivery looks like to the server: the same batch again
            client.publish(topics.topic(device, "tm"), batch.to_bytes(), qos=1).wait_for_publish(5)
        client.publish(topics.topic(device, "tm"), b"{not json", qos=1).wait_for_publish(5)
        client.publish(topics.topic("nobody-here", "tm"), batch.to_bytes(), qos=1).wait_for_publish(5)
    finally:
        client.loop_stop()
        client.disconnect()

    def windows():
        return live.http.get(f"/v1/devices/{device}/telemetry").json()["windows"]

    live.wait(lambda: len(windows()) >= 1, 20, "the telemetry stored")
    time.sleep(1)
    [w] = windows()
    assert w["seq"] == 7 and w["requests"] == 10 and w["errors"] == 1
    counts = live.http.get("/v1/ingest/stats").json()
    assert counts["tm_duplicate"] >= 2 and counts["invalid"] >= 1 and counts["refused_unknown_device"] >= 1


def test_shifted_inputs_raise_a_drift_alert(live, models):
    live.register("classifier", "1.0.0", models["1.0.0"])
    agents = live.enroll(2)
    for a in agents:
        a.start()
    live.wait_online(agents)
    r = live.rollout(model="classifier", version="1.0.0", strategy={"canary_percent": 100, "waves_percent": []})
    assert live.wait_state(r["id"], {"completed", "paused"})["state"] == "completed"
    traffic = Traffic(agents)
    try:
        live.wait(lambda: live.http.get("/v1/models/classifier/1.0.0/drift").json()["inputs"]["x"]["values"] > 0,
                  20, "input statistics arriving")
        calm = live.http.get("/v1/models/classifier/1.0.0/drift").json()
        assert calm["inputs"]["x"]["level"] == "stable" and calm["devices"] == 2, calm
    finally:
        traffic.stop()
    time.sleep(4)  # the calm traffic leaves the 3 s drift window
    traffic = Traffic(agents, shift=2.0)
    try:
        live.wait(lambda: live.http.get("/v1/alerts").json(), 30, "a drift alert")
    finally:
        traffic.stop()
    [alert] = live.http.get("/v1/alerts").json()
    assert alert["input_name"] == "x" and alert["psi"] >= 0.25 and alert["level"] == "drift" and alert["open"]


def test_an_ab_test_splits_the_cohort_and_reports_both_arms(live, models, tmp_path):
    live.register("classifier", "1.0.0", models["1.0.0"])
    live.register("classifier", "2.0.0", zoo.slow_mlp(tmp_path / "slow.onnx", layers=60))
    agents = live.enroll(4, tags=("ab",))
    for a in agents:
        a.start()
    live.wait_online(agents)
    made = live.http.post("/v1/abtests", json={"name": "slow head", "a": {"model": "classifier", "version": "1.0.0"},
                                               "b": {"model": "classifier", "version": "2.0.0"},
                                               "selector": {"tags": ["ab"]}, "split_percent": 50})
    assert made.status_code == 201, made.text
    test = made.json()
    assert sorted(test["devices_a"] + test["devices_b"]) == sorted(live.device_id(a) for a in agents)
    for arm in ("a", "b"):
        assert live.wait_state(test["rollouts"][arm], {"completed", "paused"})["state"] == "completed"
    by_id = {live.device_id(a): a for a in agents}
    assert {by_id[d].model()["version"] for d in test["devices_a"]} == {"1.0.0"}
    assert {by_id[d].model()["version"] for d in test["devices_b"]} == {"2.0.0"}
    traffic = Traffic(agents)
    try:
        live.wait(lambda: min(live.http.get(f"/v1/abtests/{test['id']}/report").json()[arm]["latency_samples"]
                              for arm in ("a", "b")) >= 100, 40, "samples in both arms")
    finally:
        traffic.stop()
    report = live.http.get(f"/v1/abtests/{test['id']}/report").json()
    assert report["a"]["version"] == "1.0.0" and report["b"]["version"] == "2.0.0"
    assert report["a"]["error_rate"] == 0 and report["a"]["error_rate_ci95"][1] < 0.1
    lat = report["difference"]["latency_mean_ms"]
    assert lat["b_minus_a"] > 0 and lat["significant"] and lat["ci95"][0] > 0  # B is slower, and provably so
    assert set(report["a"]["outputs"]) == {"y"} and report["b"]["outputs"]["y"]["values"] > 0


def test_simulated_devices_speak_the_protocol_through_a_rollout(live, models):
    """fleet_sim/sim.py (the benchmarks' devices) against the real server: verified offers, chunked downloads, results."""
    import hashlib

    from sqlmodel import Session

    from fleet_server.keys import pinned_root
    from fleet_server.models import Device
    from fleet_sim.sim import SimFleet

    live.register("classifier", "1.0.0", models["1.0.0"])
    ids = [f"sim-{i:02d}" for i in range(20)]
    with Session(live.db) as s:
        s.add_all([Device(id=d, profile="rpi5", signing_public_key=hashlib.sha256(d.encode()).hexdigest(),
                          mqtt_password_hash="x") for d in ids])
        s.commit()
    fleet = SimFleet(live.broker_url, pinned_root(live.data))
    sims = [fleet.add(d, profile="rpi5", active_sha256=None, fail_probe=(d == "sim-00")) for d in ids]
    try:
        assert fleet.connect_all(30) < 30
        live.wait(lambda: live.http.get("/v1/devices", params={"online": True}).json()["total"] == 20, 20,
                  "the simulated devices online")
        r = live.rollout(model="classifier", version="1.0.0", strategy={"canary_percent": 100, "waves_percent": []},
                         gates={"max_failure_share": 0.5})
        target = hashlib.sha256(models["1.0.0"].read_bytes()).hexdigest()
        assert fleet.run(lambda: sum(d.active == target for d in sims) == 19, 60)
        done = live.wait_state(r["id"], {"completed", "paused", "aborted"})
    finally:
        fleet.close()
    assert done["state"] == "completed" and done["counts"] == {"installed": 19, "failed": 1}
    assert live.members(r["id"])["sim-00"]["reason"] == "probe_failed"
    assert fleet.counts["full"] == 20 and not fleet.counts["bad_chunk"] and not fleet.counts["offer_refused"]


def test_encrypted_delivery_to_a_real_agent(live, models):
    """A rollout that asks for encryption: each device gets the artifact sealed to its enrolled X25519 key."""
    live.register("classifier", "1.0.0", models["1.0.0"])
    [agent] = live.enroll(1)
    agent.start()
    live.wait_online([agent])
    r = live.rollout(model="classifier", version="1.0.0", encrypt=True,
                     strategy={"canary_percent": 100, "waves_percent": []})
    done = live.wait_state(r["id"], {"completed", "paused", "aborted"})
    assert done["state"] == "completed", live.members(r["id"])
    [member] = live.members(r["id"]).values()
    assert member["delivery"] == "encrypted" and member["bytes_offered"] > models["1.0.0"].stat().st_size
    assert agent.model()["version"] == "1.0.0"
