"""``fleet-sim``: many simulated devices that speak the real protocol, for scale tests, benchmarks and drills.

    fleet-sim enroll --server URL --token TOKEN --devices N [--profile P] --out fleet.json
    fleet-sim run --fleet fleet.json [--duration S] [--telemetry-interval S] [--requests N]
                  [--fail-probe F] [--slow F --slow-factor X] [--flaky F --flap-every S --offline-s S]
                  [--processes P] [--broker-url URL] [--ca FILE] [--json FILE]

``enroll`` enrolls N devices through the server's API (each with its own Ed25519 key, so each gets its own MQTT
password) and writes their credentials to a 0600 file. ``run`` connects them (one epoll loop per process,
``fleet_sim.sim``), answers rollouts (verifying every signature and hash, applying deltas), sends telemetry windows,
and injects failures on a seeded random share of the devices: ``--fail-probe`` (the update's health check fails),
``--slow`` (latency × ``--slow-factor`` once they run an update: a model that regressed), ``--flaky`` (the
connection is cut every ``--flap-every`` seconds and comes back ``--offline-s`` later).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import heapq
import json
import multiprocessing as mp
import os
import random
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path


def enroll(server: str, token: str, n: int, profile: str | None, out: Path, workers: int = 16,
           tags: list[str] | None = None) -> dict:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    def one(_: int) -> dict:
        public = Ed25519PrivateKey.generate().public_key().public_bytes(serialization.Encoding.Raw,
                                                                         serialization.PublicFormat.Raw)
        body = json.dumps({"token": token, "profile": profile, "signing_public_key": public.hex(),
                           "agent_version": "sim", "tags": tags or []}).encode()
        req = urllib.request.Request(f"{server.rstrip('/')}/v1/enroll", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
        for attempt in range(5):
            try:
                with urllib.request.urlopen(req, timeout=60) as r:
                    return json.loads(r.read())
            except urllib.error.HTTPError as e:
                if e.code < 500 or attempt == 4:
                    raise SystemExit(f"error: the server refused enrollment ({e.code}): {e.read()[:300]!r}") from e
            except OSError as e:
                if attempt == 4:
                    raise SystemExit(f"error: cannot reach {server}: {e}") from e
            time.sleep(0.5 * 2 ** attempt)
        raise AssertionError("unreachable")

    t0 = time.monotonic()
    with cf.ThreadPoolExecutor(workers) as pool:
        answers = list(pool.map(one, range(n)))
    fleet = {"server": server, "broker_url": answers[0]["broker_url"], "trust_root": answers[0]["trust_root"],
             "broker_ca": answers[0].get("broker_ca"),
             "devices": [{"id": a["device_id"], "profile": a["profile"], "password": a["mqtt_password"]}
                         for a in answers]}
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(fleet, f)
    return {"devices": n, "seconds": round(time.monotonic() - t0, 2), "file": str(out)}


def _run_part(part: dict, out) -> None:
    """One process: its share of the devices on one epoll loop, for ``duration`` seconds."""
    from fleet_sim.sim import SimFleet

    rng = random.Random(part["seed"])
    fleet = SimFleet(part["broker_url"], part["root"].encode(), ca_file=part["ca_file"])
    flaky = []
    for d in part["devices"]:
        dev = fleet.add(d["id"], profile=d["profile"], active_sha256=d.get("active_sha256"), password=d["password"],
                        fail_probe=rng.random() < part["fail_probe"])
        dev.slow_after_update = rng.random() < part["slow"]
        if rng.random() < part["flaky"]:
            flaky.append(dev)
    connect_s = fleet.connect_all(part["connect_timeout"])
    interval, start = part["telemetry_interval"], time.monotonic()
    # (due, index): a heap, so each turn of the loop (~50 a second) touches only the devices that are due
    due_tm = [(start + rng.random() * interval, i) for i in range(len(fleet.devices))]  # spread over the interval
    heapq.heapify(due_tm)
    next_drop = {d.id: start + rng.uniform(0.2, 1.0) * part["flap_every"] for d in flaky}
    back_at: dict[str, float] = {}
    sent = 0

    def every(now: float) -> None:
        nonlocal sent
        while due_tm and due_tm[0][0] <= now:
            _, i = heapq.heappop(due_tm)
            d = fleet.devices[i]
            if not d.connected:  # offline: its window waits until it is back
                heapq.heappush(due_tm, (now + 0.2, i))
                continue
            heapq.heappush(due_tm, (now + interval, i))
            d.slow = part["slow_factor"] if d.slow_after_update and d.installed else 1.0
            d.telemetry(part["requests"], window_s=interval)
            sent += 1
        for d in flaky:
            if d.connected and now >= next_drop[d.id]:
                fleet.drop(d)
                back_at[d.id] = now + part["offline_s"]
            elif not d.connected and d.id in back_at and now >= back_at[d.id]:
                del back_at[d.id]
                next_drop[d.id] = now + part["flap_every"]
                fleet.reconnect(d)

    fleet.run(lambda: False, part["duration"], every)
    fleet.run(lambda: False, 1.0)  # let the last messages leave
    out.put({"devices": len(fleet.devices), "connected": sum(d.connected for d in fleet.devices),
             "connect_s": round(connect_s, 2), "installed": sum(len(d.installed) for d in fleet.devices),
             "telemetry_sent": sent, "fail_probe": sum(d.fail_probe for d in fleet.devices),
             "slow": sum(d.slow_after_update for d in fleet.devices), "flaky": len(flaky),
             "counts": dict(fleet.counts)})
    fleet.close()


def run(fleet_file: Path, *, duration: float, telemetry_interval: float, requests: int, fail_probe: float,
        slow: float, slow_factor: float, flaky: float, flap_every: float, offline_s: float, processes: int,
        broker_url: str | None, ca_file: str | None, seed: int, connect_timeout: float = 120) -> dict:
    spec = json.loads(fleet_file.read_text())
    if ca_file is None and spec.get("broker_ca"):
        ca = fleet_file.with_suffix(".ca.pem")
        ca.write_text(spec["broker_ca"])
        ca_file = str(ca)
    devices = spec["devices"]
    parts = [{"devices": devices[k::processes], "broker_url": broker_url or spec["broker_url"],
              "root": spec["trust_root"], "ca_file": ca_file, "seed": seed * 1000 + k, "duration": duration,
              "telemetry_interval": telemetry_interval, "requests": requests, "fail_probe": fail_probe,
              "slow": slow, "slow_factor": slow_factor, "flaky": flaky, "flap_every": flap_every,
              "offline_s": offline_s, "connect_timeout": connect_timeout} for k in range(processes)]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_run_part, args=(p, out), daemon=True) for p in parts]
    for p in procs:
        p.start()
    try:
        results = [out.get(timeout=duration + connect_timeout + 60) for _ in procs]
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
    total: dict = {"devices": len(devices), "processes": processes}
    for key in ("connected", "installed", "telemetry_sent", "fail_probe", "slow", "flaky"):
        total[key] = sum(r[key] for r in results)
    total["connect_s"] = max(r["connect_s"] for r in results)
    counts: dict[str, int] = {}
    for r in results:
        for k, v in r["counts"].items():
            counts[k] = counts.get(k, 0) + v
    total["counts"] = counts
    return total


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="fleet-sim", description="Simulated devices on the real protocol.")
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("enroll", help="enroll N simulated devices through the server's API")
    e.add_argument("--server", required=True)
    e.add_argument("--token", required=True, help="an enrollment token with enough uses")
    e.add_argument("--devices", type=int, required=True)
    e.add_argument("--profile")
    e.add_argument("--tag", action="append")
    e.add_argument("--workers", type=int, default=16, help="concurrent enrollment requests")
    e.add_argument("--out", type=Path, required=True)
    r = sub.add_parser("run", help="connect the enrolled devices and behave like a fleet")
    r.add_argument("--fleet", type=Path, required=True, help="the file `fleet-sim enroll` wrote")
    r.add_argument("--duration", type=float, default=60)
    r.add_argument("--telemetry-interval", type=float, default=10)
    r.add_argument("--requests", type=int, default=100, help="inference requests per telemetry window")
    r.add_argument("--fail-probe", type=float, default=0.0, help="share of devices whose update probe fails")
    r.add_argument("--slow", type=float, default=0.0, help="share of devices that get slower after an update")
    r.add_argument("--slow-factor", type=float, default=5.0)
    r.add_argument("--flaky", type=float, default=0.0, help="share of devices whose connection keeps dropping")
    r.add_argument("--flap-every", type=float, default=20.0)
    r.add_argument("--offline-s", type=float, default=5.0)
    r.add_argument("--processes", type=int, default=1)
    r.add_argument("--broker-url", help="override the URL from enrollment")
    r.add_argument("--ca", help="CA file for mqtts:// (default: the fleet CA from enrollment)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--json", type=Path, help="also write the summary here")
    args = p.parse_args(argv)
    for name in ("fail_probe", "slow", "flaky"):
        if not 0 <= getattr(args, name, 0) <= 1:
            p.error(f"--{name.replace('_', '-')} is a share between 0 and 1")
    if args.command == "enroll":
        summary = enroll(args.server, args.token, args.devices, args.profile, args.out, args.workers, args.tag)
    else:
        summary = run(args.fleet, duration=args.duration, telemetry_interval=args.telemetry_interval,
                      requests=args.requests, fail_probe=args.fail_probe, slow=args.slow,
                      slow_factor=args.slow_factor, flaky=args.flaky, flap_every=args.flap_every,
                      offline_s=args.offline_s, processes=args.processes, broker_url=args.broker_url,
                      ca_file=args.ca, seed=args.seed)
        if args.json:
            args.json.write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
