"""How a device's update events move its rollout member: ``next_status(status, state, result)``, pure and
table-driven, in the protocol's words (fleet_protocol.vocabulary) and the planner's member statuses.

The rules, each learnt the hard way:
- statuses only move forward: a redelivered or late event never moves a device backwards;
- a device reports only on a job it was offered: a never-offered (pending, skipped) member ignores every event, or a
  device that guessed its job id could mark itself installed, or abort a rollout by reporting a failure;
- after installing, only the outcome of a rollback order changes a member; a failed rollback attempt leaves the
  device on the new version, so it stays visible as installed;
- failed and rolled back are final.
"""

from __future__ import annotations

from fleet_protocol.vocabulary import UpdateResult, UpdateState
from fleet_server.rollouts.planner import MemberStatus

M = MemberStatus
# Members that may report at all, and what a report can turn each into.
_CAN_REPORT = {M.OFFERED, M.DOWNLOADING, M.INSTALLED}
_RANK = {M.PENDING: 0, M.OFFERED: 1, M.DOWNLOADING: 2, M.INSTALLED: 3, M.FAILED: 3, M.ROLLED_BACK: 4}


def outcome(state: UpdateState, result: UpdateResult) -> MemberStatus:
    """What an event says about the member, before the member's current status is considered."""
    if result is UpdateResult.OK:
        return M.ROLLED_BACK if state is UpdateState.ROLLED_BACK else M.INSTALLED if \
            state is UpdateState.COMMITTED else M.DOWNLOADING
    if result is UpdateResult.FAILED:
        return M.FAILED
    return M.DOWNLOADING  # progress


def next_status(status: MemberStatus, state: UpdateState, result: UpdateResult) -> MemberStatus | None:
    """The member's new status after this event, or None when the event changes nothing (ignored)."""
    if status not in _CAN_REPORT:
        return None
    new = outcome(state, result)
    if status is M.INSTALLED:
        return M.ROLLED_BACK if new is M.ROLLED_BACK else None
    if new is status or _RANK[new] < _RANK[status]:
        return None
    return new


def may_report(status: MemberStatus) -> bool:
    """Whether a member in ``status`` can have sent any update event (else the event is forged or misdirected)."""
    return status in _CAN_REPORT
