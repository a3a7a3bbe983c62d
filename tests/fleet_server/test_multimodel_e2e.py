"""Several models per device end to end: a real Mosquitto, `fleet-server serve` and real `fleet-agent run`
processes, with two models' rollouts reaching the same devices."""

import http.client
import io
import json
import threading
import time
import urllib.request

import numpy as np
import pytest

from tests import zoo

pytestmark = pytest.mark.slow

X = np.random.default_rng(3).standard_normal((1, 3, 16, 16)).astype(np.float32)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    return {key: zoo.mlp_opset(d / f"{key}.onnx", opset=13, seed=seed)
            for key, seed in (("classifier 1.0.0", 0), ("classifier 1.1.0", 1), ("detector 1.0.0", 5))}


def listed(agent) -> dict[str, str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{agent.port}/v1/models", timeout=5) as r:
        return {m["name"]: m.get("version") for m in json.loads(r.read())["models"] if m["loaded"]}


class Requests:
    """A client per agent asking one model, counting what did not come back 200 (bounded in time)."""

    def __init__(self, agents, model: str, seconds: float = 120.0):
        buf = io.BytesIO()
        np.save(buf, X)
        self.body, self.agents, self.path = buf.getvalue(), agents, f"/v1/models/{model}/predict"
        self.deadline = time.monotonic() + seconds
        self.ok = self.failed = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        conns = [http.client.HTTPConnection("127.0.0.1", a.port, timeout=5) for a in self.agents]
        while not self._stop.is_set() and time.monotonic() < self.deadline:
            for conn in conns:
                try:
                    conn.request("POST", self.path, body=self.body, headers={"Content-Type": "application/x-npy"})
                    response = conn.getresponse()
                    response.read()
                    if response.status == 200:
                        self.ok += 1
                    else:
                        self.failed += 1
                except (OSError, http.client.HTTPException):
                    self.failed += 1
                    conn.close()
            time.sleep(0.02)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


def test_multimodel_two_models_roll_out_at_once_and_update_apart(live, models):
    for key, path in models.items():
        live.register(*key.split(), path)
    agents = live.enroll(2)
    for a in agents:
        a.start()
    live.wait_online(agents)

    # two rollouts of two models, at once, to the same devices: each device's two models install side by side
    first = [live.rollout(model=name, version="1.0.0", strategy={"canary_percent": 50, "waves_percent": [100]})
             for name in ("classifier", "detector")]
    for r in first:
        done = live.wait_state(r["id"], {"completed", "paused", "aborted"})
        assert done["state"] == "completed" and done["counts"] == {"installed": 2}, done
    live.wait(lambda: all(listed(a) == {"classifier": "1.0.0", "detector": "1.0.0"} for a in agents), 20,
              "both models served on every device")
    ids = sorted(live.device_id(a) for a in agents)

    def reported() -> dict:
        return {d["id"]: {m["name"]: m["active_version"] for m in d["models"]}
                for d in live.http.get("/v1/devices").json()["items"]}

    live.wait(lambda: all(v == {"classifier": "classifier 1.0.0", "detector": "detector 1.0.0"}
                          for v in reported().values()), 20, "the server sees both models", show=reported)
    running = live.http.get("/v1/devices", params={"model_version": "detector 1.0.0"}).json()["items"]
    assert sorted(d["id"] for d in running) == ids

    # an update of the classifier while both models are asked all along: a delta from the classifier each device
    # runs (never from the detector), not one request fails, and the error-rate gate judges the classifier's own
    # requests after its update (the detector's do not count)
    load, asked = Requests(agents, "detector"), Requests(agents, "classifier")
    try:
        second = live.rollout(model="classifier", version="1.1.0",
                              strategy={"canary_percent": 50, "waves_percent": [100]},
                              gates={"max_failure_share": 0.0, "max_error_rate": 0.0, "min_requests": 20})
        done = live.wait_state(second["id"], {"completed", "paused", "aborted"})
    finally:
        load.stop()
        asked.stop()
    assert done["state"] == "completed", done
    assert done["evaluation"]["figures"]["error_rate"] == 0  # judged: 20 or more classifier requests
    members = live.members(second["id"])
    assert {m["delivery"] for m in members.values()} == {"delta"}
    assert load.ok > 50 and load.failed == 0 and asked.failed == 0
    assert all(listed(a) == {"classifier": "1.1.0", "detector": "1.0.0"} for a in agents)

    # telemetry per model: each model's windows under its own label
    device = ids[0]
    live.wait(lambda: any(w["requests"] for w in live.http.get(f"/v1/devices/{device}/telemetry",
                                                              params={"model": "detector"}).json()["windows"]),
              20, "detector telemetry")
    windows = live.http.get(f"/v1/devices/{device}/telemetry", params={"model": "detector"}).json()["windows"]
    assert {w["model_version"] for w in windows} == {"detector 1.0.0"}
    windows = live.http.get(f"/v1/devices/{device}/telemetry", params={"model": "classifier"}).json()["windows"]
    assert {w["model_version"] for w in windows} <= {"classifier 1.0.0", "classifier 1.1.0"}
