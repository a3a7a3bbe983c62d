"""The member-status table (fleet_server/rollouts/members.py): every status × every reported state × every result."""

import itertools

import pytest

from fleet_protocol.vocabulary import UpdateResult as R
from fleet_protocol.vocabulary import UpdateState as U
from fleet_server.rollouts.members import may_report, next_status
from fleet_server.rollouts.planner import MemberStatus as M

CASES = [
    # status, reported state, result → new status (None: ignored)
    (M.OFFERED, U.DOWNLOADING, R.PENDING, M.DOWNLOADING),
    (M.OFFERED, U.COMMITTED, R.OK, M.INSTALLED),
    (M.OFFERED, U.FAILED, R.FAILED, M.FAILED),
    (M.OFFERED, U.REJECTED, R.FAILED, M.FAILED),
    (M.OFFERED, U.ROLLED_BACK, R.OK, M.ROLLED_BACK),  # an ordered rollback before the switch
    (M.DOWNLOADING, U.STAGING, R.PENDING, None),  # progress: already downloading
    (M.DOWNLOADING, U.COMMITTED, R.OK, M.INSTALLED),
    (M.DOWNLOADING, U.FAILED, R.FAILED, M.FAILED),
    (M.INSTALLED, U.ROLLED_BACK, R.OK, M.ROLLED_BACK),  # the outcome of a rollback order
    (M.INSTALLED, U.FAILED, R.FAILED, None),  # a failed rollback: still on the new version
    (M.INSTALLED, U.COMMITTED, R.OK, None),  # redelivered
    (M.INSTALLED, U.ROLLING_BACK, R.PENDING, None),
]


@pytest.mark.parametrize(("status", "state", "result", "expected"), CASES)
def test_member_transitions(status, state, result, expected):
    assert next_status(status, state, result) is expected


@pytest.mark.parametrize(("status", "state", "result"), itertools.product(M, U, R))
def test_no_event_moves_a_member_backwards_or_out_of_a_final_or_never_offered_status(status, state, result):
    new = next_status(status, state, result)
    if status in (M.PENDING, M.SKIPPED, M.FAILED, M.ROLLED_BACK):
        assert new is None  # never offered (a forged or guessed job), or final
        assert may_report(status) is (status not in (M.PENDING, M.SKIPPED, M.FAILED, M.ROLLED_BACK))
    order = [M.OFFERED, M.DOWNLOADING, M.INSTALLED, M.ROLLED_BACK]
    if new is not None and new is not M.FAILED and status in order:
        assert order.index(new) > order.index(status)
