"""Several named models per device: one lane per model, each with its own A/B slots, journal, updater thread,
serving reference and telemetry, so updating one never touches another's requests.

Layout under the state directory::

    models/detector/slots/{a,b}/…   models/detector/active.json      (agent.slots, one store per model)
    models/recognizer/slots/{a,b}/… models/recognizer/active.json
    agent.db                        journal:<model>, update_version:<model>, root, outbox (agent.store)

An offer names its model in its signed metadata (``artifact.model``): ``ModelSet.offer`` verifies that much and hands
the offer to the model's updater, creating the lane for a model the device does not have yet. Chunks go to the
lane whose job they belong to; a rollback order to the lane that runs (or ran) its job.

Memory: before an offer is admitted its model must fit the profile's budget beside what is loaded. A loaded model's
resident size is estimated as ``SESSION_BYTES`` + ``LOAD_FACTOR`` × its file: ONNX Runtime holds the weights,
prepacked copies of them, an activation arena and per-session state (``bench/agent_bench.py``: a second, 1.0 MB
model grew the agent's RSS by 18.3 MB at 128 px input and by 12.8 MB at 96 px; the estimate says 18.0). While an
update is probed the new version is loaded beside the old one, so the check counts both.

A state directory from an agent that served one model (``slots/``, ``active.json``, the ``journal`` key) becomes
that model's lane on first start (``migrate_single_model``), resumably: a marker names the model until every move
is done.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import shutil
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from agent.api import Endpoint, Serving
from agent.job import StepFailed
from agent.machine import State
from agent.offers import MODEL_NAME, REFUSALS, Offers, reason_for, version_key
from agent.report import Reporter
from agent.slots import SLOTS, SlotStore, atomic_write, fsync_dir
from agent.store import JOURNAL_PREFIX, LEGACY_JOURNAL, LEGACY_VERSION, Store, journal_key
from agent.telemetry import Telemetry
from agent.updater import Updater
from fleet_protocol.messages import MAX_MODELS, ChunkData, ModelState, RollbackOrder, UpdateOffer
from fleet_protocol.metadata import FIELD, VerifiedUpdate
from fleet_protocol.vocabulary import Reason, UpdateResult, UpdateState

log = logging.getLogger(__name__)

MODELS_DIR = "models"
LOAD_FACTOR = 2.0  # resident bytes per byte of model file
SESSION_BYTES = 16 * 2**20  # a runtime session's own state and activations, whatever the model's size
MIGRATING = ".migrating"  # names the model a single-model state directory is being moved to


@dataclass
class ModelLane:
    name: str
    slots: SlotStore
    serving: Serving
    telemetry: Telemetry
    updater: Updater
    had_active: bool  # the slot pointer named a model at start: the lane is listed even if it failed to load
    reserved: int = 0  # estimated bytes of the version being installed (counted while its update runs)

    def __post_init__(self) -> None:
        self.endpoint = Endpoint(self.serving, self.telemetry, rollback=self.local_rollback,
                                 status=self.updater.status, installed=self.listed)

    def local_rollback(self) -> None:
        self.updater.submit("message", RollbackOrder(job=f"local-{self.name[:40]}-{int(time.time())}",
                                                     reason="rollback requested on the device"))

    def listed(self) -> bool:
        """Shown by the local API: it serves, or should (a first install in progress is not listed yet)."""
        return self.serving.current is not None or self.had_active

    def present(self) -> bool:
        """Reported and listed: it serves or should, or its update is under way (a lane made for an offer that
        was refused holds nothing and is not shown)."""
        return self.listed() or self.updater.snap.state is not State.IDLE

    def holds_nothing(self) -> bool:
        return not self.present() and self.slots.pointer()["slot"] is None

    def footprint(self) -> int:
        """Estimated resident bytes: the model it serves, and the one its update admitted (loaded beside it to be
        probed, then instead of it)."""
        current = self.serving.current
        loaded = estimated_bytes(current.info.length) if current is not None else 0
        return loaded + (self.reserved if self.updater.snap.state is not State.IDLE else 0)

    def state(self) -> ModelState:
        current = self.serving.current
        # a model that fails to load is still what the slot pointer names (and the server must not offer it again)
        info = current.info if current is not None else self.slots.active() if self.had_active else None
        snap = self.updater.snap
        return ModelState(name=self.name, active_version=info.version_label if info else None,
                          active_sha256=info.sha256 if info else None,
                          active_slot=info.slot if info else None,  # type: ignore[arg-type]
                          update_state=snap.state, job=snap.job or None)


def estimated_bytes(model_file_bytes: int) -> int:
    """What a model of this file size is estimated to hold in memory once loaded."""
    return SESSION_BYTES + int(model_file_bytes * LOAD_FACTOR)


UpdaterFactory = Callable[[str, SlotStore, Serving, Telemetry, Callable[[VerifiedUpdate], None]], Updater]
ROUTED_JOBS = 256  # job → model routes remembered for chunks and rollback orders


class ModelSet:
    """The device's models by name. ``make_updater`` builds a model's updater around its slots, serving reference
    and telemetry (the daemon wires the shared trust state, meter, reporter and loader into it).

    Lock order: the trust state's lock (``Offers.lock``), then this set's. An updater admitting an offer holds the
    trust lock and asks this set what is loaded (``_fits``), and building an updater takes the trust lock, so lanes
    are built outside this set's lock (building one under it deadlocked the link thread)."""

    def __init__(self, state_dir: Path, *, store: Store, offers: Offers, make_updater: UpdaterFactory,
                 budget_bytes: int | None = None):
        self.root = Path(state_dir) / MODELS_DIR
        self.store, self.offers, self._make_updater = store, offers, make_updater
        self.budget_bytes = budget_bytes
        self.reporter: Reporter | None = None  # set by the daemon (the reporter asks this set for the states)
        self._lanes: dict[str, ModelLane] = {}
        self._jobs: OrderedDict[str, str] = OrderedDict()  # job → model, in the order offers arrived
        self._lock = threading.Lock()
        self._connected = False

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Migrate a single-model state directory, then start every model found (each loads its active slot and
        resumes its journaled update)."""
        migrate_single_model(self.root.parent, self.store)
        self.root.mkdir(parents=True, exist_ok=True)
        names = {p.name for p in self.root.iterdir() if p.is_dir() and MODEL_NAME.match(p.name)}
        names |= {k[len(JOURNAL_PREFIX):] for k in self.store.keys(JOURNAL_PREFIX)
                  if MODEL_NAME.match(k[len(JOURNAL_PREFIX):])}
        for name in sorted(names):
            if self._held_nothing(name):  # made for an offer that was refused: no lane, no thread
                shutil.rmtree(self.root / name, ignore_errors=True)
                continue
            self.lane(name, create=True)

    def _held_nothing(self, name: str) -> bool:
        slots = self.root / name / "slots"
        if any((slots / s / "slot.json").exists() for s in SLOTS) or (self.root / name / "active.json").exists():
            return False
        return self.store.load_journal(name)[0].state is State.IDLE

    def stop(self) -> None:
        for lane in self.lanes():
            lane.updater.stop()

    def lanes(self) -> list[ModelLane]:
        with self._lock:
            return [self._lanes[n] for n in sorted(self._lanes)]

    def lane(self, name: str, *, create: bool = False) -> ModelLane | None:
        """The model's lane; with ``create``, made and started when missing (None when the device already has
        ``MAX_MODELS``)."""
        with self._lock:
            found = self._lanes.get(name)
        if found is not None or not create:
            return found
        if not MODEL_NAME.match(name):
            raise ValueError(f"model name {name!r} is not a valid name")
        slots = SlotStore(self.root / name)
        serving, telemetry = Serving(), Telemetry()
        updater = self._make_updater(name, slots, serving, telemetry, self._fits(name))
        lane = ModelLane(name, slots, serving, telemetry, updater, had_active=slots.pointer()["slot"] is not None)
        updater.on_refused = lambda: self._retire(name)
        with self._lock:
            found = self._lanes.get(name)
            if found is None and len(self._lanes) >= MAX_MODELS:
                return None
            if found is None:
                self._lanes[name] = lane
        if found is not None:  # another thread made it first (lanes are made by the link thread and at start)
            return found
        lane.updater.start()  # loads its active model (outside the lock: a load takes a while)
        if self._connected:  # a lane made while the link is up (a new model's first offer) hears it is
            lane.updater.submit("connected")
        log.info("model %s: %s", name, "serving" if lane.serving.current else "no model yet")
        return lane

    def _retire(self, name: str) -> None:
        """A model's offer was refused and the lane holds nothing: it goes (its thread ends; the empty folder is
        removed on the next start), unless something else for it is already queued."""
        with self._lock:
            lane = self._lanes.get(name)
            if lane is None or not lane.holds_nothing() or lane.updater.queued():
                return
            del self._lanes[name]
        lane.updater.stop(join=False)  # (called on that lane's own thread)
        log.info("model %s: no model and no update; lane closed", name)

    # ------------------------------------------------------------------ what the device reports and serves

    def states(self) -> list[ModelState]:
        return [lane.state() for lane in self.lanes() if lane.present()][:MAX_MODELS]

    def endpoints(self) -> dict[str, Endpoint]:
        """Asked on every request: each lane's endpoint is made once, with the lane."""
        return {lane.name: lane.endpoint for lane in self.lanes() if lane.present()}

    # ------------------------------------------------------------------ routing (the link's thread)

    def offer(self, offer: UpdateOffer) -> None:
        """To the updater of the model the signed metadata names (its lane made on first sight); an offer whose
        metadata does not verify, or that is older than one seen before, is refused here and reported. The offer of
        a job a model already has (a QoS 1 redelivery, after a restart too) goes straight to it: its updater knows a
        redelivery from a new offer, where the version check here would call it a replay."""
        known = self._lane_of_job(offer.job) or next(
            (ln for ln in self.lanes() if ln.updater.snap.job == offer.job), None)
        if known is not None:
            known.updater.submit("message", offer)
            return
        try:
            name = self.offers.model_of(offer)
        except REFUSALS as e:
            log.warning("offer %s refused: %s", offer.job, e)
            self._reject(offer.job, reason_for(e), str(e))
            return
        for _ in range(3):  # (a lane may retire between its lookup and the lock below: then once more)
            lane = self.lane(name, create=True)
            if lane is None:
                present = ", ".join(ln.name for ln in self.lanes())
                self._reject(offer.job, Reason.MEMORY_BUDGET,
                             f"this device serves at most {MAX_MODELS} models ({present})")
                return
            with self._lock:  # routed and queued together, so the lane cannot retire in between
                if self._lanes.get(name) is not lane:
                    continue  # it just retired: make it again
                self._jobs[offer.job] = name
                while len(self._jobs) > ROUTED_JOBS:
                    self._jobs.popitem(last=False)
                lane.updater.submit("message", offer)
                return
        self._reject(offer.job, Reason.INTERNAL, f"model {name}: its lane kept closing; offer not taken")

    def _lane_of_job(self, job: str) -> ModelLane | None:
        with self._lock:
            name = self._jobs.get(job)
            return self._lanes.get(name) if name else None

    def chunk(self, chunk: ChunkData) -> None:
        lane = self._lane_of_job(chunk.job)
        if lane is not None:
            lane.updater.submit("message", chunk)  # else late or foreign: dropped

    def rollback(self, order: RollbackOrder) -> None:
        """To the model whose offer had the job ``order`` names (queued behind it, if it is not yet taken), or whose
        active model that job installed; a device with one model takes any rollback order (as it always did)."""
        lane = self._lane_of_job(order.job)
        lanes = [ln for ln in self.lanes() if ln.present()]
        if lane is None:
            lane = next((ln for ln in lanes if ln.updater.snap.job == order.job), None)
        if lane is None:
            lane = next((ln for ln in lanes if (c := ln.serving.current) is not None and c.info.job == order.job),
                        None)
        if lane is None and len(lanes) == 1:
            lane = lanes[0]
        if lane is None:
            self._reject(order.job, Reason.MALFORMED, f"no model on this device ran job {order.job}")
            return
        lane.updater.submit("message", order)

    def broadcast(self, kind: str) -> None:
        """``connected`` / ``disconnected`` to every model's updater."""
        self._connected = kind == "connected"
        for lane in self.lanes():
            lane.updater.submit(kind)

    def _reject(self, job: str, reason: Reason, detail: str) -> None:
        if self.reporter is not None:
            self.reporter.event(job, UpdateState.REJECTED, UpdateResult.FAILED, reason, detail[:900])

    # ------------------------------------------------------------------ memory

    def _fits(self, name: str) -> Callable[[VerifiedUpdate], None]:
        """The admission check of ``name``'s updater (run under the trust lock, so two models' admissions are
        judged one after the other, each counting what the other reserved)."""
        def check(verified: VerifiedUpdate) -> None:
            new = estimated_bytes(verified.spec.artifact.length)
            lanes = self.lanes()
            if self.budget_bytes is not None:
                held = {lane.name: lane.footprint() for lane in lanes}
                need = sum(held.values()) + new
                if need > self.budget_bytes:
                    others = ", ".join(f"{n} {b / 2**20:.1f} MB" for n, b in held.items() if b) or "none"
                    raise StepFailed(Reason.MEMORY_BUDGET,
                                     f"{name} {verified.spec.artifact.model_version} needs ~{new / 2**20:.1f} MB "
                                     f"beside the models loaded or being installed ({others}): "
                                     f"{need / 2**20:.1f} MB exceeds the memory budget of "
                                     f"{self.budget_bytes / 2**20:.0f} MB")
            for lane in lanes:
                if lane.name == name:
                    lane.reserved = new
        return check


