"""The update driver of one named model: feeds inputs to the state machine (``agent.machine``), journals each
transition, then has the step handlers (``agent.steps``) perform its actions, one job at a time, on its own thread.
A device with several models runs one driver per model (``agent.models``), so one model's download, probe or
rollback never waits for another's; they share the trust state (``agent.offers``), the link policy's meter and
the reporter.

Everything arrives as an input on one queue — offers, rollback orders, chunks, (re)connects, ticks — and is handled
in order, so no two steps race. ``_transition`` is the one place that persists: the new snapshot and the job
(``Store.save_journal``, durable) are saved *before* any action runs, and an action's outcome comes back as the next
event. Verification is ``fleet_protocol``'s (``agent.offers``); bad data is refused and reported with a reason code,
and the model being served is never touched until a verified, probed replacement is switched in atomically.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

from agent.api import Serving
from agent.download import ChunkWindow, WindowConfig
from agent.job import Job, StepFailed
from agent.machine import Action, Event, Snapshot, State, Step, step
from agent.metering import Hold, Metering
from agent.offers import REFUSALS, Admission, Offers, reason_for
from agent.report import Reporter
from agent.slots import SlotStore
from agent.steps import Outcome, StepContext, downloaded, perform, serve_active
from agent.store import Store
from agent.telemetry import Telemetry
from fleet_protocol import topics, windows
from fleet_protocol.errors import ProtocolError
from fleet_protocol.messages import (
    BINARY_CHUNKS,
    CHUNK_ENCODINGS_PROPERTY,
    ChunkData,
    ChunkRequest,
    RollbackOrder,
    UpdateOffer,
)
from fleet_protocol.metadata import VerifiedUpdate
from fleet_protocol.vocabulary import Reason, UpdateResult, UpdateState
from fleet_runtime.runtimes import Model

log = logging.getLogger(__name__)

# Our chunk requests say that we decode binary chunk frames (the server answers with JSON to agents that do not).
CHUNK_REQUEST_PROPERTIES = ((CHUNK_ENCODINGS_PROPERTY, BINARY_CHUNKS),)


class Send(Protocol):
    """Publish directly (not through the outbox); None while disconnected."""

    def __call__(self, topic: str, payload: bytes, retain: bool = False, *,
                 user_properties: tuple[tuple[str, str], ...] = ()) -> int | None: ...


StepHook = Callable[[UpdateState | Action], None]


def no_hook(where: UpdateState | Action) -> None:
    """The production ``on_step``: nothing."""


@dataclass
class UpdaterConfig:
    device_id: str
    work_dir: Path  # shared by the models: each job works in its own folder under it
    window: WindowConfig = field(default_factory=WindowConfig)
    device_key: bytes | None = None  # X25519 private key for encrypted delivery


def fits_anything(verified: VerifiedUpdate) -> None:
    """No memory budget: every artifact fits."""


class Updater:
    """``on_step`` is called after each transition is journaled (with the new state, before its actions) and after
    each action (before its outcome is journaled): the boundaries where a power cut may strike. Tests pause there."""

    def __init__(self, config: UpdaterConfig, *, model: str, store: Store, slots: SlotStore, serving: Serving,
                 telemetry: Telemetry, offers: Offers, reporter: Reporter, meter: Metering, send: Send,
                 loader: Callable[[Path], Model], fits: Callable[[VerifiedUpdate], None] = fits_anything,
                 on_step: StepHook = no_hook):
        self.config, self.model, self.store, self._send, self._on_step = config, model, store, send, on_step
        self.offers, self.reporter, self.meter, self._fits = offers, reporter, meter, fits
        config.work_dir.mkdir(parents=True, exist_ok=True)
        self.window = ChunkWindow(config.window, request=self._request_chunks, meter=self.meter)
        self.steps = StepContext(device_id=config.device_id, model=model, work_dir=config.work_dir,
                                 device_key=config.device_key,
                                 slots=slots, serving=serving, telemetry=telemetry, loader=loader,
                                 offers=self.offers, reporter=self.reporter, window=self.window, meter=self.meter)
        self._reported_hold: tuple[str, str] | None = None
        self.on_refused: Callable[[], None] = lambda: None  # an offer was refused (the lane may hold nothing)
        self.snap, record = store.load_journal(model)
        self.job = Job.from_record(record)
        self._inbox: queue.Queue[tuple[str, object]] = queue.Queue()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ inputs (any thread)

    def submit(self, kind: str, payload: object = None) -> None:
        """``message`` (an offer, rollback order or chunk), ``connected``, ``disconnected``, or ``outcome``."""
        self._inbox.put((kind, payload))

    def start(self) -> None:
        serve_active(self.steps.slots, self.steps.serving, self.steps.loader)
        self._thread = threading.Thread(target=self._run, name=f"updater-{self.model}", daemon=True)
        self._thread.start()
        self.submit("outcome", Outcome(Event.RESTART))

    def stop(self, timeout: float = 10.0, *, join: bool = True) -> None:
        self.submit("stop")
        if join and self._thread is not None:
            self._thread.join(timeout)

    def queued(self) -> int:
        """Inputs waiting to be handled."""
        return self._inbox.qsize()

    def set_chunk_window(self, window: int) -> None:
        self.window.config = replace(self.window.config, window=window)

    def status(self) -> dict:
        hold = self._reported_hold  # (reason, why) of a download that waits on the link policy
        return {"update": {"state": self.snap.state.value, "job": self.snap.job, "reason": self.snap.reason,
                           "detail": self.snap.detail,
                           "waiting": {"reason": hold[0], "why": hold[1]} if hold else None}}

    # ------------------------------------------------------------------ the loop (updater thread)

    def _run(self) -> None:
        while True:
            try:
                kind, payload = self._inbox.get(timeout=1.0)
            except queue.Empty:
                kind, payload = "tick", None
            if kind == "stop":
                return
            try:
                self._handle(kind, payload)
            except Exception:  # a bug in one input must not stop the updater
                log.exception("updater failed on %s", kind)

    def _handle(self, kind: str, payload: object) -> None:
        if isinstance(payload, UpdateOffer):
            self._offer(payload)
        elif isinstance(payload, RollbackOrder):
            self._transition(Outcome(Event.ROLLBACK_ORDER, detail=payload.reason), job_id=payload.job)
        elif isinstance(payload, ChunkData):
            self._chunk(payload)
        elif isinstance(payload, Outcome):
            self._transition(payload)
        elif kind == "connected":
            self.window.connected = True
            if self.snap.state is State.DOWNLOADING:
                self.window.request_missing()
        elif kind == "disconnected":
            self.window.connected = False
        elif kind == "tick" and self.snap.state is State.DOWNLOADING:
            self._guarded(self._download_tick)
        elif kind == "tick" and self.snap.state is State.SCHEDULED:
            self._window_tick()
        self._report_hold()

    def _window_tick(self) -> None:
        """A staged update switches as soon as its maintenance windows are open (by this device's clock)."""
        try:
            sets = self.offers.verified(self.job).spec.window_sets
        except (StepFailed, ProtocolError) as e:  # e.g. the journaled metadata expired while it waited
            self.submit("outcome", Outcome.failed(e))
            return
        if windows.all_open(sets, time.time()):
            self.submit("outcome", Outcome(Event.WINDOW_OPEN))

    def _download_tick(self) -> None:
        if self.window.active:
            self.window.tick()
        elif self.job.url and self.steps.held is not None:  # an HTTP download on hold: try again
            nxt = perform(self.steps, Action.FETCH, self.snap, self.job)
            if nxt is not None:
                self.submit("outcome", nxt)

    def _hold(self) -> tuple[Hold, int] | None:
        """Why the download waits, with the bytes it still needs."""
        if self.snap.state is not State.DOWNLOADING:
            return None
        if self.window.active:
            return (self.window.held, self.window.outstanding_bytes()) if self.window.held else None
        held, payload = self.steps.held, self.job.payload
        if held is None or payload is None:
            return None
        part = self.steps.work_dir / str(self.job.id) / "payload"
        return held, payload.length - (part.stat().st_size if part.exists() else 0)

    def _report_hold(self) -> None:
        """Tell the server when a download starts or stops waiting on the link policy (``waiting: metered``)."""
        if self.snap.state is not State.DOWNLOADING:
            self._reported_hold, self.steps.held = None, None
            return
        found = self._hold()
        key = (found[0].reason.value, found[0].why) if found else None
        if key == self._reported_hold:
            return
        if found is not None:
            held, outstanding = found
            if self.snap.restarts:  # a held download is waiting, not crashing: reboots while held are not counted
                self.snap = replace(self.snap, restarts=0)
                self.store.save_journal(self.model, self.snap, self.job.to_record())
            log.info("download %s %s", self.snap.job, held.describe(outstanding))
            self.reporter.event(self.snap.job, UpdateState.DOWNLOADING, UpdateResult.PENDING, held.reason,
                                held.describe(outstanding))
        elif self._reported_hold is not None:
            self.reporter.event(self.snap.job, UpdateState.DOWNLOADING, UpdateResult.PENDING, Reason.OK,
                                "download resumed")
        self._reported_hold = key

    def _transition(self, outcome: Outcome, *, job_id: str | None = None) -> None:
        """One step of the machine: journal the new snapshot with the job, and only then perform its actions; each
        outcome is queued as the next input."""
        s = self._journal(outcome, job_id=job_id)
        if s is not None:
            self._act(s)

    def _journal(self, outcome: Outcome, *, job_id: str | None = None,
                 admission: Admission | None = None) -> Step | None:
        """Persist the step ``outcome`` makes (with the trust state an admission moves to) and adopt that trust."""
        s = step(self.snap, outcome.event, job=job_id, reason=outcome.reason or "", detail=outcome.detail)
        if s.ignored:
            log.debug("ignored %s in %s", outcome.event.value, self.snap.state.value)
            return None
        job = self._job_after(outcome.event, s.snapshot, admission)
        self.store.save_journal(self.model, s.snapshot, job.to_record(),
                                **(admission.trust_record if admission else {}))
        if admission is not None:
            self.offers.adopt(admission)
        self.snap, self.job = s.snapshot, job
        log.info("update %s (%s): %s → %s %s", s.snapshot.job, self.model, outcome.event.value,
                 s.snapshot.state.value, [a.value for a in s.actions])
        return s

    def _act(self, s: Step) -> None:
        self._on_step(s.snapshot.state)
        for action in s.actions:
            nxt = perform(self.steps, action, self.snap, self.job)
            self._on_step(action)
            if nxt is not None:
                self.submit("outcome", nxt)

    def _job_after(self, event: Event, snap: Snapshot, admission: Admission | None) -> Job:
        """The job the new snapshot journals with: none when idle, a new one when a job starts, else the same."""
        if snap.state is State.IDLE:
            return Job()
        if self.snap.state is State.IDLE and admission is not None:
            return admission.job
        if self.snap.state is State.IDLE and event is Event.ROLLBACK_ORDER:
            return Job.rollback(snap.job, self.steps.slots.pointer()["previous"])
        return self.job

    # ------------------------------------------------------------------ offers and chunks

    def _offer(self, offer: UpdateOffer) -> None:
        if self.snap.state is State.SCHEDULED and offer.job != self.snap.job and self._supersede(offer):
            return
        if self.snap.state is not State.IDLE:
            if step(self.snap, Event.OFFER, job=offer.job).actions == (Action.REJECT_BUSY,):
                self.reporter.event(offer.job, UpdateState.REJECTED, UpdateResult.FAILED, Reason.INTERNAL,
                                    f"busy with job {self.snap.job} ({self.snap.state.value})")
            return  # else a redelivery of the offer being worked on
        s: Step | None = None
        with self.offers.lock:  # admit, journal and adopt as one against the other models' updaters
            try:
                admission = self._admit(offer)
            except REFUSALS as e:  # reported; the trust state did not change
                log.warning("offer %s for %s refused: %s", offer.job, self.model, e)
                self.reporter.event(offer.job, UpdateState.REJECTED, UpdateResult.FAILED, reason_for(e),
                                    str(e)[:900])
                refused = True
            else:
                refused = False
                s = self._journal(Outcome(Event.OFFER), job_id=offer.job, admission=admission)
        if refused:
            self.on_refused()
        elif s is not None:
            self._act(s)

    def _admit(self, offer: UpdateOffer) -> Admission:
        return self.offers.admit(offer, model=self.model, previous_slot=self.steps.slots.pointer()["slot"],
                                 fits=self._fits)

    def _supersede(self, offer: UpdateOffer) -> bool:
        """A newer offer for a job that only waits for its window replaces it: once the offer verifies, the waiting
        job ends (failed, ``superseded``, reported) and the offer comes back as the next input, to an idle agent."""
        try:
            self._admit(offer)  # a check; nothing adopted
        except REFUSALS:
            return False  # handled as any offer to a busy agent: refused and reported, the waiting job kept
        self._transition(Outcome(Event.FAILED, Reason.SUPERSEDED, f"superseded by job {offer.job}"))
        self.submit("message", offer)
        return True

    def _chunk(self, chunk: ChunkData) -> None:
        if self.snap.state is not State.DOWNLOADING or chunk.job != self.snap.job:
            return  # late or foreign chunk
        path = self.window.accept(chunk)
        if path is not None:
            self._guarded(lambda: self.submit("outcome", downloaded(self.job, path)))

    def _guarded(self, fn: Callable[[], None]) -> None:
        """Run a download step outside an action; its failure is the job's FAILED event."""
        try:
            fn()
        except (StepFailed, OSError) as e:
            self.submit("outcome", Outcome.failed(e))

    def _request_chunks(self, request: ChunkRequest) -> None:
        self._send(topics.topic(self.config.device_id, "dl-req", request.job), request.to_bytes(), False,
                   user_properties=CHUNK_REQUEST_PROPERTIES)
