"""The console against a live fleet: Mosquitto, `fleet-server serve`, 20 devices enrolled through the API by
fleet-sim and driven by its simulator (real MQTT, signed offers, chunked downloads, telemetry), and Debian's
Chromium driven by Playwright (its own browser download is impossible here; the system one is used)."""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
import time
from pathlib import Path

import pytest
from sqlmodel import Session

from fleet_server.auth import issue_token
from fleet_server.keys import pinned_root
from fleet_server.models import Role
from tests import zoo
from tests.fleet_driver import Broker
from tests.fleet_server.live_fleet import LiveFleet

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
AXE = Path(__file__).parent / "vendor" / "axe.min.js"
LAB, FIELD = 16, 4  # devices tagged site:lab (healthy) and site:field (every update's probe fails)


def _require_browser() -> None:
    if not Path(CHROMIUM).exists():
        pytest.fail("Debian's chromium is not installed: run make system-deps (make test does)")
    pytest.importorskip("playwright.sync_api")


class SimulatedFleet:
    """fleet-sim's devices in a thread: one epoll loop, a telemetry window per device per second."""

    def __init__(self, broker_url: str, root: bytes, devices: list[dict], blobs: dict[str, bytes]):
        from fleet_sim.sim import SimFleet

        self.fleet = SimFleet(broker_url, root, blobs=blobs)
        for d in devices:
            self.fleet.add(d["id"], profile=d["profile"], active_sha256=None, password=d["password"],
                           fail_probe=d["fail_probe"])
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> SimulatedFleet:
        self.fleet.connect_all(30)
        self._thread.start()
        return self

    def _run(self) -> None:
        due = {d.id: time.monotonic() + i / 20 for i, d in enumerate(self.fleet.devices)}

        def every(now: float) -> None:
            for d in self.fleet.devices:
                if now >= due[d.id] and d.connected:
                    due[d.id] = now + 1.0
                    d.telemetry(40, window_s=1.0)

        self.fleet.run(self._stop.is_set, 3600, every)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self.fleet.close()


@pytest.fixture(scope="module")
def console_fleet(tmp_path_factory):
    """The live fleet, tokens per role, and the simulated devices (16 lab, 4 field), all running."""
    _require_browser()
    from fleet_sim.cli import enroll

    work = tmp_path_factory.mktemp("console-fleet")
    broker = Broker(work / "broker").start()
    live = LiveFleet(work, broker.url, env={"EF_SERVER_DRIFT_INTERVAL_S": "5"})
    models = {v: zoo.mlp_opset(work / f"{v}.onnx", opset=13, seed=seed) for v, seed in (("1.0.0", 0), ("1.1.0", 1))}
    for version, path in models.items():
        live.register("classifier", version, path)
    with Session(live.db) as s:
        live.tokens = {role.value: issue_token(s, name=f"{role.value}-person", role=role, created_by="test")[1]
                       for role in Role}
    server = f"http://127.0.0.1:{live.port}"
    devices = []
    for tag, n, failing in (("site:lab", LAB, False), ("site:field", FIELD, True)):
        token = live.http.post("/v1/enrollment-tokens", json={"max_uses": n, "profile": "rpi5"}).json()["token"]
        enroll(server, token, n, "rpi5", work / f"{tag[5:]}.json", workers=4, tags=[tag])
        import json

        spec = json.loads((work / f"{tag[5:]}.json").read_text())
        devices += [{**d, "fail_probe": failing} for d in spec["devices"]]
    v1 = models["1.0.0"].read_bytes()
    sim = SimulatedFleet(broker.url, pinned_root(live.data), devices, {hashlib.sha256(v1).hexdigest(): v1}).start()
    live.wait(lambda: live.http.get("/v1/devices", params={"online": True}).json()["total"] == LAB + FIELD, 30,
              "the simulated devices online")
    live.url, live.devices = server, devices
    yield live
    sim.stop()
    live.close()
    broker.stop()


@pytest.fixture(scope="module")
def browser():
    _require_browser()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    """Where screenshots go: the test's output folder, and also EF_CONSOLE_SHOTS when set (docs/ refreshes)."""
    folder = tmp_path_factory.mktemp("console-screenshots")
    yield folder
    extra = os.environ.get("EF_CONSOLE_SHOTS")
    if extra:
        Path(extra).mkdir(parents=True, exist_ok=True)
        for f in folder.glob("*.png"):
            shutil.copy(f, Path(extra) / f"console-{f.name}")


def open_console(browser, live, role: str):
    """A fresh browser context signed in as ``role``. CSP is bypassed only so axe-core can be injected."""
    context = browser.new_context(viewport={"width": 1360, "height": 900}, bypass_csp=True)
    page = context.new_page()
    page.set_default_timeout(15_000)
    page.goto(f"{live.url}/ui")
    page.get_by_label("API token").fill(live.tokens[role])
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_selector("nav:not([hidden])")
    return page
