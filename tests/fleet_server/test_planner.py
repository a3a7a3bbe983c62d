"""The planner and the gates are pure: table tests for each rule, hypothesis for the invariants."""

from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleet_server.rollouts.gates import Evidence, Gates, LatencyHistogram, evaluate, merge, quantile
from fleet_server.rollouts.planner import (
    Member,
    MemberStatus,
    RolloutState,
    Strategy,
    Verdict,
    View,
    plan,
)

P, OFF, INS, F = MemberStatus.PENDING, MemberStatus.OFFERED, MemberStatus.INSTALLED, MemberStatus.FAILED


def fleet(n, status=P, **kw):
    return [Member(f"d{i:03d}", status, **kw) for i in range(n)]


@pytest.mark.parametrize(("canary", "waves", "n", "targets"), [
    (10, (50, 100), 20, (2, 10, 20)),
    (10, (50,), 20, (2, 10, 20)),  # 100 is implied
    (1, (25, 50), 7, (1, 2, 4, 7)),  # at least one device per stage
    (50, (10, 60), 4, (2, 3, 4)),  # a wave below the canary share is dropped
    (100, (), 3, (3,)),
    (10, (50,), 0, (0, 0, 0)),
])
def test_stage_targets(canary, waves, n, targets):
    assert Strategy(canary_percent=canary, waves_percent=waves).targets(n) == targets


def test_bad_strategies_are_refused():
    for kw in ({"canary_percent": 0}, {"waves_percent": (50, 20)}, {"rate_per_minute": 0}, {"soak_s": -1}):
        with pytest.raises(ValueError):
            Strategy(**kw)


def test_canary_then_waves_with_soak():
    s = Strategy(canary_percent=10, waves_percent=(50,), soak_s=30)
    p = plan(View(RolloutState.RUNNING, 0, fleet(20), now=0), s)
    assert p.offer == ("d000", "d001") and p.stage == 0
    members = [Member(m.device_id, INS if m.device_id in p.offer else P, offered_at=0) for m in fleet(20)]
    p = plan(View(RolloutState.RUNNING, 0, members, now=10), s)
    assert p.offer == () and p.stage == 0 and p.stage_finished_at == 10  # soaking
    p = plan(View(RolloutState.RUNNING, 0, members, now=20, stage_finished_at=10), s)
    assert p.offer == () and "soaking" in p.notes[0]
    p = plan(View(RolloutState.RUNNING, 0, members, now=40, stage_finished_at=10), s)
    assert p.stage == 1 and len(p.offer) == 8 and p.offer[0] == "d002"


def test_an_unfinished_stage_waits_and_a_wait_verdict_holds_it():
    s = Strategy(canary_percent=10, waves_percent=(50,))
    members = [replace(m, status=OFF, offered_at=0) if i < 2 else m for i, m in enumerate(fleet(20))]
    assert plan(View(RolloutState.RUNNING, 0, members, now=5), s).stage == 0
    done = [replace(m, status=INS) if m.status is OFF else m for m in members]
    held = plan(View(RolloutState.RUNNING, 0, done, now=5, verdict=Verdict.WAIT), s)
    assert held.stage == 0 and held.offer == () and "waiting" in held.notes[0]


def test_a_failed_gate_stops_offers_at_once():
    p = plan(View(RolloutState.RUNNING, 1, fleet(20), now=0, verdict=Verdict.FAIL), Strategy())
    assert p.offer == () and p.halt


def test_only_running_rollouts_offer():
    for state in (RolloutState.DRAFT, RolloutState.PAUSED, RolloutState.ABORTED, RolloutState.COMPLETED):
        assert plan(View(state, 0, fleet(5), now=0), Strategy()).offer == ()


def test_rate_limit_defers_and_skipped_members_do_not_count():
    s = Strategy(canary_percent=100, waves_percent=(), rate_per_minute=3)
    members = [*fleet(5), Member("zz", MemberStatus.SKIPPED)]
    p = plan(View(RolloutState.RUNNING, 0, members, now=0), s)
    assert len(p.offer) == 3 and "rate limit" in p.notes[0]
    after = [replace(m, status=OFF, offered_at=0) if m.device_id in p.offer else m for m in members]
    assert plan(View(RolloutState.RUNNING, 0, after, now=59), s).offer == ()
    assert len(plan(View(RolloutState.RUNNING, 0, after, now=60.5), s).offer) == 2


def test_complete_when_the_last_stage_finished_and_late_joiners_are_offered():
    s = Strategy(canary_percent=50, waves_percent=())
    members = fleet(4, INS, offered_at=0)
    p = plan(View(RolloutState.RUNNING, 1, members, now=100), s)
    assert p.complete and p.offer == ()
    p = plan(View(RolloutState.RUNNING, 1, [*members, Member("late", P)], now=100), s)
    assert p.offer == ("late",) and not p.complete


def test_online_devices_go_first():
    members = [Member("a", P, online=False), Member("b", P), Member("c", P, online=False), Member("d", P)]
    s = Strategy(canary_percent=50, waves_percent=())
    assert plan(View(RolloutState.RUNNING, 0, members, now=0), s).offer == ("b", "d")


