"""The fleet's root metadata, every version: agents pin version 1 at enrollment and follow the chain."""

from __future__ import annotations

import json

from fastapi import APIRouter, HTTPException, Request, status

from fleet_server import keys

router = APIRouter(prefix="/v1/trust", tags=["trust"])


@router.get("/roots")
def roots(request: Request) -> list[dict]:
    """Public: root metadata is signed, and an agent verifies each version against the one before."""
    try:
        return [json.loads(raw) for raw in keys.root_versions(request.app.state.settings.data_dir)]
    except keys.KeysError as e:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, str(e)) from e
