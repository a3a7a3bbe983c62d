"""Uploads that attack the server, through the real app on SQLite and PostgreSQL, and the sandbox that validation
and conversion run in (fleet_server/sandbox.py), with real children: they must not read the fleet's keys, reach
the network, outlive their limits or take the server's memory."""

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from sqlmodel import Session

from fleet_server.jobs import run_job
from fleet_server.keys import init_keys, keys_dir
from fleet_server.models import ConversionJob, ModelVersion
from fleet_server.pki import FleetCA
from fleet_server.sandbox import (
    Sandbox,
    SandboxConfig,
    SandboxCrashError,
    SandboxError,
    SandboxLimitError,
    landlock_abi,
)
from tests import zoo
from tests.converters.test_security_sources import malicious_pt2, plain_pt2, zero_bomb
from tests.fleet_server.test_models_and_jobs import npz, upload

REPO = Path(__file__).resolve().parents[2]
SYSTEM_PYTHON = "/usr/bin/python3"


def peak_rss_mb() -> float:
    status = Path("/proc/self/status").read_text()
    return next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM")) / 1024


def calibration(count: int = 8) -> bytes:
    return npz(x=np.random.default_rng(0).standard_normal((count, 3, 16, 16)).astype(np.float32))


@pytest.fixture(scope="module")
def bombs(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("bombs")
    zero_bomb(folder / "over-limit.npz", 1100 << 20)  # past the 1 GiB data limit
    zero_bomb(folder / "under-limit.npz", 700 << 20)  # within it, but past a 512 MiB sandbox
    return folder


# ----------------------------------------------------------------------------- through the app


def test_security_pt2_with_pickled_weights_is_refused_and_never_runs(server, tmp_path):
    op = server.as_("operator")
    marker = tmp_path / "ran"
    plain = plain_pt2(tmp_path / "net.pt2")
    body = {"name": "net", "version": "1", "source_format": "pt2",
            "source_sha256": upload(server, malicious_pt2(plain, tmp_path / "bad.pt2", marker).read_bytes()),
            "calibration_sha256": upload(server, calibration())}
    refused = server.post("/v1/models", json=body, headers=op)
    assert not marker.exists()
    assert refused.status_code == 422, refused.text
    assert "stored as pickled Python objects" in refused.json()["detail"]
    plain_body = {**body, "source_sha256": upload(server, plain.read_bytes())}
    accepted = server.post("/v1/models", json=plain_body, headers=op)
    assert accepted.status_code == 201, accepted.text
    assert accepted.json()["inputs"] == ["x[1,3,16,16] float32"]


def test_security_npz_bomb_is_refused_before_decompressing(server, tmp_path, bombs):
    model = upload(server, zoo.mlp_opset(tmp_path / "m.onnx", opset=13).read_bytes())
    before = peak_rss_mb()
    r = server.post("/v1/models", headers=server.as_("operator"), json={
        "name": "net", "version": "1", "source_sha256": model,
        "calibration_sha256": upload(server, (bombs / "over-limit.npz").read_bytes())})
    assert r.status_code == 422 and "more than 1024 MiB once decompressed" in r.json()["detail"], r.text
    assert peak_rss_mb() - before < 100


def test_security_validation_past_its_memory_limit_kills_only_the_child(server, tmp_path, bombs):
    server.app.state.settings.sandbox_memory_mb = 512
    model = upload(server, zoo.mlp_opset(tmp_path / "m.onnx", opset=13).read_bytes())
    before = peak_rss_mb()
    r = server.post("/v1/models", headers=server.as_("operator"), json={
        "name": "net", "version": "1", "source_sha256": model,
        "calibration_sha256": upload(server, (bombs / "under-limit.npz").read_bytes())})
    assert r.status_code == 422 and r.json()["detail"] == "validation exceeded its 512 MiB memory limit", r.text
    assert peak_rss_mb() - before < 100  # the server never held the 700 MiB


def test_security_conversion_job_refuses_a_pickled_pt2_registered_before_the_fix(server, tmp_path):
    """A version registered before validation refused pickles: its job fails with the reason, and nothing ran."""
    marker = tmp_path / "ran"
    bad = malicious_pt2(plain_pt2(tmp_path / "net.pt2"), tmp_path / "bad.pt2", marker)
    settings = server.app.state.settings
    with Session(server.app.state.engine) as s:
        mv = ModelVersion(name="old", version="1", source_format="pt2", source_sha256=upload(server, bad.read_bytes()),
                          calibration_sha256=upload(server, calibration()), created_by="test")
        s.add(mv)
        s.commit()
        job = ConversionJob(model_version_id=mv.id, profiles=["jetson-orin-nano"], created_by="test")
        s.add(job)
        s.commit()
        job_id = job.id
    outcome = run_job(job_id, settings.database_url, str(settings.data_dir))
    assert not marker.exists()
    state = server.get(f"/v1/jobs/{job_id}", headers=server.as_("viewer")).json()
    assert outcome == "failed" and state["artifacts"] == []
    assert "stored as pickled Python objects" in state["error"]


# ----------------------------------------------------------------------------- the sandbox itself

PROBES = '''
import os, socket, subprocess, time

def snoop(args, progress):
    """What a hostile model could try from inside a validation or conversion."""
    found = {"uid": os.getuid(), "env": sorted(os.environ)}
    for path in args["secrets"]:
        try:
            with open(path, "rb"):
                found[path] = "read"
        except OSError as e:
            found[path] = type(e).__name__
    try:
        socket.create_connection(("127.0.0.1", args["port"]), timeout=2).close()
        found["tcp"] = "connected"
    except OSError as e:
        found["tcp"] = type(e).__name__
    return found

def hog(args, progress):
    return len(bytearray(args["mib"] << 20))

def linger(args, progress):
    child = subprocess.Popen(["sleep", "60"])
    progress(str(child.pid))
    time.sleep(60)

def segfault(args, progress):
    os.kill(os.getpid(), 11)

def plant(args, progress):
    os.symlink(args["target"], "planted")
    os.mkdir("real")
    with open("real/ok.bin", "wb") as f:
        f.write(b"fine")
    os.symlink("/", "root")
'''


@pytest.fixture(scope="module")
def probes():
    """The probe targets, in a folder any user can read (the child may run as nobody)."""
    folder = Path(tempfile.mkdtemp(prefix="sandbox-probes-"))
    folder.chmod(0o755)
    (folder / "sandbox_probes.py").write_text(textwrap.dedent(PROBES))
    (folder / "sandbox_probes.py").chmod(0o644)
    yield folder
    shutil.rmtree(folder)


@pytest.fixture
def fleet_secrets(tmp_path) -> tuple[Path, list[Path]]:
    """A data directory with the real key files: the online signing key and the fleet CA key (0600)."""
    data_dir = tmp_path / "data"
    init_keys(data_dir, tmp_path / "root.pem")
    FleetCA.init(data_dir / "pki")
    return data_dir, [keys_dir(data_dir) / "online.pem", data_dir / "pki" / "ca.key"]


def _interpreters() -> list:
    """The server's own interpreter, and one the sandbox user can run (where Python itself is out of its reach,
    the child stays uid 0 without capabilities: both paths are real deployments)."""
    runnable = os.geteuid() == 0 and os.path.exists(SYSTEM_PYTHON) and subprocess.run(
        ["runuser", "-u", "nobody", "--", SYSTEM_PYTHON, "-c", "import sys; assert sys.version_info >= (3, 11)"],
        capture_output=True).returncode == 0
    mark = pytest.mark.skipif(not runnable, reason="needs root and a Python 3.11+ that nobody can run")
    return [sys.executable, pytest.param(SYSTEM_PYTHON, marks=mark)]


@pytest.mark.parametrize("python", _interpreters())
def test_security_sandbox_child_cannot_read_the_fleet_keys(fleet_secrets, probes, monkeypatch, python):
    if os.geteuid() != 0 and not landlock_abi():
        pytest.skip("neither root nor Landlock: the child has the server's uid (fleet_server/sandbox.py says so)")
    data_dir, keys = fleet_secrets
    monkeypatch.setenv("EF_SERVER_MQTT_PASSWORD", "hunter2")
    listener = socket.create_server(("127.0.0.1", 0))
    config = SandboxConfig.for_server(data_dir, f"sqlite:///{data_dir.parent / 'fleet.db'}", timeout_s=60,
                                      python=python, python_path=(str(probes), str(REPO)))
    secrets = [*map(str, keys), f"/proc/{os.getpid()}/environ"]
    with listener, Sandbox(config, "validation") as box:
        found = box.run("sandbox_probes:snoop", {"secrets": secrets, "port": listener.getsockname()[1]})
    assert {found[s] for s in secrets} == {"PermissionError"}, found
    assert not [name for name in found["env"] if name.startswith("EF_SERVER_")]
    if os.geteuid() == 0 and python == SYSTEM_PYTHON:
        assert found["uid"] == 65534  # dropped to nobody
    if landlock_abi() >= 4:
        assert found["tcp"] == "PermissionError"  # no database, broker or API over TCP


def test_security_sandbox_child_past_its_memory_limit_is_killed_alone(probes):
    config = SandboxConfig(memory_mb=256, timeout_s=60, python_path=(str(probes),))
    before = peak_rss_mb()
    with Sandbox(config, "validation") as box:
        with pytest.raises(SandboxLimitError, match="^validation exceeded its 256 MiB memory limit$"):
            box.run("sandbox_probes:hog", {"mib": 1024})
        assert box.run("sandbox_probes:hog", {"mib": 64}) == 64 << 20  # within the limit it works
    assert peak_rss_mb() - before < 50


def test_security_sandbox_past_its_time_limit_is_killed_with_its_children(probes):
    config = SandboxConfig(timeout_s=2, python_path=(str(probes),))
    started: list[str] = []
    t0 = time.monotonic()
    with Sandbox(config, "conversion") as box, \
            pytest.raises(SandboxLimitError, match="^conversion did not finish within its 2 s limit$"):
        box.run("sandbox_probes:linger", {}, on_progress=started.append)
    assert time.monotonic() - t0 < 10
    grandchild = Path(f"/proc/{started[0]}/stat")
    deadline = time.monotonic() + 5
    while grandchild.exists() and grandchild.read_text().split(")")[1].split()[0] != "Z":
        assert time.monotonic() < deadline, "the child's own child outlived the sandbox"
        time.sleep(0.05)


def test_security_sandbox_crash_is_a_clear_error(probes):
    with Sandbox(SandboxConfig(timeout_s=60, python_path=(str(probes),)), "validation") as box, \
            pytest.raises(SandboxCrashError, match=r"^validation crashed \(SIGSEGV\)$"):
        box.run("sandbox_probes:segfault", {})


def test_security_sandbox_outputs_never_follow_links(fleet_secrets, probes):
    data_dir, keys = fleet_secrets
    with Sandbox(SandboxConfig(timeout_s=60, python_path=(str(probes),)), "conversion") as box:
        box.run("sandbox_probes:plant", {"target": str(keys[0])})
        with box.open_output("real/ok.bin") as f:
            assert f.read() == b"fine"
        for sneaky in ("planted", "root/etc/hostname", "../x", "/etc/hostname", "real/../planted"):
            with pytest.raises(SandboxError):
                box.open_output(sneaky)
