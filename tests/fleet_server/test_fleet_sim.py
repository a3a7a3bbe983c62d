"""`fleet-sim` against the real server and a Mosquitto that requires each device's own password: enrollment through
the API, a rollout with injected failures (probe failures, a latency regression, connections cut and restored)."""

import json
import subprocess
import sys
import time

import pytest

from tests import zoo
from tests.fleet_driver import Broker
from tests.fleet_server.live_fleet import ROOT, LiveFleet


@pytest.fixture
def secured(tmp_path):
    files, pid = tmp_path / "broker-files", tmp_path / "mosquitto.pid"
    probe = Broker(tmp_path / "mq")  # its port, for the server's URL; started once the server wrote the files
    fleet = LiveFleet(tmp_path, probe.url, env={"EF_SERVER_BROKER_FILES_DIR": str(files),
                                                "EF_SERVER_BROKER_PID_FILE": str(pid),
                                                "EF_SERVER_MQTT_USERNAME": "fleet-server",
                                                "EF_SERVER_MQTT_PASSWORD": "server-pw"})
    probe.conf.write_text(probe.conf.read_text().replace("allow_anonymous true\n", "allow_anonymous false\n")
                          + f"password_file {files / 'passwd'}\nacl_file {files / 'acl'}\npid_file {pid}\n")
    broker = probe.start()
    yield fleet
    fleet.close()
    broker.stop()


def fleet_sim(*args, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fleet_sim.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


@pytest.mark.slow
def test_fleet_sim_enrolls_and_injects_failures_through_a_rollout(secured, tmp_path):
    live = secured
    live.register("classifier", "1.0.0", zoo.mlp_opset(tmp_path / "m.onnx", opset=13, seed=0))
    token = live.http.post("/v1/enrollment-tokens", json={"max_uses": 12, "profile": "rpi5"}).json()["token"]
    enrolled = fleet_sim("enroll", "--server", f"http://127.0.0.1:{live.port}", "--token", token, "--devices", 12,
                         "--out", tmp_path / "fleet.json")
    assert enrolled.returncode == 0, enrolled.stderr
    spec = json.loads((tmp_path / "fleet.json").read_text())
    assert len({d["password"] for d in spec["devices"]}) == 12  # each device its own credentials
    summary_file = tmp_path / "summary.json"
    sim = subprocess.Popen([sys.executable, "-m", "fleet_sim.cli", "run", "--fleet", str(tmp_path / "fleet.json"),
                            "--duration", "30", "--telemetry-interval", "1", "--requests", "50", "--fail-probe",
                            "0.25", "--slow", "1", "--slow-factor", "5", "--flaky", "0.25", "--flap-every", "4",
                            "--offline-s", "1", "--seed", "3", "--json", str(summary_file)], cwd=ROOT,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        live.wait(lambda: live.http.get("/v1/devices", params={"online": True}).json()["total"] >= 9, 30,
                  "the simulated devices online")
        r = live.rollout(model="classifier", version="1.0.0", strategy={"canary_percent": 100, "waves_percent": []},
                         gates={"max_failure_share": 0.6})
        done = live.wait_state(r["id"], {"completed", "paused", "aborted"}, timeout=60)
        out, _ = sim.communicate(timeout=90)
    finally:
        sim.kill()
    assert sim.returncode == 0, out[-3000:]
    summary = json.loads(summary_file.read_text())
    failing = summary["fail_probe"]
    assert 0 < failing < 12 and summary["flaky"] > 0 and summary["slow"] == 12
    assert done["state"] == "completed" and done["counts"] == {"installed": 12 - failing, "failed": failing}
    assert {m["reason"] for m in live.members(r["id"]).values() if m["status"] == "failed"} == {"probe_failed"}
    assert summary["counts"]["dropped"] > 0 and summary["counts"]["reconnected"] > 0  # flaky links came back
    assert summary["installed"] == 12 - failing and summary["telemetry_sent"] > 12 * 10
    assert not summary["counts"].get("connect_refused") and not summary["counts"].get("offer_refused")
    time.sleep(1)
    tm = live.http.get("/v1/telemetry", params={"model_version": "classifier 1.0.0", "bucket_s": 3600}).json()
    p50 = tm["series"][-1]["p50_ms"]
    assert 6 < p50 < 16, tm  # the regression: ~2 ms × 5 on the updated devices


@pytest.mark.slow
def test_ramp_a_fleet_sim_rollout_grows_its_rate_with_successes(secured, tmp_path):
    """24 simulated devices at a base rate of 3 offers a minute would take 8 minutes; tripling the rate for every 3
    installs finishes in seconds, and the offers come in growing steps, each after installs."""
    live = secured
    live.register("classifier", "1.0.0", zoo.mlp_opset(tmp_path / "m.onnx", opset=13, seed=0))
    token = live.http.post("/v1/enrollment-tokens", json={"max_uses": 24, "profile": "rpi5"}).json()["token"]
    enrolled = fleet_sim("enroll", "--server", f"http://127.0.0.1:{live.port}", "--token", token, "--devices", 24,
                         "--out", tmp_path / "fleet.json")
    assert enrolled.returncode == 0, enrolled.stderr
    sim = subprocess.Popen([sys.executable, "-m", "fleet_sim.cli", "run", "--fleet", str(tmp_path / "fleet.json"),
                            "--duration", "60", "--telemetry-interval", "5", "--requests", "5"], cwd=ROOT,
                           stdout=open(tmp_path / "sim.log", "wb"), stderr=subprocess.STDOUT)  # noqa: SIM115
    try:
        live.wait(lambda: live.http.get("/v1/devices", params={"online": True}).json()["total"] >= 24, 30,
                  "the simulated devices online")
        r = live.rollout(model="classifier", version="1.0.0", strategy={
            "canary_percent": 100, "waves_percent": [], "rate_per_minute": 3, "ramp_factor": 3, "ramp_every": 3,
            "max_rate_per_minute": 100})
        done = live.wait_state(r["id"], {"completed", "paused", "aborted"}, timeout=50)
    finally:
        sim.kill()
        sim.wait(30)
    assert done["state"] == "completed" and done["counts"] == {"installed": 24}, done
    members = sorted(live.members(r["id"]).values(), key=lambda m: m["offered_at"])
    groups: dict[float, list[dict]] = {}  # the offers of each engine step
    for m in members:
        groups.setdefault(m["offered_at"], []).append(m)
    sizes = [len(g) for g in groups.values()]
    print("offers per engine step:", sizes)
    assert sizes[:2] == [3, 6], sizes  # the base rate; then 9 a minute after 3 installs, 3 of them already used
    for when, group in list(groups.items())[1:]:  # each step of growth follows installs, never time alone
        installed = sum(1 for m in members if m["finished_at"] <= when)
        offered_before = sum(len(g) for t, g in groups.items() if t < when)
        assert offered_before + len(group) <= 3 * 3 ** (installed // 3), (sizes, installed)
