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
from fleet_server.models import ABTest, Device, DriftAlert, ModelVersion
from fleet_server.rollouts import service
from fleet_server.rollouts.engine import selector_matches
from fleet_server.routes.rollouts import GatesIn, Selector, StrategyIn, refused, wake_engine

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
    if (body.a.model, body.a.version) == (body.b.model, body.b.version):
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, "an A/B test needs two different versions")
    strategy, gates = body.strategy.model_dump(), body.gates.model_dump()
    try:  # both arms pass every check before anything is stored
        arm_a = service.check_release(session, model=body.a.model, version=body.a.version, strategy=strategy,
                                      gates=gates)
        arm_b = service.check_release(session, model=body.b.model, version=body.b.version, strategy=strategy,
                                      gates=gates)
    except service.RolloutRefusedError as e:
        raise refused(e) from e
    selector = body.selector.model_dump()
    cohort = sorted(d.id for d in session.exec(select(Device)) if selector_matches(selector, d))
    if len(cohort) < 2:
        raise HTTPException(status.HTTP_409_CONFLICT, f"the selector matches {len(cohort)} device(s); an A/B test "
                                                      "needs at least two")
    test = ABTest(name=body.name, model_a_id=arm_a.model_version_id, model_b_id=arm_b.model_version_id,
                  selector=selector, split_percent=body.split_percent, created_by=op.name)
    session.add(test)
    session.commit()
    session.refresh(test)
    test.devices_a, test.devices_b = insights.split(test.id or 0, cohort, body.split_percent)
    arms = []
    for arm, ref, devices in (("A", body.a, test.devices_a), ("B", body.b, test.devices_b)):
        try:
            r = service.create_rollout(session, model=ref.model, version=ref.version, name=f"A/B {test.id} arm {arm}",
                                       selector={**selector, "devices": devices}, strategy=strategy, gates=gates,
                                       actor=op.name, start=True)
        except service.RolloutRefusedError as e:  # checked above in this session: a version deleted meanwhile
            raise refused(e) from e
        arms.append(r.id)
    test.rollout_a_id, test.rollout_b_id, test.started_at = arms[0], arms[1], time.time()
    session.add(test)
    session.commit()
    audit(session, actor=op.name, action="abtest.create", target=f"abtest:{test.id}",
          detail=f"A={body.a.version} ({len(test.devices_a)}) B={body.b.version} ({len(test.devices_b)})")
    wake_engine(request)
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
