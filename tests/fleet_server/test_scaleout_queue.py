"""Conversion jobs on the procrastinate queue in a real PostgreSQL, taken by `fleet-server worker` subprocesses,
with artifacts in a real S3 API server (moto) — reached by the workers through a loopback relay the tests can cut to
stage an outage."""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest
from fastapi.testclient import TestClient
from sqlmodel import Session, select

from fleet_server.app import create_app
from fleet_server.auth import issue_token
from fleet_server.keys import init_keys
from fleet_server.migrate import upgrade
from fleet_server.models import ConversionPart, ConversionWorker, ConvertedArtifact, Role
from fleet_server.queue import buildable, capabilities, conninfo, unbuildable_reason
from fleet_server.settings import ServerSettings
from tests.fleet_driver import free_port
from tests.fleet_server.live_fleet import LiveFleet
from tests.fleet_server.test_models_and_jobs import registered  # noqa: F401 - the fixture, on this server
from tests.s3server import S3Server

_n = itertools.count()
FAST = {"worker_heartbeat_s": 1.0, "worker_stall_s": 4.0, "job_retry_wait_s": 1.0, "job_attempts": 3}


class Relay:
    """A TCP relay on loopback to a real server that the test can cut (connections refused, open ones dropped)."""

    def __init__(self, target_port: int):
        self.target, self.port = target_port, free_port()
        self.up = threading.Event()
        self.up.set()
        self._open: list[socket.socket] = []
        self._listener: socket.socket | None = None
        self._stop = threading.Event()
        self._listen()
        threading.Thread(target=self._accept, daemon=True).start()

    def _listen(self) -> None:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", self.port))
        s.listen(64)
        s.settimeout(0.2)
        self._listener = s

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if not self.up.is_set():
                client.close()  # the outage: refused at once
                continue
            upstream = socket.create_connection(("127.0.0.1", self.target))
            self._open += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := a.recv(1 << 16):
                b.sendall(data)
        for s in (a, b):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        self.up.clear()
        for s in self._open:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
        self._open.clear()

    def restore(self) -> None:
        self.up.set()

    def close(self) -> None:
        self._stop.set()
        self.cut()
        self._listener.close()


@pytest.fixture(scope="module")
def s3():
    server = S3Server().start()
    yield server
    server.stop()


