"""Artifacts: streamed uploads (operators), streamed downloads with HTTP Range (what agents resume with): served
here from the local store, redirected to a presigned URL from object storage."""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, HTTPException, Path, Request, status
from fastapi.responses import FileResponse, RedirectResponse
from sqlmodel import select

from fleet_server.artifacts import ArtifactError, checked
from fleet_server.auth import Operator, SessionDep, Viewer, audit
from fleet_server.models import Rollout, RolloutDevice
from fleet_server.rollouts.delivery import OFFER_TTL

router = APIRouter(prefix="/v1/artifacts", tags=["artifacts"])
deliveries = APIRouter(prefix="/v1/deliveries", tags=["artifacts"])


@router.post("", status_code=status.HTTP_201_CREATED)
async def upload(request: Request, session: SessionDep, op: Operator) -> dict:
    """The request body is the artifact, streamed to disk through a sha256."""
    store = request.app.state.artifacts
    limit = request.app.state.settings.max_upload_bytes
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise HTTPException(status.HTTP_413_CONTENT_TOO_LARGE, f"upload exceeds the limit of {limit} bytes")
    try:
        sha, size = await store.put_stream(request.stream(), max_bytes=limit)
    except ArtifactError as e:
        raise HTTPException(status.HTTP_413_CONTENT_TOO_LARGE, str(e)) from e
    if size == 0:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, "empty upload")
    audit(session, actor=op.name, action="artifact.upload", target=f"artifact:{sha}", detail=f"{size} bytes")
    return {"sha256": sha, "size": size}


@router.get("/{sha256}", response_model=None)
def download(sha256: str, request: Request, _: Viewer) -> FileResponse | RedirectResponse:
    """A local artifact is served here (HTTP Range included); one in object storage is a redirect to a presigned
    URL, which the storage serves with Range itself (the bytes never pass through the API)."""
    store = request.app.state.artifacts
    try:
        checked(sha256)
        if not store.exists(sha256):
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no artifact {sha256}")
    except ArtifactError as e:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(e)) from e
    return _serve(store, sha256)


def _serve(store, sha256: str) -> FileResponse | RedirectResponse:
    path = store.local_path(sha256)
    if path is not None:
        return FileResponse(path, media_type="application/octet-stream", filename=sha256)
    return RedirectResponse(store.download_url(sha256), status_code=status.HTTP_307_TEMPORARY_REDIRECT)


@deliveries.get("/{job}/blobs/{sha256}", response_model=None)
def delivery_file(job: Annotated[str, Path(max_length=64)], sha256: Annotated[str, Path(max_length=64)],
                  request: Request, session: SessionDep) -> FileResponse | RedirectResponse:
    """A file of one device's update over HTTP (the offer's ``url`` names this folder when settings turn HTTP
    downloads on). No token: the job id in the path is the capability — random, sent only to that device over its
    own topic, and good only for the files its signed metadata lists, while its rollout runs and the offer lasts.
    Object storage answers with a presigned redirect (Range served by the storage); the local store serves the file
    here with Range. Either way the agent checks the length and sha256 it verified in the signed metadata."""
    member = session.exec(select(RolloutDevice).where(RolloutDevice.job == job)).first()
    nothing = HTTPException(status.HTTP_404_NOT_FOUND, "no such delivery")
    if member is None or (member.files or {}).get(f"blobs/{sha256}") != sha256:
        raise nothing
    rollout = session.get(Rollout, member.rollout_id)
    offered = member.offered_at or 0
    if rollout is None or rollout.state not in ("running", "paused") or \
            time.time() - offered > OFFER_TTL.total_seconds():
        raise nothing
    return _serve(request.app.state.artifacts, sha256)
