"""One handler per action of the update state machine (``agent.machine.Action``), Mender's states in small.

Each handler does one step of the journaled job and returns the event its outcome makes (or None when the outcome
arrives later, as chunks do). None of them journals: the driver (``agent.updater``) has persisted the transition
before any handler runs, and persists what a handler filled into the job with the next transition. Every handler is
idempotent, because a power cut replays the journaled state's actions. Failures raise; ``perform`` turns every
expected one into a FAILED event with its reason code, so each failure path leads the machine to its rollback.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from agent import probe as probing
from agent.api import Loaded, Serving
from agent.download import ChunkWindow, check_payload, http_download
from agent.job import Job, Payload, StepFailed
from agent.machine import Action, Event, Snapshot, State
from agent.metering import Hold, Metering
from agent.offers import Offers, reason_for
from agent.report import Reporter
from agent.slots import SlotError, SlotInfo, SlotStore
from agent.telemetry import Telemetry
from fleet_protocol import windows
from fleet_protocol.chunks import ChunkManifest
from fleet_protocol.errors import ProtocolError
from fleet_protocol.metadata import VerifiedUpdate
from fleet_protocol.vocabulary import Reason, UpdateResult, UpdateState
from fleet_runtime.runtimes import Model, RuntimeLoadError, check_feeds

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Outcome:
    """The event a step's outcome makes, with the reason and detail of a failure."""

    event: Event
    reason: Reason | None = None  # of a FAILED event
    detail: str = ""

    @classmethod
    def failed(cls, e: Exception) -> Outcome:
        detail = str(e) if isinstance(e, StepFailed) else f"{type(e).__name__}: {e}"
        return cls(Event.FAILED, reason_for(e), detail[:900])


@dataclass
class StepContext:
    """What the handlers work with. ``staged`` carries the model the probe loaded to the switch (same process)."""

    device_id: str
    model: str  # the lane's: a journaled job for another model (from before the migration) is not installed here
    work_dir: Path
    device_key: bytes | None  # X25519 private key for encrypted delivery
    slots: SlotStore
    serving: Serving
    telemetry: Telemetry
    loader: Callable[[Path], Model]
    offers: Offers
    reporter: Reporter
    window: ChunkWindow
    meter: Metering | None = None  # the link policy, for the HTTP path (the chunk window holds its own)
    staged: Loaded | None = None
    held: Hold | None = None  # why the HTTP download waits (None: it does not)

    def job_dir(self, job: Job) -> Path:
        folder = self.work_dir / str(job.id)
        folder.mkdir(parents=True, exist_ok=True)
        return folder


Handler = Callable[[StepContext, Snapshot, Job], Outcome | None]
FAILURES = (StepFailed, ProtocolError, probing.ProbeDataError, RuntimeLoadError, SlotError, OSError)


def perform(ctx: StepContext, action: Action, snap: Snapshot, job: Job) -> Outcome | None:
    try:
        return HANDLERS[action](ctx, snap, job)
    except FAILURES as e:
        return Outcome.failed(e)


def timed(key: str, handler: Handler) -> Handler:
    """The handler, with its duration kept in the job's timings (reported with the result)."""

    def run(ctx: StepContext, snap: Snapshot, job: Job) -> Outcome | None:
        t0 = time.perf_counter()
        outcome = handler(ctx, snap, job)
        job.timings[key] = (time.perf_counter() - t0) * 1e3
        return outcome

    return run


# ------------------------------------------------------------------ downloading


def choose_payload(verified: VerifiedUpdate, active: SlotInfo | None) -> tuple[Payload, ChunkManifest | None]:
    """What to download: a delta from the active artifact when the metadata offers one (never for an encrypted
    artifact: the delta would be of the ciphertext), else the full artifact."""
    d = verified.delta_from(active.sha256) if active is not None and not verified.spec.encrypted_for else None
    if d is not None:
        return Payload("delta", d.sha256, d.length, d.path), d.chunks
    a = verified.spec.artifact
    return Payload("full", a.sha256, a.length, a.path), a.chunks


def fetch(ctx: StepContext, snap: Snapshot, job: Job) -> Outcome | None:
    payload, manifest = choose_payload(ctx.offers.verified(job), ctx.slots.active())
    job.payload = payload
    if job.download_started is None:
        job.download_started = time.time()
    target = ctx.job_dir(job) / "payload"
    if job.url:  # the offer's base URL serves every signed file at URL/<path>
        ctx.held = http_download(f"{job.url.rstrip('/')}/{payload.path}", target, payload.length, meter=ctx.meter)
        if ctx.held is not None:
            return None  # the driver calls fetch again once the hold lifts
        return downloaded(job, target)
    if manifest is None:
        raise StepFailed(Reason.MALFORMED, "no URL and no chunk list for the payload")
    if ctx.window.begin(str(job.id), payload.path, manifest, target):
        return downloaded(job, target)
    return None  # chunks arrive as messages: the driver calls ``downloaded`` when the window is complete


