"""Rollout benchmark: N simulated devices (fleet_sim/sim.py: real MQTT clients, real signature and hash checks, one
epoll loop per process) on a real Mosquitto, a real `fleet-server serve` (SQLite), a delta of a few MB. Measures the
time from the rollout's start to every device installed, and how many were lost (never installed). Also the CPU and
peak memory of the broker and the server. Prints a table and writes bench/results/rollout_bench.json.

Usage: python bench/rollout_bench.py [--devices 1000] [--processes 2] [--size-mb 8]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import multiprocessing as mp
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sqlmodel import Session  # noqa: E402

from fleet_server.artifacts import LocalArtifactStore  # noqa: E402
from fleet_server.auth import issue_token  # noqa: E402
from fleet_server.db import make_engine  # noqa: E402
from fleet_server.keys import init_keys, pinned_root  # noqa: E402
from fleet_server.migrate import upgrade  # noqa: E402
from fleet_server.models import (  # noqa: E402
    ConversionJob,
    ConvertedArtifact,
    Device,
    JobStatus,
    ModelVersion,
    Role,
)
from fleet_server.rollouts.delivery import Delivery  # noqa: E402
from tests.fleet_driver import Broker, free_port, wait_port  # noqa: E402


def artifacts(size_mb: float, changed: float = 0.25) -> tuple[bytes, bytes]:
    """A base and a target that differs in a quarter of its bytes (a retrained head and some layers)."""
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, int(size_mb * 1e6), dtype=np.uint8)
    target = base.copy()
    n = int(base.size * changed)
    start = base.size - n
    target[start:] = rng.integers(0, 256, n, dtype=np.uint8)
    return base.tobytes(), target.tobytes()


def register(db, store, name: str, version: str, data: bytes) -> str:
    probe = io.BytesIO()
    np.savez(probe, **{"in/x": np.zeros((1, 4), np.float32), "out/y": np.zeros((1, 2), np.float32)})
    sha, probe_sha, report = store.put_bytes(data), store.put_bytes(probe.getvalue()), store.put_bytes(b"{}")
    with Session(db) as s:
        mv = ModelVersion(name=name, version=version, source_sha256=sha, source_format="onnx",
                          calibration_sha256=sha, created_by="bench")
        s.add(mv)
        s.commit()
        s.refresh(mv)
        job = ConversionJob(model_version_id=mv.id, profiles=["rpi5"], status=JobStatus.SUCCEEDED)
        s.add(job)
        s.commit()
        s.refresh(job)
        s.add(ConvertedArtifact(job_id=job.id, model_version_id=mv.id, profile="rpi5", format="onnx-int8",
                                status="shippable", artifact_sha256=sha, size=len(data), report_sha256=report,
                                probe_sha256=probe_sha, fidelity=0.9999))
        s.commit()
    return sha


def sim_process(broker_url: str, root: bytes, ids: list[str], base_sha: str, base: bytes, target_sha: str,
                ready, go, out, timeout: float = 300) -> None:
    from fleet_sim.sim import SimFleet

    fleet = SimFleet(broker_url, root, blobs={base_sha: base})
    for d in ids:
        fleet.add(d, profile="rpi5", active_sha256=base_sha, active_label="bench 1.0.0")  # the model the delta is from
    connect_s = fleet.connect_all(120)
    ready.put(connect_s)
    go.wait()
    t0 = time.monotonic()
    fleet.run(lambda: all(d.active == target_sha for d in fleet.devices), timeout)
    fleet.run(lambda: False, 1.0)  # let the last events leave
    done = sum(d.active == target_sha for d in fleet.devices)
    seconds = [s for d in fleet.devices for s in d.update_seconds]
    out.put({"devices": len(ids), "installed": done, "seconds": time.monotonic() - t0, "connect_s": connect_s,
             "per_device_p50_s": float(np.percentile(seconds, 50)) if seconds else None,
             "per_device_p99_s": float(np.percentile(seconds, 99)) if seconds else None,
             "counts": dict(fleet.counts)})
    fleet.close()


def _descendants(pid: int) -> list[int]:
    out = [pid]
    with contextlib.suppress(OSError):  # the process ended meanwhile
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                for child in f.read().split():
                    out += _descendants(int(child))
    return out


def proc_stats(pid: int) -> tuple[float, float]:
    """CPU seconds used and peak RSS (MB) of a process and its live children (uvicorn's workers), from /proc."""
    cpu = hwm = 0.0
    for p in _descendants(pid):
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            cpu += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
            with open(f"/proc/{p}/status") as f:
                hwm += next((int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM:")), 0.0)
        except OSError:
            continue
    return cpu, hwm


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--devices", type=int, default=1000)
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--size-mb", type=float, default=8.0)
    ap.add_argument("--timeout", type=float, default=300, help="seconds the rollout may take")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="ef-rollout-bench-") as tmp_name:
        tmp = Path(tmp_name)
        broker = Broker(tmp / "broker").start()
        data = tmp / "data"
        url = f"sqlite:///{tmp / 'fleet.db'}"
        upgrade(url)
        init_keys(data, tmp / "root.pem")
        db = make_engine(url)
        store = LocalArtifactStore(data / "artifacts")
        base, target = artifacts(args.size_mb)
        base_sha = register(db, store, "bench", "1.0.0", base)
        target_sha = register(db, store, "bench", "2.0.0", target)
        t = time.perf_counter()
        with Session(db) as s:  # what a server does when a version becomes releasable: the delta, ahead of time
            cached = Delivery(data, store).best_delta(s, base_sha, target_sha)
        delta_s = time.perf_counter() - t
        rng = random.Random(0)
        ids = [f"sim-{i:05d}" for i in range(args.devices)]
        with Session(db) as s:
            for i in range(0, len(ids), 1000):
                s.add_all([Device(id=d, profile="rpi5", signing_public_key=hashlib.sha256(d.encode()).hexdigest(),
                                  mqtt_password_hash="x", active_sha256=base_sha, active_version="bench 1.0.0",
                                  tags=[f"site:{rng.randrange(9)}"])
                           for d in ids[i:i + 1000]])
                s.commit()
            _, token = issue_token(s, name="bench", role=Role.ADMIN, created_by="bench")
        port = free_port()
        env = {**os.environ, "EF_SERVER_DATABASE_URL": url, "EF_SERVER_DATA_DIR": str(data),
               "EF_SERVER_BROKER_URL": broker.url, "EF_SERVER_ENGINE_TICK_S": "0.2"}
        server = subprocess.Popen([sys.executable, "-m", "fleet_server.cli", "serve", "--port", str(port)], env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
        ctx = mp.get_context("spawn")
        ready, out, go = ctx.Queue(), ctx.Queue(), ctx.Event()
        root = pinned_root(data)
        procs = [ctx.Process(target=sim_process, args=(broker.url, root, ids[k::args.processes], base_sha, base,
                                                       target_sha, ready, go, out, args.timeout))
                 for k in range(args.processes)]
        try:
            wait_port(port, 60)
            http = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {token}"},
                                timeout=30)
            for p in procs:
                p.start()
            connect = [ready.get(timeout=300) for _ in procs]
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:  # the server has heard every device's state
                if http.get("/v1/devices", params={"online": True, "limit": 1}).json()["total"] >= args.devices:
                    break
                time.sleep(0.5)
            cpu0 = {name: proc_stats(pid)[0] for name, pid in (("server", server.pid), ("broker", broker.proc.pid))}
            go.set()
            t0 = time.perf_counter()
            r = http.post("/v1/rollouts", json={"model": "bench", "version": "2.0.0", "start": True, "strategy": {
                "canary_percent": 1, "waves_percent": [10, 100], "rate_per_minute": 100_000}}).json()
            state = {}
            while time.perf_counter() - t0 < args.timeout:
                state = http.get(f"/v1/rollouts/{r['id']}").json()
                if state["state"] != "running":
                    break
                time.sleep(0.2)
            total_s = time.perf_counter() - t0
            sims = [out.get(timeout=args.timeout + 120) for _ in procs]
            usage = {name: proc_stats(pid) for name, pid in (("server", server.pid), ("broker", broker.proc.pid))}
        finally:
            for p in procs:
                p.join(30)
                if p.is_alive():
                    p.kill()
            server.terminate()
            server.wait(30)
            broker.stop()
            db.dispose()
    installed = sum(s["installed"] for s in sims)
    result = {
        "devices": args.devices, "sim_processes": args.processes, "artifact_mb": len(target) / 1e6,
        "delta_mb": cached.length / 1e6 if cached else None, "delta_algorithm": cached.algorithm if cached else None,
        "delta_compute_s": round(delta_s, 2), "connect_s": max(connect), "rollout_state": state.get("state"),
        "start_to_all_installed_s": round(total_s, 2), "installed": installed, "lost": args.devices - installed,
        "counts": state.get("counts"), "stages": state.get("stage"),
        "per_device_p50_s": float(np.median([s["per_device_p50_s"] for s in sims if s["per_device_p50_s"]])),
        "server_cpu_s": round(usage["server"][0] - cpu0["server"], 1), "server_peak_rss_mb": round(usage["server"][1]),
        "broker_cpu_s": round(usage["broker"][0] - cpu0["broker"], 1), "broker_peak_rss_mb": round(usage["broker"][1]),
        "sim_counts": [s["counts"] for s in sims],
    }
    wire = sum(s["counts"].get("dl_wire_bytes", 0) for s in sims)
    files = sum(s["counts"].get("dl_file_bytes", 0) for s in sims)
    result["wire_bytes_per_file_byte"] = round(wire / files, 4) if files else None
    print("| devices | delta | start → all installed | lost | bytes on the wire per file byte | server CPU / peak RSS "
          "| broker CPU / peak RSS |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {args.devices:,} | {result['delta_mb']:.2f} MB {result['delta_algorithm']} of {result['artifact_mb']:.1f}"
          f" MB | {result['start_to_all_installed_s']:.1f} s ({result['rollout_state']}) | {result['lost']} | "
          f"{result['wire_bytes_per_file_byte']} | "
          f"{result['server_cpu_s']} s / {result['server_peak_rss_mb']} MB | {result['broker_cpu_s']} s / "
          f"{result['broker_peak_rss_mb']} MB |")
    print(json.dumps(result, indent=2))
    out_dir = ROOT / "bench" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "rollout_bench.json").write_text(json.dumps(result, indent=2))
    return 0 if result["lost"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
