"""The model registry: versions of a source model with their calibration data, conversion jobs per profile
(run in the job process pool), and the artifacts and reports they produce."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path as FsPath
from typing import Annotated

import numpy as np
from fastapi import APIRouter, HTTPException, Path, Request, status
from sqlalchemy.exc import IntegrityError
from sqlmodel import select

from firmware_profiles import builtin_profile_ids
from fleet_server import drift
from fleet_server.auth import Operator, SessionDep, Viewer, audit
from fleet_server.limits import MAX_ID
from fleet_server.models import (
    ConversionJob,
    ConversionRequest,
    ConvertedArtifact,
    JobStatus,
    ModelVersion,
    ModelVersionCreate,
    Rollout,
)

router = APIRouter(prefix="/v1", tags=["models"])
REFERENCE_SAMPLES = 512  # calibration samples the drift reference is computed from


def _validate_source(store, body: ModelVersionCreate) -> tuple[list[str], list[str], dict]:
    """The source loads as a model and the calibration data fits it: checked now, not when a job runs. Returns the
    inputs, outputs and the calibration data's statistics per input (the drift reference)."""
    from converters.calibration import load_dataset
    from converters.errors import ConvertError
    from converters.source import load_source

    for sha in filter(None, (body.source_sha256, body.calibration_sha256, body.evaluation_sha256)):
        if not store.exists(sha):
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, f"no uploaded artifact {sha} "
                                "(POST /v1/artifacts first)")
    work = FsPath(tempfile.mkdtemp(prefix="fleet-validate-"))
    try:
        src = work / f"source.{body.source_format}"
        shutil.copyfile(store.path(body.source_sha256), src)
        calib = work / "calibration.npz"
        shutil.copyfile(store.path(body.calibration_sha256), calib)
        try:
            source = load_source(src, work / "w")
            data = load_dataset(calib, source.inputs, limit=REFERENCE_SAMPLES)
        except ConvertError as e:
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(e)) from e
        ref = drift.reference({i.name: np.concatenate([np.ravel(smp[i.name]) for smp in data.samples])
                               for i in source.inputs})
        return [i.describe() for i in source.inputs], [o.describe() for o in source.outputs], ref
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _version(session, name: str, version: str) -> ModelVersion:
    mv = session.exec(select(ModelVersion).where(ModelVersion.name == name, ModelVersion.version == version)).first()
    if mv is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no model {name} {version}")
    return mv


@router.post("/models", status_code=status.HTTP_201_CREATED, response_model=ModelVersion)
def create_model_version(body: ModelVersionCreate, request: Request, session: SessionDep, op: Operator):
    inputs, outputs, ref = _validate_source(request.app.state.artifacts, body)
    mv = ModelVersion(**body.model_dump(), inputs=inputs, outputs=outputs, reference_stats=ref, created_by=op.name)
    session.add(mv)
    try:
        session.commit()
    except IntegrityError as e:
        session.rollback()
        raise HTTPException(status.HTTP_409_CONFLICT, f"{body.name} {body.version} exists already") from e
    session.refresh(mv)
    result = ModelVersion.model_validate(mv, from_attributes=True)
    audit(session, actor=op.name, action="model.create", target=f"model:{body.name}:{body.version}")
    return result


@router.get("/models", response_model=list[ModelVersion])
def list_model_versions(session: SessionDep, _: Viewer, name: str | None = None):
    q = select(ModelVersion).order_by(ModelVersion.name, ModelVersion.id)
    if name:
        q = q.where(ModelVersion.name == name)
    return session.exec(q).all()


@router.get("/models/{name}/{version}", response_model=ModelVersion)
def get_model_version(name: str, version: str, session: SessionDep, _: Viewer):
    return _version(session, name, version)


@router.delete("/models/{name}/{version}", status_code=status.HTTP_204_NO_CONTENT)
def delete_model_version(name: str, version: str, session: SessionDep, op: Operator):
    mv = _version(session, name, version)
    busy = session.exec(select(ConversionJob).where(ConversionJob.model_version_id == mv.id,
                                                    ConversionJob.status.in_([JobStatus.QUEUED,  # type: ignore[attr-defined]
                                                                              JobStatus.RUNNING]))).first()
    if busy is not None:
        raise HTTPException(status.HTTP_409_CONFLICT, f"conversion job {busy.id} is still working on it")
    rollout = session.exec(select(Rollout).where(Rollout.model_version_id == mv.id)
                           .order_by(Rollout.id.desc())).first()  # type: ignore[union-attr]
    if rollout is not None:
        live = rollout.state in ("draft", "running", "paused")
        audit(session, actor=op.name, action="model.delete", target=f"model:{name}:{version}", outcome="denied",
              status_code=409, detail=f"rollout {rollout.id} ({rollout.state})")
        raise HTTPException(status.HTTP_409_CONFLICT,
                            f"rollout {rollout.id} ({rollout.state}) "
                            + ("is using this version" if live else "shipped this version: it stays for the record"))
    for row in session.exec(select(ConvertedArtifact).where(ConvertedArtifact.model_version_id == mv.id)).all():
        session.delete(row)
    for row in session.exec(select(ConversionJob).where(ConversionJob.model_version_id == mv.id)).all():
        session.delete(row)
    session.delete(mv)
    session.commit()
    audit(session, actor=op.name, action="model.delete", target=f"model:{name}:{version}")


@router.post("/models/{name}/{version}/conversions", status_code=status.HTTP_202_ACCEPTED,
             response_model=ConversionJob)
def request_conversion(name: str, version: str, body: ConversionRequest, request: Request, session: SessionDep,
                       op: Operator):
    mv = _version(session, name, version)
    unknown = sorted(set(body.profiles) - set(builtin_profile_ids()))
    if unknown:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, f"unknown profile(s) {unknown}")
    job = ConversionJob(model_version_id=mv.id, profiles=sorted(set(body.profiles)), created_by=op.name)
    session.add(job)
    session.commit()
    session.refresh(job)
    result = ConversionJob.model_validate(job, from_attributes=True)
    request.app.state.jobs.submit(job.id)
    audit(session, actor=op.name, action="conversion.request", target=f"job:{job.id}",
          detail=",".join(job.profiles))
    return result


@router.get("/jobs/{job_id}")
def get_job(job_id: Annotated[int, Path(ge=1, le=MAX_ID)], session: SessionDep, _: Viewer) -> dict:
    job = session.get(ConversionJob, job_id)
    if job is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no job {job_id}")
    artifacts = session.exec(select(ConvertedArtifact).where(ConvertedArtifact.job_id == job_id)
                             .order_by(ConvertedArtifact.id)).all()
    return {**job.model_dump(mode="json"), "artifacts": [a.model_dump(mode="json") for a in artifacts]}
