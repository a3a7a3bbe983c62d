"""The rollout planner: a pure function from what is known (members and their statuses, the strategy, the clock, the
offers already made, the latest gate verdict) to what to do next (devices to offer now, the stage to move to, a
halt). It touches nothing; the engine journals its decisions, then publishes.

Stages: stage 0 is the canary, then one stage per wave. A stage's target is a cumulative count of the rollout's
eligible members (``ceil(share × n)``, at least 1, the last stage always everyone). A stage is offered up to its
target at no more than ``rate_per_minute`` offers in any 60 s; it is finished when every device offered so far has
finished (installed, failed, rolled back) or ``stage_timeout_s`` passed since its last offer; it advances once its
soak time has passed since it finished and the gates pass on what finished. A failed gate stops new offers at once.
Within a stage, online devices are offered first.
Members that join later (enrolled or matched afterwards) are offered in the current stage's turn: while the rollout
is in its last stage at once (rate permitting), before that as part of the growing target.

Operators' controls: with ``require_approval`` each wave after the canary waits, once the rollout has moved to it,
until an operator approves that stage (``View.approved_stage``); nothing of it is offered before. With a ramp
(``ramp_factor`` > 1, ``ramp_every`` successes) the rate grows by the factor for every ``ramp_every`` devices
installed since the last failure, up to ``max_rate_per_minute``, and falls back to ``rate_per_minute`` on a failure.

Maintenance windows (``windows``, fleet_protocol.windows) constrain when devices *switch*, not when they are offered:
offers go out at once (devices download and stage), and a stage's timeout starts counting when the first window
opens at or after its newest offer: waiting for a window is not a stall.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum

from fleet_protocol import windows as maintenance
from fleet_protocol.windows import Window


class MemberStatus(StrEnum):
    PENDING = "pending"
    OFFERED = "offered"
    DOWNLOADING = "downloading"
    INSTALLED = "installed"
    FAILED = "failed"
    ROLLED_BACK = "rolled_back"
    SKIPPED = "skipped"  # no releasable artifact for its profile (never offered)


IN_FLIGHT = {MemberStatus.OFFERED, MemberStatus.DOWNLOADING}
FINISHED = {MemberStatus.INSTALLED, MemberStatus.FAILED, MemberStatus.ROLLED_BACK}


class RolloutState(StrEnum):
    DRAFT = "draft"
    RUNNING = "running"
    PAUSED = "paused"
    COMPLETED = "completed"
    ABORTED = "aborted"  # and rolled back where the rollout asked for it


@dataclass(frozen=True)
class Strategy:
    canary_percent: float = 10.0
    waves_percent: tuple[float, ...] = (50.0, 100.0)  # cumulative shares after the canary; 100 is implied last
    rate_per_minute: int = 1000
    soak_s: float = 0.0
    stage_timeout_s: float = 3600.0
    require_approval: bool = False  # each wave after the canary waits for an operator's approval
    ramp_factor: float = 1.0  # the rate's growth per ``ramp_every`` successes since the last failure
    ramp_every: int = 0  # 0: no ramp
    max_rate_per_minute: int | None = None  # the ramp's ceiling (None: no ceiling)
    windows: tuple[Window, ...] = ()  # maintenance windows: devices switch only inside one

    def __post_init__(self) -> None:
        if not 0 < self.canary_percent <= 100:
            raise ValueError("canary_percent must be in (0, 100]")
        if any(not 0 < w <= 100 for w in self.waves_percent) or list(self.waves_percent) != sorted(self.waves_percent):
            raise ValueError("waves_percent must be increasing shares in (0, 100]")
        if self.rate_per_minute < 1 or self.soak_s < 0 or self.stage_timeout_s <= 0:
            raise ValueError("rate_per_minute ≥ 1, soak_s ≥ 0, stage_timeout_s > 0")
        if self.ramp_factor < 1 or self.ramp_every < 0:
            raise ValueError("ramp_factor ≥ 1 and ramp_every ≥ 0")
        if self.max_rate_per_minute is not None and self.max_rate_per_minute < self.rate_per_minute:
            raise ValueError("max_rate_per_minute must be at least rate_per_minute")

    def rate(self, members: Sequence[Member]) -> int:
        """Offers per minute now: the base rate, grown by the ramp for the successes since the last failure."""
        if self.ramp_every <= 0 or self.ramp_factor <= 1:
            return self.rate_per_minute
        failures = [m.finished_at or 0.0 for m in members if m.status is MemberStatus.FAILED]
        since = max(failures, default=float("-inf"))
        successes = sum(1 for m in members if m.status is MemberStatus.INSTALLED and (m.finished_at or 0.0) > since)
        steps = min(successes // self.ramp_every, 64)  # beyond this any ceiling is reached
        ceiling = self.max_rate_per_minute or 1_000_000
        return int(min(ceiling, self.rate_per_minute * self.ramp_factor ** steps))

    def shares(self) -> tuple[float, ...]:
        """Cumulative share per stage, canary first, ending at 100."""
        out = [self.canary_percent, *(w for w in self.waves_percent if w > self.canary_percent)]
        if out[-1] < 100:
            out.append(100.0)
        return tuple(out)

    def targets(self, n: int) -> tuple[int, ...]:
        """Cumulative device count per stage for ``n`` eligible members (each ≥ 1 when n ≥ 1, the last = n)."""
        if n == 0:
            return tuple(0 for _ in self.shares())
        counts = [min(n, max(1, math.ceil(s * n / 100 - 1e-9))) for s in self.shares()]
        counts[-1] = n
        return tuple(counts)


@dataclass(frozen=True)
class Member:
    device_id: str
    status: MemberStatus
    offered_at: float | None = None  # when the engine journaled its offer
    finished_at: float | None = None
    online: bool = True


class Verdict(StrEnum):
    PASS = "pass"
    WAIT = "wait"  # not enough finished devices to judge yet
    FAIL = "fail"


@dataclass(frozen=True)
class View:
    state: RolloutState
    stage: int
    members: Sequence[Member]
    now: float
    verdict: Verdict = Verdict.PASS  # the gates on what has finished so far
    stage_finished_at: float | None = None  # when the current stage was first seen finished (soak runs from it)
    approved_stage: int = 0  # with require_approval: the highest stage an operator approved (the canary needs none)


@dataclass(frozen=True)
class Plan:
    offer: tuple[str, ...] = ()
    stage: int = 0  # the stage to be in after this plan
    stage_finished_at: float | None = None
    halt: bool = False  # a gate failed: the engine pauses or aborts as the rollout says
    complete: bool = False
    notes: tuple[str, ...] = field(default=())
    awaiting_approval: int | None = None  # the stage that waits for an operator
    rate: int | None = None  # offers per minute allowed now (the ramp's current rate)


def rate_budget(members: Sequence[Member], now: float, rate_per_minute: int) -> int:
    """Offers still allowed now so that no 60 s window holds more than ``rate_per_minute``."""
    recent = sum(1 for m in members if m.offered_at is not None and now - 60.0 < m.offered_at <= now)
    return max(0, rate_per_minute - recent)


def plan(view: View, strategy: Strategy) -> Plan:
    members = [m for m in view.members if m.status is not MemberStatus.SKIPPED]
    if view.state is not RolloutState.RUNNING:
        return Plan(stage=view.stage, stage_finished_at=view.stage_finished_at)
    if view.verdict is Verdict.FAIL:
        return Plan(stage=view.stage, stage_finished_at=view.stage_finished_at, halt=True,
                    notes=("a health gate failed: no new offers",))
    targets = strategy.targets(len(members))
    last = len(targets) - 1
    stage = min(view.stage, last)
    offered = [m for m in members if m.status is not MemberStatus.PENDING]
    # online devices first: a canary that cannot receive its offer tells nothing; offline ones are still offered in
    # their turn (the broker queues the offer in their persistent session)
    pending = sorted((m for m in members if m.status is MemberStatus.PENDING), key=lambda m: (not m.online,
                                                                                              m.device_id))
    notes: list[str] = []

    stage_done = len(offered) >= targets[stage] and _settled(offered, view.now, strategy.stage_timeout_s,
                                                             strategy.windows)
    finished_at: float | None = None
    if stage_done:
        finished_at = view.now if view.stage_finished_at is None else view.stage_finished_at
    if finished_at is not None and stage < last:
        if view.verdict is Verdict.WAIT:
            notes.append(f"stage {stage} finished; waiting for enough finished devices to judge the gates")
        elif view.now - finished_at >= strategy.soak_s:
            stage, finished_at = stage + 1, None
            notes.append(f"advancing to stage {stage}")
        else:
            notes.append(f"stage {stage} soaking ({strategy.soak_s - (view.now - finished_at):.0f} s left)")

    if strategy.windows and not maintenance.is_open(strategy.windows, view.now) and \
            any(m.status in IN_FLIGHT for m in offered):
        nxt = maintenance.next_open(strategy.windows, view.now)
        when = datetime.fromtimestamp(nxt, UTC).isoformat(timespec="minutes") if nxt is not None else "never"
        notes.append(f"outside the maintenance windows: devices stage now and switch when one opens (next {when})")

    rate = strategy.rate(members)
    awaiting = stage if strategy.require_approval and stage > view.approved_stage else None
    want = max(0, targets[stage] - len(offered))
    if awaiting is not None:
        if want:
            notes.append(f"stage {stage} waits for an operator's approval")
        want = 0
    n = min(want, len(pending), rate_budget(members, view.now, rate))
    chosen = tuple(m.device_id for m in pending[:n])
    if want > n and n < len(pending):
        notes.append(f"rate limit: {want - n} offer(s) deferred")
    complete = (stage == last and not pending and not chosen
                and all(m.status in FINISHED for m in offered))
    return Plan(offer=chosen, stage=stage, stage_finished_at=finished_at if not chosen else None, complete=complete,
                notes=tuple(notes), awaiting_approval=awaiting if not complete else None, rate=rate)


def _settled(offered: Sequence[Member], now: float, timeout_s: float, windows: Sequence[Window] = ()) -> bool:
    """Every offered device finished, or the newest offer is older than the stage timeout (stragglers stay
    in flight and are judged when they report). With maintenance windows the timeout counts from the first window
    that opens at or after the newest offer."""
    in_flight = [m for m in offered if m.status in IN_FLIGHT]
    if not in_flight:
        return True
    newest = max((m.offered_at or 0.0) for m in offered)
    since = newest
    if windows:
        opened = maintenance.next_open(windows, newest)
        since = opened if opened is not None else newest
    return now - since >= timeout_s
