"""Artifacts: streamed uploads (operators), streamed downloads with HTTP Range (what agents resume with): served
here from the local store, redirected to a presigned URL from object storage."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, Request, status
from fastapi.responses import FileResponse, RedirectResponse

from fleet_server.artifacts import ArtifactError, checked
from fleet_server.auth import Operator, SessionDep, Viewer, audit

router = APIRouter(prefix="/v1/artifacts", tags=["artifacts"])


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
    path = store.local_path(sha256)
    if path is not None:
        return FileResponse(path, media_type="application/octet-stream", filename=sha256)
    return RedirectResponse(store.download_url(sha256), status_code=status.HTTP_307_TEMPORARY_REDIRECT)