# ------------------------------------------------------------------ migration from one model per device


def migrate_single_model(state_dir: Path, store: Store) -> str | None:
    """Move a single-model state directory (``slots/``, ``active.json``, journal and update version) into
    ``models/<name>/``; returns the model's name, or None when there was nothing to move. Every step is idempotent
    and the marker keeps the name, so a power cut anywhere resumes on the next start."""
    old_slots, models = state_dir / "slots", state_dir / MODELS_DIR
    marker = models / MIGRATING
    name = marker.read_text().strip() if marker.exists() else None
    if name is None:
        if not old_slots.exists() and store.get(LEGACY_JOURNAL) is None:
            return None
        name = _legacy_name(old_slots, store)
        if name is None:  # nothing usable: empty slots (slot.json is written last) and no journaled job
            shutil.rmtree(old_slots, ignore_errors=True)
            (state_dir / "active.json").unlink(missing_ok=True)
            store.rename({LEGACY_JOURNAL: f"{LEGACY_JOURNAL}.empty"})
            return None
        models.mkdir(parents=True, exist_ok=True)
        atomic_write(marker, name.encode())
    target = models / name
    target.mkdir(parents=True, exist_ok=True)
    if old_slots.exists():
        if (target / "slots").exists() and not any((target / "slots" / s / "slot.json").exists() for s in SLOTS):
            shutil.rmtree(target / "slots")  # empty slot folders made meanwhile (a slot store opened on them)
        if not (target / "slots").exists():
            os.replace(old_slots, target / "slots")
    if (state_dir / "active.json").exists() and not (target / "active.json").exists():
        os.replace(state_dir / "active.json", target / "active.json")
    fsync_dir(target)
    fsync_dir(state_dir)
    version = store.get(LEGACY_VERSION)  # kept as well: the floor of every model's first offer (agent.offers)
    if version is not None and store.get(version_key(name)) is None:
        store.put(**{version_key(name): version})
    store.rename({LEGACY_JOURNAL: journal_key(name)})
    marker.unlink(missing_ok=True)
    fsync_dir(models)
    log.info("migrated the single-model state directory to %s", target)
    return name


def _mended(name: str) -> str:
    """A directory name for a model named before names were checked on the device."""
    mended = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).lstrip("._-")[:64]
    return mended or "model"


def _legacy_name(old_slots: Path, store: Store) -> str | None:
    """The model a single-model directory holds: its slots' ``model`` (the active one first), else the one its
    journaled job installs (read from the journaled metadata without verifying it: the updater verifies it again
    before any step)."""
    try:
        active = json.loads((old_slots.parent / "active.json").read_text()).get("slot")
    except (OSError, ValueError):
        active = None
    for slot in sorted(SLOTS, key=lambda s: s != active):
        try:
            name = json.loads((old_slots / slot / "slot.json").read_text())["model"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if isinstance(name, str):  # a model that serves is never dropped: a name that is no directory name is mended
            return name if MODEL_NAME.match(name) else _mended(name)
    raw = store.get(LEGACY_JOURNAL)
    try:
        metadata = json.loads(raw or b"{}")["job"]["metadata"]
        name = json.loads(base64.b64decode(metadata))["signed"][FIELD]["artifact"]["model"]
    except (ValueError, KeyError, TypeError):
        return None
    return name if isinstance(name, str) and MODEL_NAME.match(name) else None
