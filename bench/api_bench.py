"""API benchmark: the main read endpoints at fixed request rates, 10,000 devices, SQLite and PostgreSQL side by side.

A real `fleet-server serve` process (uvicorn, one worker) per database; an open-loop load generator (requests are
sent on schedule whether or not earlier ones finished, so a slow server shows as latency, not as a lower rate)
on a pool of raw keep-alive HTTP/1.1 connections. Each rate runs for a bounded time. Endpoints: the device
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
from urllib.parse import urlparse

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
    if url.startswith("postgresql"):  # what autovacuum does to a settled table: statistics and a visibility map
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql("VACUUM ANALYZE device")
    engine.dispose()
    return token, ids


async def _connection(host: str, port: int, token: str, queue: asyncio.Queue, out: list) -> None:
    """One keep-alive HTTP/1.1 connection: takes (scheduled time, path) items until None. Latency counts from the
    scheduled time, so time spent queued behind a slow server is measured (no coordinated omission)."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        while (item := await queue.get()) is not None:
            scheduled, path = item
            try:
                writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n\r\n".encode())
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length:"))
                await reader.readexactly(length)
                out.append((time.perf_counter() - scheduled, int(head[9:12])))
            except (OSError, asyncio.IncompleteReadError, StopIteration):
                out.append((time.perf_counter() - scheduled, 0))
                writer.close()
                reader, writer = await asyncio.open_connection(host, port)
    finally:
        writer.close()


async def load(base: str, token: str, paths: list[str], rate: float, seconds: float, connections: int = 64) -> dict:
    """Open loop: requests go into a queue on schedule whether or not earlier ones finished; a pool of raw
    keep-alive connections serves the queue. A minimal client (no httpx) keeps the load generator's own CPU use
    small: it shares this machine's two cores with the server."""
    u = urlparse(base)
    queue: asyncio.Queue = asyncio.Queue()
    out: list[tuple[float, int]] = []
    workers = [asyncio.create_task(_connection(u.hostname or "127.0.0.1", u.port or 80, token, queue, out))
               for _ in range(connections)]
    n = int(rate * seconds)
    start = time.perf_counter()
    for i in range(n):
        due = start + i / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        queue.put_nowait((due, paths[i % len(paths)]))
    for _ in workers:
        queue.put_nowait(None)
    await asyncio.wait_for(asyncio.gather(*workers), timeout=max(60.0, 4 * seconds))
    elapsed = time.perf_counter() - start
    a = np.asarray([lat for lat, _ in out]) * 1e3
    errors = sum(1 for _, code in out if code != 200)
    return {"rate": rate, "sent": n, "errors": errors, "throughput": len(out) / elapsed,
            "p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99))}


def serve(url: str, data_dir: Path, workers: int = 1) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "EF_SERVER_DATABASE_URL": url, "EF_SERVER_DATA_DIR": str(data_dir),
           "EF_SERVER_BROKER_URL": "mqtt://127.0.0.1:1"}
    proc = subprocess.Popen([sys.executable, "-m", "fleet_server.cli", "serve", "--port", str(port),
                             "--workers", str(workers)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port, 60)
    return proc, f"http://127.0.0.1:{port}"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rates", type=lambda v: [int(x) for x in v.split(",")], default=None)
    ap.add_argument("--workers", type=lambda v: [int(x) for x in v.split(",")], default=[1, 2],
                    help="uvicorn worker counts to compare (default 1,2)")
    ap.add_argument("--db", choices=["SQLite", "PostgreSQL"], action="append", default=None)
    args = ap.parse_args()
    rates = args.rates or ([100, 300] if args.quick else [100, 300, 600, 1000])
    seconds = 3.0 if args.quick else 5.0
    rows = []
    pg = Postgres().start()
    try:
        with tempfile.TemporaryDirectory(prefix="ef-api-bench-") as tmp:
            dbs = {"SQLite": f"sqlite:///{tmp}/fleet.db", "PostgreSQL": pg.create_database("bench")}
            for name, url in dbs.items():
                if args.db and name not in args.db:
                    continue
                token, ids = populate(url)
                rng = random.Random(1)
                endpoints = {
                    "device list (page of 100)": [f"/v1/devices?limit=100&offset={rng.randrange(0, DEVICES, 100)}"
                                                  for _ in range(200)],
                    "device detail": [f"/v1/devices/{rng.choice(ids)}" for _ in range(500)],
                }
                for workers in args.workers:
                    proc, base = serve(url, Path(tmp) / name, workers)
                    try:
                        for label, paths in endpoints.items():
                            asyncio.run(load(base, token, paths, 50, 1.0))  # warm-up
                            for rate in rates:
                                r = asyncio.run(load(base, token, paths, rate, seconds))
                                rows.append({"database": name, "workers": workers, "endpoint": label, **r})
                                print(f"  {name} x{workers} {label} @ {rate}/s: p99 {r['p99_ms']:.1f} ms",
                                      file=sys.stderr, flush=True)
                    finally:
                        proc.terminate()
                        try:
                            proc.wait(15)
                        except subprocess.TimeoutExpired:
                            proc.kill()
                            proc.wait()
    finally:
        pg.stop()
    print(f"| database | workers | endpoint | offered (req/s) | achieved (req/s) | errors | p50 (ms) | p99 (ms) |  "
          f"({DEVICES:,} devices, {seconds:.0f} s per rate)")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['database']} | {r['workers']} | {r['endpoint']} | {r['rate']} | {r['throughput']:.0f} | "
              f"{r['errors']} | "
              f"{r['p50_ms']:.1f} | {r['p99_ms']:.1f} |")
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "api_bench.json").write_text(json.dumps({"devices": DEVICES, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
