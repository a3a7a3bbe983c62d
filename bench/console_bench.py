"""Console benchmark: time to first render, measured in the browser (performance.now() from navigation start), of
the fleet page with 10,000 devices and of the device page with a week of one-minute telemetry (10,080 windows).

A real `fleet-server serve` (SQLite, no broker: the rollout engine is off) on a database filled directly; Debian's
Chromium driven by Playwright. Each page is loaded fresh ``--runs`` times; the median and the worst are reported.
"Rendered" means: the fleet page's device table and counts are on screen; the device page's charts are drawn.
Prints a table and writes bench/results/console_bench.json.
Usage: python bench/console_bench.py [--runs N]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sqlalchemy import insert  # noqa: E402
from sqlmodel import Session  # noqa: E402

from fleet_protocol.messages import LATENCY_EDGES_MS  # noqa: E402
from fleet_server.auth import issue_token  # noqa: E402
from fleet_server.db import make_engine  # noqa: E402
from fleet_server.migrate import upgrade  # noqa: E402
from fleet_server.models import Device, Role, TelemetryWindow  # noqa: E402
from tests.console.conftest import CHROMIUM, CHROMIUM_ARGS  # noqa: E402
from tests.fleet_driver import free_port, wait_port  # noqa: E402

DEVICES = 10_000
WEEK_WINDOWS = 7 * 24 * 60  # one window a minute
PROFILES = ["rpi4", "rpi5", "jetson-orin-nano", "android-arm64"]


def fill(db_url: str) -> tuple[str, str]:
    """10,000 devices and a week of telemetry for the first; returns (an admin token, that device's id)."""
    engine = make_engine(db_url)
    rng = random.Random(1)
    devices = [{"id": f"dev-{i:016x}", "profile": PROFILES[i % 4], "tags": [f"site:{i % 50}", f"line:{i % 7}"],
                "agent_version": "0.1.0", "signing_public_key": f"{i:064x}", "mqtt_password_hash": "x",
                "online": rng.random() < 0.9, "active_version": f"classifier 1.{i % 3}.0"} for i in range(DEVICES)]
    now = time.time()
    bins = len(LATENCY_EDGES_MS) - 1
    windows = []
    for k in range(WEEK_WINDOWS):
        counts = [0] * bins
        for _ in range(20):  # 20 latency samples around bin 17 (~ 1-2 ms), a slow day in the middle
            counts[min(bins - 1, max(0, int(rng.gauss(17 + (3 if 3000 < k < 4000 else 0), 1.5))))] += 3
        end = now - (WEEK_WINDOWS - k) * 60
        windows.append({"device_id": devices[0]["id"], "seq": k, "window_start": end - 60, "window_end": end,
                        "model_version": "classifier 1.0.0", "requests": 60, "errors": rng.randrange(2),
                        "latency_edges": list(LATENCY_EDGES_MS), "latency_counts": counts,
                        "cpu_percent": 30 + 10 * rng.random(), "rss_mb": 80 + rng.random() * 5,
                        "temperature_c": 48 + 4 * rng.random(), "inputs": []})
    with engine.begin() as conn:
        conn.execute(insert(Device), devices)
        conn.execute(insert(TelemetryWindow), windows)
    with Session(engine) as s:
        _, token = issue_token(s, name="bench", role=Role.ADMIN, created_by="bench")
    engine.dispose()
    return token, devices[0]["id"]


def first_render(browser, url: str, token: str, ready: str) -> float:
    """Milliseconds from navigation start until ``ready`` (a JS condition) holds, in a fresh browser context."""
    context = browser.new_context(viewport={"width": 1360, "height": 900})
    context.add_init_script(f"sessionStorage.setItem('edgefleet.token', {json.dumps(token)})")
    page = context.new_page()
    page.goto(url)
    page.wait_for_function(f"() => {ready}", timeout=60_000, polling="raf")
    elapsed = page.evaluate("performance.now()")
    context.close()
    return float(elapsed)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=5)
    args = p.parse_args()
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as tmp:
        db_url = f"sqlite:///{tmp}/fleet.db"
        upgrade(db_url)
        t0 = time.perf_counter()
        token, device = fill(db_url)
        fill_s = time.perf_counter() - t0
        port = free_port()
        env = {**os.environ, "EF_SERVER_DATABASE_URL": db_url, "EF_SERVER_DATA_DIR": f"{tmp}/data",
               "EF_SERVER_ROLLOUT_ENGINE": "false", "EF_SERVER_BROKER_URL": "mqtt://127.0.0.1:1"}
        server = subprocess.Popen([sys.executable, "-m", "fleet_server.cli", "serve", "--port", str(port)], env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
        try:
            wait_port(port, 60)
            base = f"http://127.0.0.1:{port}/ui"
            pages = {
                "fleet page, 10,000 devices": (f"{base}#/fleet",
                                               "document.querySelector('table caption') && "
                                               "document.querySelectorAll('.cards .card').length >= 5"),
                "device page, a day (1,440 windows)": (f"{base}#/devices/{device}",
                                                       "document.querySelectorAll('svg.chart').length >= 3"),
                "device page, a week (10,080 windows)": (f"{base}#/devices/{device}?range=604800",
                                                         "document.querySelectorAll('svg.chart').length >= 3"),
            }
            results = {}
            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
                first_render(browser, *pages["fleet page, 10,000 devices"][:1], token,
                             pages["fleet page, 10,000 devices"][1])  # a warm-up load, not counted
                for name, (url, ready) in pages.items():
                    times = [first_render(browser, url, token, ready) for _ in range(args.runs)]
                    results[name] = {"median_ms": round(statistics.median(times), 1), "max_ms": round(max(times), 1),
                                     "runs": len(times)}
                browser.close()
        finally:
            server.terminate()
            server.wait(20)
    print(f"filled {DEVICES:,} devices and {WEEK_WINDOWS:,} telemetry windows in {fill_s:.1f} s")
    print(f"{'page':<40} {'median ms':>10} {'max ms':>10}")
    for name, r in results.items():
        print(f"{name:<40} {r['median_ms']:>10} {r['max_ms']:>10}")
    out = ROOT / "bench" / "results" / "console_bench.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"devices": DEVICES, "week_windows": WEEK_WINDOWS, "results": results,
                               "chromium": CHROMIUM}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
