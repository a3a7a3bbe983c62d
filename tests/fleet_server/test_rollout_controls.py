"""Operators' rollout controls: an approval between waves, an exponential ramp, a retry of the failed devices. The
planner's rules as table tests with an injected clock; the API against a real database; an approval end to end with
a real server, broker and agents."""

from __future__ import annotations

import pytest

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
