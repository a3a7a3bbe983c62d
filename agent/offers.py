"""Admitting an offer: root rotations, signed update metadata, scope, probe data and format are checked before the
job exists, and the device's trust state (root, highest update version) advances only with an admitted offer.

python-tuf's rule: a verifier works on a candidate, and the trusted state is replaced on the last line, after every
check and after the driver journaled the job together with the new trust state (``Admission.trust_record`` goes
into the same transaction as the journal).
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass

from agent import probe as probing
from agent.job import Job, StepFailed
from fleet_protocol.errors import (
    ChunkError,
    DecryptError,
    DeltaError,
    ExpiredError,
    MalformedError,
    MixAndMatchError,
    ProtocolError,
    RollbackError,
    SignatureError,
    TargetMismatchError,
    ThresholdError,
    UntrustedKeyError,
)
from fleet_protocol.messages import UpdateOffer
from fleet_protocol.metadata import UpdateVerifier, VerifiedUpdate
from fleet_protocol.vocabulary import Reason
from fleet_runtime.runtimes import RuntimeLoadError

SERVED_FORMATS = ("onnx-int8", "tflite-int8")

REASONS: list[tuple[type[Exception], Reason]] = [
    (UntrustedKeyError, Reason.BAD_SIGNATURE), (SignatureError, Reason.BAD_SIGNATURE),
    (ThresholdError, Reason.BAD_SIGNATURE), (RollbackError, Reason.ROLLBACK_ATTACK), (ExpiredError, Reason.EXPIRED),
    (MixAndMatchError, Reason.WRONG_DEVICE), (TargetMismatchError, Reason.HASH_MISMATCH),
    (ChunkError, Reason.HASH_MISMATCH), (DeltaError, Reason.DELTA_FAILED), (DecryptError, Reason.DECRYPT_FAILED),
    (MalformedError, Reason.MALFORMED), (probing.ProbeDataError, Reason.MALFORMED),
    (RuntimeLoadError, Reason.LOAD_FAILED),
]


# What an offer's checks raise for bad data (anything else is a bug, logged by the driver).
REFUSALS = (ProtocolError, probing.ProbeDataError, StepFailed)


def reason_for(e: Exception) -> Reason:
    """The reason code the server hears for an error (its most specific family first)."""
    if isinstance(e, StepFailed):
        return e.reason
    return next((r for cls, r in REASONS if isinstance(e, cls)), Reason.INTERNAL)


@dataclass(frozen=True)
class Scope:
    device_id: str
    profile: str
    cohort: str | None


@dataclass(frozen=True)
class Admission:
    """An admitted offer: the job to journal, and the trust state it moves the device to."""

    job: Job
    verifier: UpdateVerifier

    @property
    def trust_record(self) -> dict[str, bytes]:
        return {"root": self.verifier.root_bytes, "update_version": str(self.verifier.update_version).encode()}


class Offers:
    """The device's trust state and the checks every offer passes before it becomes a job."""

    def __init__(self, scope: Scope, *, root: bytes, update_version: int):
        self.scope = scope
        self.verifier = self._verifier(root, update_version)
        self._verified: tuple[str, VerifiedUpdate] | None = None

    def _verifier(self, root: bytes, update_version: int) -> UpdateVerifier:
        return UpdateVerifier(root, device_id=self.scope.device_id, profile=self.scope.profile,
                              cohort=self.scope.cohort, update_version=update_version)

    def admit(self, offer: UpdateOffer, *, previous_slot: str | None) -> Admission:
        """Check ``offer`` on a copy of the trust state; raises (ProtocolError, ProbeDataError, StepFailed) and
        changes nothing when any check fails."""
        candidate = self._verifier(self.verifier.root_bytes, self.verifier.update_version)
        for root in offer.roots:
            if root != candidate.root_bytes:
                candidate.update_root(root)
        verified = candidate.verify_update(offer.metadata)
        _check_probe(offer, verified)
        if verified.spec.artifact.format not in SERVED_FORMATS:
            raise StepFailed(Reason.MALFORMED, f"artifact format {verified.spec.artifact.format} is not served "
                                               "by the agent")
        job = Job(id=offer.job, metadata=offer.metadata, probe=offer.probe, url=offer.url,
                  previous_slot=previous_slot, received=time.time())
        return Admission(job, candidate)

    def adopt(self, admission: Admission) -> None:
        """Trust what ``admission`` verified: called once the driver has journaled it."""
        self.verifier = admission.verifier

    def verified(self, job: Job) -> VerifiedUpdate:
        """The journaled offer's metadata, verified again (signature and scope) without advancing the version: once
        per job in this process (fetch, stage and probe all need it; after a restart it is checked afresh)."""
        if self._verified is None or self._verified[0] != job.id:
            if job.metadata is None or job.id is None:
                raise StepFailed(Reason.INTERNAL, "the journaled job carries no update metadata")
            self._verified = (job.id, self._verifier(self.verifier.root_bytes, 0).verify_update(job.metadata))
        return self._verified[1]


def _check_probe(offer: UpdateOffer, verified: VerifiedUpdate) -> None:
    if offer.probe is None:
        raise StepFailed(Reason.MALFORMED, "the offer carries no probe data")
    if hashlib.sha256(offer.probe).hexdigest() != verified.spec.probe.inputs_sha256:
        raise StepFailed(Reason.HASH_MISMATCH, "probe data does not match its signed sha256")
    probing.read_golden(offer.probe)

