"""The agent as a real process against a real Mosquitto: updates, refusals, rollback."""

import io
import json
import urllib.request

import numpy as np
import onnxruntime as ort
import pytest

from fleet_protocol.messages import Reason

pytestmark = pytest.mark.slow


def predict(port: int, x: np.ndarray) -> np.ndarray:
    buf = io.BytesIO()
    np.save(buf, x)
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/predict", data=buf.getvalue(),
                                 headers={"Content-Type": "application/x-npy"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return np.load(io.BytesIO(r.read()))


def reference(release, x):
    sess = ort.InferenceSession(release.data, providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def wait_idle(agent, timeout=20.0) -> dict:
    """The result event goes out just before the journal returns to idle: wait for that too."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = agent.model()
        if info["update"]["state"] == "idle":
            return info
        time.sleep(0.05)
    raise TimeoutError(f"the agent stays in {info['update']}")


def install(fleet, agent, job, release, **kw):
    fleet.offer(job, release, **kw)
    result = fleet.wait_result(job)
    assert result.result == "ok" and result.state == "committed", (result, agent.output()[-3000:])
    wait_idle(agent)
    return result


def test_full_then_delta_update_serves_the_new_model(fleet, releases):
    agent = fleet.agent().start()
    assert agent.model()["loaded"] is False
    x = np.random.default_rng(0).standard_normal((1, 3, 16, 16)).astype(np.float32)
    first = install(fleet, agent, "j-full", releases["1.0.0"])
    assert {"stage_ms", "probe_ms", "switch_ms", "download_ms"} <= set(first.timings_ms)
    np.testing.assert_allclose(predict(agent.port, x), reference(releases["1.0.0"], x), rtol=1e-5, atol=1e-5)
    full_requests = [r for r in fleet.chunk_requests if r.job == "j-full"]
    assert full_requests and all(r.path.endswith("model.onnx") for r in full_requests)

    install(fleet, agent, "j-delta", releases["1.1.0"], base=releases["1.0.0"])
    delta_requests = [r for r in fleet.chunk_requests if r.job == "j-delta"]
    assert delta_requests and all(r.path.endswith(".patch") for r in delta_requests)  # the delta, not the file
    info = agent.model()
    assert (info["version"], info["slot"]) == ("1.1.0", "b") and info["update"]["state"] == "idle"
    np.testing.assert_allclose(predict(agent.port, x), reference(releases["1.1.0"], x), rtol=1e-5, atol=1e-5)
    states = [s for s in fleet.states if s.active_version == "classifier 1.1.0"]
    assert states and states[-1].active_sha256 == releases["1.1.0"].sha256


@pytest.mark.parametrize("encoding,used", [("negotiate", "binary"), ("json", "json")])
def test_chunks_come_as_binary_frames_when_asked_and_json_chunks_are_still_accepted(fleet, releases, encoding, used):
    fleet.chunk_encoding = encoding  # "json": a server that predates binary chunks ignores the agent's property
    agent = fleet.agent().start()
    install(fleet, agent, "j1", releases["1.0.0"])
    install(fleet, agent, "j2", releases["1.1.0"], base=releases["1.0.0"])
    assert agent.model()["sha256"] == releases["1.1.0"].sha256
    unused = {"binary": "json", "json": "binary"}[used]
    assert fleet.chunks_sent[used] > 0 and fleet.chunks_sent[unused] == 0, fleet.chunks_sent


@pytest.mark.parametrize("tamper,reason", [("flip", Reason.BAD_SIGNATURE), ("untrusted_key", Reason.BAD_SIGNATURE),
                                           ("truncate", Reason.MALFORMED), ("probe", Reason.HASH_MISMATCH)])
def test_tampered_offers_are_refused_and_the_model_keeps_serving(fleet, releases, tamper, reason):
    agent = fleet.agent().start()
    install(fleet, agent, "j1", releases["1.0.0"])
    fleet.offer("j2", releases["1.1.0"], tamper=tamper)
    result = fleet.wait_result("j2")
    assert (result.result, result.reason) == ("failed", reason), result
    assert agent.model()["version"] == "1.0.0"
    assert not [r for r in fleet.chunk_requests if r.job == "j2"]  # not a byte fetched for a bad offer


def test_expired_and_wrong_profile_offers_are_refused(fleet, releases):
    from datetime import timedelta

    agent = fleet.agent().start()
    install(fleet, agent, "j1", releases["1.0.0"])
    fleet.offer("j2", releases["1.1.0"], expires_in=timedelta(seconds=-5))
    assert fleet.wait_result("j2").reason == Reason.EXPIRED
    wait_idle(agent)
    fleet.offer("j3", releases["1.1.0"], profile="jetson-nano")
    assert fleet.wait_result("j3").reason == Reason.WRONG_DEVICE
    assert agent.model()["version"] == "1.0.0"


def test_a_wrong_delta_and_a_failing_probe_keep_the_previous_model(fleet, releases):
    agent = fleet.agent().start()
    install(fleet, agent, "j1", releases["1.0.0"])
    fleet.offer("j2", releases["1.1.0"], base=releases["1.0.0"], wrong_delta=True)
    result = fleet.wait_result("j2")
    assert result.result == "failed" and result.reason in (Reason.HASH_MISMATCH, Reason.DELTA_FAILED), result
    wait_idle(agent)
    # a probe whose expected outputs belong to another model
    fleet.offer("j3", releases["1.1.0"], probe=releases["1.2.0"].probe)
    result = fleet.wait_result("j3")
    assert (result.result, result.reason) == ("failed", Reason.PROBE_FAILED) and "cosine" in result.detail
    info = agent.model()
    assert info["version"] == "1.0.0" and info["slot"] == "a"


def test_rollback_order_switches_back_to_the_previous_slot(fleet, releases):
    agent = fleet.agent().start()
    install(fleet, agent, "j1", releases["1.0.0"])
    install(fleet, agent, "j2", releases["1.1.0"], base=releases["1.0.0"])
    fleet.rollback("r1")
    result = fleet.wait_result("r1")
    assert (result.state, result.result, result.reason) == ("rolled_back", "ok", Reason.ROLLED_BACK)
    assert wait_idle(agent)["version"] == "1.0.0"
    x = np.random.default_rng(3).standard_normal((1, 3, 16, 16)).astype(np.float32)
    np.testing.assert_allclose(predict(agent.port, x), reference(releases["1.0.0"], x), rtol=1e-5, atol=1e-5)
    status = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{agent.port}/v1/model").read())
    assert status["connected"] is True