def downloaded(job: Job, path: Path) -> Outcome:
    assert job.payload is not None
    check_payload(path, sha256=job.payload.sha256, length=job.payload.length)
    now = time.time()
    job.timings["download_ms"] = (now - (job.download_started or now)) * 1e3
    job.download_started = None
    return Outcome(Event.DOWNLOADED)


# ------------------------------------------------------------------ staging


def stage(ctx: StepContext, snap: Snapshot, job: Job) -> Outcome:
    """Verify the payload again (it sat on disk), decrypt, patch, check the target hash, write the inactive slot."""
    spec = ctx.offers.verified(job).spec
    if spec.artifact.model != ctx.model:
        raise StepFailed(Reason.MALFORMED, f"the job installs model {spec.artifact.model!r}, not {ctx.model!r}")
    p = job.payload
    if p is None:
        raise StepFailed(Reason.INTERNAL, "the journaled job has no downloaded payload")
    data = (ctx.job_dir(job) / "payload").read_bytes()
    if len(data) != p.length or hashlib.sha256(data).hexdigest() != p.sha256:
        raise StepFailed(Reason.HASH_MISMATCH, "the downloaded payload changed on disk")
    if spec.encrypted_for:
        data = _decrypt(ctx, data)
    if p.kind == "delta":
        data = _patch(ctx, job, data)
    model_sha = hashlib.sha256(data).hexdigest()
    if p.kind == "delta" and model_sha != spec.artifact.sha256:
        raise StepFailed(Reason.HASH_MISMATCH, "the patched model does not match the signed target hash")
    plain = ctx.job_dir(job) / "model"
    plain.write_bytes(data)
    info = ctx.slots.stage(plain, sha256=model_sha, fmt=spec.artifact.format, model=spec.artifact.model,
                           model_version=spec.artifact.model_version, job=str(job.id))
    job.target_slot = info.slot
    return Outcome(Event.STAGED)


def _decrypt(ctx: StepContext, data: bytes) -> bytes:
    if ctx.device_key is None:
        raise StepFailed(Reason.DECRYPT_FAILED, "the artifact is encrypted and this agent has no key")
    from fleet_protocol.crypto import decrypt  # imported when needed: the daemon's RSS counts on a device

    return decrypt(ctx.device_key, data, aad=ctx.device_id.encode())


def _patch(ctx: StepContext, job: Job, patch: bytes) -> bytes:
    previous = ctx.slots.verified(job.previous_slot)
    if previous is None:
        raise StepFailed(Reason.DELTA_FAILED, "the delta's base (the active model) is gone")
    from fleet_protocol import delta  # bsdiff4 + zstandard, loaded on the first delta

    return delta.apply(ctx.slots.path(previous).read_bytes(), patch)


def _staged_info(ctx: StepContext, job: Job) -> SlotInfo:
    info = ctx.slots.verified(job.target_slot)
    if info is None or info.job != job.id:
        raise StepFailed(Reason.INTERNAL, "the staged slot no longer holds this job's model")
    if info.model != ctx.model:
        raise StepFailed(Reason.MALFORMED, f"the staged slot holds model {info.model!r}, not {ctx.model!r}")
    return info


# ------------------------------------------------------------------ probing, switching


def probe(ctx: StepContext, snap: Snapshot, job: Job) -> Outcome:
    """Load the staged model beside the serving one and judge it on the signed golden inputs."""
    info = _staged_info(ctx, job)
    signed = ctx.offers.verified(job).spec.probe
    model = ctx.loader(ctx.slots.path(info))
    golden = probing.read_golden(job.probe or b"")
    try:
        got = model.run(check_feeds(model, dict(golden.inputs)))  # the same path as a request takes
    except Exception as e:  # the runtime's own error types
        raise StepFailed(Reason.PROBE_FAILED, f"the model fails on the golden inputs: {str(e)[:300]}") from e
    verdict = probing.judge(golden.expected, got, atol=signed.atol, rtol=signed.rtol, min_cosine=signed.min_cosine)
    job.probe_result = verdict.detail
    if not verdict.passed:
        raise StepFailed(Reason.PROBE_FAILED, verdict.detail)
    sets = ctx.offers.verified(job).spec.window_sets
    if not windows.all_open(sets, time.time()):
        return Outcome(Event.WINDOW_CLOSED)  # the staged model is loaded again at the switch, in the window
    ctx.staged = Loaded(model, info)
    return Outcome(Event.PROBE_PASSED)


