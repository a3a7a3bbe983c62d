"""Drift per model input with alerts, and A/B tests (two model versions over one cohort, with a comparison report)."""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, HTTPException, Path, Query, Request, status
from pydantic import BaseModel, ConfigDict
from pydantic import Field as PField
from sqlmodel import select

from fleet_server import insights
from fleet_server.auth import Operator, SessionDep, Viewer, audit
from fleet_server.limits import MAX_ID
from fleet_server.models import ABTest, Device, DriftAlert, ModelVersion, Rollout, utcnow
from fleet_server.rollouts.engine import releasable, selector_matches, strategy_dict
from fleet_server.rollouts.planner import RolloutState, Strategy
from fleet_server.routes.rollouts import GatesIn, Selector, StrategyIn

router = APIRouter(prefix="/v1", tags=["drift and A/B tests"])


def _mv(session, name: str, version: str) -> ModelVersion:
    mv = session.exec(select(ModelVersion).where(ModelVersion.name == name, ModelVersion.version == version)).first()
    if mv is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no model {name} {version}")
    return mv


@router.get("/models/{name}/{version}/drift")
def model_drift(name: str, version: str, session: SessionDep, _: Viewer,
                window_s: Annotated[float, Query(ge=1, le=30 * 86400)] = 900.0) -> dict:
    """PSI per input of the last ``window_s`` of fleet telemetry against the calibration data (< 0.1 stable,
    0.1–0.25 shift, ≥ 0.25 drift)."""
    return insights.drift_report(session, _mv(session, name, version), time.time() - window_s)


@router.get("/alerts", response_model=list[DriftAlert])
def alerts(session: SessionDep, _: Viewer, open_only: Annotated[bool, Query(alias="open")] = True):
    q = select(DriftAlert).order_by(DriftAlert.id.desc())  # type: ignore[union-attr]
    if open_only:
        q = q.where(DriftAlert.open == True)  # noqa: E712
    return session.exec(q.limit(500)).all()


class ModelRef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = PField(max_length=64)
    version: str = PField(max_length=64)


class ABTestCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{
        "name": "int8 head v2", "a": {"model": "classifier", "version": "1.0.0"},
        "b": {"model": "classifier", "version": "1.1.0"}, "selector": {"tags": ["site:lab"]},
        "split_percent": 50}]})
    name: str = PField(default="", max_length=100)
    a: ModelRef
    b: ModelRef
    selector: Selector = Selector()
    split_percent: float = PField(default=50.0, gt=0, lt=100)
    strategy: StrategyIn = StrategyIn(canary_percent=100, waves_percent=[])
    gates: GatesIn = GatesIn()


@router.post("/abtests", status_code=status.HTTP_201_CREATED)
def create_abtest(body: ABTestCreate, request: Request, session: SessionDep, op: Operator) -> dict:
    """Splits the cohort by a stable hash of the device id and ships each arm's version as its own rollout."""
    mv_a, mv_b = _mv(session, body.a.model, body.a.version), _mv(session, body.b.model, body.b.version)
    if mv_a.id == mv_b.id:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, "an A/B test needs two different versions")
    for mv in (mv_a, mv_b):
        if not releasable(session, mv.id):
            raise HTTPException(status.HTTP_409_CONFLICT, f"{mv.name} {mv.version} has no releasable artifact")
    selector = body.selector.model_dump()
    cohort = sorted(d.id for d in session.exec(select(Device)) if selector_matches(selector, d))
    if len(cohort) < 2:
        raise HTTPException(status.HTTP_409_CONFLICT, f"the selector matches {len(cohort)} device(s); an A/B test "
                                                      "needs at least two")
    test = ABTest(name=body.name, model_a_id=mv_a.id, model_b_id=mv_b.id, selector=selector,
                  split_percent=body.split_percent, created_by=op.name)
    session.add(test)
    session.commit()
    session.refresh(test)
    test.devices_a, test.devices_b = insights.split(test.id or 0, cohort, body.split_percent)
    strategy = strategy_dict(Strategy(**{**body.strategy.model_dump(),
                                         "waves_percent": tuple(body.strategy.waves_percent)}))
    arms = []
    for arm, mv, devices in (("A", mv_a, test.devices_a), ("B", mv_b, test.devices_b)):
        r = Rollout(name=f"A/B {test.id} arm {arm}", model_version_id=mv.id, state=RolloutState.RUNNING.value,
                    selector={**selector, "devices": devices}, strategy=strategy, gates=body.gates.model_dump(),
                    created_by=op.name, started_at=utcnow())
        session.add(r)
        session.commit()
        session.refresh(r)
        arms.append(r.id)
    test.rollout_a_id, test.rollout_b_id, test.started_at = arms[0], arms[1], time.time()
    session.add(test)
    session.commit()
    audit(session, actor=op.name, action="abtest.create", target=f"abtest:{test.id}",
          detail=f"A={mv_a.version} ({len(test.devices_a)}) B={mv_b.version} ({len(test.devices_b)})")
    engine = getattr(request.app.state, "rollouts", None)
    if engine is not None:
        engine.wake()
    return {"id": test.id, "rollouts": {"a": arms[0], "b": arms[1]}, "devices_a": test.devices_a,
            "devices_b": test.devices_b}


@router.get("/abtests")
def list_abtests(session: SessionDep, _: Viewer) -> list[dict]:
    return [t.model_dump(mode="json") for t in session.exec(select(ABTest).order_by(ABTest.id.desc()).limit(200))]  # type: ignore[union-attr]


@router.get("/abtests/{test_id}/report")
def abtest_report(test_id: Annotated[int, Path(ge=1, le=MAX_ID)], session: SessionDep, _: Viewer) -> dict:
    test = session.get(ABTest, test_id)
    if test is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no A/B test {test_id}")
    try:
        return insights.ab_report(session, test)
    except ValueError as e:
        raise HTTPException(status.HTTP_409_CONFLICT, str(e)) from e
