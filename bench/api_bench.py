"""API benchmark: the main read endpoints at fixed request rates, 10,000 devices, SQLite and PostgreSQL side by side.

A real `fleet-server serve` process (uvicorn, one worker) per database; an open-loop load generator (requests are
sent on schedule whether or not earlier ones finished, so a slow server shows as latency, not as a lower rate)
with asyncio + httpx on a pool of keep-alive connections. Each rate runs for a bounded time. Endpoints: the device
list (page of 100) and a device's detail. Prints a table and writes bench/results/api_bench.json.
Usage: python bench/api_bench.py [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import secrets
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

from fleet_server.auth import issue_token  # noqa: E402
from fleet_server.db import make_engine  # noqa: E402
from fleet_server.migrate import upgrade  # noqa: E402
from fleet_server.models import Device, Role  # noqa: E402
from tests.fleet_driver import free_port, wait_port  # noqa: E402
from tests.postgres import Postgres  # noqa: E402

DEVICES = 10_000
PROFILES = ["rpi4", "rpi5", "jetson-orin-nano", "jetson-nano"]


def populate(url: str) -> tuple[str, list[str]]:
    upgrade(url)
    engine = make_engine(url)
    rng = random.Random(0)
    ids = [f"dev-{i:05d}" for i in range(DEVICES)]
    with Session(engine) as s:
        for i in range(0, DEVICES, 1000):
            s.add_all([Device(id=d, profile=rng.choice(PROFILES), tags=[f"site:{rng.randrange(20)}"],
                              signing_public_key=secrets.token_hex(32), mqtt_password_hash="x",
                              online=rng.random() < 0.8, active_version="classifier 1.0.0") for d in ids[i:i + 1000]])
            s.commit()
        _, token = issue_token(s, name="bench", role=Role.VIEWER, created_by="bench")
    engine.dispose()
    return token, ids


async def load(base: str, token: str, paths: list[str], rate: float, seconds: float) -> dict:
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    latencies: list[float] = []
    errors = 0
    async with httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {token}"}, limits=limits,
                                 timeout=10.0) as client:
        async def one(path: str) -> None:
            nonlocal errors
            t0 = time.perf_counter()
            try:
                r = await client.get(path)
                if r.status_code != 200:
                    errors += 1
            except httpx.HTTPError:
                errors += 1
            latencies.append(time.perf_counter() - t0)

        n = int(rate * seconds)
        start = time.perf_counter()
        tasks = []
        for i in range(n):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(paths[i % len(paths)])))
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - start
    a = np.asarray(latencies) * 1e3
    return {"rate": rate, "sent": n, "errors": errors, "throughput": n / elapsed, "p50_ms": float(np.percentile(a, 50)),
            "p99_ms": float(np.percentile(a, 99))}


def serve(url: str, data_dir: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "EF_SERVER_DATABASE_URL": url, "EF_SERVER_DATA_DIR": str(data_dir),
           "EF_SERVER_BROKER_URL": "mqtt://127.0.0.1:1"}
    proc = subprocess.Popen([sys.executable, "-m", "fleet_server.cli", "serve", "--port", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port, 60)
    return proc, f"http://127.0.0.1:{port}"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    rates = [100, 300] if args.quick else [100, 300, 600, 1000]
    seconds = 3.0 if args.quick else 5.0
    rows = []
    pg = Postgres().start()
    try:
        with tempfile.TemporaryDirectory(prefix="ef-api-bench-") as tmp:
            dbs = {"SQLite": f"sqlite:///{tmp}/fleet.db", "PostgreSQL": pg.create_database("bench")}
            for name, url in dbs.items():
                token, ids = populate(url)
                proc, base = serve(url, Path(tmp) / name)
                try:
                    rng = random.Random(1)
                    endpoints = {
                        "device list (page of 100)": [f"/v1/devices?limit=100&offset={rng.randrange(0, DEVICES, 100)}"
                                                      for _ in range(200)],
                        "device detail": [f"/v1/devices/{rng.choice(ids)}" for _ in range(500)],
                    }
                    for label, paths in endpoints.items():
                        asyncio.run(load(base, token, paths, 50, 1.0))  # warm-up
                        for rate in rates:
                            r = asyncio.run(load(base, token, paths, rate, seconds))
                            rows.append({"database": name, "endpoint": label, **r})
                            print(f"  {name} {label} @ {rate}/s: p99 {r['p99_ms']:.1f} ms", file=sys.stderr,
                                  flush=True)
                finally:
                    proc.terminate()
                    try:
                        proc.wait(15)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait()
    finally:
        pg.stop()
    print(f"| database | endpoint | offered (req/s) | achieved (req/s) | errors | p50 (ms) | p99 (ms) |  "
          f"({DEVICES:,} devices, {seconds:.0f} s per rate)")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['database']} | {r['endpoint']} | {r['rate']} | {r['throughput']:.0f} | {r['errors']} | "
              f"{r['p50_ms']:.1f} | {r['p99_ms']:.1f} |")
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "api_bench.json").write_text(json.dumps({"devices": DEVICES, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
