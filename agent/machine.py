"""The update state machine: ``step(snapshot, event) -> Step``, pure and table-driven (Mender's daemon is the model).

The whole wiring is the transition table below. Every failure before the switch leaves the previous model serving
(it never stopped); a failure during the switch restores the previous slot. The driver (``agent.updater``) journals
the new snapshot to disk *before* it performs the step's actions, so a restart replays ``RESTART`` in the journaled
state and either resumes or rolls back:

    idle ──offer──▶ downloading ──downloaded──▶ staging ──staged──▶ probing ──probe_passed──▶ activating
                                                                      │ window_closed              ▲
                                                                      ▼                            │ window_open
                                                                  scheduled ───────────────────────┘
                        │                          │                   │                          │
                        └────────── failed ────────┴───────────────────┘                     switched / failed
                                      ▼                                                       ▼          ▼
                                    failed ◀──────── rolled_back ──── rolling_back      committed   rolling_back
                                      │ reported                                          │ reported
                                      ▼                                                   ▼
                                     idle                                                idle

The previous model is served until the switch, so a failed download, stage or probe needs no rollback at all.
An update with maintenance windows (fleet_protocol.windows) that passes its probe outside them waits in
``scheduled`` (nothing runs there: restarts in it count toward neither guard) until the driver sees a window open.
A download that waits on the link policy (metered, budget) has its restart count reset by the driver whenever it
reports the hold, so nightly reboots during a week-long budgeted download are not a crash loop.
Guards: a job that keeps crashing the agent (more than ``MAX_RESTARTS`` restarts in one state) is failed or rolled
back instead of retried forever, and a job that takes more than ``MAX_TRANSITIONS`` steps is stopped as a loop.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import StrEnum

from fleet_protocol.vocabulary import Reason, UpdateState

# One vocabulary: the machine's states are the protocol's update states (what an ``update_event`` reports), so
# the two cannot drift. ``UpdateState.REJECTED`` and ``UpdateState.ROLLED_BACK`` are report-only: no transition
# leads to them, and ``MACHINE_STATES`` lists the ones a journal can hold.
State = UpdateState
MACHINE_STATES = frozenset(State) - {State.REJECTED, State.ROLLED_BACK}


class Event(StrEnum):
    OFFER = "offer"  # a verified offer for a new job
    DOWNLOADED = "downloaded"
    STAGED = "staged"
    PROBE_PASSED = "probe_passed"
    WINDOW_CLOSED = "window_closed"  # the probe passed outside the update's maintenance windows
    WINDOW_OPEN = "window_open"  # a window opened: switch now
    SWITCHED = "switched"
    ROLLED_BACK = "rolled_back"
    REPORTED = "reported"
    FAILED = "failed"  # the current step failed; the event carries the reason
    ROLLBACK_ORDER = "rollback_order"  # from the server
    RESTART = "restart"  # the agent started with this snapshot journaled


class Action(StrEnum):
    FETCH = "fetch"  # request missing chunks / resume the HTTP download
    STAGE = "stage"
    PROBE = "probe"
    SWITCH = "switch"
    RESTORE_PREVIOUS = "restore_previous"
    REPORT_PROGRESS = "report_progress"
    REPORT_OK = "report_ok"
    REPORT_FAILED = "report_failed"
    CLEANUP = "cleanup"  # drop download and staging leftovers of this job
    REJECT_BUSY = "reject_busy"  # an offer for another job arrived mid-update


BUSY = frozenset({State.DOWNLOADING, State.STAGING, State.PROBING, State.SCHEDULED, State.ACTIVATING,
                  State.COMMITTED, State.ROLLING_BACK, State.FAILED})
MAX_RESTARTS = 3
MAX_TRANSITIONS = 64

S, E, A = State, Event, Action
# (state, event) → (next state, actions). Anything not listed is ignored (a late or duplicate event).
TABLE: dict[tuple[State, Event], tuple[State, tuple[Action, ...]]] = {
    (S.IDLE, E.OFFER): (S.DOWNLOADING, (A.REPORT_PROGRESS, A.FETCH)),
    (S.DOWNLOADING, E.DOWNLOADED): (S.STAGING, (A.REPORT_PROGRESS, A.STAGE)),
    (S.STAGING, E.STAGED): (S.PROBING, (A.REPORT_PROGRESS, A.PROBE)),
    (S.PROBING, E.PROBE_PASSED): (S.ACTIVATING, (A.SWITCH,)),
    (S.PROBING, E.WINDOW_CLOSED): (S.SCHEDULED, (A.REPORT_PROGRESS,)),
    (S.SCHEDULED, E.WINDOW_OPEN): (S.ACTIVATING, (A.SWITCH,)),
    (S.ACTIVATING, E.SWITCHED): (S.COMMITTED, (A.REPORT_OK, A.CLEANUP)),
    (S.COMMITTED, E.REPORTED): (S.IDLE, ()),
    # failures: before the switch nothing to undo; during it, restore
    (S.DOWNLOADING, E.FAILED): (S.FAILED, (A.CLEANUP, A.REPORT_FAILED)),
    (S.STAGING, E.FAILED): (S.FAILED, (A.CLEANUP, A.REPORT_FAILED)),
    (S.PROBING, E.FAILED): (S.FAILED, (A.CLEANUP, A.REPORT_FAILED)),
    (S.SCHEDULED, E.FAILED): (S.FAILED, (A.CLEANUP, A.REPORT_FAILED)),
    (S.ACTIVATING, E.FAILED): (S.ROLLING_BACK, (A.RESTORE_PREVIOUS,)),
    (S.ROLLING_BACK, E.ROLLED_BACK): (S.FAILED, (A.CLEANUP, A.REPORT_FAILED)),
    (S.ROLLING_BACK, E.FAILED): (S.FAILED, (A.CLEANUP, A.REPORT_FAILED)),  # nothing left to restore
    (S.FAILED, E.REPORTED): (S.IDLE, ()),
    # the server orders a rollback: of the committed model when idle, or of the update in progress
    (S.IDLE, E.ROLLBACK_ORDER): (S.ROLLING_BACK, (A.RESTORE_PREVIOUS,)),
    (S.DOWNLOADING, E.ROLLBACK_ORDER): (S.FAILED, (A.CLEANUP, A.REPORT_FAILED)),
    (S.STAGING, E.ROLLBACK_ORDER): (S.FAILED, (A.CLEANUP, A.REPORT_FAILED)),
    (S.PROBING, E.ROLLBACK_ORDER): (S.FAILED, (A.CLEANUP, A.REPORT_FAILED)),
    (S.SCHEDULED, E.ROLLBACK_ORDER): (S.FAILED, (A.CLEANUP, A.REPORT_FAILED)),
    (S.ACTIVATING, E.ROLLBACK_ORDER): (S.ROLLING_BACK, (A.RESTORE_PREVIOUS,)),
    # a restart resumes the journaled state; every step is idempotent
    (S.IDLE, E.RESTART): (S.IDLE, ()),
    (S.DOWNLOADING, E.RESTART): (S.DOWNLOADING, (A.FETCH,)),
    (S.STAGING, E.RESTART): (S.STAGING, (A.STAGE,)),
    (S.PROBING, E.RESTART): (S.PROBING, (A.PROBE,)),
    (S.SCHEDULED, E.RESTART): (S.SCHEDULED, (A.REPORT_PROGRESS,)),
    (S.ACTIVATING, E.RESTART): (S.ACTIVATING, (A.SWITCH,)),
    (S.COMMITTED, E.RESTART): (S.COMMITTED, (A.REPORT_OK, A.CLEANUP)),
    (S.ROLLING_BACK, E.RESTART): (S.ROLLING_BACK, (A.RESTORE_PREVIOUS,)),
    (S.FAILED, E.RESTART): (S.FAILED, (A.CLEANUP, A.REPORT_FAILED)),
}


@dataclass(frozen=True)
class Snapshot:
    """What the journal holds about the update in progress (the job's data lives beside it)."""

    state: State = State.IDLE
    job: str | None = None
    reason: str = Reason.OK  # a Reason value: why the job failed, if it did
    detail: str = ""
    restarts: int = 0  # restarts in the current state
    transitions: int = 0  # steps taken in this job
    ordered_rollback: bool = False  # the server asked for it: a rollback, not a failure


@dataclass(frozen=True)
class Step:
    snapshot: Snapshot
    actions: tuple[Action, ...] = ()
    ignored: bool = False  # the event meant nothing in this state


def step(snap: Snapshot, event: Event, *, job: str | None = None, reason: str = "", detail: str = "") -> Step:
    """The next snapshot and the actions to perform (after journaling it). ``job`` names the offer's job for OFFER
    and the order's job for ROLLBACK_ORDER; ``reason`` / ``detail`` describe a FAILED event."""
    if event is Event.OFFER:
        if snap.state in BUSY:
            if job == snap.job:
                return Step(snap, ignored=True)  # QoS 1 redelivery of the offer being worked on
            return Step(snap, (Action.REJECT_BUSY,))
        nxt, actions = TABLE[(snap.state, event)]
        return Step(Snapshot(state=nxt, job=job, transitions=1), actions)
    key = (snap.state, event)
    if key not in TABLE:
        return Step(snap, ignored=True)
    nxt, actions = TABLE[key]
    new = replace(snap, state=nxt, transitions=snap.transitions + 1,
                  restarts=snap.restarts if nxt is snap.state else 0)  # restarts count per state
    if event is Event.FAILED:
        new = replace(new, reason=reason or Reason.INTERNAL, detail=detail)
    elif event is Event.ROLLBACK_ORDER:
        if snap.state is State.IDLE:
            new = replace(new, job=job, restarts=0, transitions=1)
        new = replace(new, reason=Reason.ROLLED_BACK, detail=detail or "rollback ordered by the server",
                      ordered_rollback=True)
    elif event is Event.RESTART:
        new = replace(new, restarts=snap.restarts + 1)
        if snap.state is State.SCHEDULED:  # waiting is not work: reboots there count toward no guard
            new = replace(new, restarts=0, transitions=snap.transitions)
        if snap.state not in (State.IDLE, State.SCHEDULED) and new.restarts > MAX_RESTARTS:
            return _guard(new, f"the agent restarted {new.restarts} times during this job in state "
                               f"{snap.state.value}")
    if nxt is State.IDLE:
        new = Snapshot()
    elif new.transitions > MAX_TRANSITIONS:
        return _guard(new, f"more than {MAX_TRANSITIONS} steps in one job (loop guard)")
    return Step(new, actions)


def _guard(snap: Snapshot, detail: str) -> Step:
    """Stop a job that loops or keeps crashing the agent. Each guard moves one step closer to idle, so the guard
    itself cannot loop: activating → rolling back → failed → idle (giving up the report, not the device)."""
    fresh = replace(snap, restarts=0)
    if snap.state is State.ACTIVATING:
        return Step(replace(fresh, state=State.ROLLING_BACK, reason=Reason.INTERNAL, detail=detail),
                    (Action.RESTORE_PREVIOUS,))
    if snap.state in (State.FAILED, State.COMMITTED):
        return Step(Snapshot(), ())
    if snap.state is State.ROLLING_BACK:
        return Step(replace(fresh, state=State.FAILED, detail=f"{snap.detail}; {detail}".strip("; ")),
                    (Action.CLEANUP, Action.REPORT_FAILED))
    return Step(replace(fresh, state=State.FAILED, reason=Reason.INTERNAL, detail=detail),
                (Action.CLEANUP, Action.REPORT_FAILED))
