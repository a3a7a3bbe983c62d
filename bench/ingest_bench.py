"""Ingest benchmark: telemetry messages/s from many simulated devices (fleet_sim/sim.py, real MQTT clients) through a
real Mosquitto into `fleet-server serve`'s database, SQLite and PostgreSQL side by side, with the count lost (published
and acknowledged by the broker but never stored). Each database is measured ``--repeat`` times on a fresh database,
server and broker, and the table shows the run with the median server CPU per message (the simulated devices share
this host's cores with the server, so one run's figure moves by ±20%); every run is in the JSON.
Prints a table and writes bench/results/ingest_bench.json.

Usage: python bench/ingest_bench.py [--devices 1000] [--per-device 20] [--processes 2] [--repeat 3]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sqlalchemy import func  # noqa: E402
from sqlmodel import Session, select  # noqa: E402

from bench.rollout_bench import proc_stats  # noqa: E402
from fleet_server.db import make_engine  # noqa: E402
from fleet_server.keys import init_keys, pinned_root  # noqa: E402
from fleet_server.migrate import upgrade  # noqa: E402
from fleet_server.models import Device, TelemetryWindow  # noqa: E402
from tests.fleet_driver import Broker, free_port, wait_port  # noqa: E402
from tests.postgres import Postgres  # noqa: E402


def publisher(broker_url: str, root: bytes, ids: list[str], per_device: int, ready, go, out) -> None:
    from fleet_sim.sim import SimFleet

    fleet = SimFleet(broker_url, root)
    for d in ids:
        fleet.add(d, profile="rpi5", active_sha256=None)
    fleet.connect_all(120)
    ready.put(True)
    go.wait()
    t0 = time.monotonic()
    infos = []
    for _ in range(per_device):
        infos += [d.telemetry(requests=100, model_version="bench 1.0.0") for d in fleet.devices]
        fleet.run(lambda: False, 0.0)  # push what is queued
    fleet.run(lambda: all(i.is_published() for i in infos), 120)  # every publish acknowledged (QoS 1)
    out.put({"published": per_device * len(ids), "seconds": time.monotonic() - t0})
    fleet.close()


def run_one(name: str, url: str, tmp: Path, broker: Broker, args, attempt: int = 0) -> dict:
    upgrade(url)
    data = tmp / f"data-{name}-{attempt}"
    init_keys(data, tmp / f"root-{name}-{attempt}.pem")
    db = make_engine(url)
    ids = [f"ing-{i:05d}" for i in range(args.devices)]
    with Session(db) as s:
        s.add_all([Device(id=d, profile="rpi5", signing_public_key=hashlib.sha256(d.encode()).hexdigest(),
                          mqtt_password_hash="x") for d in ids])
        s.commit()
    port = free_port()
    env = {**os.environ, "EF_SERVER_DATABASE_URL": url, "EF_SERVER_DATA_DIR": str(data),
           "EF_SERVER_BROKER_URL": broker.url}
    log = ROOT / "bench" / "results" / f"ingest-server-{name}.log"  # kept: the first place to look at a loss
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as log_file:
        server = subprocess.Popen([sys.executable, "-m", "fleet_server.cli", "serve", "--port", str(port),
                                   "--workers", str(args.workers)], env=env, stdout=log_file,
                                  stderr=subprocess.STDOUT, cwd=ROOT)
    ctx = mp.get_context("spawn")
    ready, out, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    procs = [ctx.Process(target=publisher, args=(broker.url, pinned_root(data), ids[k::args.processes],
                                                  args.per_device, ready, go, out)) for k in range(args.processes)]
    expected = args.devices * args.per_device
    try:
        wait_port(port, 60)
        time.sleep(1.0)  # the server's subscriptions are in place
        for p in procs:
            p.start()
        for _ in procs:
            ready.get(timeout=300)
        deadline = time.monotonic() + 180  # the devices' online and state messages are through
        while time.monotonic() < deadline:
            with Session(db) as s:
                if s.exec(select(func.count()).select_from(Device).where(Device.online)).one() >= args.devices:
                    break
            time.sleep(0.5)
        cpu0 = {k: proc_stats(pid)[0] for k, pid in (("server", server.pid), ("broker", broker.proc.pid))}
        t0 = time.perf_counter()
        go.set()
        stored, last_change, last = 0, time.perf_counter(), -1
        while time.perf_counter() - last_change < 15 and time.perf_counter() - t0 < 600:
            with Session(db) as s:
                stored = s.exec(select(func.count()).select_from(TelemetryWindow)).one()
            if stored != last:
                last, last_change = stored, time.perf_counter()
            if stored >= expected:
                break
            time.sleep(0.2)
        seconds = time.perf_counter() - t0
        pubs = [out.get(timeout=120) for _ in procs]
        usage = {k: proc_stats(pid) for k, pid in (("server", server.pid), ("broker", broker.proc.pid))}
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
        server.terminate()
        server.wait(30)
        db.dispose()
    published = sum(p["published"] for p in pubs)
    return {"database": name, "workers": args.workers, "devices": args.devices, "published": published,
            "stored": stored,
            "lost": published - stored, "seconds": round(seconds, 2), "msgs_per_s": round(stored / seconds),
            "publish_seconds": round(max(p["seconds"] for p in pubs), 2),
            "server_cpu_s": round(usage["server"][0] - cpu0["server"], 1),
            "server_cpu_us_per_msg": round((usage["server"][0] - cpu0["server"]) / max(stored, 1) * 1e6),
            "server_peak_rss_mb": round(usage["server"][1]),
            "broker_cpu_s": round(usage["broker"][0] - cpu0["broker"], 1),
            "broker_peak_rss_mb": round(usage["broker"][1])}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--devices", type=int, default=1000)
    ap.add_argument("--per-device", type=int, default=20)
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--workers", type=int, default=1, help="server worker processes (each ingests a share)")
    ap.add_argument("--db", choices=["SQLite", "PostgreSQL"], action="append", default=None)
    ap.add_argument("--repeat", type=int, default=3, help="runs per database; the table shows the median")
    args = ap.parse_args()
    rows, runs = [], []
    pg = Postgres().start() if not args.db or "PostgreSQL" in args.db else None
    try:
        with tempfile.TemporaryDirectory(prefix="ef-ingest-bench-") as tmp_name:
            tmp = Path(tmp_name)
            for name in ("SQLite", "PostgreSQL"):
                if (args.db and name not in args.db) or (name == "PostgreSQL" and pg is None):
                    continue
                mine = []
                for attempt in range(args.repeat):
                    url = (f"sqlite:///{tmp / f'fleet-{attempt}.db'}" if name == "SQLite"
                           else pg.create_database(f"ingest{attempt}"))  # type: ignore[union-attr]
                    broker = Broker(tmp / f"broker-{name}-{attempt}").start()
                    try:
                        mine.append(run_one(name, url, tmp, broker, args, attempt))
                    finally:
                        broker.stop()
                    print(f"  {mine[-1]}", file=sys.stderr, flush=True)
                runs += mine
                median = sorted(mine, key=lambda r: r["server_cpu_us_per_msg"])[len(mine) // 2]
                rows.append({**median, "runs": len(mine),
                             "server_cpu_us_per_msg_all": [r["server_cpu_us_per_msg"] for r in mine],
                             "lost": sum(r["lost"] for r in mine)})
    finally:
        if pg is not None:
            pg.stop()
    print("| database | server workers | devices | messages | stored | lost | msgs/s into the database | "
          "server CPU per message | server CPU / RSS | broker CPU / RSS |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['database']} | {r['workers']} | {r['devices']:,} | {r['published']:,} | {r['stored']:,} | "
              f"{r['lost']} | "
              f"{r['msgs_per_s']:,} | {r['server_cpu_us_per_msg']} µs (runs: "
              f"{', '.join(map(str, r['server_cpu_us_per_msg_all']))}) | {r['server_cpu_s']} s / "
              f"{r['server_peak_rss_mb']} MB | "
              f"{r['broker_cpu_s']} s / {r['broker_peak_rss_mb']} MB |")
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "ingest_bench.json").write_text(json.dumps({"median": rows, "runs": runs}, indent=2))
    return 0 if all(r["lost"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
