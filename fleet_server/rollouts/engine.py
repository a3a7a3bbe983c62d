"""The rollout engine: the thin loop around the pure planner and gates.

Every tick, for each running rollout: add devices that match its selector and are not members yet (skipped, with the
reason, when their profile has no releasable artifact), judge the gates on what finished, ask the planner, and act.
An offer is journaled first (member row → ``offered`` with its job, files and time, committed) and published after,
so a restart never offers a device twice: an ``offered`` member is only ever re-sent the same job, which the agent
de-duplicates. One process runs the engine at a time, by a lease row in the database.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
import time
from dataclasses import asdict

from sqlalchemy import text, update
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from fleet_protocol import messages, topics
from fleet_protocol.windows import Window
from fleet_server import remote_config
from fleet_server.insights import latency_histogram, version_label, watch_drift
from fleet_server.models import (
    ConvertedArtifact,
    Device,
    EngineLease,
    ModelVersion,
    Rollout,
    RolloutDevice,
    TelemetryWindow,
    utcnow,
)
from fleet_server.rollouts.delivery import Delivery, DeliveryError
from fleet_server.rollouts.gates import (
    Evidence,
    Gates,
    LatencyHistogram,
    Side,
    evaluate,
    failure_counts,
    merge,
    window_side,
)
from fleet_server.rollouts.planner import (
    IN_FLIGHT,
    Member,
    MemberStatus,
    RolloutState,
    Strategy,
    Verdict,
    View,
    plan,
)

log = logging.getLogger(__name__)
LEASE_S = 10.0
RESEND_AFTER_S = 30.0  # an offered device that said nothing gets the same job again (the agent de-duplicates)
JOIN_EVERY_S = 2.0  # how often a running rollout looks for devices that newly match its selector


# Untyped text: rows come back as the driver's tuples, with no per-column result processing (this runs every tick
# over every member; the typed select spent three quarters of a 10,000-device tick converting rows)
MEMBERS = text("SELECT rd.device_id, rd.status, rd.offered_at, rd.finished_at, d.online FROM rollout_device rd "
               "JOIN device d ON d.id = rd.device_id WHERE rd.rollout_id = :rollout_id")


def releasable(session: Session, model_version_id: int) -> dict[str, ConvertedArtifact]:
    """Profile → the newest artifact that passed its profile's fidelity gate and can run on an agent."""
    rows = session.exec(select(ConvertedArtifact).where(ConvertedArtifact.model_version_id == model_version_id,
                                                        ConvertedArtifact.status == "shippable")
                        .order_by(ConvertedArtifact.id)).all()  # type: ignore[arg-type]
    return {r.profile: r for r in rows if r.format in ("onnx-int8", "tflite-int8") and r.artifact_sha256}


def selector_matches(selector: dict, device: Device) -> bool:
    if device.decommissioned_at is not None:
        return False
    if selector.get("devices") and device.id not in selector["devices"]:
        return False
    if selector.get("profiles") and device.profile not in selector["profiles"]:
        return False
    return set(selector.get("tags") or []) <= set(device.tags)