def scheduled_detail(ctx: StepContext, job: Job) -> str:
    """``waiting: maintenance window`` with when the next one opens (by this device's clock)."""
    nxt = windows.next_all_open(ctx.offers.verified(job).spec.window_sets, time.time())
    when = "no window opens within a year" if nxt is None else \
        f"next opens {datetime.fromtimestamp(nxt, UTC).isoformat(timespec='minutes')}"
    return f"waiting: maintenance window ({when})"


def switch(ctx: StepContext, snap: Snapshot, job: Job) -> Outcome:
    info = _staged_info(ctx, job)
    staged = ctx.staged
    loaded = staged if staged is not None and staged.info == info else \
        Loaded(ctx.loader(ctx.slots.path(info)), info)  # after a restart: load it again
    ctx.slots.switch_to(info.slot)
    ctx.serving.swap(loaded)  # new requests go to the new model; running ones finish on the old
    ctx.telemetry.model_changed()
    ctx.staged = None
    return Outcome(Event.SWITCHED)


def restore_previous(ctx: StepContext, snap: Snapshot, job: Job) -> Outcome:
    previous = job.previous_slot
    if (previous is None or ctx.slots.verified(previous) is None) and snap.ordered_rollback:
        raise StepFailed(Reason.INTERNAL, "no previous model to roll back to")
    ctx.slots.restore(previous)
    serve_active(ctx.slots, ctx.serving, ctx.loader)
    ctx.telemetry.model_changed()
    return Outcome(Event.ROLLED_BACK)


def serve_active(slots: SlotStore, serving: Serving, loader: Callable[[Path], Model]) -> None:
    """Load whatever the pointer says is active (startup, rollback); an unusable slot serves nothing."""
    info = slots.active()
    current = serving.current
    if info is None:
        serving.swap(None)
        return
    if current is not None and current.info == info:
        return
    try:
        serving.swap(Loaded(loader(slots.path(info)), info))
    except RuntimeLoadError:
        log.exception("the active slot %s cannot be loaded", info.slot)
        serving.swap(None)


# ------------------------------------------------------------------ reporting


def report_progress(ctx: StepContext, snap: Snapshot, job: Job) -> None:
    if snap.state is State.SCHEDULED:
        ctx.reporter.event(snap.job, snap.state, UpdateResult.PENDING, Reason.WINDOW, scheduled_detail(ctx, job),
                           timings=job.reported_timings())
        return
    ctx.reporter.event(snap.job, snap.state, UpdateResult.PENDING, timings=job.reported_timings())


def report_ok(ctx: StepContext, snap: Snapshot, job: Job) -> Outcome:
    active = ctx.slots.pointer()["slot"]
    ctx.reporter.event(snap.job, UpdateState.COMMITTED, UpdateResult.OK, detail=f"active slot {active}",
                       timings=job.reported_timings())
    ctx.reporter.device_state()
    return Outcome(Event.REPORTED)


def report_failed(ctx: StepContext, snap: Snapshot, job: Job) -> Outcome:
    """A failure, or the rollback the server ordered (done: its result is ok)."""
    reason = Reason(snap.reason) if snap.reason in Reason.__members__.values() else Reason.INTERNAL
    if snap.ordered_rollback:
        state, result = UpdateState.ROLLED_BACK, UpdateResult.OK
    else:
        state, result = UpdateState.FAILED, UpdateResult.FAILED
    ctx.reporter.event(snap.job, state, result, reason, snap.detail, timings=job.reported_timings())
    ctx.reporter.device_state()
    return Outcome(Event.REPORTED)


def cleanup(ctx: StepContext, snap: Snapshot, job: Job) -> None:
    """Drop the job's download and staging leftovers (the slots are the slot store's)."""
    if snap.job:
        shutil.rmtree(ctx.work_dir / str(snap.job), ignore_errors=True)
    ctx.window.cancel()
    ctx.staged = None


# REJECT_BUSY has no handler here: it answers an offer that never becomes the job (``Updater._offer``).
HANDLERS: dict[Action, Handler] = {
    Action.FETCH: fetch,
    Action.STAGE: timed("stage_ms", stage),
    Action.PROBE: timed("probe_ms", probe),
    Action.SWITCH: timed("switch_ms", switch),
    Action.RESTORE_PREVIOUS: restore_previous,
    Action.REPORT_PROGRESS: report_progress,
    Action.REPORT_OK: report_ok,
    Action.REPORT_FAILED: report_failed,
    Action.CLEANUP: cleanup,
}
