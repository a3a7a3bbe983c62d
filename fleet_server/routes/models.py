"""The model registry: versions of a source model with their calibration data, conversion jobs per profile
(run in the job process pool), and the artifacts and reports they produce."""

from __future__ import annotations

import logging
from pathlib import Path as FsPath
from typing import Annotated

import numpy as np
from fastapi import APIRouter, HTTPException, Path, Request, status
from pydantic import BaseModel, ValidationError
from pydantic import Field as PField
from sqlalchemy.exc import IntegrityError
from sqlmodel import select

from firmware_profiles import builtin_profile_ids
from fleet_server import drift
from fleet_server.auth import Operator, SessionDep, Viewer, audit
from fleet_server.limits import MAX_ID
from fleet_server.models import (
    ConversionJob,
    ConversionPart,
    ConversionRequest,
    ConvertedArtifact,
    JobStatus,
    ModelVersion,
    ModelVersionCreate,
    Rollout,
    utcnow,
)
from fleet_server.sandbox import (
    Sandbox,
    SandboxConfig,
    SandboxCrashError,
    SandboxError,
    SandboxLimitError,
    out_of_memory,
)

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1", tags=["models"])
REFERENCE_SAMPLES = 512  # calibration samples the drift reference is computed from


class _Reference(BaseModel):
    """One input's drift reference, as the sandboxed child reports it (checked: the child is not trusted)."""

    edges: list[float] = PField(max_length=drift.BINS + 1)
    shares: list[float] = PField(max_length=drift.BINS)
    mean: float
    std: float
    count: int


class _Validated(BaseModel):
    inputs: list[Annotated[str, PField(max_length=1000)]] = PField(max_length=10_000)
    outputs: list[Annotated[str, PField(max_length=1000)]] = PField(max_length=10_000)
    reference: dict[Annotated[str, PField(max_length=1000)], _Reference] = PField(max_length=10_000)


def _validate_source(store, body: ModelVersionCreate, sandbox: SandboxConfig) -> tuple[list[str], list[str], dict]:
    """The source loads as a model and the calibration data fits it: checked now, not when a job runs. Returns the
    inputs, outputs and the calibration data's statistics per input (the drift reference). The checking runs in a
    sandboxed child (fleet_server/sandbox.py): parsing an upload never runs in the server, next to its keys."""
    for sha in filter(None, (body.source_sha256, body.calibration_sha256, body.evaluation_sha256)):
        if not store.exists(sha):
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, f"no uploaded artifact {sha} "
                                "(POST /v1/artifacts first)")
    try:
        with Sandbox(sandbox, "validation") as box:
            args = {"source": box.add_stream(store.open(body.source_sha256), f"source.{body.source_format}"),
                    "calibration": box.add_stream(store.open(body.calibration_sha256), "calibration.npz"),
                    "reference_samples": REFERENCE_SAMPLES}
            answer = box.run("fleet_server.routes.models:validate_upload", args)
    except (SandboxLimitError, SandboxCrashError) as e:  # the upload took the child down: the upload's fault
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(e)) from e
    except SandboxError as e:
        log.error("model validation unavailable: %s", e)
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "model validation is unavailable") from e
    if isinstance(answer, dict) and isinstance(answer.get("error"), str):
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, answer["error"][:2000])
    try:
        checked = _Validated.model_validate(answer)
    except ValidationError as e:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, "validation gave a malformed answer") from e
    return checked.inputs, checked.outputs, {k: v.model_dump() for k, v in checked.reference.items()}


def validate_upload(args: dict, progress) -> dict:
    """The sandboxed child's side of :func:`_validate_source`: only input files in, plain data out."""
    from converters.calibration import load_dataset
    from converters.errors import ConvertError
    from converters.source import load_source

    try:
        here = FsPath.cwd()  # the sandbox's work folder
        source = load_source(here / args["source"], here / "work")
        data = load_dataset(here / args["calibration"], source.inputs, limit=args["reference_samples"])
    except ConvertError as e:
        if out_of_memory(e):
            raise MemoryError from e
        return {"error": str(e)}
    ref = drift.reference({i.name: np.concatenate([np.ravel(smp[i.name]) for smp in data.samples])
                           for i in source.inputs})
    return {"inputs": [i.describe() for i in source.inputs], "outputs": [o.describe() for o in source.outputs],
            "reference": ref}


def _version(session, name: str, version: str) -> ModelVersion:
    mv = session.exec(select(ModelVersion).where(ModelVersion.name == name, ModelVersion.version == version)).first()
    if mv is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no model {name} {version}")
    return mv


@router.post("/models", status_code=status.HTTP_201_CREATED, response_model=ModelVersion)
def create_model_version(body: ModelVersionCreate, request: Request, session: SessionDep, op: Operator):
    sandbox = SandboxConfig.from_settings(request.app.state.settings)
    inputs, outputs, ref = _validate_source(request.app.state.artifacts, body, sandbox)
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
        for part in session.exec(select(ConversionPart).where(ConversionPart.job_id == row.id)).all():
            session.delete(part)
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
def get_job(job_id: Annotated[int, Path(ge=1, le=MAX_ID)], request: Request, session: SessionDep,
            _: Viewer) -> dict:
    job = session.get(ConversionJob, job_id)
    if job is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no job {job_id}")
    if job.status == JobStatus.QUEUED:  # waiting for a worker that may not exist: it says so
        request.app.state.jobs.check()
        session.refresh(job)
    artifacts = session.exec(select(ConvertedArtifact).where(ConvertedArtifact.job_id == job_id)
                             .order_by(ConvertedArtifact.id)).all()
    parts = session.exec(select(ConversionPart).where(ConversionPart.job_id == job_id)
                         .order_by(ConversionPart.id)).all()
    return {**job.model_dump(mode="json"), "artifacts": [a.model_dump(mode="json") for a in artifacts],
            "parts": [p.model_dump(mode="json") for p in parts]}


@router.post("/jobs/{job_id}/cancel")
def cancel_job(job_id: Annotated[int, Path(ge=1, le=MAX_ID)], request: Request, session: SessionDep,
               op: Operator) -> dict:
    """Stop a conversion job: waiting parts leave the queue, a running conversion's child is killed."""
    job = session.get(ConversionJob, job_id, with_for_update=True)
    if job is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no job {job_id}")
    if job.status not in (JobStatus.QUEUED, JobStatus.RUNNING):
        raise HTTPException(status.HTTP_409_CONFLICT, f"job {job_id} is {job.status.value}: nothing to cancel")
    job.status, job.finished_at, job.progress = JobStatus.CANCELLED, utcnow(), "cancelled"
    session.add(job)
    session.commit()
    request.app.state.jobs.cancel(job_id)
    audit(session, actor=op.name, action="conversion.cancel", target=f"job:{job_id}")
    session.refresh(job)
    return job.model_dump(mode="json")