class QueueFleet:
    """The API (in-process, job_queue = procrastinate) and `fleet-server worker` subprocesses on one PostgreSQL."""

    def __init__(self, postgres, s3: S3Server, tmp: Path):
        self.tmp = tmp
        self.database_url = postgres.create_database(f"q{next(_n)}")
        upgrade(self.database_url)
        bucket = f"queue-{next(_n)}"
        self.relay = Relay(s3.port)
        store = s3.store_settings(bucket)
        self.settings = ServerSettings(database_url=self.database_url, data_dir=tmp / "data",
                                       broker_url="mqtt://127.0.0.1:1", job_queue="procrastinate", **store, **FAST)
        init_keys(self.settings.data_dir, tmp / "root.pem")
        self.app = create_app(self.settings)
        self.app.state.artifacts.ensure_bucket()
        with Session(self.app.state.engine) as s:
            self.tokens = {role.value: issue_token(s, name=f"{role.value}-bot", role=role, created_by="t")[1]
                           for role in Role}
        self.client = TestClient(self.app)
        self.client.as_ = lambda role: {"Authorization": f"Bearer {self.tokens[role]}"}
        # The workers' environment: the same settings, S3 through the relay.
        self.env = {**os.environ, "EF_SERVER_DATABASE_URL": self.database_url,
                    "EF_SERVER_DATA_DIR": str(tmp / "worker-data"), "EF_SERVER_JOB_QUEUE": "procrastinate",
                    "EF_SERVER_BROKER_URL": "mqtt://127.0.0.1:1",
                    **{f"EF_SERVER_{k.upper()}": str(v) for k, v in {**store, **FAST}.items()},
                    "EF_SERVER_S3_ENDPOINT_URL": f"http://127.0.0.1:{self.relay.port}"}
        self.workers: dict[str, subprocess.Popen] = {}

    def start_worker(self, name: str, profiles: str | None = None) -> subprocess.Popen:
        command = [str(Path(sys.executable).with_name("fleet-server")), "worker", "--name", name]
        if profiles:
            command += ["--profiles", profiles]
        log = open(self.tmp / f"{name}.log", "wb")  # noqa: SIM115 - the worker's whole life
        proc = subprocess.Popen(command, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        self.workers[name] = proc
        LiveFleet.wait(lambda: self.registered(name), 60, f"worker {name} registers ({self.worker_log(name)})")
        return proc

    def worker_log(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text(errors="replace")[-3000:]

    def registered(self, name: str) -> bool:
        with Session(self.app.state.engine) as s:
            return s.get(ConversionWorker, name) is not None

    def job(self, job_id: int) -> dict:
        r = self.client.get(f"/v1/jobs/{job_id}", headers=self.client.as_("viewer"))
        assert r.status_code == 200, r.text
        return r.json()

    def convert(self, profiles: list[str]) -> int:
        r = self.client.post("/v1/models/classifier/1.0.0/conversions", json={"profiles": profiles},
                             headers=self.client.as_("operator"))
        assert r.status_code == 202, r.text
        return r.json()["id"]

    def wait_job(self, job_id: int, statuses=("succeeded", "failed", "cancelled"), timeout: float = 240) -> dict:
        state: dict = {}

        def done() -> bool:
            state.update(self.job(job_id))
            return state["status"] in statuses

        LiveFleet.wait(done, timeout, f"job {job_id} ends", lambda: (state, {n: self.worker_log(n)[-1500:]
                                                                         for n in self.workers}))
        return state

    def close(self) -> None:
        for proc in self.workers.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.workers.values():
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        self.client.close()
        self.app.state.jobs.shutdown()
        self.app.state.engine.dispose()
        self.relay.close()


def sandbox_children() -> list[psutil.Process]:
    """Running sandboxed children (each in its own session and cgroup, so found by their command line)."""
    return [p for p in psutil.process_iter(["cmdline"]) if "fleet_server.sandbox" in (p.info["cmdline"] or [])]


@pytest.fixture
def fleet(postgres, s3, tmp_path):
    f = QueueFleet(postgres, s3, tmp_path)
    yield f
    f.close()


@pytest.fixture
def server(fleet):  # the registered model fixture (test_models_and_jobs) uploads through this client
    return fleet.client


def parts(fleet: QueueFleet, job_id: int) -> list[ConversionPart]:
    with Session(fleet.app.state.engine) as s:
        return list(s.exec(select(ConversionPart).where(ConversionPart.job_id == job_id)).all())


def test_scaleout_queue_workers_advertise_what_they_can_build():
    formats, flags = capabilities()
    assert "onnx-int8" in formats  # this machine has the convert extra: ONNX Runtime, TensorFlow, coremltools
    assert set(buildable(["onnx-int8"])) == {"jetson-nano", "jetson-orin-nano"}  # ONNX-only profiles
    assert "ios-a15" not in buildable(["onnx-int8", "tflite-int8"])
    assert buildable(["onnx-int8", "tflite-int8", "coreml-int8"], ["rpi4"]) == ["rpi4"]
    w = ConversionWorker(name="w1", host="h", formats=["onnx-int8"], profiles=["jetson-orin-nano"], heartbeat_at=0)
    assert unbuildable_reason("jetson-orin-nano", [w]) is None
    reason = unbuildable_reason("ios-a15", [w])
    assert "no live worker can build ios-a15" in reason and "coreml-int8" in reason and "w1" in reason
    assert conninfo("postgresql+psycopg://u:p@127.0.0.1:5/db") == "postgresql://u:p@127.0.0.1:5/db"
    with pytest.raises(ValueError, match="PostgreSQL"):
        conninfo("sqlite:///x.db")


@pytest.mark.slow
@pytest.mark.usefixtures("registered")
def test_scaleout_queue_parts_go_to_a_capable_worker_and_a_part_none_can_build_says_so(fleet):
    fleet.start_worker("onnx-only", profiles="jetson-orin-nano")
    job_id = fleet.convert(["ios-a15", "jetson-orin-nano"])
    state = fleet.job(job_id)  # the ios part failed at once: no live worker builds Core ML
    ios = next(p for p in state["parts"] if p["profile"] == "ios-a15")
    assert ios["status"] == "failed" and "no live worker can build ios-a15" in ios["error"], state["parts"]
    state = fleet.wait_job(job_id)
    assert state["status"] == "failed" and "ios-a15" in state["error"]  # the job says which part and why
    jetson = next(p for p in state["parts"] if p["profile"] == "jetson-orin-nano")
    assert jetson["status"] == "succeeded" and jetson["worker"] == "onnx-only" and jetson["attempts"] == 1
    assert [a["profile"] for a in state["artifacts"]] == ["jetson-orin-nano"]
    assert "[jetson-orin-nano] taken by onnx-only" in state["log"] and "[ios-a15] no live worker" in state["log"]
    art = state["artifacts"][0]
    r = fleet.client.get(f"/v1/artifacts/{art['report_sha256']}", headers=fleet.client.as_("viewer"),
                         follow_redirects=False)
    assert r.status_code == 307  # the worker uploaded it to S3: the API hands out a presigned URL
    report = httpx.get(r.headers["location"], timeout=10)
    assert report.status_code == 200 and report.json()["profile"] == "jetson-orin-nano"


@pytest.mark.slow
@pytest.mark.usefixtures("registered")
def test_scaleout_queue_a_worker_killed_mid_part_is_retried_elsewhere_with_one_set_of_artifacts(fleet):
    first = fleet.start_worker("w1", profiles="jetson-orin-nano")
    job_id = fleet.convert(["jetson-orin-nano"])
    LiveFleet.wait(lambda: "loading model" in fleet.job(job_id)["log"], 120, "w1 converts",
               lambda: fleet.worker_log("w1"))
    assert parts(fleet, job_id)[0].worker == "w1"
    fleet.start_worker("w2", profiles="jetson-orin-nano")
    killed = time.monotonic()
    first.send_signal(signal.SIGKILL)
    first.wait(10)
    LiveFleet.wait(lambda: parts(fleet, job_id)[0].worker == "w2", 60, "w2 takes the part over",
               lambda: fleet.worker_log("w2"))
    takeover = time.monotonic() - killed
    state = fleet.wait_job(job_id)
    assert state["status"] == "succeeded", state
    [part] = state["parts"]
    assert part["attempts"] == 2 and part["worker"] == "w2"
    with Session(fleet.app.state.engine) as s:
        rows = s.exec(select(ConvertedArtifact).where(ConvertedArtifact.job_id == job_id)).all()
    assert [(r.profile, r.format) for r in rows] == [("jetson-orin-nano", "onnx-int8")]  # exactly one set
    assert "taken by w1 (attempt 1)" in state["log"] and "taken by w2 (attempt 2)" in state["log"]
    assert takeover < FAST["worker_stall_s"] + 3 * FAST["worker_heartbeat_s"] + 5, takeover
    print(f"takeover after kill -9: {takeover:.1f} s")


@pytest.mark.slow
@pytest.mark.usefixtures("registered")
def test_scaleout_queue_an_outage_is_retried_with_backoff_and_cancel_kills_the_conversion(fleet):
    fleet.start_worker("w1", profiles="jetson-orin-nano")
    fleet.relay.cut()  # object storage unreachable from the worker: it cannot fetch the source
    job_id = fleet.convert(["jetson-orin-nano"])
    LiveFleet.wait(lambda: "retrying" in fleet.job(job_id)["log"], 90, "a failed attempt", lambda: fleet.job(job_id))
    fleet.relay.restore()
    LiveFleet.wait(lambda: "loading model" in fleet.job(job_id)["log"], 90, "the retry converts",
               lambda: (fleet.job(job_id), fleet.worker_log("w1")))
    [part] = parts(fleet, job_id)
    assert part.attempts >= 2 and part.status == "running"
    LiveFleet.wait(sandbox_children, 30, "the sandboxed child runs")
    children = sandbox_children()
    r = fleet.client.post(f"/v1/jobs/{job_id}/cancel", headers=fleet.client.as_("operator"))
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    _, alive = psutil.wait_procs(children, timeout=15)
    assert alive == []  # the conversion child was killed
    LiveFleet.wait(lambda: parts(fleet, job_id)[0].status == "cancelled", 15, "the part is cancelled")
    state = fleet.job(job_id)
    assert state["status"] == "cancelled" and state["artifacts"] == []
    assert "cancelled: the conversion was stopped" in state["log"]
    again = fleet.client.post(f"/v1/jobs/{job_id}/cancel", headers=fleet.client.as_("operator"))
    assert again.status_code == 409
    assert fleet.workers["w1"].poll() is None  # the worker lives on for the next part
