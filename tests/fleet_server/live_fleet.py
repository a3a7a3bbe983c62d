"""A real fleet on loopback for end-to-end tests: Mosquitto, `fleet-server serve` as a subprocess (SQLite), and
agents enrolled through `fleet-agent enroll` running as `fleet-agent run` subprocesses."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
from sqlmodel import Session

from converters.probe import golden_probe
from fleet_server import drift
from fleet_server.artifacts import LocalArtifactStore, StoreConfig, open_store
from fleet_server.auth import issue_token
from fleet_server.db import make_engine
from fleet_server.keys import init_keys
from fleet_server.migrate import upgrade
from fleet_server.models import ConversionJob, ConvertedArtifact, JobStatus, ModelVersion, Role
from fleet_server.settings import ServerSettings
from tests.fleet_driver import AgentProcess, free_port, wait_port

ROOT = Path(__file__).resolve().parents[2]
AGENT_ENV = {"EF_AGENT_TELEMETRY_INTERVAL_S": "0.5", "EF_AGENT_CHUNK_TIMEOUT_S": "1.0"}


class LiveFleet:
    def __init__(self, workdir: Path, broker_url: str, env: dict[str, str] | None = None, db_url: str | None = None):
        self.dir, self.broker_url, self.extra_env = workdir, broker_url, env or {}
        self.db_url = db_url or f"sqlite:///{workdir / 'fleet.db'}"
        self.data = workdir / "data"
        upgrade(self.db_url)
        init_keys(self.data, workdir / "root.pem")
        self.db = make_engine(self.db_url)
        with Session(self.db) as s:
            _, token = issue_token(s, name="test-admin", role=Role.ADMIN, created_by="test")
        settings = ServerSettings(**{k.removeprefix("EF_SERVER_").lower(): v for k, v in self.extra_env.items()
                                     if k.startswith("EF_SERVER_")})
        if settings.artifact_store == "s3":  # where the server reads them: register() writes there
            self.store = open_store(StoreConfig.from_settings(settings))
            self.store.ensure_bucket()
        else:
            self.store = LocalArtifactStore(self.data / "artifacts")
        self.port = free_port()
        self.server: subprocess.Popen | None = None
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{self.port}",
                                 headers={"Authorization": f"Bearer {token}"}, timeout=30)
        self.agents: list[AgentProcess] = []
        self.start_server()

    def start_server(self) -> None:
        self.server = self.spawn_server(self.port, self.dir / "server.log")

    def spawn_server(self, port: int, log_path: Path) -> subprocess.Popen:
        """One `fleet-server serve` process on this fleet's database, data folder and broker (a replica, when the
        database is PostgreSQL)."""
        env = {**os.environ, "EF_SERVER_DATABASE_URL": self.db_url, "EF_SERVER_DATA_DIR": str(self.data),
               "EF_SERVER_BROKER_URL": self.broker_url, "EF_SERVER_ENGINE_TICK_S": "0.2",
               "EF_SERVER_DRIFT_INTERVAL_S": "1", "EF_SERVER_DRIFT_WINDOW_S": "3",
               "EF_SERVER_PUBLIC_URL": f"http://127.0.0.1:{port}", **self.extra_env}
        log = open(log_path, "ab")  # noqa: SIM115 - lives as long as the process
        proc = subprocess.Popen([sys.executable, "-m", "fleet_server.cli", "serve", "--port", str(port)],
                                env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        wait_port(port, 60)
        return proc

    def stop_server(self) -> None:
        if self.server and self.server.poll() is None:
            self.server.terminate()
            try:
                self.server.wait(20)
            except subprocess.TimeoutExpired:
                self.server.kill()
                self.server.wait()

    def close(self) -> None:
        for a in self.agents:
            a.stop()
        self.stop_server()
        self.http.close()
        self.db.dispose()

    # ------------------------------------------------------------------ models

    def register(self, name: str, version: str, model: Path, *, profiles=("rpi5",), probe_from: Path | None = None,
                 fidelity: float = 0.9999) -> int:
        """A model version with a shippable artifact per profile, as a finished conversion job leaves it (the
        conversion itself is tested in tests/converters; here the rollout is under test). ``probe_from`` makes the
        probe's expected outputs come from another model: devices then fail the probe."""
        x = np.random.default_rng(7).standard_normal((1, 3, 16, 16)).astype(np.float32)
        sha = self.store.put_bytes(model.read_bytes())
        probe = self.store.put_bytes(golden_probe(probe_from or model, {"x": x}))
        report = self.store.put_bytes(b"{}")
        with Session(self.db) as s:
            calibration = np.random.default_rng(11).standard_normal((64, 3, 16, 16)).astype(np.float32)
            mv = ModelVersion(name=name, version=version, source_sha256=sha, source_format="onnx",
                              calibration_sha256=hashlib.sha256(calibration.tobytes()).hexdigest(), inputs=["x"],
                              outputs=["y"], reference_stats=drift.reference({"x": calibration}), created_by="test")
            s.add(mv)
            s.commit()
            s.refresh(mv)
            job = ConversionJob(model_version_id=mv.id, profiles=list(profiles), status=JobStatus.SUCCEEDED)
            s.add(job)
            s.commit()
            s.refresh(job)
            for p in profiles:
                s.add(ConvertedArtifact(job_id=job.id, model_version_id=mv.id, profile=p, format="onnx-int8",
                                        status="shippable", artifact_sha256=sha, size=model.stat().st_size,
                                        report_sha256=report, probe_sha256=probe, fidelity=fidelity))
            s.commit()
            return mv.id

    # ------------------------------------------------------------------ devices

    def enroll(self, n: int, *, profile: str = "rpi5", tags: tuple[str, ...] = ()) -> list[AgentProcess]:
        token = self.http.post("/v1/enrollment-tokens", json={"max_uses": n, "profile": profile,
                                                              "tags": list(tags)}).json()["token"]
        out = []
        for _ in range(n):
            i = len(self.agents)
            port = free_port()
            cfg = self.dir / f"agent{i}.toml"
            done = subprocess.run([sys.executable, "-m", "agent.cli", "enroll", "--server",
                                   f"http://127.0.0.1:{self.port}", "--token", token, "--config", str(cfg),
                                   "--state-dir", str(self.dir / f"agent{i}"), "--api-port", str(port)],
                                  capture_output=True, text=True, timeout=60, cwd=ROOT)
            assert done.returncode == 0, done.stderr
            agent = AgentProcess(cfg, port, env=AGENT_ENV)
            self.agents.append(agent)
            out.append(agent)
        return out

    def device_id(self, agent: AgentProcess) -> str:
        return next(line.split("=", 1)[1].strip().strip('"') for line in agent.config.read_text().splitlines()
                    if line.startswith("device_id"))

    def wait_online(self, agents: list[AgentProcess], timeout: float = 30) -> None:
        ids = {self.device_id(a) for a in agents}
        self.wait(lambda: ids <= {d["id"] for d in self.http.get("/v1/devices", params={"online": True,
                                                                                       "limit": 500}).json()["items"]},
                  timeout, "devices online")

    # ------------------------------------------------------------------ rollouts

    def rollout(self, **body) -> dict:
        r = self.http.post("/v1/rollouts", json={"start": True, **body})
        assert r.status_code == 201, r.text
        return r.json()

    def get(self, rollout_id: int) -> dict:
        return self.http.get(f"/v1/rollouts/{rollout_id}").json()

    def members(self, rollout_id: int) -> dict[str, dict]:
        return {m["device_id"]: m for m in self.http.get(f"/v1/rollouts/{rollout_id}/devices").json()}

    def wait_state(self, rollout_id: int, states: set[str], timeout: float = 90) -> dict:
        last: dict = {}

        def check() -> bool:
            nonlocal last
            last = self.get(rollout_id)
            return last["state"] in states

        self.wait(check, timeout, f"rollout {rollout_id} in {states}", lambda: last)
        return last

    @staticmethod
    def wait(predicate, timeout: float, what: str, show=lambda: None) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(0.2)
        raise TimeoutError(f"timed out waiting for {what}: {show()}")
