"""Metered links end to end (issue 17, part 6): a real `fleet-server serve`, Mosquitto and `fleet-agent run`
subprocesses. A device on a metered link holds its download and the server shows it ``waiting: metered`` with the
bytes outstanding; once the link is free it downloads at its bandwidth cap. A device whose daily budget runs out
mid-download waits with what it has, and resumes from there (over HTTP) after a restart with a larger budget."""

from __future__ import annotations

import json
import re
import time

import numpy as np
import pytest
from onnx import TensorProto, helper, save

from tests.fleet_driver import Broker
from tests.fleet_server.live_fleet import LiveFleet

pytestmark = pytest.mark.slow


def wide_mlp(path, *, hidden: int = 1024, seed: int = 0):
    """x [1,3,16,16] → y [1,10] through a 768×``hidden`` layer: ~3 MB, a dozen 256 KiB chunks."""
    rng = np.random.default_rng(seed)

    def w(name, *shape):
        return helper.make_tensor(name, TensorProto.FLOAT, shape, (rng.standard_normal(shape) * 0.05).astype(
            np.float32).tobytes(), raw=True)

    nodes = [helper.make_node("Flatten", ["x"], ["f"]),
             helper.make_node("Gemm", ["f", "w1", "b1"], ["h"], transB=1),
             helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Gemm", ["r", "w2", "b2"], ["y"], transB=1)]
    graph = helper.make_graph(nodes, "wide", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])],
                              [w("w1", hidden, 768), w("b1", hidden), w("w2", 10, hidden), w("b2", 10)])
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    return path


def outstanding(member: dict) -> int:
    found = re.search(r"([\d,]+) bytes outstanding", member["detail"])
    return int(found.group(1).replace(",", "")) if found else -1


def test_metered_link_holds_the_download_then_it_runs_at_the_cap(live, tmp_path):
    model = wide_mlp(tmp_path / "wide.onnx")
    size = model.stat().st_size
    live.register("wide", "1.0.0", model)
    flag = tmp_path / "on-cellular"
    flag.touch()
    (agent,) = live.enroll(1)
    agent.env = {**agent.env, "EF_AGENT_METERED_FILE": str(flag), "EF_AGENT_MAX_DOWNLOAD_BPS": "1000000"}
    agent.start()
    live.wait_online([agent])
    r = live.rollout(model="wide", version="1.0.0", strategy={"canary_percent": 100, "waves_percent": []})
    device = live.device_id(agent)
    live.wait(lambda: live.members(r["id"]).get(device, {}).get("reason") == "metered", 30, "the device waiting: metered",
              lambda: live.members(r["id"]))
    member = live.members(r["id"])[device]
    assert member["status"] in ("offered", "downloading") and member["detail"].startswith("waiting: metered link")
    assert outstanding(member) == size  # nothing fetched while metered
    waiting = agent.model()["update"]["waiting"]  # the device's own API says so too
    assert waiting["reason"] == "metered" and str(flag) in waiting["why"]
    time.sleep(2)
    assert live.get(r["id"])["state"] == "running" and live.members(r["id"])[device]["status"] != "installed"

    flag.unlink()
    done = live.wait_state(r["id"], {"completed", "paused", "aborted"}, timeout=60)
    assert done["state"] == "completed" and done["counts"] == {"installed": 1}, done
    member = live.members(r["id"])[device]
    assert member["reason"] == "ok"  # no longer waiting
    # 1 MB/s with a bucket of one second: at least (size - 1 MB) / 1 MB/s for the download itself.
    assert member["timings"]["download_ms"] >= (size - 1_000_000) / 1_000_000 * 1000 * 0.9, member["timings"]
    assert "waiting: metered" in agent.output()


def test_metered_daily_budget_waits_with_what_arrived_and_resumes_over_http(tmp_path):
    broker = Broker(tmp_path / "broker").start()
    live = LiveFleet(tmp_path, broker.url, env={"EF_SERVER_DEVICE_HTTP_DOWNLOADS": "true"})
    try:
        model = wide_mlp(tmp_path / "wide.onnx", seed=1)
        size = model.stat().st_size
        live.register("wide", "1.0.0", model)
        (agent,) = live.enroll(1)
        agent.env = {**agent.env, "EF_AGENT_DAILY_DOWNLOAD_BYTES": "1000000"}
        agent.start()
        live.wait_online([agent])
        r = live.rollout(model="wide", version="1.0.0", strategy={"canary_percent": 100, "waves_percent": []})
        device = live.device_id(agent)
        live.wait(lambda: live.members(r["id"]).get(device, {}).get("reason") == "data_budget", 30,
                  "the device waiting on its data budget", lambda: live.members(r["id"]))
        member = live.members(r["id"])[device]
        assert "1,000,000 bytes a day" in member["detail"] and outstanding(member) == size - 1_000_000

        agent.stop()
        agent.env = {**agent.env, "EF_AGENT_DAILY_DOWNLOAD_BYTES": "100000000"}
        agent.start()
        done = live.wait_state(r["id"], {"completed", "paused", "aborted"}, timeout=60)
        assert done["state"] == "completed" and done["counts"] == {"installed": 1}, done
        assert live.members(r["id"]).get(device, {}).get("reason") == "ok"
        ledger = json.loads((tmp_path / "agent0" / "work" / "link-ledger.json").read_text())
        assert ledger["bytes"] == size  # resumed where the budget stopped it: nothing fetched twice
    finally:
        live.close()
        broker.stop()
