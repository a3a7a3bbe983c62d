"""The words both sides share, as enums in one home (standard library only, so the agent's pure state machine and
the server's pure member-status table can import it): update states and results as the agent reports them, and the
reason codes of failures. Values are wire values: never rename one."""

from __future__ import annotations

from enum import StrEnum


class UpdateState(StrEnum):
    """Where an update job is, as an ``update_event`` reports it: the agent's state machine states, plus two that
    only appear in reports."""

    IDLE = "idle"
    DOWNLOADING = "downloading"  # offer verified and journaled; fetching the delta or full artifact
    STAGING = "staging"  # verify, patch, decrypt, verify target, write the inactive slot (fsync)
    PROBING = "probing"  # load the staged model beside the serving one and run the golden inputs
    SCHEDULED = "scheduled"  # staged and probed; the switch waits for a maintenance window
    ACTIVATING = "activating"  # switch the active-slot pointer (atomic rename)
    COMMITTED = "committed"  # switched; report success
    ROLLING_BACK = "rolling_back"  # point back at the previous slot
    FAILED = "failed"  # report why; the previous model is serving
    REJECTED = "rejected"  # report only: the offer was refused before any work (bad signature, busy, …)
    ROLLED_BACK = "rolled_back"  # report only: a rollback the server ordered is done


class UpdateResult(StrEnum):
    PENDING = "pending"  # progress; the job goes on
    OK = "ok"
    FAILED = "failed"


class Reason(StrEnum):
    """Why an update step failed (or, on a progress event, why it waits); the server's health gates and dashboards
    key on these."""

    OK = "ok"
    BAD_SIGNATURE = "bad_signature"
    ROLLBACK_ATTACK = "rollback_attack"
    EXPIRED = "expired"
    WRONG_DEVICE = "wrong_device"
    MALFORMED = "malformed"
    HASH_MISMATCH = "hash_mismatch"
    DELTA_FAILED = "delta_failed"
    DOWNLOAD_FAILED = "download_failed"
    DECRYPT_FAILED = "decrypt_failed"
    LOAD_FAILED = "load_failed"
    PROBE_FAILED = "probe_failed"
    DISK_FULL = "disk_full"
    ROLLED_BACK = "rolled_back"
    INTERNAL = "internal"
    SUPERSEDED = "superseded"  # a newer verified offer replaced a job that waited for its maintenance window
    MEMORY_BUDGET = "memory_budget"  # the models loaded plus the new artifact would exceed the profile's budget
    # progress, not failure: the job waits (issue 17: metered links, maintenance windows)
    METERED = "metered"  # the integrator's condition says the link is metered
    DATA_BUDGET = "data_budget"  # today's download budget is spent
    WINDOW = "maintenance_window"  # staged; the switch waits for a maintenance window


WAITING_REASONS = frozenset({Reason.METERED, Reason.DATA_BUDGET, Reason.WINDOW})
