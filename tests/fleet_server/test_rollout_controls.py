"""Operators' rollout controls: an approval between waves, an exponential ramp, a retry of the failed devices. The
planner's rules as table tests with an injected clock; the API against a real database; an approval end to end with
a real server, broker and agents."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import pytest

from fleet_protocol.windows import Window
from fleet_server.rollouts.planner import Member, MemberStatus, RolloutState, Strategy, View, plan
from tests import zoo

P, OFF, INS, F = MemberStatus.PENDING, MemberStatus.OFFERED, MemberStatus.INSTALLED, MemberStatus.FAILED


def members(statuses: list[MemberStatus], finished: list[float | None] | None = None) -> list[Member]:
    finished = finished or [None] * len(statuses)
    return [Member(f"d{i:03d}", s, offered_at=0.0 if s is not P else None, finished_at=f)
            for i, (s, f) in enumerate(zip(statuses, finished, strict=True))]


# ----------------------------------------------------------------------------- approval


def test_approval_each_wave_waits_for_its_stage_to_be_approved():
    s = Strategy(canary_percent=10, waves_percent=(50,), require_approval=True)
    p = plan(View(RolloutState.RUNNING, 0, members([P] * 10), now=0), s)
    assert p.offer == ("d000",) and p.awaiting_approval is None  # the canary needs no approval: starting was it
    done = members([INS] + [P] * 9, [1.0] + [None] * 9)
    p = plan(View(RolloutState.RUNNING, 0, done, now=2), s)
    assert p.stage == 1 and p.offer == () and p.awaiting_approval == 1
    assert any("waits for an operator's approval" in n for n in p.notes)
    again = plan(View(RolloutState.RUNNING, 1, done, now=500), s)  # time alone changes nothing
    assert again.offer == () and again.awaiting_approval == 1
    p = plan(View(RolloutState.RUNNING, 1, done, now=501, approved_stage=1), s)
    assert p.offer == tuple(f"d{i:03d}" for i in range(1, 5)) and p.awaiting_approval is None
    wave = members([INS] * 5 + [P] * 5, [1.0] * 5 + [None] * 5)
    p = plan(View(RolloutState.RUNNING, 1, wave, now=600, approved_stage=1), s)
    assert p.stage == 2 and p.offer == () and p.awaiting_approval == 2  # the last stage waits too
    p = plan(View(RolloutState.RUNNING, 2, wave, now=601, approved_stage=2), s)
    assert len(p.offer) == 5


def test_approval_is_not_asked_for_without_require_approval():
    done = members([INS] + [P] * 9, [1.0] + [None] * 9)
    p = plan(View(RolloutState.RUNNING, 0, done, now=2), Strategy(canary_percent=10, waves_percent=(50,)))
    assert p.stage == 1 and len(p.offer) == 4 and p.awaiting_approval is None


# ----------------------------------------------------------------------------- ramp


@pytest.mark.parametrize(("statuses", "finished", "rate"), [
    ([P] * 10, None, 2),  # nothing installed yet: the base rate
    ([INS] * 3 + [P] * 7, [1.0, 2.0, 3.0] + [None] * 7, 2),  # 3 < ramp_every
    ([INS] * 4 + [P] * 6, [1.0] * 4 + [None] * 6, 4),  # one step
    ([INS] * 8 + [P] * 2, [1.0] * 8 + [None] * 2, 8),  # two steps
    ([INS] * 16 + [P] * 2, [1.0] * 16 + [None] * 2, 10),  # capped at the ceiling
    ([INS] * 8 + [F] + [P], [1.0] * 8 + [2.0, None], 2),  # a failure after them: back to the base
    ([INS] * 4 + [F] + [INS] * 4 + [P], [1.0] * 4 + [2.0] + [3.0] * 4 + [None], 4),  # successes after it count
])
def test_ramp_grows_with_successes_and_falls_back_on_a_failure(statuses, finished, rate):
    s = Strategy(canary_percent=100, waves_percent=(), rate_per_minute=2, ramp_factor=2, ramp_every=4,
                 max_rate_per_minute=10)
    assert s.rate(members(statuses, finished)) == rate


def test_ramp_rate_limits_the_offers_in_any_minute():
    s = Strategy(canary_percent=100, waves_percent=(), rate_per_minute=2, ramp_factor=3, ramp_every=2)
    fleet = members([INS] * 2 + [P] * 20, [5.0, 5.0] + [None] * 20)
    p = plan(View(RolloutState.RUNNING, 0, fleet, now=10), s)
    assert p.rate == 6 and len(p.offer) == 4  # 6 per minute, 2 of them already offered within the last 60 s
    assert plan(View(RolloutState.RUNNING, 0, fleet, now=70), s).offer.__len__() == 6


def test_ramp_strategies_are_checked():
    for kw in ({"ramp_factor": 0.5}, {"ramp_every": -1}, {"rate_per_minute": 10, "max_rate_per_minute": 5}):
        with pytest.raises(ValueError):
            Strategy(**kw)


# ----------------------------------------------------------------------------- maintenance windows

NIGHTLY = Window(cron="0 2 * * *", duration_s=3600)  # 02:00-03:00 UTC
DAY1_0100 = 1_764_637_200.0  # 2025-12-02T01:00:00Z


@pytest.mark.parametrize(("windows", "now", "stage", "timeout_counts_from"), [
    ((), DAY1_0100 + 599, 0, "the offer"),  # no windows: 600 s after the offer
    ((), DAY1_0100 + 600, 1, "the offer"),
    ((NIGHTLY,), DAY1_0100 + 600, 0, "02:00"),  # waiting for the window is not a stall
    ((NIGHTLY,), DAY1_0100 + 3600 + 599, 0, "02:00"),
    ((NIGHTLY,), DAY1_0100 + 3600 + 600, 1, "02:00"),
])
def test_window_stage_timeout_counts_from_the_first_window_after_the_offer(windows, now, stage, timeout_counts_from):
    s = Strategy(canary_percent=10, waves_percent=(), stage_timeout_s=600, windows=windows)
    fleet = [Member("d000", OFF, offered_at=DAY1_0100)] + [Member(f"d{i:03d}", P) for i in range(1, 10)]
    p = plan(View(RolloutState.RUNNING, 0, fleet, now=now), s)
    assert p.stage == stage, (timeout_counts_from, p.notes)
    if windows and now < DAY1_0100 + 3600:
        assert any("outside the maintenance windows" in n and "2025-12-02T02:00" in n for n in p.notes), p.notes


def test_window_offers_are_not_held_outside_the_windows():
    s = Strategy(canary_percent=100, waves_percent=(), windows=(NIGHTLY,))
    p = plan(View(RolloutState.RUNNING, 0, members([P] * 3), now=DAY1_0100 - 6 * 3600), s)
    assert len(p.offer) == 3  # devices download and stage now; they switch in the window


def test_window_strategies_round_trip_through_storage():
    from fleet_server.rollouts.engine import strategy_dict, strategy_of

    s = Strategy(windows=(NIGHTLY, Window(cron="30 1 * * 6", duration_s=7200, tz="Asia/Tokyo")))
    stored = strategy_dict(s)
    assert stored["windows"][1] == {"cron": "30 1 * * 6", "duration_s": 7200, "tz": "Asia/Tokyo"}
    assert strategy_of(stored) == s and strategy_of({}).windows == ()


# ----------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_approval_a_wave_waits_for_the_operator_then_the_rollout_completes(live, tmp_path):
    model = zoo.mlp_opset(tmp_path / "m.onnx", opset=13, seed=0)
    live.register("classifier", "1.0.0", model)
    agents = live.enroll(2)
    for a in agents:
        a.start()
    live.wait_online(agents)
    r = live.rollout(model="classifier", version="1.0.0",
                     strategy={"canary_percent": 50, "waves_percent": [], "require_approval": True})
    live.wait(lambda: live.get(r["id"])["waiting_for_approval"] == 1, 60, "the wave waits for approval",
              lambda: live.get(r["id"]))
    members = live.members(r["id"])
    assert sorted(m["status"] for m in members.values()) == ["installed", "pending"]  # the canary only
    assert live.http.post(f"/v1/rollouts/{r['id']}/approve").json()["approved_stage"] == 1
    assert live.http.post(f"/v1/rollouts/{r['id']}/approve").status_code == 409  # nothing waits any more
    done = live.wait_state(r["id"], {"completed", "paused", "aborted"})
    assert done["state"] == "completed" and done["counts"] == {"installed": 2}, done
    audit = live.http.get("/v1/audit", params={"action": "rollout.approve"}).json()
    assert any(e["target"] == f"rollout:{r['id']}" and e["outcome"] == "ok" for e in audit), audit


@pytest.mark.slow
def test_retry_the_failed_devices_of_a_paused_rollout_as_a_new_attempt(live, tmp_path):
    model = zoo.mlp_opset(tmp_path / "m.onnx", opset=13, seed=0)
    other = zoo.mlp_opset(tmp_path / "o.onnx", opset=13, seed=1)
    live.register("classifier", "1.0.0", model, probe_from=other)  # every device fails its probe
    agents = live.enroll(2)
    for a in agents:
        a.start()
    live.wait_online(agents)
    r = live.rollout(model="classifier", version="1.0.0", strategy={"canary_percent": 100, "waves_percent": []},
                     gates={"max_failure_share": 0.0, "min_finished": 2})
    first = live.wait_state(r["id"], {"completed", "paused", "aborted"})
    assert first["state"] == "paused" and first["counts"] == {"failed": 2}, first
    assert live.http.post(f"/v1/rollouts/{r['id']}/retry").status_code == 201
    retry = live.http.get("/v1/rollouts").json()[0]
    assert retry["retry_of"] == r["id"] and retry["name"].endswith("(attempt 2)") and retry["state"] == "running"
    assert retry["selector"]["devices"] == sorted(live.device_id(a) for a in agents)
    assert live.get(r["id"])["state"] == "aborted"  # the original hands its devices over
    again = live.wait_state(retry["id"], {"completed", "paused", "aborted"})
    assert again["counts"] == {"failed": 2} and live.get(r["id"])["counts"] == {"failed": 2}  # its own counts
    assert live.http.post(f"/v1/rollouts/{r['id']}/retry").status_code == 409  # retried already: once
    assert live.http.post(f"/v1/rollouts/{retry['id']}/retry").json()["name"].endswith("(attempt 3)")


@pytest.mark.slow
def test_window_devices_stage_at_once_and_switch_only_when_the_window_opens(live, tmp_path):
    model = zoo.mlp_opset(tmp_path / "m.onnx", opset=13, seed=0)
    live.register("classifier", "1.0.0", model)
    agents = live.enroll(1, tags=("site:night",))
    site = live.http.put("/v1/tags/site:night/windows", json={"windows": [{"cron": "* * * * *", "duration_s": 120}]})
    assert site.status_code == 200, site.text  # the site allows any time: the rollout's window decides
    agents[0].start()
    live.wait_online(agents)
    opens = (int(time.time()) // 60 + 1) * 60
    if opens - time.time() < 20:  # leave the device time to download, stage and probe first
        opens += 60
    at = datetime.fromtimestamp(opens, UTC)
    r = live.rollout(model="classifier", version="1.0.0", strategy={
        "canary_percent": 100, "waves_percent": [],
        "windows": [{"cron": f"{at.minute} {at.hour} {at.day} {at.month} *", "duration_s": 600}]})
    device = live.device_id(agents[0])
    live.wait(lambda: live.members(r["id"]).get(device, {}).get("reason") == "maintenance_window", 30,
              "the device staged and waiting for its window", lambda: live.members(r["id"]))
    member = live.members(r["id"])[device]
    assert time.time() < opens and member["status"] == "downloading"
    assert member["detail"] == f"waiting: maintenance window (next opens {at.isoformat(timespec='minutes')})"
    assert any("outside the maintenance windows" in n for n in live.get(r["id"])["notes"])
    done = live.wait_state(r["id"], {"completed", "paused", "aborted"}, timeout=opens - time.time() + 60)
    assert done["state"] == "completed" and done["counts"] == {"installed": 1}, done
    assert live.members(r["id"])[device]["finished_at"] >= opens  # switched inside the window, not before


def test_window_tag_windows_api_validates_and_audits(server):
    op = server.as_("operator")
    bad = server.put("/v1/tags/site:a/windows", headers=op, json={"windows": [{"cron": "0 25 * * *",
                                                                               "duration_s": 600}]})
    assert bad.status_code == 422 and "outside 0-23" in bad.text
    assert server.put("/v1/tags/site:a/windows", headers=server.as_("viewer"), json={"windows": []}).status_code == 403
    w = {"cron": "0 2 * * 1-5", "duration_s": 3600, "tz": "Europe/Berlin"}
    got = server.put("/v1/tags/site:a/windows", headers=op, json={"windows": [w]}).json()
    assert got["windows"] == [w] and got["updated_by"] == "operator-bot"
    assert server.get("/v1/tags/site:a/windows", headers=server.as_("viewer")).json()["windows"] == [w]
    assert server.put("/v1/tags/site:a/windows", headers=op, json={"windows": []}).json()["windows"] == []
    audit = server.get("/v1/audit", headers=server.as_("admin"), params={"action": "tag.windows"}).json()
    assert [e["detail"] for e in audit][:2] == ["removed", "0 2 * * 1-5 for 3600 s (Europe/Berlin)"]


@pytest.mark.slow
def test_window_a_newer_rollout_supersedes_an_update_that_waits_for_its_window(live, tmp_path):
    live.register("classifier", "1.0.0", zoo.mlp_opset(tmp_path / "a.onnx", opset=13, seed=0))
    live.register("classifier", "1.1.0", zoo.mlp_opset(tmp_path / "b.onnx", opset=13, seed=1))
    agents = live.enroll(1)
    agents[0].start()
    live.wait_online(agents)
    device = live.device_id(agents[0])
    far = datetime.now(UTC) + timedelta(days=3)  # a window days away: the update waits, staged
    waiting = live.rollout(model="classifier", version="1.0.0", strategy={
        "canary_percent": 100, "waves_percent": [],
        "windows": [{"cron": f"0 {far.hour} {far.day} {far.month} *", "duration_s": 3600}]})
    live.wait(lambda: live.members(waiting["id"]).get(device, {}).get("reason") == "maintenance_window", 30,
              "the device staged and waiting", lambda: live.members(waiting["id"]))
    hotfix = live.rollout(model="classifier", version="1.1.0", strategy={"canary_percent": 100, "waves_percent": []})
    done = live.wait_state(hotfix["id"], {"completed", "paused", "aborted"}, timeout=60)
    assert done["state"] == "completed" and done["counts"] == {"installed": 1}, done
    old = live.members(waiting["id"])[device]
    assert (old["status"], old["reason"]) == ("failed", "superseded") and hotfix["id"] and "job r" in old["detail"]
    assert agents[0].model()["version"] == "1.1.0"
