"""`make demo` in CI: the whole journey with 3 agents, asserting its own outcome, and an interrupted run that
leaves nothing behind."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.fleet_driver import free_port

ROOT = Path(__file__).resolve().parents[1]


def demo(out: Path, *args: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EF_SERVER_", "EF_AGENT_"))}
    return subprocess.Popen([sys.executable, "scripts/demo.py", "--agents", "3", "--no-keep", "--out", str(out),
                             "--port", str(free_port()), *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def gone(pgid: int, timeout: float = 10.0) -> bool:
    """No live process left in the group (every demo child leads its own). Zombies do not count: orphans are
    reaped by whatever PID 1 this machine has, whenever it gets to it."""
    deadline = time.monotonic() + timeout
    while True:
        alive = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                alive.append(stat.parent.name)
        if not alive or time.monotonic() > deadline:
            return not alive
        time.sleep(0.2)


@pytest.mark.slow
def test_the_demo_runs_the_whole_journey_and_stops_everything(tmp_path):
    out = tmp_path / "demo"
    proc = demo(out)
    try:
        log, _ = proc.communicate(timeout=900)
    finally:
        proc.kill()
    assert proc.returncode == 0, log[-6000:]
    summary = json.loads((out / "summary.json").read_text())
    steps = summary["steps"]
    assert summary["ok"] and steps["enroll"] == {"devices": 3, "online": 3,
                                                 "profiles": ["android-arm64", "jetson-orin-nano", "rpi5"]}
    assert steps["rollout_1"]["state"] == "completed" and steps["rollout_1"]["counts"] == {"installed": 3}
    assert steps["rollout_2"]["state"] == "completed" and steps["rollout_2"]["deltas"] == 3
    assert all(steps["telemetry"]["by_version"][v]["requests"] > 0 for v in ("1.0.0", "1.1.0"))
    bad = steps["bad_rollout"]
    assert bad["state"] == "aborted" and "p99 latency" in " ".join(bad["reasons"]) and bad["rolled_back"] >= 1
    assert set(bad["running"].values()) == {"1.1.0"}  # every device back on the good version
    second = steps["second_model"]  # a second model installed beside the first while its traffic went on
    assert second["state"] == "completed" and second["devices_with_both"] == 3 and second["digits_failed_during"] == 0
    assert summary["traffic"]["failed"] == 0 and "OpenAPI docs" in log and "/docs" in summary["urls"]["api_docs"]
    pids = json.loads((out / "pids.json").read_text())
    assert len(pids) == 5 and all(gone(pid) for pid in pids.values())  # broker, server, 3 agents: all stopped


@pytest.mark.slow
def test_an_interrupted_demo_leaves_nothing_running(tmp_path):
    out = tmp_path / "demo"
    proc = demo(out)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # until the broker and the server run
            pids_file = out / "pids.json"
            if pids_file.exists() and "fleet-server" in json.loads(pids_file.read_text() or "{}"):
                break
            time.sleep(0.2)
        time.sleep(1)
        proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
        log, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 1 and "interrupted" in log, log[-3000:]
    pids = json.loads((out / "pids.json").read_text())
    assert {"mosquitto", "fleet-server"} <= set(pids) and all(gone(pid) for pid in pids.values())
    assert json.loads((out / "summary.json").read_text())["ok"] is False
