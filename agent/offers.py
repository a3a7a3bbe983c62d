"""Admitting an offer: root rotations, signed update metadata, scope, probe data and format are checked before the
job exists, and the device's trust state (root, highest update version) advances only with an admitted offer.

python-tuf's rule: a verifier works on a candidate, and the trusted state is replaced on the last line, after every
check and after the driver journaled the job together with the new trust state (``Admission.trust_record`` goes
into the same transaction as the journal).

A device serves several named models, each with its own updater thread. The root is the device's. Versions are
checked twice: in arrival order, on the link's thread, against the highest version this device has seen for any
model (``model_of``: an old offer replayed for any model, even one the device does not have yet, is refused); and
by the model's updater against the highest version that model admitted. The server signs a device's offers in the
order it publishes them, but the models' threads may admit two of them in the other order: one shared counter
there refused the older of two good offers as a rollback. ``lock`` serialises admission, journaling and adoption
across the models' threads, so the root only moves forward.
"""

from __future__ import annotations

import hashlib
import re
import threading
import time
from collections.abc import Callable
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
from fleet_protocol.messages import NAME, UpdateOffer
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
# A model's name is a directory name on the device: the protocol's pattern (the registry's), checked again here.
MODEL_NAME = re.compile(NAME)
VERIFIED_CACHE = 8  # jobs whose metadata stays verified in memory (one per model updating at once)


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
    """An admitted offer: the job to journal, and the trust state it moves the device (root) and the model (highest
    update version) to."""

    job: Job
    model: str
    verifier: UpdateVerifier

    @property
    def trust_record(self) -> dict[str, bytes]:
        return {"root": self.verifier.root_bytes,
                version_key(self.model): str(self.verifier.update_version).encode()}


def version_key(model: str) -> str:
    """The store key of a model's highest admitted update version."""
    return f"update_version:{model}"


class Offers:
    """The device's trust state and the checks every offer passes before it becomes a job. Shared by the models'
    updaters (``lock``)."""

    def __init__(self, scope: Scope, *, root: bytes, versions: dict[str, int] | None = None, seen: int = 0):
        self.scope = scope
        self.lock = threading.RLock()
        self._root = self._verifier(root, 0)
        self.versions: dict[str, int] = dict(versions or {})
        # the highest version routed to any model (arrival order): a floor for every model, new ones included
        self.seen = max(seen, *self.versions.values(), 0)
        self._verified: dict[str, VerifiedUpdate] = {}

    def know(self, model: str, version: int) -> None:
        """A model's highest admitted version, read from the store at start."""
        with self.lock:
            self.versions.setdefault(model, version)
            self.seen = max(self.seen, version)

    def _verifier(self, root: bytes, update_version: int) -> UpdateVerifier:
        return UpdateVerifier(root, device_id=self.scope.device_id, profile=self.scope.profile,
                              cohort=self.scope.cohort, update_version=update_version)

    @property
    def verifier(self) -> UpdateVerifier:
        """The trusted root, with the highest update version any model admitted (what the device state reports;
        remote configuration verifies against this root)."""
        with self.lock:
            return self._verifier(self._root.root_bytes, max(self.versions.values(), default=0))

    def model_of(self, offer: UpdateOffer) -> str:
        """Which of the device's models ``offer`` is for: its signed metadata verified (rotations, signature, scope,
        and a version above any this device has seen, in arrival order) on a candidate; nothing is adopted but the
        version seen. The model's own updater checks it again (``admit``)."""
        with self.lock:
            candidate = self._candidate(offer, update_version=self.seen)
            verified = candidate.verify_update(offer.metadata)
            model = verified.spec.artifact.model
            if not MODEL_NAME.match(model):
                raise StepFailed(Reason.MALFORMED, f"model name {model[:80]!r} is not a valid name")
            self.seen = verified.version
        return model

    def _candidate(self, offer: UpdateOffer, *, update_version: int) -> UpdateVerifier:
        with self.lock:
            candidate = self._verifier(self._root.root_bytes, update_version)
        for root in offer.roots:
            if root != candidate.root_bytes:
                candidate.update_root(root)
        return candidate

    def admit(self, offer: UpdateOffer, *, model: str, previous_slot: str | None,
              fits: Callable[[VerifiedUpdate], None] = lambda verified: None) -> Admission:
        """Check ``offer`` for ``model`` on a copy of the trust state; raises (ProtocolError, ProbeDataError,
        StepFailed) and changes nothing when any check fails. ``fits`` refuses what the device cannot hold."""
        with self.lock:
            floor = self.versions.get(model, 0)
        candidate = self._candidate(offer, update_version=floor)
        verified = candidate.verify_update(offer.metadata)
        if verified.spec.artifact.model != model:
            raise StepFailed(Reason.MALFORMED, f"the offer is for model {verified.spec.artifact.model!r}, "
                                               f"not {model!r}")
        _check_probe(offer, verified)
        if verified.spec.artifact.format not in SERVED_FORMATS:
            raise StepFailed(Reason.MALFORMED, f"artifact format {verified.spec.artifact.format} is not served "
                                               "by the agent")
        fits(verified)
        job = Job(id=offer.job, metadata=offer.metadata, probe=offer.probe, url=offer.url,
                  previous_slot=previous_slot, received=time.time())
        return Admission(job, model, candidate)

    def adopt(self, admission: Admission) -> None:
        """Trust what ``admission`` verified: called once the driver has journaled it (under ``lock``)."""
        with self.lock:
            if admission.verifier.root_version >= self._root.root_version:
                self._root = self._verifier(admission.verifier.root_bytes, 0)
            self.versions[admission.model] = max(self.versions.get(admission.model, 0),
                                                 admission.verifier.update_version)

    def verified(self, job: Job) -> VerifiedUpdate:
        """The journaled offer's metadata, verified again (signature and scope) without advancing the version: once
        per job in this process (fetch, stage and probe all need it; after a restart it is checked afresh)."""
        if job.metadata is None or job.id is None:
            raise StepFailed(Reason.INTERNAL, "the journaled job carries no update metadata")
        with self.lock:
            found = self._verified.get(job.id)
            root = self._root.root_bytes
        if found is None:
            found = self._verifier(root, 0).verify_update(job.metadata)
            with self.lock:
                while len(self._verified) >= VERIFIED_CACHE:
                    self._verified.pop(next(iter(self._verified)))
                self._verified[job.id] = found
        return found


def _check_probe(offer: UpdateOffer, verified: VerifiedUpdate) -> None:
    if offer.probe is None:
        raise StepFailed(Reason.MALFORMED, "the offer carries no probe data")
    if hashlib.sha256(offer.probe).hexdigest() != verified.spec.probe.inputs_sha256:
        raise StepFailed(Reason.HASH_MISMATCH, "probe data does not match its signed sha256")
    probing.read_golden(offer.probe)