def test_stragglers_do_not_block_a_stage_past_its_timeout():
    s = Strategy(canary_percent=50, waves_percent=(), stage_timeout_s=60)
    members = [Member("a", INS, offered_at=0), Member("b", OFF, offered_at=0, online=False), *fleet(2)]
    assert plan(View(RolloutState.RUNNING, 0, members, now=30), s).stage == 0
    assert plan(View(RolloutState.RUNNING, 0, members, now=61), s).stage == 1


@settings(max_examples=150, deadline=None)
@given(n=st.integers(0, 60), canary=st.floats(1, 100), rate=st.integers(1, 30),
       waves=st.lists(st.floats(1, 100), max_size=3).map(lambda w: tuple(sorted(w))),
       outcomes=st.lists(st.sampled_from(["installed", "failed", "stay"]), min_size=60, max_size=60),
       fail_at=st.one_of(st.none(), st.integers(0, 40)))
def test_invariants_over_simulated_rollouts(n, canary, rate, waves, outcomes, fail_at):
    """Driven step by step: never an offer twice, never above the rate in any 60 s, nothing after a failed gate,
    stages only move forward, and without a failure the rollout completes."""
    s = Strategy(canary_percent=canary, waves_percent=waves, rate_per_minute=rate, stage_timeout_s=300)
    members = {m.device_id: m for m in fleet(n)}
    offers: list[tuple[float, str]] = []
    stage, finished_at, now = 0, None, 0.0
    complete = False
    for step in range(1000):  # 10 s steps: even 60 devices at 1 per minute finish inside
        now = step * 10.0
        verdict = Verdict.FAIL if fail_at is not None and step >= fail_at else Verdict.PASS
        p = plan(View(RolloutState.RUNNING, stage, list(members.values()), now, verdict, finished_at), s)
        if verdict is Verdict.FAIL:
            assert p.offer == () and p.halt
            break
        assert p.stage >= stage
        stage, finished_at = p.stage, p.stage_finished_at
        for d in p.offer:
            assert members[d].status is P, f"{d} offered twice"
            members[d] = replace(members[d], status=OFF, offered_at=now)
            offers.append((now, d))
        for d, m in members.items():  # devices that were offered finish a step later
            if m.status is OFF and m.offered_at < now:
                outcome = outcomes[int(d[1:]) % len(outcomes)]
                if outcome != "stay" or now - m.offered_at > 400:
                    members[d] = replace(m, status=INS if outcome != "failed" else F, finished_at=now)
        if p.complete:
            complete = True
            break
    times = [t for t, _ in offers]
    for t in times:
        assert sum(1 for u in times if t - 60 < u <= t) <= rate
    if fail_at is None:
        assert complete and all(m.status in (INS, F) for m in members.values())


def hist(counts, edges=(0.0, 1.0, 2.0, 4.0, 8.0)):
    return LatencyHistogram(edges, tuple(counts))


def test_histogram_merge_and_quantiles():
    h = merge([hist((10, 0, 0, 0)), hist((0, 10, 0, 0)), LatencyHistogram((0.0, 5.0), (3,))])
    assert h.counts == (10, 10, 0, 0)  # differing edges are skipped
    assert quantile(h, 0.5) == pytest.approx(1.0) and quantile(h, 0.99) == pytest.approx(1.98)
    assert quantile(hist((0, 0, 0, 0)), 0.99) is None and merge([]) is None


@pytest.mark.parametrize(("gates", "ev", "verdict", "says"), [
    (Gates(), Evidence(0, 0), Verdict.WAIT, "finished devices needed"),
    (Gates(min_finished=2), Evidence(2, 1), Verdict.FAIL, "update failures 1/2"),
    (Gates(max_failure_share=0.5, min_finished=2), Evidence(2, 1), Verdict.PASS, "all gates pass"),
    (Gates(max_error_rate=0.01), Evidence(5, 0, requests_after=10, errors_after=5), Verdict.WAIT, "error rate"),
    (Gates(max_error_rate=0.01), Evidence(5, 0, requests_after=100, errors_after=5), Verdict.FAIL, "error rate 5.00%"),
    (Gates(max_p99_ratio=1.5), Evidence(5, 0, latency_before=hist((100, 0, 0, 0)),
                                        latency_after=hist((0, 0, 100, 0))), Verdict.FAIL, "p99 latency"),
    (Gates(max_p99_ratio=1.5), Evidence(5, 0, latency_before=hist((100, 0, 0, 0)),
                                        latency_after=hist((100, 0, 0, 0))), Verdict.PASS, "all gates pass"),
    (Gates(max_p99_ratio=1.5), Evidence(5, 0, latency_before=None, latency_after=hist((100, 0, 0, 0))),
     Verdict.WAIT, "latency samples"),
    (Gates(min_fidelity=0.99), Evidence(5, 0, fidelity=0.95), Verdict.FAIL, "fidelity"),
])
def test_gate_table(gates, ev, verdict, says):
    e = evaluate(gates, ev)
    assert e.verdict is verdict and says in " ".join(e.reasons)
