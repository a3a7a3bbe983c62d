"""API tokens (admin) and the audit log (admin reads it)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Path, Query, Request, status
from sqlmodel import select

from fleet_server.auth import Admin, SessionDep, audit, issue_token
from fleet_server.limits import MAX_ID, MAX_OFFSET
from fleet_server.models import ApiToken, ApiTokenCreate, ApiTokenIssued, ApiTokenPublic, AuditEntry, utcnow

router = APIRouter(prefix="/v1", tags=["tokens and audit"])


@router.post("/tokens", status_code=status.HTTP_201_CREATED, response_model=ApiTokenIssued)
def create_token(body: ApiTokenCreate, session: SessionDep, admin: Admin):
    row, token = issue_token(session, name=body.name, role=body.role, created_by=admin.name)
    issued = ApiTokenIssued(**row.model_dump(), token=token)  # before the audit commit expires the row
    audit(session, actor=admin.name, action="token.create", target=f"token:{row.id}", detail=body.role.value)
    return issued


@router.get("/tokens", response_model=list[ApiTokenPublic])
def list_tokens(session: SessionDep, _: Admin):
    return session.exec(select(ApiToken).order_by(ApiToken.id)).all()


@router.delete("/tokens/{token_id}", response_model=ApiTokenPublic)
def revoke_token(token_id: Annotated[int, Path(ge=1, le=MAX_ID)], request: Request, session: SessionDep,
                 admin: Admin):
    row = session.get(ApiToken, token_id)
    if row is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no token {token_id}")
    if row.revoked_at is None:
        row.revoked_at = utcnow()
        session.add(row)
        session.commit()
        session.refresh(row)
        request.app.state.tokens.invalidate()
    public = ApiTokenPublic.model_validate(row, from_attributes=True)
    audit(session, actor=admin.name, action="token.revoke", target=f"token:{token_id}")
    return public


@router.get("/audit", response_model=list[AuditEntry])
def read_audit(session: SessionDep, _: Admin, limit: Annotated[int, Query(ge=1, le=1000)] = 100,
               offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0, actor: str | None = None):
    q = select(AuditEntry).order_by(AuditEntry.id.desc())  # type: ignore[union-attr]
    if actor:
        q = q.where(AuditEntry.actor == actor)
    return session.exec(q.offset(offset).limit(limit)).all()
