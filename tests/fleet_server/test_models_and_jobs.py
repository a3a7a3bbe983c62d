"""The model registry and conversion jobs: real uploads, validation, a real conversion in the job process."""

import io
import time

import numpy as np
import pytest

from tests import zoo


def upload(server, data: bytes) -> str:
    r = server.post("/v1/artifacts", content=data, headers=server.as_("operator"))
    assert r.status_code == 201, r.text
    return r.json()["sha256"]


def npz(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


@pytest.fixture
def registered(server, tmp_path):
    model = zoo.mlp_opset(tmp_path / "m.onnx", opset=13)
    calib = npz(x=np.random.default_rng(0).standard_normal((24, 1, 3, 16, 16)).astype(np.float32)[:, 0])
    body = {"name": "classifier", "version": "1.0.0", "source_sha256": upload(server, model.read_bytes()),
            "calibration_sha256": upload(server, calib)}
    r = server.post("/v1/models", json=body, headers=server.as_("operator"))
    assert r.status_code == 201, r.text
    return body, model


def test_registry_validates_uploads_before_accepting_a_version(server, registered):
    body, model = registered
    op = server.as_("operator")
    listed = server.get("/v1/models", headers=server.as_("viewer")).json()
    assert [(m["name"], m["version"]) for m in listed] == [("classifier", "1.0.0")]
    assert listed[0]["inputs"] == ["x[1,3,16,16] float32"]
    assert server.post("/v1/models", json=body, headers=op).status_code == 409  # duplicate version
    truncated = upload(server, model.read_bytes()[: model.stat().st_size // 2])
    bad = server.post("/v1/models", json={**body, "version": "2", "source_sha256": truncated}, headers=op)
    assert bad.status_code == 422 and "model" in bad.json()["detail"].lower()
    wrong_data = upload(server, npz(y=np.zeros((4, 5), np.float32)))
    bad = server.post("/v1/models", json={**body, "version": "3", "calibration_sha256": wrong_data}, headers=op)
    assert bad.status_code == 422
    missing = server.post("/v1/models", json={**body, "version": "4", "source_sha256": "0" * 64}, headers=op)
    assert missing.status_code == 422 and "POST /v1/artifacts" in missing.text
    assert server.post("/v1/models", json=body, headers=server.as_("viewer")).status_code == 403
    unknown = server.post("/v1/models/classifier/1.0.0/conversions", json={"profiles": ["toaster"]}, headers=op)
    assert unknown.status_code == 422


@pytest.mark.slow
def test_a_conversion_job_runs_in_the_pool_and_its_artifacts_download(server, registered):
    op = server.as_("operator")
    job = server.post("/v1/models/classifier/1.0.0/conversions", json={"profiles": ["jetson-orin-nano"]},
                      headers=op)
    assert job.status_code == 202
    job_id = job.json()["id"]
    t0 = time.monotonic()
    assert server.get("/health").status_code == 200 and time.monotonic() - t0 < 1  # the API stays responsive
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        state = server.get(f"/v1/jobs/{job_id}", headers=server.as_("viewer")).json()
        if state["status"] in ("succeeded", "failed"):
            break
        time.sleep(0.5)
    assert state["status"] == "succeeded", state
    assert "jetson-orin-nano" in state["log"]
    [art] = state["artifacts"]
    assert art["format"] == "onnx-int8" and art["status"] in ("shippable", "refused")
    report = server.get(f"/v1/artifacts/{art['report_sha256']}", headers=server.as_("viewer")).json()
    assert report["profile"] == "jetson-orin-nano" and report["fidelity"]
    rollout = {"model": "classifier", "version": "1.0.0", "selector": {"profiles": ["jetson-orin-nano"]}}
    if art["status"] == "shippable":
        blob = server.get(f"/v1/artifacts/{art['artifact_sha256']}", headers=server.as_("viewer")).content
        assert len(blob) == art["size"] and report["artifact_sha256"] == art["artifact_sha256"]
        probe = np.load(io.BytesIO(server.get(f"/v1/artifacts/{art['probe_sha256']}",
                                              headers=server.as_("viewer")).content))
        assert {"in/x", "out/y"} <= set(probe.files) and art["fidelity"] > 0.99  # the golden probe devices run
        made = server.post("/v1/rollouts", json=rollout, headers=op)
        assert made.status_code == 201 and made.json()["state"] == "draft"
        r = server.delete("/v1/models/classifier/1.0.0", headers=op)
        assert r.status_code == 409 and "is using this version" in r.json()["detail"]
        assert server.post(f"/v1/rollouts/{made.json()['id']}/abort", headers=op).json()["state"] == "aborted"
        r = server.delete("/v1/models/classifier/1.0.0", headers=op)
        assert r.status_code == 409 and "stays for the record" in r.json()["detail"]
    else:
        assert server.post("/v1/rollouts", json=rollout, headers=op).status_code == 409
        assert server.delete("/v1/models/classifier/1.0.0", headers=op).status_code == 204
        assert server.get("/v1/models/classifier/1.0.0", headers=server.as_("viewer")).status_code == 404
    server.app.state.jobs.shutdown()


@pytest.mark.slow
def test_cancelling_a_running_job_kills_its_conversion_child(server, registered):
    import psutil

    def children() -> list:
        return [p for p in psutil.process_iter(["cmdline"]) if "fleet_server.sandbox" in (p.info["cmdline"] or [])]

    op = server.as_("operator")
    job_id = server.post("/v1/models/classifier/1.0.0/conversions", json={"profiles": ["jetson-orin-nano"]},
                         headers=op).json()["id"]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (children() and "loading model" in server.get(
            f"/v1/jobs/{job_id}", headers=op).json()["log"]):
        time.sleep(0.3)
    running = children()
    assert running, server.get(f"/v1/jobs/{job_id}", headers=op).json()
    r = server.post(f"/v1/jobs/{job_id}/cancel", headers=op)
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    _, alive = psutil.wait_procs(running, timeout=15)
    assert alive == []
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and "cancelled: the conversion was stopped" not in (
            state := server.get(f"/v1/jobs/{job_id}", headers=op).json())["log"]:
        time.sleep(0.3)
    assert state["status"] == "cancelled" and state["artifacts"] == [], state
    assert server.post(f"/v1/jobs/{job_id}/cancel", headers=op).status_code == 409
    assert server.post(f"/v1/jobs/{job_id}/cancel", headers=server.as_("viewer")).status_code == 403
    server.app.state.jobs.shutdown()