class RolloutEngine:
    def __init__(self, db: Engine, delivery: Delivery, publish, *, tick_s: float = 0.5, holder: str | None = None,
                 drift_interval_s: float = 60.0, drift_window_s: float = 900.0, config_resend_s: float = 60.0):
        self.db, self.delivery, self.publish, self.tick_s = db, delivery, publish, tick_s
        self.drift_interval_s, self.drift_window_s = drift_interval_s, drift_window_s
        self._drift_due = 0.0
        self.config_resend_s, self._config_due = config_resend_s, 0.0
        self._join_due: dict[int, float] = {}
        self.holder = holder or f"{socket.gethostname()}:{os.getpid()}:{id(self):x}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rollout-engine", daemon=True)
        self._wake = threading.Event()
        self.leading = False  # held the lease at the last tick (fleet_server/replicas.py acts only then)

    def start(self) -> RolloutEngine:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop ticking and hand the lease back, so a restarted server takes over at once instead of waiting for
        it to lapse."""
        self._stop.set()
        self._wake.set()
        self._thread.join(10)
        self.leading = False
        try:
            with Session(self.db) as s:
                s.execute(update(EngineLease).where(EngineLease.name == "rollouts",  # type: ignore[arg-type]
                                                    EngineLease.holder == self.holder).values(expires_at=0.0))
                s.commit()
        except Exception:  # the database is gone: the lease lapses by itself
            log.warning("could not release the engine lease", exc_info=True)

    def wake(self) -> None:
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            t0 = time.monotonic()
            try:
                self.leading = self._lease()
                if self.leading:
                    self.tick()
            except Exception:  # a database outage or a bug in one tick: log, and try again next tick
                log.exception("rollout engine tick failed")
            # a tick over 10,000s of members costs ~0.1 s of CPU: never more than a third of the process's time, so
            # the threads that carry the devices' messages (and the API) keep the GIL most of the time
            self._wake.wait(max(self.tick_s, 2 * (time.monotonic() - t0)))
            self._wake.clear()

    def _lease(self) -> bool:
        now = time.time()
        with Session(self.db) as s:
            lease = s.get(EngineLease, "rollouts")
            if lease is None:
                s.add(EngineLease(name="rollouts", holder=self.holder, expires_at=now + LEASE_S))
                try:
                    s.commit()
                    return True
                except Exception:  # another process created it first
                    s.rollback()
                    return False
            result = s.execute(update(EngineLease).where(EngineLease.name == "rollouts")  # type: ignore[arg-type]
                               .where((EngineLease.holder == self.holder) | (EngineLease.expires_at < now))  # type: ignore[arg-type]
                               .values(holder=self.holder, expires_at=now + LEASE_S))
            s.commit()
            return result.rowcount == 1  # type: ignore[attr-defined]

    # ------------------------------------------------------------------ one tick

    def tick(self, now: float | None = None) -> None:
        with Session(self.db) as s:
            running = s.exec(select(Rollout.id).where(Rollout.state == RolloutState.RUNNING.value)).all()
        now = now if now is not None else time.time()
        for rollout_id in running:
            if rollout_id is not None:
                self.step(rollout_id, now)
        if now >= self._drift_due:
            self._drift_due = now + self.drift_interval_s
            with Session(self.db) as s:
                watch_drift(s, now, self.drift_window_s)
        if now >= self._config_due:
            self._config_due = now + min(self.config_resend_s, 10.0)
            with Session(self.db) as s:
                remote_config.resend_lagging(s, data_dir=self.delivery.data_dir, after_s=self.config_resend_s,
                                             publish=lambda t, p: self.publish(t, p, retain=True))

    def step(self, rollout_id: int, now: float) -> None:
        """One planning round for one rollout. Reads the members as plain columns (no ORM objects: this runs every
        tick over every member) and loads rows only for the devices it offers to."""
        with Session(self.db) as s:
            r = s.get(Rollout, rollout_id)
            if r is None or r.state != RolloutState.RUNNING.value:
                return
            mv = s.get(ModelVersion, r.model_version_id)
            artifacts = releasable(s, r.model_version_id)
            if now >= self._join_due.get(rollout_id, 0.0):
                self._join_due[rollout_id] = now + JOIN_EVERY_S
                self._join(s, r, artifacts)
            status = {m.value: m for m in MemberStatus}
            members = [Member(d, status[st], off, fin, bool(online)) for d, st, off, fin, online in s.connection()
                       .execute(MEMBERS, {"rollout_id": rollout_id})]
            evaluation = self._evaluate(s, r, mv, members, artifacts)
            verdict = Verdict(evaluation["verdict"])
            p = plan(View(RolloutState.RUNNING, r.stage, members, now, verdict, r.stage_finished_at,
                          approved_stage=r.approved_stage), strategy := strategy_of(r.strategy))
            evaluation = {**evaluation, "rate_per_minute": p.rate, "awaiting_approval": p.awaiting_approval}
            r.evaluation, r.stage, r.stage_finished_at = evaluation, p.stage, p.stage_finished_at
            if p.notes:
                r.notes = [*r.notes, *(f"{time.strftime('%H:%M:%S', time.gmtime(now))} {n}" for n in p.notes
                                       if not r.notes or not r.notes[-1].endswith(n))][-50:]
            if p.halt:
                self._halt(s, r, evaluation)
                return
            if p.complete:
                r.state, r.finished_at = RolloutState.COMPLETED.value, utcnow()
                s.add(r)
                s.commit()
                log.info("rollout %s completed", r.id)
                return
            resend = {m.device_id for m in members if m.status is MemberStatus.OFFERED and m.offered_at
                      and now - m.offered_at > RESEND_AFTER_S and m.online}
            wanted = set(p.offer) | resend
            rows = {m.device_id: m for m in s.exec(select(RolloutDevice).where(
                RolloutDevice.rollout_id == rollout_id,
                RolloutDevice.device_id.in_(wanted)))} if wanted else {}  # type: ignore[attr-defined]
            outgoing: list[tuple[str, bytes]] = []
            for device_id in p.offer:  # first offers; then the unanswered ones again, as the same job
                member = rows[device_id]
                payload = self._offer(s, member, mv, artifacts, r.encrypt, strategy.windows)
                if payload is None:
                    member.status = MemberStatus.SKIPPED.value
                else:
                    member.status, member.offered_at = MemberStatus.OFFERED.value, now
                    outgoing.append((topics.topic(device_id, "cmd"), payload))
                s.add(member)
            for device_id in resend - set(p.offer):
                member = rows[device_id]
                payload = self._offer(s, member, mv, artifacts, r.encrypt, strategy.windows)
                if payload is not None:
                    member.offered_at = now
                    s.add(member)
                    outgoing.append((topics.topic(device_id, "cmd"), payload))
            s.add(r)
            s.commit()  # journaled before a byte is published
        for topic, payload in outgoing:
            self.publish(topic, payload)

    def _offer(self, s: Session, member: RolloutDevice, mv, artifacts: dict, encrypt: bool,
               windows: tuple[Window, ...] = ()) -> bytes | None:
        """The signed offer for one member, or None with the reason on the member (no artifact, undeliverable)."""
        device = s.get(Device, member.device_id)
        art = artifacts.get(device.profile) if device else None
        if device is None or art is None:
            member.reason, member.detail = "no_artifact", "no releasable artifact for this device's profile"
            return None
        try:
            return self.delivery.offer(s, member=member, device=device, mv=mv, art=art, encrypt=encrypt,
                                       windows=windows).to_bytes()
        except DeliveryError as e:
            member.reason, member.detail = "undeliverable", str(e)[:1000]
            return None

    def _join(self, s: Session, r: Rollout, artifacts: dict) -> None:
        """Devices that match the selector and are not members yet (dynamic rollouts): only non-members are read,
        as plain columns."""
        members = select(RolloutDevice.device_id).where(RolloutDevice.rollout_id == r.id)
        q = select(Device.id, Device.profile, Device.tags).where(  # type: ignore[call-overload]
            Device.decommissioned_at.is_(None), Device.id.not_in(members))  # type: ignore[union-attr,attr-defined]
        if r.selector.get("profiles"):
            q = q.where(Device.profile.in_(r.selector["profiles"]))  # type: ignore[attr-defined]
        if r.selector.get("devices"):
            q = q.where(Device.id.in_(r.selector["devices"]))  # type: ignore[attr-defined]
        wanted_tags = set(r.selector.get("tags") or [])
        added = 0
        for device_id, profile, tags in s.exec(q):
            if not wanted_tags <= set(tags or []):
                continue
            member = RolloutDevice(rollout_id=r.id or 0, device_id=device_id, job=new_job_id(r.id or 0))
            if profile not in artifacts:
                member.status, member.reason = MemberStatus.SKIPPED.value, "no_artifact"
                member.detail = f"no releasable artifact of this version for profile {profile}"
            s.add(member)
            added += 1
        if added:
            s.commit()

    def _evaluate(self, s: Session, r: Rollout, mv: ModelVersion | None, members: list[Member],
                  artifacts: dict) -> dict:
        gates = Gates(**r.gates)
        finished, failed = failure_counts([m.status.value for m in members])
        label = version_label(mv) if mv else ""
        installed = {m.device_id: m for m in members if m.status is MemberStatus.INSTALLED}
        requests = errors = 0
        before: list[LatencyHistogram] = []
        after: list[LatencyHistogram] = []
        if mv and installed and (gates.max_error_rate is not None or gates.max_p99_ratio is not None):
            # only this model's windows are read (each device reports one window per model); window_side decides
            windows = s.exec(select(TelemetryWindow).where(
                TelemetryWindow.device_id.in_(list(installed)),  # type: ignore[attr-defined]
                col(TelemetryWindow.model_version).startswith(f"{mv.name} ", autoescape=True))).all()
            for w in windows:
                m = installed[w.device_id]
                side = window_side(w.model_version, w.window_end, model=mv.name, version_label=label,
                                   offered_at=m.offered_at, finished_at=m.finished_at)
                h = latency_histogram(w)
                if side is Side.AFTER:
                    requests, errors = requests + w.requests, errors + w.errors
                    if h:
                        after.append(h)
                elif side is Side.BEFORE and h:
                    before.append(h)
        fidelities = [a.fidelity for a in artifacts.values() if a.fidelity is not None]
        ev = Evidence(finished=finished, failed=failed, requests_after=requests, errors_after=errors,
                      latency_before=merge(before), latency_after=merge(after),
                      fidelity=min(fidelities) if fidelities else None)
        result = evaluate(gates, ev).as_dict()
        result["at"] = time.time()
        return result

    def _halt(self, s: Session, r: Rollout, evaluation: dict) -> None:
        reasons = "; ".join(evaluation["reasons"])
        if r.on_gate_failure == "abort":
            r.state, r.finished_at = RolloutState.ABORTED.value, utcnow()
            r.notes = [*r.notes, f"gate failed ({reasons}): aborted, rolling back updated devices"][-50:]
            s.add(r)
            s.commit()
            self.roll_back(rollout_id=r.id or 0, reason=f"health gate failed: {reasons}")
        else:
            r.state = RolloutState.PAUSED.value
            r.notes = [*r.notes, f"gate failed ({reasons}): paused"][-50:]
            s.add(r)
            s.commit()
        log.warning("rollout %s halted by its gates: %s", r.id, reasons)

    def roll_back(self, rollout_id: int, reason: str) -> int:
        """Order every device this rollout installed (or is installing) back to its previous model."""
        with Session(self.db) as s:
            rows = s.exec(select(RolloutDevice).where(RolloutDevice.rollout_id == rollout_id)).all()
            targets = [(m.device_id, m.job) for m in rows
                       if m.status == MemberStatus.INSTALLED.value or MemberStatus(m.status) in IN_FLIGHT]
        for device_id, job in targets:
            order = messages.RollbackOrder(job=job, reason=reason[:500])
            self.publish(topics.topic(device_id, "cmd"), order.to_bytes())
        return len(targets)


def new_job_id(rollout_id: int) -> str:
    """A member's job id: unguessable (80 random bits), because a device's events and chunk requests name it. With
    ``r{rollout}-{device}`` a device never offered a job could guess it and report it installed or failed."""
    return f"r{rollout_id}-{secrets.token_hex(10)}"


def strategy_of(stored: dict) -> Strategy:
    """A stored strategy (JSON) as the planner's; rollouts stored before a field existed get its default."""
    return Strategy(**{**stored, "waves_percent": tuple(stored.get("waves_percent", ())),
                       "windows": tuple(Window.model_validate(w) for w in stored.get("windows", ()))})


def strategy_dict(strategy: Strategy) -> dict:
    d = asdict(strategy)
    d["waves_percent"] = list(d["waves_percent"])
    d["windows"] = [w.model_dump() for w in strategy.windows]
    return d
