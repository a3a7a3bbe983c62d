"""Rollouts: create, start, pause, resume, abort, rollback; progress, gate verdicts and per-device status."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, HTTPException, Path, Query, Request, status
from pydantic import BaseModel, ConfigDict
from pydantic import Field as PField
from sqlalchemy import func
from sqlmodel import select

from fleet_protocol.windows import Window
from fleet_server.auth import Operator, SessionDep, Viewer, audit
from fleet_server.limits import MAX_ID, MAX_OFFSET
from fleet_server.models import ModelVersion, Rollout, RolloutDevice, utcnow
from fleet_server.rollouts import service
from fleet_server.rollouts.planner import MemberStatus, RolloutState

router = APIRouter(prefix="/v1", tags=["rollouts"])
RolloutId = Annotated[int, Path(ge=1, le=MAX_ID)]


class Selector(BaseModel):
    model_config = ConfigDict(extra="forbid")
    profiles: list[str] = PField(default=[], max_length=32)
    tags: list[str] = PField(default=[], max_length=32, description="every tag must be present (groups are tags)")
    devices: list[str] = PField(default=[], max_length=10_000)


class StrategyIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    canary_percent: float = PField(default=10.0, gt=0, le=100)
    waves_percent: list[float] = PField(default=[50.0, 100.0], max_length=20)
    rate_per_minute: int = PField(default=1000, ge=1, le=1_000_000)
    soak_s: float = PField(default=0.0, ge=0, le=7 * 86400)
    stage_timeout_s: float = PField(default=3600.0, gt=0, le=30 * 86400)
    require_approval: bool = PField(default=False, description="each wave after the canary waits for "
                                    "POST /v1/rollouts/{id}/approve")
    ramp_factor: float = PField(default=1.0, ge=1, le=100, description="the rate grows by this factor for every "
                                "ramp_every devices installed since the last failure; a failure resets it")
    ramp_every: int = PField(default=0, ge=0, le=1_000_000)
    max_rate_per_minute: int | None = PField(default=None, ge=1, le=1_000_000)
    windows: list[Window] = PField(default=[], max_length=16, description="maintenance windows (cron in tz + "
                                   "duration_s): devices download and stage at once, switch only inside one")


class GatesIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_failure_share: float = PField(default=0.2, ge=0, le=1)
    min_finished: int = PField(default=1, ge=1, le=1_000_000)
    max_error_rate: float | None = PField(default=None, ge=0, le=1)
    max_p99_ratio: float | None = PField(default=None, gt=0, le=1000)
    min_requests: int = PField(default=20, ge=1, le=10_000_000)
    min_fidelity: float | None = PField(default=None, ge=-1, le=1)


class RolloutCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{
        "name": "classifier 1.1 to the lab", "model": "defect-classifier", "version": "1.1.0",
        "selector": {"profiles": ["rpi5"], "tags": ["site:lab"]},
        "strategy": {"canary_percent": 10, "waves_percent": [50, 100], "rate_per_minute": 100, "soak_s": 300},
        "gates": {"max_failure_share": 0.1, "min_finished": 2, "max_p99_ratio": 1.5},
        "on_gate_failure": "abort", "start": True}]})
    name: str = PField(default="", max_length=100)
    model: str = PField(max_length=64)
    version: str = PField(max_length=64)
    selector: Selector = Selector()
    strategy: StrategyIn = StrategyIn()
    gates: GatesIn = GatesIn()
    on_gate_failure: Literal["pause", "abort"] = "pause"
    encrypt: bool = False
    start: bool = False


class RolloutPublic(BaseModel):
    id: int
    name: str
    model: str
    version: str
    state: str
    stage: int
    selector: dict
    strategy: dict
    gates: dict
    on_gate_failure: str
    encrypt: bool
    counts: dict[str, int]
    evaluation: dict
    notes: list[str]
    approved_stage: int = 0
    waiting_for_approval: int | None = None  # the stage that waits for an operator (require_approval)
    retry_of: int | None = None


class MemberPublic(BaseModel):
    device_id: str
    status: str
    reason: str
    detail: str
    delivery: str
    bytes_offered: int
    offered_at: float | None
    finished_at: float | None
    timings: dict


def _public(session, r: Rollout) -> RolloutPublic:
    mv = session.get(ModelVersion, r.model_version_id)
    counts = dict(session.exec(select(RolloutDevice.status, func.count())  # type: ignore[call-overload]
                               .where(RolloutDevice.rollout_id == r.id).group_by(RolloutDevice.status)).all())
    return RolloutPublic(id=r.id, name=r.name, model=mv.name if mv else "", version=mv.version if mv else "",
                         state=r.state, stage=r.stage, selector=r.selector, strategy=r.strategy, gates=r.gates,
                         on_gate_failure=r.on_gate_failure, encrypt=r.encrypt, counts=counts,
                         evaluation=r.evaluation, notes=r.notes, approved_stage=r.approved_stage,
                         waiting_for_approval=(r.evaluation or {}).get("awaiting_approval")
                         if r.state == RolloutState.RUNNING.value else None, retry_of=r.retry_of)


def _rollout(session, rollout_id: int) -> Rollout:
    r = session.get(Rollout, rollout_id)
    if r is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no rollout {rollout_id}")
    return r


@router.post("/rollouts", status_code=status.HTTP_201_CREATED, response_model=RolloutPublic)
def create_rollout(body: RolloutCreate, request: Request, session: SessionDep, op: Operator):
    try:
        r = service.create_rollout(session, model=body.model, version=body.version,
                                   selector=body.selector.model_dump(), strategy=body.strategy.model_dump(),
                                   gates=body.gates.model_dump(), actor=op.name, name=body.name,
                                   on_gate_failure=body.on_gate_failure, encrypt=body.encrypt, start=body.start)
    except service.RolloutRefusedError as e:
        raise refused(e) from e
    wake_engine(request)
    return _public(session, r)


@router.get("/rollouts", response_model=list[RolloutPublic])
def list_rollouts(session: SessionDep, _: Viewer, state: str | None = None,
                  offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
                  limit: Annotated[int, Query(ge=1, le=200)] = 50):
    q = select(Rollout).order_by(Rollout.id.desc())  # type: ignore[union-attr]
    if state:
        q = q.where(Rollout.state == state)
    return [_public(session, r) for r in session.exec(q.offset(offset).limit(limit))]


@router.get("/rollouts/{rollout_id}", response_model=RolloutPublic)
def get_rollout(rollout_id: RolloutId, session: SessionDep, _: Viewer):
    return _public(session, _rollout(session, rollout_id))


@router.get("/rollouts/{rollout_id}/devices", response_model=list[MemberPublic])
def rollout_devices(rollout_id: RolloutId, session: SessionDep, _: Viewer, status_: Annotated[
        str | None, Query(alias="status")] = None, offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
        limit: Annotated[int, Query(ge=1, le=1000)] = 200):
    _rollout(session, rollout_id)
    q = select(RolloutDevice).where(RolloutDevice.rollout_id == rollout_id).order_by(RolloutDevice.device_id)
    if status_:
        q = q.where(RolloutDevice.status == status_)
    return [MemberPublic.model_validate(m, from_attributes=True) for m in session.exec(q.offset(offset).limit(limit))]


TRANSITIONS = {  # operation → (states it applies to, the state after)
    "start": ({RolloutState.DRAFT}, RolloutState.RUNNING),
    "pause": ({RolloutState.RUNNING}, RolloutState.PAUSED),
    "resume": ({RolloutState.PAUSED}, RolloutState.RUNNING),
    "abort": ({RolloutState.DRAFT, RolloutState.RUNNING, RolloutState.PAUSED}, RolloutState.ABORTED),
    "rollback": ({RolloutState.RUNNING, RolloutState.PAUSED, RolloutState.ABORTED, RolloutState.COMPLETED},
                 RolloutState.ABORTED),
}


@router.post("/rollouts/{rollout_id}/approve", response_model=RolloutPublic)
def approve(rollout_id: RolloutId, request: Request, session: SessionDep, op: Operator):
    """Let the wave a rollout with ``require_approval`` waits at go ahead (audited)."""
    r = _rollout(session, rollout_id)
    waiting = (r.evaluation or {}).get("awaiting_approval")
    if r.state not in (RolloutState.RUNNING.value, RolloutState.PAUSED.value) or waiting is None \
            or waiting <= r.approved_stage:
        audit(session, actor=op.name, action="rollout.approve", target=f"rollout:{r.id}", outcome="denied",
              status_code=409, detail=f"{r.state}, nothing waits for approval")
        raise HTTPException(status.HTTP_409_CONFLICT, "this rollout is not waiting for an approval")
    r.approved_stage = waiting
    r.evaluation = {**r.evaluation, "awaiting_approval": None}
    r.notes = [*r.notes, f"stage {waiting} approved by {op.name}"][-50:]
    session.add(r)
    session.commit()
    session.refresh(r)
    audit(session, actor=op.name, action="rollout.approve", target=f"rollout:{r.id}", detail=f"stage {waiting}")
    wake_engine(request)
    return _public(session, r)


@router.post("/rollouts/{rollout_id}/retry", status_code=status.HTTP_201_CREATED, response_model=RolloutPublic)
def retry(rollout_id: RolloutId, request: Request, session: SessionDep, op: Operator):
    """A new rollout, started, of the same version and plan to the devices that failed in a paused or finished one
    (not those an operator's rollback took back): a new attempt with its own counts (``retry_of`` names the
    original)."""
    r = _rollout(session, rollout_id)
    if r.state not in (RolloutState.PAUSED.value, RolloutState.COMPLETED.value, RolloutState.ABORTED.value):
        raise HTTPException(status.HTTP_409_CONFLICT, f"cannot retry a rollout that is {r.state}: pause it first")
    failed = session.exec(select(RolloutDevice.device_id).where(
        RolloutDevice.rollout_id == r.id,
        RolloutDevice.status == MemberStatus.FAILED.value).order_by(RolloutDevice.device_id)).all()
    if not failed:
        raise HTTPException(status.HTTP_409_CONFLICT, f"rollout {r.id} has no failed device to retry")
    again = session.exec(select(Rollout.id).where(Rollout.retry_of == r.id)).first()
    if again is not None:
        raise HTTPException(status.HTTP_409_CONFLICT, f"rollout {r.id} was retried already as rollout {again}")
    mv = session.get(ModelVersion, r.model_version_id)
    first, attempts = _first_attempt(session, r)
    if r.state == RolloutState.PAUSED.value:  # the retry takes its devices over: the original stops offering
        r.state, r.finished_at = RolloutState.ABORTED.value, utcnow()
        r.notes = [*r.notes, f"stopped by {op.name}: its failed devices are retried"][-50:]
        session.add(r)
        session.commit()
    try:
        new = service.create_rollout(session, model=mv.name, version=mv.version,
                                     selector={"profiles": [], "tags": [], "devices": list(failed)},
                                     strategy=r.strategy, gates=r.gates, actor=op.name,
                                     name=f"{first.name or f'rollout {first.id}'} (attempt {attempts + 1})",
                                     on_gate_failure=r.on_gate_failure, encrypt=r.encrypt, start=True,
                                     retry_of=r.id)
    except service.RolloutRefusedError as e:
        raise refused(e) from e
    wake_engine(request)
    return _public(session, new)


def _first_attempt(session, r: Rollout) -> tuple[Rollout, int]:
    """The rollout this line of retries started from, and how many attempts the line has made up to ``r``."""
    first, n = r, 1
    while first.retry_of is not None:
        first, n = session.get(Rollout, first.retry_of), n + 1
    return first, n


@router.post("/rollouts/{rollout_id}/{operation}", response_model=RolloutPublic)
def operate(rollout_id: RolloutId, operation: Literal["start", "pause", "resume", "abort", "rollback"],
            request: Request, session: SessionDep, op: Operator):
    """start / pause / resume / abort (no new offers; devices keep what they run) / rollback (abort, and order every
    device this rollout updated back to its previous model)."""
    r = _rollout(session, rollout_id)
    allowed, after = TRANSITIONS[operation]
    if RolloutState(r.state) not in allowed:
        audit(session, actor=op.name, action=f"rollout.{operation}", target=f"rollout:{r.id}", outcome="denied",
              status_code=409, detail=f"rollout is {r.state}")
        raise HTTPException(status.HTTP_409_CONFLICT, f"cannot {operation} a rollout that is {r.state}")
    r.state = after.value
    if operation == "start":
        r.started_at = utcnow()
    if after is RolloutState.ABORTED:
        r.finished_at = r.finished_at or utcnow()
    r.notes = [*r.notes, f"{operation} by {op.name}"][-50:]
    session.add(r)
    session.commit()
    session.refresh(r)
    ordered = 0
    if operation == "rollback":
        ordered = request.app.state.rollouts.roll_back(r.id, reason=f"rollback ordered by {op.name}")
    audit(session, actor=op.name, action=f"rollout.{operation}", target=f"rollout:{r.id}",
          detail=f"{ordered} device(s) ordered back" if operation == "rollback" else "")
    wake_engine(request)
    return _public(session, r)


def refused(e: service.RolloutRefusedError) -> HTTPException:
    return HTTPException(e.status, str(e))


def wake_engine(request: Request) -> None:
    """Tell the rollout engine (absent in tests that run the API alone) to look now, not at its next tick."""
    engine = getattr(request.app.state, "rollouts", None)
    if engine is not None:
        engine.wake()
