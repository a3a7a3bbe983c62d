"""The update state machine, exhaustively: every table row, the failure paths, restarts and guards."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.machine import (
    BUSY,
    MACHINE_STATES,
    MAX_RESTARTS,
    MAX_TRANSITIONS,
    TABLE,
    Action,
    Event,
    Snapshot,
    State,
    step,
)
from fleet_protocol.vocabulary import UpdateState

HAPPY = [Event.DOWNLOADED, Event.STAGED, Event.PROBE_PASSED, Event.SWITCHED, Event.REPORTED]


def run(events, snap=None):
    snap = snap or Snapshot()
    actions = []
    for e in events:
        kw = {"job": "j1"} if e in (Event.OFFER, Event.ROLLBACK_ORDER) else {}
        s = step(snap, e, **kw)
        snap = s.snapshot
        actions.append(s.actions)
    return snap, actions


def test_happy_path_visits_every_state_in_order_and_ends_idle():
    snap = Snapshot()
    seen = []
    for e in [Event.OFFER, *HAPPY]:
        s = step(snap, e, job="j1")
        snap = s.snapshot
        seen.append((snap.state, s.actions))
    assert seen == [
        (State.DOWNLOADING, (Action.REPORT_PROGRESS, Action.FETCH)),
        (State.STAGING, (Action.REPORT_PROGRESS, Action.STAGE)),
        (State.PROBING, (Action.REPORT_PROGRESS, Action.PROBE)),
        (State.ACTIVATING, (Action.SWITCH,)),
        (State.COMMITTED, (Action.REPORT_OK, Action.CLEANUP)),
        (State.IDLE, ()),
    ]
    assert snap == Snapshot()


@pytest.mark.parametrize("state", [State.DOWNLOADING, State.STAGING, State.PROBING])
def test_failure_before_the_switch_needs_no_rollback(state):
    s = step(Snapshot(state=state, job="j1"), Event.FAILED, reason="probe_failed", detail="cosine 0.2")
    assert s.snapshot.state is State.FAILED and s.actions == (Action.CLEANUP, Action.REPORT_FAILED)
    assert (s.snapshot.reason, s.snapshot.detail) == ("probe_failed", "cosine 0.2")
    assert Action.RESTORE_PREVIOUS not in s.actions
    assert step(s.snapshot, Event.REPORTED).snapshot == Snapshot()


def test_failure_during_the_switch_restores_the_previous_slot():
    s = step(Snapshot(state=State.ACTIVATING, job="j1"), Event.FAILED, reason="internal")
    assert s.snapshot.state is State.ROLLING_BACK and s.actions == (Action.RESTORE_PREVIOUS,)
    s = step(s.snapshot, Event.ROLLED_BACK)
    assert s.snapshot.state is State.FAILED and s.actions == (Action.CLEANUP, Action.REPORT_FAILED)


def test_rollback_order_when_idle_restores_and_reports_as_ordered():
    s = step(Snapshot(), Event.ROLLBACK_ORDER, job="r1")
    assert s.snapshot.state is State.ROLLING_BACK and s.snapshot.ordered_rollback and s.snapshot.job == "r1"
    s = step(s.snapshot, Event.ROLLED_BACK)
    assert s.snapshot.reason == "rolled_back" and Action.REPORT_FAILED in s.actions


@pytest.mark.parametrize("state", sorted(BUSY - {State.ACTIVATING, State.COMMITTED, State.ROLLING_BACK,
                                                 State.FAILED}))
def test_rollback_order_mid_update_aborts_it(state):
    s = step(Snapshot(state=state, job="j1"), Event.ROLLBACK_ORDER, job="j1")
    assert s.snapshot.state is State.FAILED and s.snapshot.reason == "rolled_back"


@pytest.mark.parametrize("state", sorted(BUSY))
def test_offers_while_busy_are_refused_or_deduplicated(state):
    snap = Snapshot(state=state, job="j1")
    assert step(snap, Event.OFFER, job="j1").ignored  # QoS 1 redelivery
    s = step(snap, Event.OFFER, job="j2")
    assert s.snapshot == snap and s.actions == (Action.REJECT_BUSY,)


def test_the_machine_speaks_the_protocols_vocabulary():
    assert State is UpdateState  # one enum: what the journal holds is what an update_event reports
    assert {s for s, _ in TABLE} | {nxt for nxt, _ in TABLE.values()} == MACHINE_STATES
    assert set(State) - MACHINE_STATES == {UpdateState.REJECTED, UpdateState.ROLLED_BACK}  # report-only


@pytest.mark.parametrize("state", sorted(MACHINE_STATES))
def test_restart_resumes_every_state_idempotently(state):
    snap = Snapshot(state=state, job=None if state is State.IDLE else "j1")
    s = step(snap, Event.RESTART)
    assert s.snapshot.state is state
    expected = {State.IDLE: (), State.DOWNLOADING: (Action.FETCH,), State.STAGING: (Action.STAGE,),
                State.PROBING: (Action.PROBE,), State.SCHEDULED: (Action.REPORT_PROGRESS,),
                State.ACTIVATING: (Action.SWITCH,),
                State.COMMITTED: (Action.REPORT_OK, Action.CLEANUP),
                State.ROLLING_BACK: (Action.RESTORE_PREVIOUS,), State.FAILED: (Action.CLEANUP, Action.REPORT_FAILED)}
    assert s.actions == expected[state]


@pytest.mark.parametrize("state,after", [
    (State.DOWNLOADING, State.FAILED), (State.STAGING, State.FAILED), (State.PROBING, State.FAILED),
    (State.ACTIVATING, State.ROLLING_BACK), (State.ROLLING_BACK, State.FAILED), (State.FAILED, State.IDLE),
    (State.COMMITTED, State.IDLE)])
def test_a_job_that_keeps_crashing_the_agent_is_stopped(state, after):
    snap = Snapshot(state=state, job="j1")
    for _ in range(MAX_RESTARTS):
        snap = step(snap, Event.RESTART).snapshot
        assert snap.state is state
    s = step(snap, Event.RESTART)
    assert s.snapshot.state is after
    if after is State.FAILED and state is not State.ROLLING_BACK:
        assert s.snapshot.reason == "internal" and "restarted" in s.snapshot.detail


def test_window_a_probe_passed_outside_the_windows_waits_scheduled_then_switches():
    s = step(Snapshot(state=State.PROBING, job="j1", transitions=3), Event.WINDOW_CLOSED)
    assert s.snapshot.state is State.SCHEDULED and s.actions == (Action.REPORT_PROGRESS,)
    snap = s.snapshot
    for _ in range(MAX_TRANSITIONS * 2):  # nothing runs while scheduled: nightly reboots are not a crash loop
        snap = step(snap, Event.RESTART).snapshot
        assert snap.state is State.SCHEDULED and snap.restarts == 0 and snap.transitions == 4
    s = step(snap, Event.WINDOW_OPEN)
    assert s.snapshot.state is State.ACTIVATING and s.actions == (Action.SWITCH,)
    assert step(Snapshot(state=State.PROBING, job="j1"), Event.WINDOW_OPEN).ignored  # only a scheduled job opens
    order = step(snap, Event.ROLLBACK_ORDER, job="j1")  # the server cancels it: nothing was switched
    assert order.snapshot.state is State.FAILED and Action.RESTORE_PREVIOUS not in order.actions


def test_progress_resets_the_restart_count():
    snap = step(Snapshot(state=State.DOWNLOADING, job="j1", restarts=MAX_RESTARTS), Event.DOWNLOADED).snapshot
    assert snap.state is State.STAGING and snap.restarts == 0


def test_loop_guard_stops_a_job_with_too_many_steps():
    snap = Snapshot(state=State.DOWNLOADING, job="j1", transitions=MAX_TRANSITIONS)
    s = step(snap, Event.DOWNLOADED)
    assert s.snapshot.state is State.FAILED and "loop guard" in s.snapshot.detail


def test_unknown_pairs_are_ignored_not_fatal():
    for state in State:
        for event in Event:
            if (state, event) not in TABLE and event is not Event.OFFER:
                s = step(Snapshot(state=state, job="j1"), event)
                assert s.ignored and s.snapshot.state is state and s.actions == ()


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(list(Event)), max_size=80))
def test_any_event_sequence_keeps_the_invariants(events):
    """No sequence of events can switch without a passed probe, or leave idle holding a job."""
    snap = Snapshot()
    probed = False
    for e in events:
        s = step(snap, e, job="j1" if e is not Event.ROLLBACK_ORDER else "r1", reason="internal")
        if e is Event.PROBE_PASSED and not s.ignored:
            probed = True
        if Action.SWITCH in s.actions:
            assert probed  # also when a restart re-applies the switch
        if s.snapshot.state is State.IDLE:
            assert s.snapshot == Snapshot()
            probed = False
        assert s.snapshot.transitions <= MAX_TRANSITIONS + 1
        snap = s.snapshot
