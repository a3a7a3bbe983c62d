"""The operator console in a real headless Chromium against a live server, broker and 20 simulated devices.

The tests share one fleet and run in order, as an operator's session would: sign in and filter, a rollout created
through the form completing live, a second one tripping its gate then aborted and rolled back from the page, a
viewer refused, every page screenshotted and checked by axe-core, and an expired token sent back to sign in."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest

from tests import zoo
from tests.console.conftest import AXE, FIELD, LAB, open_console

pytestmark = pytest.mark.slow
NO_RELOAD = "window.__noReload = true"  # set once; a reload would clear it


def test_console_sign_in_and_filter_devices(console_fleet, browser, shots):
    page = open_console(browser, console_fleet, "operator")
    assert page.locator("#who").inner_text() == "operator-person (operator)"
    page.wait_for_selector("table caption:text('20 device(s)')")
    cards = page.locator(".cards .card").all_inner_texts()
    assert any(re.match(rf"{LAB + FIELD}\s+devices", c) for c in cards), cards
    page.get_by_label("Tag").fill("site:field")
    page.get_by_role("button", name="Filter").click()
    page.wait_for_selector(f"table caption:text('{FIELD} device(s)')")
    shown = page.locator("tbody tr td:first-child a").all_inner_texts()
    field_ids = {d["id"] for d in console_fleet.devices if d["fail_probe"]}
    assert set(shown) == field_ids
    one = sorted(field_ids)[0]
    page.get_by_label("Tag").fill("")
    page.get_by_label("Device id").fill(one[4:14])
    page.get_by_role("button", name="Filter").click()
    page.wait_for_selector("table caption:text('1 device(s)')")
    assert page.locator("tbody tr td:first-child a").all_inner_texts() == [one]
    page.get_by_label("Device id").fill("no-such-device")
    page.get_by_role("button", name="Filter").click()
    page.wait_for_selector("text=No device matches these filters.")
    page.get_by_label("Device id").fill("")
    page.get_by_role("button", name="Filter").click()
    page.wait_for_selector("table caption:text('20 device(s)')")
    page.screenshot(path=shots / "fleet.png", full_page=True)
    page.context.close()


def test_console_rollout_created_through_the_form_completes_without_reload(console_fleet, browser, shots):
    page = open_console(browser, console_fleet, "operator")
    page.get_by_role("link", name="Rollouts", exact=True).click()
    page.wait_for_selector("text=No rollouts yet")
    page.get_by_role("link", name="New rollout").click()
    page.get_by_label("Name").fill("lab first install")
    page.get_by_label("Model version").select_option(label="classifier 1.0.0")
    page.get_by_label("Tags (all must match)").fill("site:lab")
    page.wait_for_selector(f"#preview-count:text('{LAB} device(s) match')")
    assert "Releasable for: rpi5" in page.locator("#preview").inner_text()
    page.get_by_label("Canary %").fill("25")
    page.get_by_label("Waves % (comma separated)").fill("100")
    page.get_by_label("An operator approves each wave after the canary").check()
    page.evaluate(NO_RELOAD)
    page.get_by_role("button", name="Create rollout").click()
    page.wait_for_url(re.compile(r"#/rollouts/\d+$"))
    page.wait_for_selector("#awaiting-approval:text('stage 1')", timeout=90_000)  # the canary done, the wave waits
    page.locator("button[data-action=approve]").click()
    page.locator("#confirm-ok").click()
    page.wait_for_selector("h1 .badge:text('completed')", timeout=90_000)
    assert page.evaluate("window.__noReload") is True  # updated in place, never reloaded
    rollout_id = int(page.url.rsplit("/", 1)[1])
    done = console_fleet.get(rollout_id)
    assert done["state"] == "completed" and done["counts"] == {"installed": LAB}
    page.wait_for_selector(f"text=installed {LAB}")
    page.wait_for_function(f"document.querySelectorAll('tbody .badge.installed').length === {LAB}")
    page.screenshot(path=shots / "rollout-completed.png", full_page=True)
    page.context.close()


def test_console_gate_trips_then_abort_and_rollback_from_the_page(console_fleet, browser, shots):
    live = console_fleet
    page = open_console(browser, live, "operator")
    page.goto(f"{live.url}/ui#/rollouts/new")
    page.get_by_label("Name").fill("everyone to 1.1.0")
    page.get_by_label("Model version").select_option(label="classifier 1.1.0")
    page.wait_for_selector(f"#preview-count:text('{LAB + FIELD} device(s) match')")
    page.get_by_label("Canary %").fill("100")
    page.get_by_label("Waves % (comma separated)").fill("")
    page.get_by_label("Max failure share (0–1)").fill("0.1")
    page.get_by_label("Min finished devices to judge").fill(str(LAB + FIELD))
    page.evaluate(NO_RELOAD)
    page.get_by_role("button", name="Create rollout").click()
    page.wait_for_url(re.compile(r"#/rollouts/\d+$"))
    rollout_id = int(page.url.rsplit("/", 1)[1])
    page.wait_for_selector("h1 .badge:text('paused')", timeout=90_000)  # the failure-share gate (4/20 > 10%)
    page.wait_for_selector("h3:has-text('Verdict') .badge:text('fail')")
    assert "update failures 4/20" in page.locator(".panel ul").first.inner_text()
    assert page.locator("tbody code:text('probe_failed')").count() == FIELD
    page.screenshot(path=shots / "rollout-gate-failed.png", full_page=True)

    page.locator("button[data-action=abort]").click()
    page.get_by_role("dialog").wait_for()
    page.locator("#confirm-ok").click()
    page.wait_for_selector("h1 .badge:text('aborted')")
    page.locator("button[data-action=rollback]").click()
    page.locator("#confirm-ok").click()
    page.wait_for_function(
        f"document.querySelectorAll('tbody .badge.rolled_back').length === {LAB}", timeout=60_000)
    assert page.evaluate("window.__noReload") is True
    state = live.get(rollout_id)
    assert state["state"] == "aborted" and state["counts"] == {"rolled_back": LAB, "failed": FIELD}
    actions = [e["action"] for e in live.http.get("/v1/audit", params={"actor": "operator-person"}).json()]
    assert {"rollout.create", "rollout.abort", "rollout.rollback"} <= set(actions)  # the same audited routes
    page.screenshot(path=shots / "rollout-rolled-back.png", full_page=True)
    page.locator("button[data-action=retry]").click()  # the failed devices, as a new attempt
    page.locator("#confirm-ok").click()
    page.wait_for_url(re.compile(rf"#/rollouts/(?!{rollout_id}$)\d+$"))
    page.wait_for_selector(f"a:text('rollout #{rollout_id}')")
    retry = live.get(int(page.url.rsplit("/", 1)[1]))
    assert retry["retry_of"] == rollout_id and len(retry["selector"]["devices"]) == FIELD
    page.context.close()


def test_console_viewer_is_refused_the_abort_button(console_fleet, browser):
    live = console_fleet
    draft = live.http.post("/v1/rollouts", json={"model": "classifier", "version": "1.1.0", "name": "a draft",
                                                 "selector": {"tags": ["site:lab"]}}).json()
    page = open_console(browser, live, "viewer")
    page.goto(f"{live.url}/ui#/rollouts/{draft['id']}")
    abort = page.locator("button[data-action=abort]")
    abort.wait_for()
    assert abort.is_disabled() and abort.get_attribute("title") == "needs the operator role"
    assert "need the operator role" in page.locator("#role-note").inner_text()
    # the server refuses it too, and says which role it needs
    answer = page.evaluate("""async (id) => {
        const r = await fetch(`/v1/rollouts/${id}/abort`, {method: 'POST',
            headers: {Authorization: `Bearer ${sessionStorage.getItem('edgefleet.token')}`}});
        return [r.status, (await r.json()).detail];
    }""", draft["id"])
    assert answer == [403, "this needs the operator role"]
    page.get_by_role("link", name="Admin", exact=True).click()
    page.wait_for_selector("text=Managing tokens and enrollment needs the admin role.")
    assert live.get(draft["id"])["state"] == "draft"
    page.context.close()


PAGES = [("fleet", "#/fleet", "table caption"), ("rollouts", "#/rollouts", "tbody tr"),
         ("models", "#/models", "tbody tr"), ("abtests", "#/abtests", "h1"), ("alerts", "#/alerts", "h1"),
         ("admin", "#/admin", "text=Audit log")]


def _axe(page) -> list[dict]:
    page.add_script_tag(path=str(AXE))
    result = page.evaluate("async () => (await axe.run(document, {resultTypes: ['violations']})).violations")
    return [{"id": v["id"], "impact": v["impact"], "nodes": [n["target"] for n in v["nodes"]][:3]} for v in result]


def test_console_every_page_renders_and_passes_axe(console_fleet, browser, shots):
    live = console_fleet
    page = open_console(browser, live, "admin")
    device = sorted(d["id"] for d in live.devices if not d["fail_probe"])[0]
    problems = {}
    for name, route, ready in [*PAGES, ("device", f"#/devices/{device}", "svg.chart"),
                               ("rollout-new", "#/rollouts/new", "#preview-count")]:
        page.goto(f"{live.url}/ui{route}")
        page.wait_for_selector(ready)
        if name == "models":
            page.get_by_role("button", name="classifier 1.0.0").click()
            page.wait_for_selector("h3:text('Artifacts per profile')")
        page.wait_for_timeout(300)
        page.screenshot(path=shots / f"{name}.png", full_page=True)
        serious = [v for v in _axe(page) if v["impact"] in ("serious", "critical")]
        if serious:
            problems[name] = serious
    assert not problems, json.dumps(problems, indent=1)
    # the device page charts telemetry and shows the update history with its reason codes
    page.goto(f"{live.url}/ui#/devices/{device}")
    page.wait_for_selector("svg.chart")
    titles = page.evaluate("[...document.querySelectorAll('svg.chart > title')].map(t => t.textContent)")
    assert titles[:2] == ["Latency p50 and p99 over time", "Error rate over time"]
    page.wait_for_selector("td .badge.rolled_back")
    page.context.close()


def test_console_keyboard_reaches_every_control_and_every_control_is_labelled(console_fleet, browser):
    page = open_console(browser, console_fleet, "operator")
    page.goto(f"{console_fleet.url}/ui#/rollouts/new")
    page.wait_for_selector("#preview-count")
    unlabelled = page.evaluate("""() => [...document.querySelectorAll('main input, main select, main textarea')]
        .filter(el => !(el.labels && el.labels.length) && !el.getAttribute('aria-label'))
        .map(el => el.name)""")
    assert unlabelled == []
    page.goto(f"{console_fleet.url}/ui#/fleet")
    page.wait_for_selector("table caption")
    active = "(document.activeElement.getAttribute('aria-label') || document.activeElement.textContent).trim()"
    assert page.evaluate("document.activeElement.id") == "main"  # a new page moves focus to its content
    backwards = []
    for _ in range(9):
        page.keyboard.press("Shift+Tab")
        backwards.append(page.evaluate(active))
    assert backwards == ["Sign out", "Admin", "Alerts", "A/B tests", "Models", "Rollouts", "Fleet", "edgefleet",
                         "Skip to content"]
    forwards = []
    page.evaluate("document.getElementById('main').focus()")
    for _ in range(25):
        page.keyboard.press("Tab")
        forwards.append(page.evaluate("document.activeElement.name || document.activeElement.textContent.trim()"))
    assert {"q", "profile", "tag", "version", "online", "Filter"} <= set(forwards)  # the filters, in order of reading
    page.evaluate("document.getElementById('main').focus()")
    for _ in range(6):  # back past Sign out, Admin, Alerts, A/B tests, Models
        page.keyboard.press("Shift+Tab")
    assert page.evaluate(active) == "Rollouts"
    page.keyboard.press("Enter")
    page.wait_for_url(re.compile("#/rollouts$"))
    page.context.close()


def test_console_expired_token_sends_back_to_sign_in(console_fleet, browser):
    live = console_fleet
    issued = live.http.post("/v1/tokens", json={"name": "short-lived", "role": "viewer"}).json()
    live.tokens["short-lived"] = issued["token"]
    page = open_console(browser, live, "short-lived")
    page.wait_for_selector("table caption")
    live.http.delete(f"/v1/tokens/{issued['id']}")
    page.wait_for_selector("text=Your token expired or was revoked: sign in again.", timeout=20_000)
    assert page.get_by_label("API token").is_visible()
    page.context.close()


def test_console_device_page_charts_the_version_and_resources_devices_report(console_fleet, browser, shots):
    live = console_fleet
    device = sorted(d["id"] for d in live.devices if not d["fail_probe"])[0]
    page = open_console(browser, live, "viewer")
    page.wait_for_selector("table caption")
    ids = page.locator("tbody tr td:nth-child(1)").all_inner_texts()
    running = dict(zip(ids, page.locator("tbody tr td:nth-child(4)").all_inner_texts(), strict=True))
    lab = {d["id"] for d in live.devices if not d["fail_probe"]}
    # the lab devices installed a version (the field ones failed every probe: no model yet), as their state says
    assert all(re.fullmatch(r"classifier 1\.[01]\.0" if i in lab else "—", v) for i, v in running.items()), running
    page.goto(f"{live.url}/ui#/devices/{device}")
    page.wait_for_selector("svg.chart > title:text('Resident memory over time')", state="attached")
    ident = page.locator("dl.ident").inner_text()
    assert re.search(r"Active slot\s+classifier 1\.[01]\.0 \(", ident), ident
    page.wait_for_selector("h2:text('Models') + div table tbody tr")  # its models, as its state report lists them
    models = page.locator("h2:text('Models') + div").inner_text()
    assert re.search(r"classifier\s+classifier 1\.[01]\.0\s+[ab] \(", models), models
    titles = page.evaluate("[...document.querySelectorAll('svg.chart > title')].map(t => t.textContent)")
    assert {"CPU over time", "Resident memory over time", "Temperature over time"} <= set(titles)
    assert page.locator("main .grid2 .empty").count() == 0  # no chart left empty
    last = live.http.get(f"/v1/console/devices/{device}/series").json()["series"][-1]
    assert 0 < last["cpu_percent"] <= 100 and 16 <= last["rss_mb"] <= 1024 and 25 <= last["temperature_c"] <= 90
    page.screenshot(path=shots / "device.png", full_page=True)
    page.goto(f"{live.url}/ui#/fleet")
    page.wait_for_selector("table caption")
    page.wait_for_timeout(300)
    page.screenshot(path=shots / "fleet.png", full_page=True)
    page.context.close()


def test_console_rollout_form_starts_from_the_apis_defaults(console_fleet, browser):
    from fleet_server.routes.rollouts import GatesIn, StrategyIn

    page = open_console(browser, console_fleet, "operator")
    page.goto(f"{console_fleet.url}/ui#/rollouts/new")
    page.wait_for_selector("#preview-count")
    strategy, gates = StrategyIn(), GatesIn()
    value = lambda label: page.get_by_label(label).first.input_value()  # noqa: E731 - hinted labels hold more text
    assert float(value("Canary %")) == strategy.canary_percent
    assert [float(w) for w in value("Waves % (comma separated)").split(",")] == strategy.waves_percent
    assert float(value("Max failure share (0–1)")) == gates.max_failure_share
    assert int(value("Min requests to judge")) == gates.min_requests
    assert value("Max p99 latency ratio") == value("Min fidelity (cosine)") == ""  # off, as the API's default
    assert "1.5 is usual" in page.locator("label:has-text('Max p99 latency ratio')").inner_text()
    assert page.get_by_label("When a gate fails").input_value() == "pause"
    page.context.close()


def test_console_register_with_calibration_data_follows_the_job_log_and_downloads(console_fleet, browser,
                                                                                 tmp_path):
    live = console_fleet
    source = zoo.mlp_opset(tmp_path / "m.onnx", opset=13, seed=5)
    calibration = tmp_path / "calibration.npz"
    np.savez(calibration, x=np.random.default_rng(3).standard_normal((32, 3, 16, 16)).astype(np.float32))
    page = open_console(browser, live, "operator")
    page.goto(f"{live.url}/ui#/models")
    page.wait_for_selector("#register-title")
    page.evaluate("""() => { window.__jobTitles = [];  // every title the job log had, in order
        new MutationObserver(() => { const t = document.getElementById('job-log-title');
            const text = t && !t.hidden ? t.textContent : null;
            if (text && window.__jobTitles.at(-1) !== text) window.__jobTitles.push(text); })
          .observe(document.body, {subtree: true, childList: true, characterData: true, attributes: true}); }""")
    page.get_by_label("Name", exact=True).fill("inspector")
    page.get_by_label("Version", exact=True).fill("2.0.0")
    page.get_by_label("Source model").set_input_files(str(source))
    page.get_by_label("Calibration data (.npz)").set_input_files(str(calibration))
    page.locator("#register-title").locator("..").get_by_label("Convert for profiles").fill("rpi5")
    page.evaluate(NO_RELOAD)
    page.get_by_role("button", name="Register").click()
    page.wait_for_selector("#job-log-title:text-matches('(succeeded|failed)[)]$')", timeout=180_000)
    titles = page.evaluate("window.__jobTitles")
    assert re.search(r"\((queued|running), updating\)", titles[0]) and titles[-1].endswith("(succeeded)"), titles
    assert re.search(r"done: (\d+) of \1 artifact\(s\) shippable", page.locator("#job-log").inner_text())
    assert page.evaluate("window.__noReload") is True
    page.wait_for_selector("tbody .badge.shippable")
    with page.expect_download() as saved:
        page.get_by_role("button", name="Download the calibration data").click()
    assert Path(saved.value.path()).read_bytes() == calibration.read_bytes()
    artifact = live.http.get("/v1/console/models/inspector/2.0.0").json()["artifacts"][0]
    with page.expect_download() as saved:
        page.get_by_role("button", name="Download the rpi5 artifact").first.click()
    assert hashlib.sha256(Path(saved.value.path()).read_bytes()).hexdigest() == artifact["artifact_sha256"]
    assert saved.value.suggested_filename == f"inspector-2.0.0-rpi5.{artifact['format']}"
    page.context.close()


def test_console_shows_reported_strings_as_text_never_as_markup(console_fleet, browser):
    """A device may report any string as its version (the state message only bounds its length); the page shows it
    as text. The browser context bypasses the CSP (for axe-core), so this checks the rendering itself."""
    from sqlmodel import Session, delete

    from fleet_server.models import Device, TelemetryWindow

    live, hostile = console_fleet, '<img src=x onerror="window.__pwned=1">'
    with Session(live.db) as s:  # what the ingest stores from such a device's state and telemetry
        s.add(Device(id="zz-hostile", profile="rpi5", signing_public_key="ab" * 32, mqtt_password_hash="x",
                     agent_version=hostile[:64], active_version=hostile))
        s.add(TelemetryWindow(device_id="zz-hostile", seq=0, window_start=0.0, window_end=9e9, requests=1,
                              model_version=hostile, inputs=[]))
        s.commit()
    try:
        page = open_console(browser, live, "viewer")
        page.get_by_label("Device id").fill("zz-hostile")
        page.get_by_role("button", name="Filter").click()
        page.wait_for_selector("table caption:text('1 device(s)')")
        assert page.locator("tbody td").filter(has_text=hostile).count() == 1
        page.goto(f"{live.url}/ui#/devices/zz-hostile")
        page.wait_for_selector("dl.ident")
        assert hostile in page.locator("dl.ident").inner_text()
        page.wait_for_timeout(500)
        assert page.locator("img").count() == 0 and page.evaluate("window.__pwned") is None
        page.context.close()
    finally:
        with Session(live.db) as s:
            s.exec(delete(TelemetryWindow).where(TelemetryWindow.device_id == "zz-hostile"))
            s.exec(delete(Device).where(Device.id == "zz-hostile"))
            s.commit()
