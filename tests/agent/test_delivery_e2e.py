"""Other ways in and out of the agent: a TFLite artifact, encrypted delivery, HTTP Range downloads, a Unix-socket
API, graceful shutdown, and the fleet-agent commands."""

import io
import json
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from fleet_protocol.crypto import generate_device_key
from fleet_protocol.messages import Reason
from fleet_runtime import runtimes
from tests.fleet_driver import RangeFileServer, Release

from .test_updates_e2e import install, predict, reference

pytestmark = pytest.mark.slow


def tflite_release(path) -> Release:
    m = runtimes.load(path)
    x = np.random.default_rng(5).standard_normal((1, 16, 16, 3)).astype(np.float32)
    out = m.run({m.inputs[0].name: x})
    buf = io.BytesIO()
    np.savez(buf, **{f"in/{m.inputs[0].name}": x}, **{f"out/{k}": v for k, v in out.items()})
    return Release("classifier", "2.0.0-tflite", path.read_bytes(), buf.getvalue(), fmt="tflite-int8")


def test_a_tflite_artifact_is_served_by_litert(fleet, tflite_model):
    agent = fleet.agent().start()
    install(fleet, agent, "t1", tflite_release(tflite_model))
    info = agent.model()
    assert (info["format"], info["runtime"]) == ("tflite-int8", "ai_edge_litert")
    x = np.random.default_rng(0).standard_normal((1, 16, 16, 3)).astype(np.float32)
    got = predict(agent.port, x)
    m = runtimes.load(tflite_model)
    np.testing.assert_allclose(got, next(iter(m.run({m.inputs[0].name: x}).values())), rtol=1e-6)


def test_encrypted_delivery_to_the_device_key(fleet, releases, tmp_path):
    private, public = generate_device_key()
    (tmp_path / "device.key").write_bytes(private)
    agent = fleet.agent(device_key_file=str(tmp_path / "device.key")).start()
    install(fleet, agent, "e1", releases["1.0.0"], encrypt_to=public)
    assert agent.model()["sha256"] == releases["1.0.0"].sha256
    _, other = generate_device_key()  # encrypted to someone else: authentication fails, nothing installed
    fleet.offer("e2", releases["1.1.0"], encrypt_to=other)
    result = fleet.wait_result("e2")
    assert (result.result, result.reason) == ("failed", Reason.DECRYPT_FAILED)
    assert agent.model()["version"] == "1.0.0"


def test_http_range_download_resumes_after_a_dropped_connection(fleet, releases):
    agent = fleet.agent().start()
    server = RangeFileServer(fleet.by_path, cut_first=True)
    try:
        fleet.offer("h1", releases["1.0.0"], url=server.url(""))
        result = fleet.wait_result("h1")
        assert result.result == "ok", agent.output()[-2000:]
        assert server.requests[0] is None and server.requests[1].startswith("bytes=")  # asked only for the rest
        assert int(server.requests[1][6:-1]) > 0
        assert not [r for r in fleet.chunk_requests if r.job == "h1"]  # nothing over MQTT
    finally:
        server.close()


def test_unix_socket_api_and_the_fleet_agent_commands(fleet, releases, tmp_path):
    sock = tmp_path / "agent.sock"
    agent = fleet.agent(api_socket=str(sock)).start()
    install(fleet, agent, "u1", releases["1.0.0"])
    install(fleet, agent, "u2", releases["1.1.0"], base=releases["1.0.0"])
    x = np.random.default_rng(0).standard_normal((1, 3, 16, 16)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    cli = [sys.executable, "-m", "agent.cli"]
    out = subprocess.run([*cli, "predict", str(tmp_path / "x.npy"), "--config", str(agent.config)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "[1, 10]" in out.stdout, out.stderr
    status = json.loads(subprocess.run([*cli, "status", "--config", str(agent.config)], capture_output=True,
                                       text=True, timeout=60).stdout)
    assert status["active"]["version"] == "1.1.0" and status["pointer"] == {"slot": "b", "previous": "a"}
    rb = subprocess.run([*cli, "rollback", "--config", str(agent.config)], capture_output=True, text=True,
                        timeout=60)
    assert rb.returncode == 0, rb.stderr
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        status = json.loads(subprocess.run([*cli, "status", "--config", str(agent.config)], capture_output=True,
                                           text=True, timeout=60).stdout)
        if status["active"]["version"] == "1.0.0" and status["update"]["state"] == "idle":
            break
        time.sleep(0.2)
    assert status["active"]["version"] == "1.0.0"
    assert any(e.state == "rolled_back" and e.job.startswith("local-") for e in fleet.events)
    np.testing.assert_allclose(np.load(io.BytesIO(_unix_predict(sock, x))), reference(releases["1.0.0"], x),
                               rtol=1e-5, atol=1e-5)


def _unix_predict(path, x) -> bytes:
    from agent.cli import _UnixConnection

    buf = io.BytesIO()
    np.save(buf, x)
    conn = _UnixConnection(str(path))
    conn.request("POST", "/v1/predict", body=buf.getvalue(), headers={"Content-Type": "application/x-npy"})
    body = conn.getresponse().read()
    conn.close()
    return body


def test_sigterm_finishes_flushes_and_says_offline(fleet, releases):
    agent = fleet.agent(telemetry_interval_s=60).start()
    install(fleet, agent, "g1", releases["1.0.0"])
    x = np.random.default_rng(0).standard_normal((1, 3, 16, 16)).astype(np.float32)
    for _ in range(7):
        predict(agent.port, x)
    before = len(fleet.telemetry)
    assert agent.stop() == 0  # SIGTERM → clean exit
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and len(fleet.telemetry) == before:
        time.sleep(0.05)
    last = fleet.telemetry[-1]  # the window closed at shutdown was flushed, not lost
    assert last.requests >= 7
    assert fleet.online[-1].online is False  # and it said so (retained)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", agent.port), timeout=0.5)
