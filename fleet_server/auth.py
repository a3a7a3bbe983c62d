"""API tokens and the audit log: who may call what, and a record of every mutating call."""

from __future__ import annotations

import hashlib
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.concurrency import run_in_threadpool
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.engine import Engine
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


@dataclass(frozen=True)
class Principal:
    """Who is calling: an API token's id, name and role (never its secret)."""

    id: int
    name: str
    role: Role


class TokenCache:
    """Token hash → principal, for ``ttl_s`` seconds, so a read costs no database round trip for its caller.

    A revocation through this server clears the cache at once; another replica sees it within ``ttl_s``. Unknown
    tokens are not cached (a flood of random tokens cannot fill it)."""

    def __init__(self, engine: Engine, ttl_s: float = 5.0, max_entries: int = 10_000):
        self.engine, self.ttl_s, self.max_entries = engine, ttl_s, max_entries
        self._entries: dict[str, tuple[float, Principal]] = {}
        self._lock = threading.Lock()

    def cached(self, token_hash: str) -> Principal | None:
        hit = self._entries.get(token_hash)
        if hit is not None and hit[0] > time.monotonic():
            return hit[1]
        return None

    def lookup(self, token_hash: str) -> Principal | None:
        """From the database (blocking); caches a live token."""
        with Session(self.engine) as session:
            row = session.exec(select(ApiToken).where(ApiToken.token_hash == token_hash)).first()
            if row is None or row.revoked_at is not None or row.id is None:
                return None
            principal = Principal(id=row.id, name=row.name, role=row.role)
        with self._lock:
            if len(self._entries) >= self.max_entries:
                self._entries.clear()
            self._entries[token_hash] = (time.monotonic() + self.ttl_s, principal)
        return principal

    def invalidate(self) -> None:
        with self._lock:
            self._entries.clear()


async def caller(request: Request,
                 credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> Principal:
    """The API token behind the request, or 401. Async: a cache hit costs no thread hop."""
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "missing bearer token",
                            headers={"WWW-Authenticate": "Bearer"})
    cache: TokenCache = request.app.state.tokens
    token_hash = hash_secret(credentials.credentials)
    principal = cache.cached(token_hash) or await run_in_threadpool(cache.lookup, token_hash)
    if principal is None:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "invalid or revoked token",
                            headers={"WWW-Authenticate": "Bearer"})
    return principal


def _audit_denied(engine: Engine, **entry) -> None:
    with Session(engine) as session:
        audit(session, **entry)


def require(role: Role):
    """A dependency that admits callers with at least ``role``; 403 (audited) otherwise."""

    async def check(request: Request, principal: Annotated[Principal, Depends(caller)]) -> Principal:
        if RANK[principal.role] < RANK[role]:
            await run_in_threadpool(_audit_denied, request.app.state.engine, actor=principal.name,
                                    action=f"{request.method} {request.url.path}", outcome="denied", status_code=403,
                                    detail=f"needs {role.value}, has {principal.role.value}")
            raise HTTPException(status.HTTP_403_FORBIDDEN, f"this needs the {role.value} role")
        return principal

    return check


Viewer = Annotated[Principal, Depends(require(Role.VIEWER))]
Operator = Annotated[Principal, Depends(require(Role.OPERATOR))]
Admin = Annotated[Principal, Depends(require(Role.ADMIN))]
