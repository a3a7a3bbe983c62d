"""API tokens and the audit log: who may call what, and a record of every mutating call."""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlmodel import Session, select

from fleet_server.models import RANK, ApiToken, AuditEntry, Role

TOKEN_PREFIX = "eft_"
_bearer = HTTPBearer(auto_error=False)


def get_session(request: Request) -> Iterator[Session]:
    """One session per request, from the app's engine (built by create_app, never global)."""
    with Session(request.app.state.engine) as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]


def new_secret(prefix: str, nbytes: int = 32) -> str:
    return prefix + secrets.token_urlsafe(nbytes)


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def issue_token(session: Session, *, name: str, role: Role, created_by: str, nbytes: int = 32) -> tuple[ApiToken, str]:
    token = new_secret(TOKEN_PREFIX, nbytes)
    row = ApiToken(name=name, role=role, token_hash=hash_secret(token), created_by=created_by)
    session.add(row)
    session.commit()
    session.refresh(row)
    return row, token


def audit(session: Session, *, actor: str, action: str, target: str = "", outcome: str = "ok", status_code: int = 200,
          detail: str = "") -> None:
    session.add(AuditEntry(actor=actor, action=action, target=target[:200], outcome=outcome, status=status_code,
                           detail=detail[:1000]))
    session.commit()


def caller(session: SessionDep,
           credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> ApiToken:
    """The API token behind the request, or 401."""
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "missing bearer token",
                            headers={"WWW-Authenticate": "Bearer"})
    row = session.exec(select(ApiToken).where(ApiToken.token_hash == hash_secret(credentials.credentials))).first()
    if row is None or row.revoked_at is not None:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "invalid or revoked token",
                            headers={"WWW-Authenticate": "Bearer"})
    return row


def require(role: Role):
    """A dependency that admits callers with at least ``role``; 403 (audited) otherwise."""

    def check(request: Request, session: SessionDep, token: Annotated[ApiToken, Depends(caller)]) -> ApiToken:
        if RANK[token.role] < RANK[role]:
            audit(session, actor=token.name, action=f"{request.method} {request.url.path}",
                  outcome="denied", status_code=403, detail=f"needs {role.value}, has {token.role.value}")
            raise HTTPException(status.HTTP_403_FORBIDDEN, f"this needs the {role.value} role")
        return token

    return check


Viewer = Annotated[ApiToken, Depends(require(Role.VIEWER))]
Operator = Annotated[ApiToken, Depends(require(Role.OPERATOR))]
Admin = Annotated[ApiToken, Depends(require(Role.ADMIN))]
