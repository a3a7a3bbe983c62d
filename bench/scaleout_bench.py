"""Past one machine: conversion throughput on the job queue with 1 and 2 workers, and a server replica's takeover
of the rollout engine after kill -9 of the lease holder.

Part 1: the API (job_queue = procrastinate, a throwaway PostgreSQL) and `fleet-server worker` subprocesses; N
conversion jobs (default 8) of one model for one profile are submitted at once, and the clock runs until the last
finishes. The same jobs with 1 worker, then with 2, in one run: the ratio is the figure (each worker converts one
part at a time; on a machine with few cores the two share them).

Part 2: two `fleet-server serve` replicas on one PostgreSQL and one Mosquitto; the one holding the engine lease is
killed with SIGKILL, and the clock runs until the other holds the lease (the lease time bounds it).

Prints a table and writes bench/results/scaleout_bench.json.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from sqlmodel import Session  # noqa: E402

from fleet_server.app import create_app  # noqa: E402
from fleet_server.auth import issue_token  # noqa: E402
from fleet_server.keys import init_keys  # noqa: E402
from fleet_server.migrate import upgrade  # noqa: E402
from fleet_server.models import ConversionWorker, EngineLease, Role  # noqa: E402
from fleet_server.rollouts.engine import LEASE_S  # noqa: E402
from fleet_server.settings import ServerSettings  # noqa: E402
from tests import zoo  # noqa: E402
from tests.fleet_driver import Broker, free_port  # noqa: E402
from tests.fleet_server.live_fleet import LiveFleet  # noqa: E402
from tests.postgres import Postgres  # noqa: E402

PROFILE = "jetson-orin-nano"
QUEUE = {"worker_heartbeat_s": 1.0, "worker_stall_s": 10.0}


def _npz(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def queue_throughput(pg: Postgres, work: Path, workers: int, jobs: int) -> dict:
    db = pg.create_database(f"queue{workers}")
    upgrade(db)
    settings = ServerSettings(database_url=db, data_dir=work / "data", broker_url="mqtt://127.0.0.1:1",
                              job_queue="procrastinate", **QUEUE)
    init_keys(settings.data_dir, work / "root.pem")
    app = create_app(settings)
    with Session(app.state.engine) as s:
        _, token = issue_token(s, name="bench", role=Role.OPERATOR, created_by="bench")
    client = TestClient(app)
    client.headers["Authorization"] = f"Bearer {token}"
    model = zoo.mlp_opset(work / "m.onnx", opset=13)
    calib = _npz(x=np.random.default_rng(0).standard_normal((24, 3, 16, 16)).astype(np.float32))
    body = {"name": "bench", "version": "1.0.0",
            "source_sha256": client.post("/v1/artifacts", content=model.read_bytes()).json()["sha256"],
            "calibration_sha256": client.post("/v1/artifacts", content=calib).json()["sha256"]}
    assert client.post("/v1/models", json=body).status_code == 201
    env = {**os.environ, "EF_SERVER_DATABASE_URL": db, "EF_SERVER_DATA_DIR": str(settings.data_dir),
           "EF_SERVER_JOB_QUEUE": "procrastinate", "EF_SERVER_BROKER_URL": "mqtt://127.0.0.1:1",
           **{f"EF_SERVER_{k.upper()}": str(v) for k, v in QUEUE.items()}}
    procs = [subprocess.Popen([str(Path(sys.executable).with_name("fleet-server")), "worker", "--name", f"w{i}",
                               "--profiles", PROFILE], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL) for i in range(workers)]
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            with Session(app.state.engine) as s:
                if all(s.get(ConversionWorker, f"w{i}") for i in range(workers)):
                    break
            time.sleep(0.2)
        t0 = time.monotonic()
        ids = [client.post("/v1/models/bench/1.0.0/conversions", json={"profiles": [PROFILE]}).json()["id"]
               for _ in range(jobs)]
        states: dict[int, dict] = {}
        deadline = time.monotonic() + 60 * jobs
        while time.monotonic() < deadline:
            states = {i: client.get(f"/v1/jobs/{i}").json() for i in ids}
            if all(s["status"] in ("succeeded", "failed") for s in states.values()):
                break
            time.sleep(0.5)
        elapsed = time.monotonic() - t0
        by_worker: dict[str, int] = {}
        for st in states.values():
            for p in st["parts"]:
                by_worker[p["worker"]] = by_worker.get(p["worker"], 0) + 1
        return {"workers": workers, "jobs": jobs, "seconds": round(elapsed, 1),
                "jobs_per_min": round(60 * jobs / elapsed, 2),
                "succeeded": sum(s["status"] == "succeeded" for s in states.values()), "parts_by_worker": by_worker}
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        client.close()
        app.state.jobs.shutdown()
        app.state.engine.dispose()


def replica_takeover(pg: Postgres, work: Path) -> dict:
    broker = Broker(work / "broker").start()
    fleet = LiveFleet(work, broker.url, db_url=pg.create_database("replicas"))
    second = fleet.spawn_server(free_port(), work / "server-2.log")
    procs = {fleet.server.pid: fleet.server, second.pid: second}
    try:
        holder = _wait_holder(fleet, 60)
        killed = time.monotonic()
        os.kill(holder, signal.SIGKILL)
        procs[holder].wait(10)
        survivor = _wait_holder(fleet, 3 * LEASE_S, exclude=holder)
        took = time.monotonic() - killed
        assert survivor in procs and survivor != holder
        return {"lease_s": LEASE_S, "takeover_s": round(took, 1)}
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.terminate()
                p.wait(20)
        fleet.server = None
        fleet.close()
        broker.stop()


def _wait_holder(fleet: LiveFleet, timeout: float, exclude: int | None = None) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with Session(fleet.db) as s:
            lease = s.get(EngineLease, "rollouts")
            if lease is not None and lease.expires_at > time.time():
                pid = int(lease.holder.split(":")[1])
                if pid != exclude:
                    return pid
        time.sleep(0.1)
    raise TimeoutError("no replica holds the engine lease")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=8)
    args = ap.parse_args()
    pg = Postgres().start()
    rows = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for n in (1, 2):
                (Path(tmp) / f"q{n}").mkdir()
                rows.append(queue_throughput(pg, Path(tmp) / f"q{n}", n, args.jobs))
                print(f"{n} worker(s): {rows[-1]}", flush=True)
            (Path(tmp) / "replicas").mkdir()
            takeover = replica_takeover(pg, Path(tmp) / "replicas")
    finally:
        pg.stop()
    ratio = rows[0]["seconds"] / rows[1]["seconds"]
    print(f"\n{'workers':>8} {'jobs':>5} {'seconds':>8} {'jobs/min':>9} {'succeeded':>9}  parts by worker")
    for r in rows:
        print(f"{r['workers']:>8} {r['jobs']:>5} {r['seconds']:>8} {r['jobs_per_min']:>9} {r['succeeded']:>9}  "
              f"{r['parts_by_worker']}")
    print(f"throughput, 2 workers vs 1: {ratio:.2f}x  (cores here: {os.cpu_count()})")
    print(f"replica takeover after kill -9 of the lease holder: {takeover['takeover_s']} s "
          f"(lease {takeover['lease_s']} s)")
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "scaleout_bench.json").write_text(json.dumps({"queue": rows, "ratio_2_vs_1": round(ratio, 2),
                                                         "takeover": takeover, "cpus": os.cpu_count()}, indent=2))


if __name__ == "__main__":
    main()
